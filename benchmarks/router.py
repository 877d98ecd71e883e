"""Router decision time: ``classify()`` (rules + hashed features + logistic regression) per prompt.

Loads the shipped model once (timed), runs one warm-up pass over the held-out prompts, then
``--rounds`` timed passes (default 20), timing each ``classify()`` call on its own with
``time.perf_counter_ns()``. Prints p50/p99/max over all calls, the same split by how the decision
was made (rule, model or default), two long cases: a request in plain prose (about 1,900
characters) and, per category, its held-out prompts joined to ``--long`` characters (dense in the
words the rules look for: a worst case; the rules read the first 2,000 characters, the features
the first 1,000), and the held-out accuracy with its confusion matrix.

Usage::

    .venv/bin/python benchmarks/router.py [--rounds 20] [--long 4000]

Target: p50 decision time <= 1 ms on a 2-core machine. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from typhon.models._classify import (  # noqa: E402
    DEFAULT_MODEL_PATH,
    Classifier,
    classify,
    evaluate,
    load_examples,
)

TARGET_P50_MS = 1.0
# A long request in plain prose (about 1,900 characters), written for this benchmark.
LONG_PROSE = (
    "Last Tuesday our team noticed that the nightly research runs were finishing about forty "
    "minutes later than usual, and by Thursday the delay had grown to almost two hours. Nothing in "
    "the deployment had changed that week as far as anyone could tell: the same three worker pools,"
    " the same models, the same schedule. The first thing we checked was the GPU temperature, "
    "because the rack sits in a closet that gets warm in the afternoon, but the cards stayed below "
    "seventy degrees the whole time. Then we looked at the queue lengths and saw that the research "
    "pool was backing up while the development pool sat mostly idle, which suggested that the "
    "scheduler was not spreading work the way we expected. One of our engineers pointed out that "
    "the new literature review crew issues many more model calls per run than the older ones, and "
    "that each of those calls holds a slot for the whole time it streams tokens back. Another "
    "person argued that the real problem is memory bandwidth on the older card, since the seventy "
    "billion parameter model is split across two GPUs and the slower one sets the pace for both. We"
    " also found that the backup job, which compresses the run database and copies it to the NAS, "
    "now overlaps with the start of the nightly batch because it takes longer as the database "
    "grows. Finally, the electricity provider changed our tariff, so running the batch earlier in "
    "the evening would cost a bit more, and someone wants to move part of the work to a rented "
    "cloud GPU instead. I would like a careful assessment of which of these explanations is most "
    "likely, what evidence we should collect to tell them apart, how each option would affect cost "
    "and reliability over the next year, and what you would recommend we change first. Please "
    "consider the trade-offs between buying another card, rescheduling the jobs, and limiting "
    "concurrency per crew, and be explicit about the assumptions you make along the way."
)


def percentile(sorted_ns: list[int], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted nanosecond samples, in milliseconds."""
    rank = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[rank] / 1e6


def time_calls(texts: list[str], model: Classifier, rounds: int) -> dict[str, list[int]]:
    """Nanoseconds per ``classify()`` call, all together and by the decision's source."""
    for text in texts:  # warm-up: regex cache, word cache, numpy's first calls
        classify(text, classifier=model)
    samples: dict[str, list[int]] = {"all": []}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for text in texts:
            t0 = clock()
            decision = classify(text, classifier=model)
            took = clock() - t0
            samples["all"].append(took)
            samples.setdefault(decision.source, []).append(took)
    return samples


def report(label: str, ns: list[int]) -> tuple[float, float]:
    """Print a row (µs) and return p50 and p99 in milliseconds."""
    ns = sorted(ns)
    p50, p99 = percentile(ns, 0.50), percentile(ns, 0.99)
    print(
        f"{label:<28}{len(ns):>7}{p50 * 1000:>10.0f}{p99 * 1000:>10.0f}{ns[-1] / 1000:>10.0f}"
        f"{statistics.fmean(ns) / 1000:>10.0f}"
    )
    return p50, p99


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time the router's classify() per prompt.")
    p.add_argument("--rounds", type=int, default=20, help="timed passes over held-out prompts")
    p.add_argument("--long", type=int, default=4000, help="characters of the joined-prompts case")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = Classifier.load()
    load_ms = (time.perf_counter() - t0) * 1000
    size_kib = DEFAULT_MODEL_PATH.stat().st_size / 1024
    heldout = load_examples("heldout")
    texts = [text for text, _ in heldout]
    chars = sorted(len(t) for t in texts)
    print(
        f"router decision time: {len(texts)} held-out prompts x {args.rounds} rounds + 1 warm-up,"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"model: {DEFAULT_MODEL_PATH.name} {size_kib:.0f} KiB, dim {model.dim},"
        f" loaded in {load_ms:.1f} ms; prompt length median {chars[len(chars) // 2]} chars,"
        f" max {chars[-1]}"
    )
    header = f"{'[µs]':<28}{'calls':>7}{'p50':>10}{'p99':>10}{'max':>10}{'mean':>10}"
    print(header)
    print("-" * len(header))
    samples = time_calls(texts, model, args.rounds)
    p50, p99 = report("all: classify()", samples["all"])
    for source in ("rule", "classifier", "default"):
        if source in samples:
            report(f"  decided by {source}", samples[source])
    long_rounds = max(args.rounds * 5, 50)
    report(
        f"long prose ({len(LONG_PROSE)} chars)", time_calls([LONG_PROSE], model, long_rounds)["all"]
    )
    by_category: dict[str, str] = {}
    for text, category in heldout:  # held-out prompts joined: dense in rule words (a worst case)
        by_category[category] = (by_category.get(category, "") + " " + text).strip()
    joined = [(t * (args.long // len(t) + 1))[: args.long] for t in by_category.values()]
    report(f"joined prompts ({args.long} chars)", time_calls(joined, model, long_rounds)["all"])

    verdict = "PASS" if p50 <= TARGET_P50_MS else "MISS"
    print(
        f"\ndecision time over held-out prompts: p50 {p50:.3f} ms, p99 {p99:.3f} ms;"
        f" target p50 <= {TARGET_P50_MS:g} ms: {verdict}"
    )

    result = evaluate(model, heldout)
    print(f"\nheld-out accuracy (rules + model): {result.accuracy:.3f} ({result.n} prompts)")
    print(result.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
