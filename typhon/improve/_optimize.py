"""The optimizer: candidate prompt versions, a paired gate on a suite, promotion through a canary.

One pass over a crew (``optimize``) evaluates the active version on the suite's train items,
then for ``improve.rounds`` rounds proposes a candidate from the best version so far, two ways
in turn:

* ``demos``: few-shot demonstrations chosen from examples — train items whose check is
  ``equals`` (the value is the answer), train items whose output passed its check under the best
  version (bootstrapped, as DSPy's BootstrapFewShot does) and live examples that reviews and
  people rated well. The choice covers the inputs the best version gets wrong: greedy facility
  location on the inputs' shapes (letters, digits and punctuation: ``7 June 2019``,
  ``07.06.2019`` and ``bob@example.org`` look different), ties drawn at random.
* ``rewrite``: each instruction text (every field but ``role``) rewritten by a model
  (``improve.rewrite_model``, else the reviewer of the crew's model, else the crew's model)
  that reads the failed train items with their outputs and the live critiques and diagnoses;
  the answer is JSON under a schema. A rewrite that drops or adds a ``{placeholder}`` of the
  original is discarded, since crews format them.

A candidate is evaluated on the same train items as the version it challenges (leaving out
the inputs either uses as a demonstration) and wins only when the mean paired gain (pass = 1,
fail = 0, item by item) is at least ``gain_margin`` and the paired bootstrap interval
(``confidence``, ``bootstrap_samples``, a fixed seed) excludes 0. Losers are retired with the
numbers (``rejected`` events). At the end the best version, if it is not the active one and
clears the same gate against it, becomes the canary on ``canary_share`` of live runs (or active
at once without the canary); :func:`typhon.improve._canary.check_canary` finishes the job.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from typhon.config import ImproveConfig, TyphonConfig
from typhon.crews import CrewRegistry
from typhon.errors import InputError, ModelError, TyphonError
from typhon.improve._eval import EvalResult, Evaluator
from typhon.improve._prompts import Prompts, PromptVersion, PromptVersions
from typhon.improve._suite import SuiteItem, load_suite, split_items
from typhon.models import ModelClient, ModelRegistry, json_schema_format
from typhon.store import RunStore, improve_diagnoses, run_reviews

__all__ = [
    "GateResult",
    "Round",
    "gate",
    "keeps_placeholders",
    "optimize",
    "paired_bootstrap",
    "placeholders",
    "select_demos",
    "shape",
    "try_candidate",
    "weekly_pass",
]

log = structlog.get_logger("typhon.improve")

SEED = 7301
MAX_DEMO_CHARS = 1500  # input + output of one demonstration
MAX_FAILURES = 5  # failed items shown to the rewriting model
SKIP_FIELDS = frozenset({"role"})  # names, not instructions
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


# -- the gate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateResult:
    gain: float
    interval: tuple[float, float]
    n: int
    accepted: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"gain": round(self.gain, 4), "interval": [round(x, 4) for x in self.interval],
                "n": self.n, "accepted": self.accepted, "reason": self.reason}  # fmt: skip


def paired_bootstrap(
    diffs: Sequence[float], *, confidence: float, samples: int, seed: int = SEED
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of paired differences (fixed seed: the same
    differences always give the same interval)."""
    n = len(diffs)
    if n == 0:
        return (0.0, 0.0)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    tail = (1.0 - confidence) / 2.0
    low = means[max(0, int(tail * samples))]
    high = means[min(samples - 1, int((1.0 - tail) * samples))]
    return (low, high)


def gate(
    reference: Sequence[float],
    candidate: Sequence[float],
    settings: ImproveConfig,
    *,
    seed: int = SEED,
) -> GateResult:
    """Does ``candidate`` beat ``reference`` item by item? See the module's docstring."""
    diffs = [c - r for r, c in zip(reference, candidate, strict=True)]
    n = len(diffs)
    gain = sum(diffs) / n if n else 0.0
    low, high = paired_bootstrap(
        diffs, confidence=settings.confidence, samples=settings.bootstrap_samples, seed=seed
    )
    level = f"{settings.confidence:.0%} interval [{low:+.3f}, {high:+.3f}]"
    if n == 0:
        return GateResult(0.0, (0.0, 0.0), 0, False, "no items to compare on")
    if gain < settings.gain_margin:
        why = f"gain {gain:+.3f} on {n} items is below the margin {settings.gain_margin:.3f}"
        return GateResult(gain, (low, high), n, False, f"{why} ({level})")
    if low <= 0.0:
        return GateResult(gain, (low, high), n, False,
                          f"gain {gain:+.3f} on {n} items, but the {level} includes 0")  # fmt: skip
    return GateResult(gain, (low, high), n, True,
                      f"gain {gain:+.3f} on {n} items, {level}")  # fmt: skip


# -- candidates --------------------------------------------------------------------------------
def placeholders(text: str) -> set[str]:
    """The ``{name}`` placeholders of a template (``{{`` escapes are not placeholders)."""
    return set(_PLACEHOLDER.findall(text))


def keeps_placeholders(original: str, rewrite: str) -> bool:
    return placeholders(original) == placeholders(rewrite)


def shape(text: str) -> str:
    """The look of an input: runs of letters, digits and spaces collapsed (``9 a 9``)."""
    out = re.sub(r"[^\W\d_]+", "a", text.strip())
    out = re.sub(r"\d+", "9", out)
    return re.sub(r"\s+", " ", out)


def _features(text: str) -> frozenset[str]:
    """The characters and character pairs of an input's shape."""
    s = shape(text)
    return frozenset(s) | frozenset(s[i : i + 2] for i in range(len(s) - 1))


def _similarity(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def select_demos(
    pool: Sequence[Mapping[str, str]],
    failing: Sequence[str],
    k: int,
    rng: random.Random,
) -> list[dict[str, str]]:
    """``k`` demonstrations from ``pool`` that together look most like the ``failing`` inputs
    (all of the pool's when none fail): greedy facility location on the inputs' shapes, each
    step adding the example that raises the summed best similarity the most (ties drawn)."""
    feats = [_features(e["input"]) for e in pool]
    targets = [_features(text) for text in failing] or feats
    sims = [[_similarity(f, t) for t in targets] for f in feats]
    covered = [0.0] * len(targets)
    jitter = [rng.random() * 1e-9 for _ in pool]
    chosen: list[int] = []
    while len(chosen) < min(k, len(pool)):
        gains = {
            j: jitter[j] + sum(max(0.0, s - c) for s, c in zip(sims[j], covered, strict=True))
            for j in range(len(pool))
            if j not in chosen
        }
        pick = max(gains, key=gains.__getitem__)
        chosen.append(pick)
        covered = [max(c, s) for c, s in zip(covered, sims[pick], strict=True)]
    return [{"input": str(pool[j]["input"]), "output": str(pool[j]["output"])} for j in chosen]


_REWRITE_SYSTEM = (
    "You improve the instruction that a language model follows in one step of a crew. Keep what "
    "works, fix what the failed cases and critiques show, keep every {placeholder} exactly as it "
    "is, and answer only with the JSON asked for."
)


def _rewrite_messages(
    crew: str, part: str, name: str, text: str, failures: list[str], critiques: list[str]
) -> list[dict[str, str]]:
    lines = [f"Crew: {crew}. Part: {part}. Field: {name}.", "", "Current instruction:", text, ""]
    if failures:
        lines += ["Failed cases:", *failures, ""]
    if critiques:
        lines += ["Critiques of live results:", *[f"- {c}" for c in critiques], ""]
    lines.append('Write the improved instruction as {"instruction": "..."}.')
    return [{"role": "system", "content": _REWRITE_SYSTEM},
            {"role": "user", "content": "\n".join(lines)}]  # fmt: skip


def rewrite_prompts(
    client: ModelClient,
    crew: str,
    prompts: Prompts,
    failures: list[str],
    critiques: list[str],
) -> tuple[Prompts, int, list[str]]:
    """Each instruction text rewritten by ``client``: (new prompts, model calls, notes)."""
    new: Prompts = {part: dict(fields) for part, fields in prompts.items()}
    calls, notes = 0, []
    for part, fields in prompts.items():
        for name, text in fields.items():
            if name in SKIP_FIELDS or not text.strip():
                continue
            limit = max(400, 3 * len(text))
            schema = {"type": "object", "additionalProperties": False, "required": ["instruction"],
                      "properties": {"instruction": {"type": "string", "minLength": 1,
                                                     "maxLength": limit}}}  # fmt: skip
            messages = _rewrite_messages(crew, part, name, text, failures, critiques)
            calls += 1
            try:
                reply = client.chat(
                    messages, max_tokens=limit // 3 + 32, temperature=0.0,
                    response_format=json_schema_format("instruction", schema),
                )  # fmt: skip
                rewritten = str(json.loads(reply.content)["instruction"]).strip()
            except (ModelError, ValueError, KeyError, TypeError) as exc:
                notes.append(f"{part}.{name}: no usable rewrite ({type(exc).__name__})")
                continue
            if not keeps_placeholders(text, rewritten):
                notes.append(f"{part}.{name}: rewrite discarded, its placeholders differ")
                continue
            if rewritten and rewritten != text:
                new[part][name] = rewritten
    return new, calls, notes


def _live_critiques(store: RunStore, crew: str, limit: int = 5) -> list[str]:
    """The latest critiques of weak live results and the latest failure diagnoses."""
    r, d = run_reviews.c, improve_diagnoses.c
    reviews = (
        sa.select(r.critique)
        .where(r.crew == crew, r.status == "ok", sa.or_(r.verdict == "fail", r.score < 0.5))
        .order_by(r.id.desc())
        .limit(limit)
    )
    diagnoses = sa.select(d.category, d.detail).where(d.crew == crew).order_by(d.id.desc())
    with store.engine.connect() as conn:
        out = [str(c)[:300] for (c,) in conn.execute(reviews) if c]
        out += [f"{cat}: {str(det)[:300]}" for cat, det in conn.execute(diagnoses.limit(limit))]
    return out


# -- one pass ----------------------------------------------------------------------------------
@dataclass
class Round:
    round: int
    version: int
    kind: str
    pass_rate: float
    gain: float
    interval: tuple[float, float]
    accepted: bool
    model_calls: int
    n: int
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "version": self.version, "kind": self.kind,
                "pass_rate": round(self.pass_rate, 4), "gain": round(self.gain, 4),
                "interval": [round(x, 4) for x in self.interval], "accepted": self.accepted,
                "model_calls": self.model_calls, "n": self.n, "note": self.note}  # fmt: skip


@dataclass
class _Scored:
    version: PromptVersion
    result: EvalResult

    def scores(self) -> dict[str, float]:
        return {i.id: 1.0 if i.passed else 0.0 for i in self.result.items}


@dataclass
class _Pass:
    config: TyphonConfig
    store: RunStore
    crew: str
    train: list[SuiteItem]
    evaluator: Evaluator
    seed: int = SEED
    versions: PromptVersions = field(init=False)

    def __post_init__(self) -> None:
        self.versions = PromptVersions(self.store)

    def score(self, version: PromptVersion) -> _Scored:
        """Evaluate on the train items that are not among the version's own demonstrations."""
        shown = {d.get("input") for d in version.demos}
        items = [i for i in self.train if i.input not in shown]
        return _Scored(version, self.evaluator.evaluate(self.crew, items, version=version))

    def compare(self, reference: _Scored, candidate: _Scored) -> GateResult:
        ref, cand = reference.scores(), candidate.scores()
        common = [i.id for i in self.train if i.id in ref and i.id in cand]
        return gate([ref[i] for i in common], [cand[i] for i in common],
                    self.config.improve, seed=self.seed)  # fmt: skip

    def judge(self, reference: _Scored, candidate: _Scored, kind: str, number: int) -> Round:
        """Gate ``candidate`` against ``reference``; a loser is retired with the numbers."""
        verdict = self.compare(reference, candidate)
        v = candidate.version.version
        metrics = {"train_pass_rate": round(candidate.result.pass_rate, 4),
                   "train_items": candidate.result.n, "against": reference.version.version,
                   **verdict.to_json()}  # fmt: skip
        self.versions.set_metrics(self.crew, v, metrics)
        if not verdict.accepted:
            self.versions.reject(
                self.crew, v, f"gate against v{reference.version.version}: {verdict.reason}",
                {**metrics, "pass_rate_reference": round(reference.result.pass_rate, 4)},
            )  # fmt: skip
        return Round(number, v, kind, candidate.result.pass_rate, verdict.gain, verdict.interval,
                     verdict.accepted, candidate.result.model_calls, verdict.n,
                     verdict.reason)  # fmt: skip

    def promote(self, baseline: _Scored, best: _Scored, canary: bool) -> tuple[bool, str | None]:
        """Promote ``best`` when it clears the gate against the active version."""
        verdict = self.compare(baseline, best)
        v, was = best.version.version, baseline.version.version
        if not verdict.accepted:
            self.versions.reject(self.crew, v, f"gate against v{was}: {verdict.reason}",
                                 verdict.to_json())  # fmt: skip
            return False, None
        improve = self.config.improve
        why = (f"optimizer: train pass rate {baseline.result.pass_rate:.0%} (v{was}) -> "
               f"{best.result.pass_rate:.0%}; {verdict.reason}")  # fmt: skip
        if canary:
            self.versions.promote(
                self.crew,
                v,
                canary_share=improve.canary_share,
                reason=f"{why}; canary on {improve.canary_share:.0%} of runs",
            )
            return True, "canary"  # fmt: skip
        self.versions.promote(self.crew, v, reason=why)
        return True, "active"

    # -- proposals -----------------------------------------------------------------------------
    def pool(self, best: _Scored) -> list[dict[str, str]]:
        from typhon.improve._learn import examples

        passed = best.result.by_id()
        out: list[dict[str, str]] = []
        for item in self.train:
            if item.check.kind == "equals":
                out.append({"input": item.input, "output": str(item.check.value)})
            elif item.id in passed and passed[item.id].passed:
                out.append({"input": item.input, "output": passed[item.id].output})
        improve = self.config.improve
        for ex in examples(self.store, self.crew, min_score=improve.example_min_score):
            out.append({"input": str(ex["input"]), "output": str(ex["output"])})
        seen: set[str] = set()
        unique = []
        for ex in out:
            if ex["input"] not in seen and len(ex["input"]) + len(ex["output"]) <= MAX_DEMO_CHARS:
                seen.add(ex["input"])
                unique.append(ex)
        return unique

    def failing(self, best: _Scored) -> list[SuiteItem]:
        passed = best.result.by_id()
        return [i for i in self.train if i.id in passed and not passed[i.id].passed]

    def propose_demos(self, best: _Scored, number: int) -> tuple[Prompts, list[dict[str, str]]]:
        k = self.config.improve.demos
        pool = self.pool(best)
        if k == 0 or not pool:
            return best.version.prompts, best.version.demos
        failing = [i.input for i in self.failing(best)]
        rng = random.Random(self.seed * 1000 + number)
        for _ in range(5):  # another draw when it picks the demonstrations the best has
            demos = select_demos(pool, failing, k, rng)
            if demos != best.version.demos:
                return best.version.prompts, demos
        return best.version.prompts, best.version.demos

    def propose_rewrite(self, best: _Scored) -> tuple[Prompts, int, str]:
        from typhon.improve._review import reviewer_for

        improve = self.config.improve
        crew_alias = self.evaluator.alias_for(self.crew, self.train[0].input)
        alias = improve.rewrite_model or reviewer_for(self.config, crew_alias) or crew_alias
        failures = []
        for item in self.failing(best)[:MAX_FAILURES]:
            got = best.result.by_id()[item.id]
            failures.append(f"- Input: {item.input[:400]}\n  Output: {got.output[:400]}\n"
                            f"  Wanted: an output that {item.check.describe()}")  # fmt: skip
        client = self.evaluator.models.client(alias)
        prompts, calls, notes = rewrite_prompts(
            client, self.crew, best.version.prompts, failures,
            _live_critiques(self.store, self.crew),
        )  # fmt: skip
        return prompts, calls, f"rewritten by {alias}" + (f"; {'; '.join(notes)}" if notes else "")

    def run(self, rounds: int, canary: bool) -> dict[str, Any]:
        active = self.versions.ensure(self.crew, self.evaluator.registry.get(self.crew))
        baseline = best = self.score(active)
        self.versions.set_metrics(self.crew, active.version,
                                  {"train_pass_rate": round(baseline.result.pass_rate, 4),
                                   "train_items": baseline.result.n})  # fmt: skip
        calls = baseline.result.model_calls
        plan = ["demos", "rewrite"] if self.config.improve.demos > 0 else ["rewrite"]
        done: list[Round] = []
        for number in range(1, rounds + 1):
            kinds = plan[(number - 1) % len(plan) :] + plan[: (number - 1) % len(plan)]
            proposal = self._propose(best, kinds, number)
            if proposal is None:
                break
            kind, prompts, demos, extra_calls, note = proposal
            version = self.versions.add(
                self.crew, prompts, demos, parent=best.version.version,
                source=f"optimizer:{kind}", note=note,
            )  # fmt: skip
            scored = self.score(version)
            round_ = self.judge(best, scored, kind, number)
            round_.model_calls += extra_calls
            round_.note = f"{note}; {round_.note}" if note else round_.note
            calls += round_.model_calls
            done.append(round_)
            if round_.accepted:
                if best is not baseline:
                    self.versions.reject(self.crew, best.version.version,
                                         f"superseded by v{version.version} in the same pass",
                                         {"by": version.version})  # fmt: skip
                best = scored
        promoted, status = False, None
        if best is not baseline:
            promoted, status = self.promote(baseline, best, canary)
        final = self.compare(baseline, best) if best is not baseline else None
        return {
            "crew": self.crew,
            "train_items": len(self.train),
            "baseline": {"version": baseline.version.version,
                         "pass_rate": round(baseline.result.pass_rate, 4)},
            "best": {"version": best.version.version,
                     "pass_rate": round(best.result.pass_rate, 4),
                     "gain": round(final.gain, 4) if final else 0.0,
                     "interval": [round(x, 4) for x in final.interval] if final else None},
            "promoted": promoted,
            "status": status,
            "canary_share": self.config.improve.canary_share if status == "canary" else None,
            "model_calls": calls,
            "rounds": [r.to_json() for r in done],
        }  # fmt: skip

    def _propose(
        self, best: _Scored, kinds: list[str], number: int
    ) -> tuple[str, Prompts, list[dict[str, str]], int, str] | None:
        for kind in kinds:
            if kind == "demos":
                prompts, demos = self.propose_demos(best, number)
                calls, note = 0, f"{len(demos)} demonstrations"
            else:
                prompts, calls, note = self.propose_rewrite(best)
                demos = best.version.demos
            if prompts != best.version.prompts or demos != best.version.demos:
                return kind, prompts, demos, calls, note
        return None


# -- entry points --------------------------------------------------------------------------------
def _train(items: Sequence[SuiteItem]) -> list[SuiteItem]:
    train = split_items(items, "train")
    if not train:
        raise InputError("the suite has no train items to optimize on")
    return train


def optimize(
    config: TyphonConfig,
    store: RunStore,
    crew: str,
    items: Sequence[SuiteItem],
    *,
    rounds: int | None = None,
    canary: bool = True,
    evaluator: Evaluator | None = None,
    registry: CrewRegistry | None = None,
    seed: int = SEED,
) -> dict[str, Any]:
    """One optimizer pass for ``crew`` on the suite's train items (see the module's docstring):
    ``{crew, baseline, best, promoted, status, rounds, model_calls, ...}``."""
    train = _train(items)
    own = evaluator is None
    evaluator = evaluator or Evaluator(config, store, registry=registry)
    try:
        evaluator.registry.get(crew)
        work = _Pass(config, store, crew, train, evaluator, seed)
        return work.run(rounds or config.improve.rounds, canary)
    finally:
        if own:
            evaluator.close()


def try_candidate(
    config: TyphonConfig,
    store: RunStore,
    crew: str,
    items: Sequence[SuiteItem],
    prompts: Prompts,
    demos: Sequence[Mapping[str, str]] = (),
    *,
    evaluator: Evaluator,
    source: str = "manual",
    note: str = "",
    canary: bool = True,
    seed: int = SEED,
) -> dict[str, Any]:
    """A given candidate through the same gate against the active version: added, evaluated,
    then promoted (canary by default) or rejected. ``{version, gate, promoted, status, ...}``."""
    work = _Pass(config, store, crew, _train(items), evaluator, seed)
    active = work.versions.ensure(crew, evaluator.registry.get(crew))
    baseline = work.score(active)
    version = work.versions.add(crew, prompts, demos, parent=active.version, source=source,
                                note=note)  # fmt: skip
    scored = work.score(version)
    round_ = work.judge(baseline, scored, source, 1)
    promoted, status = False, None
    if round_.accepted:
        promoted, status = work.promote(baseline, scored, canary)
    base = {"version": active.version, "pass_rate": round(baseline.result.pass_rate, 4)}
    return {"crew": crew, "version": version.version, "baseline": base,
            "candidate": round_.to_json(), "promoted": promoted, "status": status,
            "model_calls": baseline.result.model_calls + round_.model_calls}  # fmt: skip


def weekly_pass(
    config: TyphonConfig,
    store: RunStore,
    registry: CrewRegistry | None = None,
    models: ModelRegistry | None = None,
) -> list[dict[str, Any]]:
    """The weekly optimizer pass: ``optimize`` for every crew in ``improve.suites``. A crew whose
    pass fails is logged and reported as ``{crew, error}``; the others go on."""
    out: list[dict[str, Any]] = []
    if not config.improve.suites:
        return out
    with Evaluator(config, store, registry=registry, models=models) as evaluator:
        for crew, path in config.improve.suites.items():
            try:
                items = load_suite(Path(path))
                out.append(optimize(config, store, crew, items, evaluator=evaluator))
            except TyphonError as exc:
                log.warning("optimizer pass failed", crew=crew, suite=str(path), error=str(exc))
                out.append({"crew": crew, "error": str(exc)})
    return out
