"""Semantic cache quality and lookup time: paraphrases that should hit, look-alikes that must not.

Reads ``benchmarks/data/cache_pairs.jsonl`` (pairs of requests written by hand: ``should_hit``
pairs are one request reworded; the others look alike but ask for something else: a negation,
another entity, number, direction or language, another task on the same object). One
``SemanticCache`` (SQLite run store, Qdrant local mode, all-MiniLM-L6-v2, threshold 0.92) takes
each pair under a prompt version of its own: ``put(a)``, then ``lookup(b)`` timed, both as
``CachingClient`` sends a lone user message (``request_text``: ``user: TEXT``). Prints the hit
rate on should-hit pairs and the false-hit rate on must-not pairs at the default threshold from
``lookup()``, the same at 0.85, 0.90, 0.92 and 0.95 from the cosine of the two requests'
embeddings (and whether the cosine at 0.92 agrees with ``lookup()``), the score distributions
per group, the threshold that would separate the groups best, the pairs on the wrong side of
0.92, and lookup and put times (embedding included; the embedding alone for comparison).

Two more sets of the same pairs from the cosine only: behind a short system prompt, and behind a
system prompt longer than the model's 256 tokens (``request_text`` puts the system message first,
and the embedder cuts at 256 tokens). Last, ``--fill`` entries (default 5,000) of other prompt
versions are added to the collection and the lookups timed again: Qdrant's local mode checks the
payload filter (alias, prompt version, expiry) in Python for every entry.

Usage::

    .venv/bin/python benchmarks/cache.py [--fill 5000] [--pairs benchmarks/data/cache_pairs.jsonl]

Target: no false hit at the default threshold (0.92). Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from typhon.config import MemoryCacheSettings  # noqa: E402
from typhon.memory._builtin import _Vectors  # noqa: E402
from typhon.memory._cache import SemanticCache, request_text  # noqa: E402
from typhon.memory._embed import MiniLMEmbedder, minilm_tokenizer_path  # noqa: E402
from typhon.store import RunStore  # noqa: E402

DEFAULT_PAIRS = Path(__file__).resolve().parent / "data" / "cache_pairs.jsonl"
THRESHOLDS = (0.85, 0.90, 0.92, 0.95)
ALIAS = "bench"
SHORT_SYSTEM = (
    "You are a helpful assistant running on a home server. Answer accurately and concisely, "
    "and say so when you are not sure."
)
LONG_SYSTEM = (
    "You are the household assistant of a small homelab. You run on local models only and never "
    "send data outside the house. The people who ask you questions are the family members and "
    "their guests; some of them are engineers and some are not, so adapt the level of detail to "
    "the question. Follow these rules. First, answer the question that was asked and nothing "
    "else; do not add unrelated advice. Second, when a question is about the servers in the house "
    "(the NAS, the GPU box, the Proxmox host, the Raspberry Pi in the hallway), give commands that "
    "work on Debian or Ubuntu unless the question names another system, and warn before anything "
    "that deletes data or restarts a service that others use. Third, when a question is about "
    "health, money or the law, give general information, say clearly that it is not professional "
    "advice, and suggest whom to ask. Fourth, when you write code, write complete and runnable "
    "code with short comments, prefer the standard library, and mention the version of the "
    "language you assume. Fifth, when you are asked to write something creative, keep it short "
    "unless a length is given, and avoid anything unsuitable for children. Sixth, when you do not "
    "know the answer or the question depends on facts you cannot check, such as today's weather, "
    "prices or news, say so plainly instead of guessing. Seventh, use metric units unless the "
    "question uses other units, and give times in the 24-hour format. Eighth, format your answers "
    "in Markdown with short paragraphs, and use lists only when the order or the count matters. "
    "Ninth, keep a friendly and calm tone, and never pretend to be a person. Tenth, if a request "
    "is ambiguous, answer the most likely reading and say which reading you chose."
)


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes): other work skews the timings."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(sorted_ns: list[int], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted nanosecond samples, in milliseconds."""
    rank = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[rank] / 1e6


def load_pairs(path: Path) -> list[dict]:
    pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for pair in pairs:
        if not {"a", "b", "should_hit"} <= pair.keys():
            raise SystemExit(f"{path}: a pair needs a, b and should_hit: {pair}")
    return pairs


def user(text: str, system: str | None = None) -> str:
    """The request text the cache compares for one user message (behind a system prompt)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return request_text(messages)  # type: ignore[arg-type]


def cosines(embedder: MiniLMEmbedder, pairs: list[dict], system: str | None = None) -> np.ndarray:
    a = np.asarray(embedder.embed([user(p["a"], system) for p in pairs]), dtype=np.float64)
    b = np.asarray(embedder.embed([user(p["b"], system) for p in pairs]), dtype=np.float64)
    return np.sum(a * b, axis=1)


def tokens(text: str) -> int:
    """MiniLM tokens in ``text`` before the embedder's cut (with [CLS] and [SEP])."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_tokenizer_path()))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return len(tokenizer.encode(text).ids)


def rates(scores: np.ndarray, should: np.ndarray, threshold: float) -> tuple[float, float]:
    """(hit rate on should-hit pairs, false-hit rate on must-not pairs) at ``threshold``."""
    hit = scores >= threshold
    return float(hit[should].mean()), float(hit[~should].mean())


def sweep(label: str, scores: np.ndarray, should: np.ndarray) -> None:
    cells = []
    for t in THRESHOLDS:
        good, bad = rates(scores, should, t)
        cells.append(f"{good:>7.0%} {bad:>6.0%}")
    print(f"{label:<34}" + "".join(f"{c:>16}" for c in cells))


def distribution(label: str, scores: np.ndarray) -> None:
    s = np.sort(scores)
    print(
        f"  {label:<24}{len(s):>4} pairs  min {s[0]:.3f}  p10 {np.quantile(s, 0.1):.3f}"
        f"  median {np.median(s):.3f}  p90 {np.quantile(s, 0.9):.3f}  max {s[-1]:.3f}"
    )


def best_threshold(scores: np.ndarray, should: np.ndarray) -> tuple[float, float, float]:
    """The threshold (on a 0.005 grid) with the highest hit rate among those with the fewest
    false hits, and its two rates."""
    best: tuple[float, float, float] = (1.0, 0.0, 0.0)
    key = (-1.0, 0.0)
    for t in np.arange(0.70, 1.0001, 0.005):
        good, bad = rates(scores, should, float(t))
        if (-bad, good) > key:
            key, best = (-bad, good), (float(t), good, bad)
    return best


def time_lookups(
    cache: SemanticCache, pairs: list[dict], versions: list[str]
) -> tuple[list[int], list[float | None]]:
    ns: list[int] = []
    got: list[float | None] = []
    for pair, version in zip(pairs, versions, strict=True):
        request = user(pair["b"])
        t0 = time.perf_counter_ns()
        hit = cache.lookup(ALIAS, version, request)
        ns.append(time.perf_counter_ns() - t0)
        got.append(None if hit is None else hit.score)
    return ns, got


def fill(cache: SemanticCache, count: int) -> float:
    """``count`` entries of other prompt versions, straight into the collection (no rows: they
    never pass the filter). Returns the seconds taken."""
    from qdrant_client import models

    rng = np.random.default_rng(7)
    client = cache.vectors.client
    try:  # the fill is set-up: no fsync per point on Qdrant local mode's SQLite file
        storage = client._client.collections[cache._name].storage.storage  # type: ignore[attr-defined]
        storage.execute("PRAGMA synchronous=OFF")
    except Exception:
        pass
    expires = time.time() + 3600
    t0 = time.perf_counter()
    for start in range(0, count, 5000):
        n = min(5000, count - start)
        vectors = rng.standard_normal((n, cache.embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        points = [
            models.PointStruct(
                id=str(uuid.uuid4()),
                vector=v.tolist(),
                payload={
                    "alias": ALIAS,
                    "prompt_version": f"other-{i % 50}",
                    "expires_at": expires,
                },
            )
            for i, v in enumerate(vectors)
        ]
        client.upsert(cache._name, points=points, wait=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure the semantic cache on paraphrase pairs.")
    p.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="JSON lines of pairs")
    p.add_argument("--fill", type=int, default=5000, help="extra entries for the second timing")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Local mode is not recommended.*")

    pairs = load_pairs(args.pairs)
    should = np.array([bool(p["should_hit"]) for p in pairs])
    embedder = MiniLMEmbedder()
    t0 = time.perf_counter()
    embedder.load()
    load_s = time.perf_counter() - t0
    settings = MemoryCacheSettings()
    print(
        f"semantic cache: {should.sum()} should-hit pairs, {(~should).sum()} must-not pairs"
        f" ({args.pairs.name}); {embedder.model}, threshold {settings.threshold},"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs; model loaded in"
        f" {load_s:.1f} s"
    )

    with tempfile.TemporaryDirectory(prefix="typhon-cache-") as tmp_name:
        tmp = Path(tmp_name)
        store = RunStore(f"sqlite:///{tmp / 'cache.db'}")
        vectors = _Vectors(path=tmp / "qdrant", url=None, backend="bench")
        cache = SemanticCache(store, embedder, vectors, settings)
        cache.put(ALIAS, "warm-up", user("warm-up request"), "warm-up answer")
        cache.lookup(ALIAS, "warm-up", user("warm-up request"))

        versions = [f"pair-{i}" for i in range(len(pairs))]
        put_ns = []
        for pair, version in zip(pairs, versions, strict=True):
            t0 = time.perf_counter_ns()
            cache.put(ALIAS, version, user(pair["a"]), f"answer to: {pair['a']}")
            put_ns.append(time.perf_counter_ns() - t0)
        lookup_ns, got = time_lookups(cache, pairs, versions)
        embed_ns = []
        for pair in pairs:
            t0 = time.perf_counter_ns()
            embedder.embed([user(pair["b"])])
            embed_ns.append(time.perf_counter_ns() - t0)
        counted = cache.stats()["_all"]
        entries = counted["entries"]

        hit = np.array([g is not None for g in got])
        good, bad = float(hit[should].mean()), float(hit[~should].mean())
        print(
            f"\nthrough SemanticCache.lookup() at {settings.threshold}: hit rate on should-hit"
            f" pairs {good:.0%} ({hit[should].sum()}/{should.sum()}), false-hit rate on must-not"
            f" pairs {bad:.0%} ({hit[~should].sum()}/{(~should).sum()}); counted by stats():"
            f" {counted['hits']} hits, {counted['misses']} misses (one warm-up hit included)"
        )

        scores = cosines(embedder, pairs)
        agree = int(((scores >= settings.threshold) == hit).sum())
        for g, s in zip(got, scores, strict=True):
            assert g is None or abs(g - s) < 1e-3, (g, s)
        print(f"cosine >= {settings.threshold} agrees with lookup() on {agree}/{len(pairs)} pairs")

        print("\nhit rate on should-hit / false-hit rate on must-not, by threshold (cosine)")
        print(f"{'':<34}" + "".join(f"{t:>16.2f}" for t in THRESHOLDS))
        sweep("user message only", scores, should)
        scores_short = cosines(embedder, pairs, SHORT_SYSTEM)
        scores_long = cosines(embedder, pairs, LONG_SYSTEM)
        short_tokens, long_tokens = tokens(user("", SHORT_SYSTEM)), tokens(user("", LONG_SYSTEM))
        sweep(f"behind a {short_tokens}-token system prompt", scores_short, should)
        sweep(f"behind a {long_tokens}-token system prompt", scores_long, should)

        print("\ncosine of the two requests (user message only)")
        distribution("should hit", scores[should])
        distribution("must not hit", scores[~should])
        print(f"behind the {long_tokens}-token system prompt")
        distribution("should hit", scores_long[should])
        distribution("must not hit", scores_long[~should])
        t, tg, tb = best_threshold(scores, should)
        print(
            f"\nbest threshold on these pairs (fewest false hits, then most hits): {t:.3f}:"
            f" hit rate {tg:.0%}, false-hit rate {tb:.0%}; the groups overlap between"
            f" {scores[should].min():.3f} (lowest should-hit) and {scores[~should].max():.3f}"
            f" (highest must-not)"
        )

        wrong = [
            (float(s), pr)
            for s, pr, h in zip(scores, pairs, hit, strict=True)
            if h != pr["should_hit"]
        ]
        print(f"\npairs on the wrong side of {settings.threshold} through lookup() ({len(wrong)}):")
        for s, pr in sorted(wrong, key=lambda x: -x[0]):
            kind = "false hit" if not pr["should_hit"] else "missed   "
            print(f"  {kind} {s:.3f}  {pr['a']!r} / {pr['b']!r}  [{pr.get('note', '')}]")

        header = f"{'[ms]':<44}{'calls':>7}{'p50':>9}{'p99':>9}{'mean':>9}"
        print(f"\n{header}\n{'-' * len(header)}")

        def line(label: str, ns: list[int]) -> float:
            s = sorted(ns)
            p50 = percentile(s, 0.5)
            print(
                f"{label:<44}{len(s):>7}{p50:>9.2f}{percentile(s, 0.99):>9.2f}"
                f"{statistics.fmean(s) / 1e6:>9.2f}"
            )
            return p50

        line(f"lookup(), {entries} entries (with embedding)", lookup_ns)
        line("  embedding the request alone", embed_ns)
        line(f"put(), up to {entries} entries (with embedding)", put_ns)
        if args.fill:
            secs = fill(cache, args.fill)
            lookup2_ns, got2 = time_lookups(cache, pairs, versions)
            assert [g is not None for g in got2] == list(hit)
            line(f"lookup(), {entries + args.fill} entries (with embedding)", lookup2_ns)
            print(f"  (filled {args.fill} entries of other prompt versions in {secs:.0f} s)")
        print(f"load average {load()}")
        vectors.close()
        store.close()

    verdict = "PASS" if bad == 0 else "MISS"
    print(
        f"\nat the default threshold {settings.threshold}: false-hit rate {bad:.0%}, hit rate"
        f" {good:.0%}; lookup p50 {percentile(sorted(lookup_ns), 0.5):.2f} ms with embedding;"
        f" target no false hit: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
