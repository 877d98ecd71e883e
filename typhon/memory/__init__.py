"""Memory tiers: working, episodic, semantic and model performance; local embeddings; the
semantic cache; backends (built-in: the run store's database + Qdrant; Letta).

Heavy parts (onnxruntime, qdrant-client) load on first use, not on import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typhon.memory._types import (
    SEARCHABLE_TIERS,
    TIERS,
    EpisodicMemory,
    MemoryBackend,
    MemoryBackendError,
    MemoryInputError,
    MemoryRecord,
    ModelPerformanceMemory,
    SearchableMemory,
    Tier,
    WorkingMemory,
)

if TYPE_CHECKING:
    from typhon.memory._open import Memory, open_memory, recall_text

__all__ = [
    "SEARCHABLE_TIERS",
    "TIERS",
    "EpisodicMemory",
    "Memory",
    "MemoryBackend",
    "MemoryBackendError",
    "MemoryInputError",
    "MemoryRecord",
    "ModelPerformanceMemory",
    "SearchableMemory",
    "Tier",
    "WorkingMemory",
    "open_memory",
    "recall_text",
]


def __getattr__(name: str) -> Any:
    if name in ("Memory", "open_memory", "recall_text"):
        from typhon.memory import _open

        return getattr(_open, name)
    raise AttributeError(f"module 'typhon.memory' has no attribute {name!r}")
