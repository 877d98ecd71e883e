"""What every memory backend does the same way: times, model-performance totals, compaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from typhon.memory._types import MemoryRecord, SearchableMemory

__all__ = ["PERF_SUMS", "as_utc", "fold_episodes", "now", "perf_increments", "perf_row"]

PERF_SUMS = (
    "calls", "failures", "prompt_tokens", "completion_tokens", "latency_s", "gpu_s", "runs",
    "runs_ok",
)  # fmt: skip


def now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def perf_increments(
    *,
    calls: int,
    failures: int,
    prompt_tokens: int,
    completion_tokens: int,
    latency_s: float,
    gpu_s: float,
    runs: int,
    runs_ok: int,
    qa_score: float | None,
) -> dict[str, Any]:
    """One ``ModelPerformanceMemory.record()`` call as the amounts to add to the stored totals."""
    return {
        "calls": calls, "failures": failures, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "latency_s": latency_s, "gpu_s": gpu_s,
        "runs": runs, "runs_ok": runs_ok,
        "qa_sum": qa_score or 0.0, "qa_n": 0 if qa_score is None else 1,
    }  # fmt: skip


def perf_row(alias: str, category: str | None, totals: Mapping[str, Any]) -> dict[str, Any]:
    """Stored totals of one alias and category as ``stats()`` returns them, rates included."""
    calls, runs = int(totals.get("calls", 0)), int(totals.get("runs", 0))
    qa_n = int(totals.get("qa_n", 0))
    return {
        "alias": alias,
        "category": category or None,
        **{k: totals.get(k, 0) for k in PERF_SUMS},
        "failure_rate": round(totals.get("failures", 0) / calls, 4) if calls else 0.0,
        "success_rate": round(totals.get("runs_ok", 0) / runs, 4) if runs else None,
        "mean_latency_s": round(totals.get("latency_s", 0.0) / calls, 4) if calls else None,
        "qa_score": round(totals.get("qa_sum", 0.0) / qa_n, 4) if qa_n else None,
        "qa_reviews": qa_n,
    }


def fold_episodes(
    memory: SearchableMemory,
    old: list[MemoryRecord],
    summarize: Callable[[list[MemoryRecord]], str],
    max_chars: int,
) -> int:
    """Replace ``old`` episodes (oldest first) by one summary per crew (kind ``summary``, tag
    ``summary``, ``meta["replaces"]`` their ids, dated as the newest one). Each summary is
    written before its episodes are forgotten; returns how many were folded."""
    by_crew: dict[str | None, list[MemoryRecord]] = {}
    for rec in old:
        by_crew.setdefault(rec.crew, []).append(rec)
    folded = 0
    for crew, group in by_crew.items():
        memory.add(  # type: ignore[call-arg]  # both backends take created_at
            summarize(group)[:max_chars], crew=crew, kind="summary", tags=("summary",),
            meta={"replaces": [r.id for r in group], "from": group[0].created_at.isoformat(),
                  "to": group[-1].created_at.isoformat()},
            created_at=group[-1].created_at,
        )  # fmt: skip
        for rec in group:
            memory.forget(rec.id)
        folded += len(group)
    return folded
