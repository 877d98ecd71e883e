"""Retention: episodic memory compacted past an age into one summary per crew, expired cache
entries dropped. (Working memory is cleared at each run's end; per-tier size budgets are kept
on every write.)"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from typhon.memory._open import Memory
from typhon.memory._types import MemoryRecord

__all__ = ["maintain", "summarize_episodes"]


def summarize_episodes(records: list[MemoryRecord]) -> str:
    """An extractive summary of episodes (no model call): counts by status and kind, the span,
    and the first line of each episode, as many as fit."""
    if not records:
        return ""
    statuses = Counter(str(r.meta.get("status") or r.kind) for r in records)
    crew = records[0].crew or "no crew"
    first, last = records[0].created_at, records[-1].created_at
    head = (
        f"Summary of {len(records)} earlier {crew} episodes ({first:%Y-%m-%d} to {last:%Y-%m-%d}): "
        + ", ".join(f"{n} {s}" for s, n in statuses.most_common())
        + "."
    )
    lines = [head]
    for rec in records:
        lines.append("- " + rec.text.splitlines()[0][:160])
    return "\n".join(lines)


def maintain(memory: Memory, *, compact_after_days: float) -> dict[str, Any]:
    """Compact old episodes and drop expired cache entries; say how many of each."""
    compacted = memory.backend.episodic.compact(
        timedelta(days=compact_after_days), summarize_episodes
    )
    expired = memory.cache.expire() if memory.cache is not None else 0
    return {"episodes_compacted": compacted, "cache_entries_expired": expired}
