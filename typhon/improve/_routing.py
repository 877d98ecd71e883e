"""Routing refinement: move a category to another model when the evidence says it does better.

The evidence is what runs left behind: each judged run's score (a person's verdict, else the QA
score), by the model that answered it and the category it was routed as, plus the model calls'
failures and latency. For each category, every other chat model with at least ``min_runs`` judged
runs in it is compared with the model the active rules send it to. A move is proposed when the
other model's mean score is higher by at least ``improve.gain_margin`` and a bootstrap interval
of the difference (``improve.confidence``, fixed seed) excludes 0, and its failure rate is not
higher. Applying a proposal adds a new rules version (source ``improve``, with the numbers in its
note) and makes it active; ``typhon routing activate N`` rolls it back.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from typhon.config import CATEGORIES, TyphonConfig
from typhon.improve._scores import judged_runs
from typhon.store import RunStore

__all__ = ["Proposal", "bootstrap_interval", "propose", "refine_routing"]


@dataclass(frozen=True)
class Proposal:
    category: str
    current: str
    proposed: str
    current_score: float
    proposed_score: float
    gain: float
    interval: tuple[float, float]
    current_runs: int
    proposed_runs: int
    current_failure_rate: float
    proposed_failure_rate: float

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        return out


def bootstrap_interval(
    a: list[float], b: list[float], *, samples: int, confidence: float, seed: int = 7
) -> tuple[float, float]:
    """The bootstrap interval of mean(b) - mean(a) (independent samples)."""
    rng = random.Random(seed)
    diffs = []
    for _ in range(samples):
        ra = [a[rng.randrange(len(a))] for _ in a]
        rb = [b[rng.randrange(len(b))] for _ in b]
        diffs.append(sum(rb) / len(rb) - sum(ra) / len(ra))
    diffs.sort()
    tail = (1 - confidence) / 2
    lo = diffs[int(tail * (samples - 1))]
    hi = diffs[int((1 - tail) * (samples - 1))]
    return round(lo, 4), round(hi, 4)


def _failure_rates(store: RunStore, since: datetime) -> dict[tuple[str, str | None], float]:
    out = {}
    for row in store.model_stats(since=since):
        calls = int(row["calls"])
        if calls:
            out[(row["alias"], row["category"])] = int(row["failures"]) / calls
    return out


def propose(
    config: TyphonConfig, store: RunStore, *, days: float = 30, min_runs: int = 10
) -> list[Proposal]:
    """Moves the evidence of the last ``days`` supports (see the module's docstring)."""
    from typhon.models._router import RoutingRules

    since = datetime.now(UTC) - timedelta(days=days)
    row = store.active_rules()
    if row is None:
        return []
    rules = RoutingRules.from_row(row)
    chat = {m.model_name for m in config.models if m.is_chat}
    scores: dict[tuple[str, str], list[float]] = {}
    for judged in judged_runs(store, since=since):
        if judged.model and judged.category:
            scores.setdefault((judged.category, judged.model), []).append(judged.score)
    failures = _failure_rates(store, since)
    settings = config.improve
    out: list[Proposal] = []
    for category in CATEGORIES:
        current = rules.models.get(category)
        if current is None:
            continue
        mine = scores.get((category, current), [])
        if len(mine) < min_runs:
            continue
        best: Proposal | None = None
        for alias in sorted(chat - {current}):
            theirs = scores.get((category, alias), [])
            if len(theirs) < min_runs:
                continue
            gain = sum(theirs) / len(theirs) - sum(mine) / len(mine)
            interval = bootstrap_interval(
                mine, theirs, samples=settings.bootstrap_samples, confidence=settings.confidence
            )
            fail_now = failures.get((current, category), 0.0)
            fail_new = failures.get((alias, category), 0.0)
            if gain < settings.gain_margin or interval[0] <= 0 or fail_new > fail_now:
                continue
            candidate = Proposal(
                category, current, alias, round(sum(mine) / len(mine), 4),
                round(sum(theirs) / len(theirs), 4), round(gain, 4), interval, len(mine),
                len(theirs), round(fail_now, 4), round(fail_new, 4),
            )  # fmt: skip
            if best is None or candidate.gain > best.gain:
                best = candidate
        if best is not None:
            out.append(best)
    return out


def refine_routing(
    config: TyphonConfig,
    store: RunStore,
    *,
    apply: bool = False,
    days: float = 30,
    min_runs: int = 10,
) -> dict[str, Any]:
    """Proposals, and with ``apply`` one new active rules version holding all of them."""
    proposals = propose(config, store, days=days, min_runs=min_runs)
    result: dict[str, Any] = {"proposals": [p.to_json() for p in proposals], "version": None}
    if not (apply and proposals):
        return result
    row = store.active_rules()
    assert row is not None
    body = dict(row["body"])
    categories = {k: dict(v) for k, v in body.get("categories", {}).items()}
    for p in proposals:
        categories[p.category]["model"] = p.proposed
    body["categories"] = categories
    body.pop("source_hash", None)  # not the configuration's mapping any more
    note = "; ".join(
        f"{p.category}: {p.current} -> {p.proposed} (score {p.current_score:.2f} -> "
        f"{p.proposed_score:.2f}, interval {p.interval[0]:+.2f}..{p.interval[1]:+.2f}, "
        f"{p.current_runs}/{p.proposed_runs} runs)"
        for p in proposals
    )
    added = store.add_rules(body, source="improve", note=note)
    result["version"] = added["version"]
    from typhon.improve._prompts import PromptVersions

    PromptVersions(store).record_event(
        "_routing", "routing_changed", row["version"], added["version"], note,
        {"proposals": result["proposals"]},
    )  # fmt: skip
    return result
