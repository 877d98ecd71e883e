"""The memory contracts: one small interface per tier, the record they share, their errors.

Tiers (the seed's memory layer):

- **working**: the current run's scratch pad (key -> value), cleared when the run ends;
- **episodic**: what happened (runs, outcomes, feedback), searchable by meaning and filters,
  compacted into summaries past an age;
- **semantic**: long-term knowledge and preferences, searchable by meaning and filters;
- **performance**: which models work for what (calls, failures, tokens, latency, GPU-seconds and
  QA scores per model alias and category).

Backends implement all four: the built-in one (the run store's database + a Qdrant index) and
Letta. Crews and the CLI use :class:`MemoryBackend` and never know which one they have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from typhon.errors import InputError, TyphonError

__all__ = [
    "SEARCHABLE_TIERS",
    "TIERS",
    "EpisodicMemory",
    "MemoryBackend",
    "MemoryBackendError",
    "MemoryInputError",
    "MemoryRecord",
    "ModelPerformanceMemory",
    "SearchableMemory",
    "Tier",
    "WorkingMemory",
]

Tier = Literal["working", "episodic", "semantic", "performance"]
TIERS: tuple[Tier, ...] = ("working", "episodic", "semantic", "performance")
SEARCHABLE_TIERS: tuple[Tier, ...] = ("episodic", "semantic")


class MemoryBackendError(TyphonError):
    """A memory backend failed (unreachable, refused, inconsistent). Names tier and backend."""

    code = "memory_unavailable"
    exit_code = 1

    def __init__(self, message: str, *, tier: str, backend: str):
        self.tier = tier
        self.backend = backend
        super().__init__(f"{tier} memory ({backend}): {message}")


class MemoryInputError(InputError):
    """Bad input to a memory tier (empty query, oversized record). Names tier and backend."""

    def __init__(self, message: str, *, tier: str, backend: str):
        self.tier = tier
        self.backend = backend
        super().__init__(f"{tier} memory ({backend}): {message}")


@dataclass(frozen=True)
class MemoryRecord:
    """One episodic or semantic memory. ``kind`` says what it is: ``run`` / ``summary`` /
    ``feedback`` (episodic), ``fact`` / ``preference`` (semantic), or anything a crew chooses.
    ``score`` is the similarity to the query in search results (cosine, 0..1), else None."""

    id: str
    tier: Tier
    text: str
    created_at: datetime
    crew: str | None = None
    run_id: str | None = None
    tags: tuple[str, ...] = ()
    kind: str = "note"
    meta: dict[str, Any] = field(default_factory=dict)
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tier": self.tier,
            "text": self.text,
            "created_at": self.created_at.isoformat(),
            "crew": self.crew,
            "run_id": self.run_id,
            "tags": list(self.tags),
            "kind": self.kind,
            "meta": self.meta,
            "score": None if self.score is None else round(self.score, 4),
        }


class WorkingMemory(Protocol):
    """A run's scratch pad: JSON values by key, gone when the run ends."""

    def put(self, run_id: str, key: str, value: Any) -> None: ...

    def get(self, run_id: str, key: str, default: Any = None) -> Any: ...

    def items(self, run_id: str) -> dict[str, Any]: ...

    def clear(self, run_id: str) -> int: ...


class SearchableMemory(Protocol):
    """Episodic or semantic memory: records searchable by meaning and by filters."""

    tier: Tier

    def add(
        self,
        text: str,
        *,
        crew: str | None = None,
        run_id: str | None = None,
        tags: Sequence[str] = (),
        kind: str = "note",
        meta: dict[str, Any] | None = None,
    ) -> MemoryRecord: ...

    def get(self, record_id: str) -> MemoryRecord | None: ...

    def search(
        self,
        query: str,
        *,
        k: int = 5,
        crew: str | None = None,
        tags: Sequence[str] = (),
        kind: str | None = None,
        since: datetime | None = None,
        min_score: float = 0.0,
    ) -> list[MemoryRecord]: ...

    def list(
        self,
        *,
        limit: int = 50,
        crew: str | None = None,
        tags: Sequence[str] = (),
        kind: str | None = None,
        since: datetime | None = None,
    ) -> list[MemoryRecord]: ...

    def forget(self, record_id: str) -> bool: ...

    def count(self) -> int: ...


class EpisodicMemory(SearchableMemory, Protocol):
    def compact(self, older_than: timedelta, summarize: Callable[[list[MemoryRecord]], str]) -> int:
        """Replace episodes older than ``older_than`` by one summary per crew (kind
        ``summary``, listing the ids it replaced); return how many episodes were folded."""
        ...


class ModelPerformanceMemory(Protocol):
    """Which models work for what: running totals per model alias and category."""

    def record(
        self,
        alias: str,
        category: str | None,
        *,
        calls: int = 0,
        failures: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        latency_s: float = 0.0,
        gpu_s: float = 0.0,
        runs: int = 0,
        runs_ok: int = 0,
        qa_score: float | None = None,
    ) -> None: ...

    def stats(
        self, alias: str | None = None, category: str | None = None
    ) -> list[dict[str, Any]]: ...


class MemoryBackend(Protocol):
    """The four tiers of one backend."""

    name: str
    working: WorkingMemory
    episodic: EpisodicMemory
    semantic: SearchableMemory
    performance: ModelPerformanceMemory

    def close(self) -> None: ...
