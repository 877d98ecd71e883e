"""The learning loop on the real local model: optimizer gain on a held-out test split, the gate
and the canary.

One process assembles the bundled gemma-3-270m GGUF into a temporary ``TYPHON_HOME`` and starts
one llama-server on loopback (``-t 1``, ``--parallel`` slots, as ``tests/support/llama.py``
starts it), configured as the only alias ``local``. The crew is a single-step custom crew,
``normalize``: its instruction is prompt data (``PROMPTS``), its demonstrations come as chat
turns (``ctx.demo_messages()``) and it asks for ``{"answer": ...}`` under a JSON schema
(llama-server enforces it by grammar). The suite (``benchmarks/data/improve_records.jsonl``,
written by ``--write-suite``) mixes three kinds of messy record fields and wants each one's
canonical form, checked with ``equals``: a name written ``Last, First`` (``First Last``), an
email address inside a sentence (the address alone) and a price inside a sentence (the plain
number); 66 items, half train and half test, the kinds in equal numbers. Zero-shot, the base
model repeats the text or loops inside the JSON, and passes nothing.

Figures, all on the test split (never seen by the optimizer):

* zero-shot: version 1 (the code's instruction, no demonstrations);
* naive: three train items picked at random as demonstrations (``--naive-draws`` draws, each
  with its own seed; their mean is the baseline to beat), and for reference one draw of as many
  random train items as the optimizer may use (``--demos``);
* optimized: ``typhon.improve._optimize.optimize`` on the train split only (``--rounds``,
  ``improve.demos`` = ``--demos``, default 6, the default gate), then the version it promoted.

Targets: optimized >= zero-shot + 30 points, and >= the naive mean. Then the two planted cases:

* a worse candidate (the active version's demonstrations, each answered by repeating its input)
  through the gate against the active version: it must be rejected;
* a live regression: the optimizer's canary first gets live runs judged by a simulated person
  (thumbs up when the answer passes the item's check, stored as run_feedback through
  ``record_feedback``, which checks the canary) until ``check_canary`` promotes it; then the
  worse candidate is made the canary by hand, and live runs judged the same way until the canary
  check rolls it back by itself. Live runs take test inputs, with no cache and no memory.

Usage::

    .venv/bin/python benchmarks/improve.py [--rounds 3] [--demos 6] [--naive-draws 3]
        [--parallel 2] [--suite benchmarks/data/improve_records.jsonl] [--write-suite]

The server is stopped at exit and the temporary folder removed. Exit status 0 whatever the
figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))  # _common, throughput; tests.support.llama

from _common import Cleanup, run_with_cleanup  # noqa: E402
from throughput import idle_check  # noqa: E402

from typhon.context import RunContext  # noqa: E402
from typhon.crews import CrewRegistry, crew  # noqa: E402
from typhon.models import json_schema_format  # noqa: E402

DEFAULT_SUITE = BENCH_DIR / "data" / "improve_records.jsonl"
ALIAS = "local"
CREW = "normalize"
TARGET_GAIN = 0.30
SEED = 2026

# The crew's instruction, as data (version 1 of its prompts).
PROMPTS = {"normalizer": {"role": "Record normalizer", "instruction": (
    "Give the canonical form of the value in the text: a person's name as First Last, an email"
    " address alone, a price as a plain number.")}}  # fmt: skip
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 40}},
    "required": ["answer"],
    "additionalProperties": False,
}
REGISTRY = CrewRegistry(builtins={})


@crew(CREW, category="simple", registry=REGISTRY)
def normalize(ctx: RunContext) -> str:
    """One model call: the instruction, the demonstrations as turns, the date; JSON back."""
    messages = [{"role": "system", "content": ctx.prompt("normalizer", "instruction")}]
    for turn in ctx.demo_messages():
        if turn["role"] == "assistant":
            turn = {**turn, "content": json.dumps({"answer": turn["content"]})}
        messages.append(turn)
    messages.append({"role": "user", "content": ctx.input})
    reply = ctx.model.chat(
        messages, max_tokens=40, temperature=0.0,
        response_format=json_schema_format("answer", ANSWER_SCHEMA),
    )  # fmt: skip
    try:
        return str(json.loads(reply.content)["answer"]).strip()
    except (ValueError, KeyError, TypeError):
        return reply.content.strip()  # an unfinished answer fails its check


# -- the suite ------------------------------------------------------------------------------------
NAMES = [("Alan", "Turing"), ("Grace", "Hopper"), ("Donald", "Knuth"), ("Marie", "Curie"),
         ("Ada", "Lovelace"), ("Dennis", "Ritchie"), ("Barbara", "Liskov"), ("Linus", "Torvalds"),
         ("Margaret", "Hamilton"), ("Edsger", "Dijkstra"), ("Tim", "Berners-Lee"),
         ("Adele", "Goldberg"), ("Brian", "Kernighan"), ("Ken", "Thompson"), ("Niklaus", "Wirth"),
         ("Frances", "Allen"), ("Leslie", "Lamport"), ("Bjarne", "Stroustrup"), ("Lise", "Meitner"),
         ("Emmy", "Noether"), ("Claude", "Shannon"), ("Charles", "Babbage")]  # fmt: skip
LOCALS = ["bob.smith", "billing", "help", "j.doe", "dev-team", "anna", "party", "ops", "sales",
          "tom", "care", "info", "maria.lopez", "k.tanaka", "support", "orders"]  # fmt: skip
DOMAINS = ["example.org", "acme.io", "shop.net", "mail.com", "corp.co", "lab.org", "infra.dev",
           "store.com", "home.net", "bank.co.uk"]  # fmt: skip
EMAIL_TEXTS = ["Contact me at {} for details", "Send the invoice to {} by Friday",
               "Questions? Write to {} anytime", "My new address is {}, please update it",
               "Reach the team via {}", "Ping {} if the build fails", "RSVP to {} before May",
               "Forward the logs to {} please", "You can email {} for a quote",
               "Mail {} when you land", "Complaints go to {}"]  # fmt: skip
PRICE_TEXTS = ["The lamp costs ${} today", "Tickets are ${} each",
               "Now only ${}, down from last week", "A coffee is ${} here",
               "Rent rose to ${} this year", "The book sells for ${}",
               "Shipping adds ${}", "He paid ${} for the shoes", "The chair is ${} on sale",
               "Lunch cost ${}", "Pay ${} at the gate"]  # fmt: skip


def _records(rng: random.Random, n: int) -> list[list[tuple[str, str]]]:
    """``n`` names, emails and prices each: (text, canonical form)."""
    names = [(f"{last}, {first}", f"{first} {last}") for first, last in NAMES[:n]]
    emails, prices = [], []
    for i in range(n):
        address = f"{LOCALS[i % len(LOCALS)]}@{DOMAINS[rng.randrange(len(DOMAINS))]}"
        emails.append((EMAIL_TEXTS[i % len(EMAIL_TEXTS)].format(address), address))
        cents = rng.choice(["", f".{rng.randrange(100):02d}"])
        amount = f"{rng.randint(2, 480)}{cents}"
        prices.append((PRICE_TEXTS[i % len(PRICE_TEXTS)].format(amount), amount))
    for kind in (names, emails, prices):
        rng.shuffle(kind)
    return [names, emails, prices]


def write_suite(path: Path, per_kind: int = 22, seed: int = SEED) -> None:
    """``per_kind`` names, emails and prices, half of each kind train and half test."""
    kinds = _records(random.Random(seed), per_kind)
    lines = []
    for split, half in (("train", slice(0, per_kind // 2)), ("test", slice(per_kind // 2, None))):
        rows = [row for group in zip(*(k[half] for k in kinds), strict=True) for row in group]
        for i, (text, canonical) in enumerate(rows, start=1):
            item = {"id": f"{split}-{i:02d}", "input": text, "split": split,
                    "check": {"kind": "equals", "value": canonical}}  # fmt: skip
            lines.append(json.dumps(item))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _kind(text: str) -> str:
    return "email" if "@" in text else "price" if "$" in text else "name"


# -- set-up ---------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, cleanup: Cleanup):
        from tests.support.llama import start_llama_server
        from typhon.config import TyphonConfig
        from typhon.improve._eval import Evaluator
        from typhon.models._local import _bundled_model
        from typhon.store import RunStore

        self.tmp = Path(tempfile.mkdtemp(prefix="typhon-improve-"))
        cleanup.add(f"remove {self.tmp}", lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        home = self.tmp / "home"
        model = _bundled_model(home)
        started = time.perf_counter()
        server = start_llama_server(model, parallel=args.parallel,
                                    log_path=self.tmp / "llama.log")  # fmt: skip
        cleanup.add(f"stop llama-server {server.url}", server.stop)
        self.ready_s = time.perf_counter() - started
        self.url = f"{server.url}/v1"
        self.config = TyphonConfig.model_validate({
            "home": str(home),
            "database_url": f"sqlite:///{self.tmp / 'typhon.db'}",
            "model_list": [{"model_name": ALIAS, "litellm_params": {
                "model": "openai/gemma", "api_base": self.url}}],
            "routing": dict.fromkeys(("simple", "complex", "code", "creative"), ALIAS),
            "pools": [{"name": "research", "cap": args.parallel}],
            "improve": {"review": False, "demos": args.demos, "rounds": args.rounds,
                        "canary_share": 0.5, "canary_min_runs": args.canary_runs,
                        "canary_margin": 0.1},
        })  # fmt: skip
        self.store = RunStore(self.config.effective_database_url)
        cleanup.add("close the run store", self.store.close)
        self.evaluator = Evaluator(self.config, self.store, registry=REGISTRY)
        cleanup.add("close the evaluator", self.evaluator.close)
        self.calls = 0

    def evaluate(self, items: list[Any], prompts: Any, demos: Any) -> Any:
        result = self.evaluator.evaluate(CREW, items, prompts=prompts, demos=demos)
        self.calls += result.model_calls
        return result


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _formats(items: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[_kind(item.input)] = out.get(_kind(item.input), 0) + 1
    return out


def _per_format(result: Any) -> str:
    ok: dict[str, list[int]] = {}
    for item in result.items:
        counts = ok.setdefault(_kind(item.input), [0, 0])
        counts[0] += int(item.passed)
        counts[1] += 1
    return "  ".join(f"{s} {p}/{n}" for s, (p, n) in ok.items())


# -- the live canary ------------------------------------------------------------------------------
def live_until_decided(bench: Bench, test: list[Any], limit: int) -> tuple[str | None, int, str]:
    """Live runs on test inputs, each judged by a simulated person from the item's check
    (stored with record_feedback, which checks the canary), until the canary is decided."""
    from typhon.improve._feedback import record_feedback
    from typhon.improve._prompts import PromptVersions
    from typhon.improve._suite import check_output
    from typhon.orchestrator import Typhon

    versions = PromptVersions(bench.store)
    rng = random.Random(SEED)
    random.seed(SEED)  # the canary's share of live runs: the same draws every time
    done = 0
    with Typhon(bench.config, registry=REGISTRY, store=bench.store) as typhon:
        while versions.canary(CREW) is not None and done < limit:
            batch = [rng.choice(test) for _ in range(4)]
            handles = [typhon.submit(CREW, item.input, no_cache=True, no_memory=True)
                       for item in batch]  # fmt: skip
            for item, handle in zip(batch, handles, strict=True):
                record = handle.wait(120)
                bench.calls += record.usage.calls
                passed, _ = check_output(item.check, record.output or "")
                record_feedback(bench.config, bench.store, record.id, "up" if passed else "down",
                                by="simulated person")  # fmt: skip
                done += 1
    event = next((e for e in versions.events(CREW) if e["kind"] in ("promoted", "rolled_back")),
                 None)  # fmt: skip
    if versions.canary(CREW) is not None or event is None:
        return None, done, "undecided"
    return str(event["kind"]), done, str(event["reason"])


def _naive(bench: Bench, train: list[Any], test: list[Any], prompts: Any, k: int, seed: int) -> Any:
    picked = random.Random(seed).sample(train, k)
    demos = [{"input": i.input, "output": i.check.value} for i in picked]
    return bench.evaluate(test, prompts, demos)


# -- main -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace, cleanup: Cleanup) -> None:
    from typhon.improve._optimize import optimize, try_candidate
    from typhon.improve._prompts import PromptVersions
    from typhon.improve._suite import load_suite, split_items
    from typhon.logging import configure_logging

    configure_logging("error")
    if args.write_suite:
        write_suite(args.suite)
        print(f"wrote {args.suite}")
    busy = idle_check()
    print(f"$ {shlex.join(sys.orig_argv)}")
    print("improve: optimizer, gate and canary on the real local model")
    items = load_suite(args.suite)
    train, test = split_items(items, "train"), split_items(items, "test")
    bench = Bench(args, cleanup)
    print(f"  model    gemma-3-270m on llama-server -t 1 -np {args.parallel}"
          f" (ready in {bench.ready_s:.1f}s); python {sys.version.split()[0]},"
          f" {os.cpu_count()} CPUs; {busy}")  # fmt: skip
    print(f"  suite    {args.suite.name}: {len(train)} train, {len(test)} test items;"
          f" test items per kind {_formats(test)}")  # fmt: skip
    started = time.perf_counter()
    versions = PromptVersions(bench.store)
    v1 = versions.ensure(CREW, REGISTRY.get(CREW))

    zero = bench.evaluate(test, v1.prompts, [])
    print(f"\ntest pass rate (n={len(test)})")
    print(f"  zero-shot (v1)                 {_pct(zero.pass_rate)}   {_per_format(zero)}")
    naive_rates = []
    for draw in range(args.naive_draws):
        naive = _naive(bench, train, test, v1.prompts, 3, SEED + draw)
        naive_rates.append(naive.pass_rate)
        print(f"  naive, 3 random demos (#{draw + 1})   {_pct(naive.pass_rate)}"
              f"   {_per_format(naive)}")  # fmt: skip
    if args.demos != 3:
        same = _naive(bench, train, test, v1.prompts, args.demos, SEED)
        print(f"  (reference: {args.demos} random demos)    {_pct(same.pass_rate)}"
              f"   {_per_format(same)}")  # fmt: skip
    naive_mean = sum(naive_rates) / len(naive_rates)

    opt_started = time.perf_counter()
    result = optimize(bench.config, bench.store, CREW, items, evaluator=bench.evaluator)
    opt_s = time.perf_counter() - opt_started
    bench.calls += result["model_calls"]
    best = versions.get(CREW, result["best"]["version"])
    optimized = bench.evaluate(test, best.prompts, best.demos)
    print(
        f"  optimized (v{best.version}, {len(best.demos)} demos)       "
        f"{_pct(optimized.pass_rate)}   {_per_format(optimized)}"
    )
    gain = optimized.pass_rate - zero.pass_rate
    print(
        f"  gain over zero-shot            {100 * gain:+5.1f} points  target"
        f" >= +{100 * TARGET_GAIN:.0f}: {'PASS' if gain >= TARGET_GAIN - 1e-9 else 'MISS'}"
    )
    print(
        f"  against the naive mean         {_pct(naive_mean)}  target optimized >= naive:"
        f" {'PASS' if optimized.pass_rate >= naive_mean - 1e-9 else 'MISS'}"
    )

    print(f"\noptimizer on train only: {len(result['rounds'])} rounds,"
          f" {result['model_calls']} model calls, {opt_s:.0f}s;"
          f" baseline v{result['baseline']['version']}"
          f" {_pct(result['baseline']['pass_rate'])} -> best v{best.version}"
          f" {_pct(result['best']['pass_rate'])}; promoted: {result['status']}")  # fmt: skip
    for r in result["rounds"]:
        lo, hi = r["interval"]
        print(
            f"  round {r['round']}  v{r['version']:<3} {r['kind']:<8} train {_pct(r['pass_rate'])}"
            f"  gain {r['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] n={r['n']}"
            f"  {'accepted' if r['accepted'] else 'rejected'}  calls {r['model_calls']}"
        )
    for demo in best.demos:
        print(f"  demo     {demo['input']!r} -> {demo['output']!r}")

    print("\nplanted cases")
    if result["status"] == "canary":
        kind, runs, reason = live_until_decided(bench, test, args.live_limit)
        print(f"  optimizer's canary v{best.version}: {kind or 'undecided'} after {runs} live runs"
              f" ({reason})")  # fmt: skip
    active = versions.active(CREW)
    assert active is not None
    # the same demonstrations, each "answered" by repeating its input
    wrong = [{"input": d["input"], "output": d["input"]} for d in active.demos]
    if not wrong:  # nothing was promoted: three train items, echoed
        wrong = [{"input": i.input, "output": i.input} for i in train[:3]]
    planted = try_candidate(bench.config, bench.store, CREW, items, active.prompts, wrong,
                            evaluator=bench.evaluator, source="planted",
                            note="demonstrations that echo their input")  # fmt: skip
    bench.calls += planted["model_calls"]
    cand = planted["candidate"]
    lo, hi = cand["interval"]
    print(f"  worse candidate v{planted['version']} (echoing demos) against active"
          f" v{active.version}: train {_pct(planted['baseline']['pass_rate'])} ->"
          f" {_pct(cand['pass_rate'])}, gain {cand['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]:"
          f" {'REJECTED' if not cand['accepted'] else 'accepted'} by the gate"
          f" -- {'PASS' if not cand['accepted'] else 'MISS'}")  # fmt: skip
    bad = versions.add(CREW, active.prompts, wrong, parent=active.version, source="planted",
                       note="a live regression: demonstrations that echo their input")  # fmt: skip
    versions.promote(CREW, bad.version, canary_share=0.5, reason="planted by the benchmark")
    kind, runs, reason = live_until_decided(bench, test, args.live_limit)
    print(f"  bad canary v{bad.version} on 50% of live runs: {kind or 'undecided'} after {runs}"
          f" live runs -- {'PASS' if kind == 'rolled_back' else 'MISS'}")  # fmt: skip
    print(f"    reason: {reason}")
    print(f"\nmodel calls in all: {bench.calls}; wall time {time.perf_counter() - started:.0f}s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--suite", type=Path, default=DEFAULT_SUITE, help="the JSONL suite")
    p.add_argument("--write-suite", action="store_true", help="(re)write the suite first")
    p.add_argument("--rounds", type=int, default=3, help="optimizer rounds (3)")
    p.add_argument("--demos", type=int, default=6, help="improve.demos for the optimizer (6)")
    p.add_argument("--naive-draws", type=int, default=3, help="random 3-demo draws (3)")
    p.add_argument("--parallel", type=int, default=2, help="llama-server slots and pool cap (2)")
    p.add_argument("--canary-runs", type=int, default=8, help="improve.canary_min_runs (8)")
    p.add_argument("--live-limit", type=int, default=80, help="live runs per canary at most (80)")
    args = p.parse_args(argv)
    for name in ("rounds", "demos", "naive_draws", "parallel", "canary_runs", "live_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_with_cleanup(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
