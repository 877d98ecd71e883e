"""Open the configured memory: its backend, its embedder and the semantic cache."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from typhon.config import TyphonConfig
from typhon.memory._types import MemoryBackend, MemoryRecord

if TYPE_CHECKING:
    from typhon.memory._cache import SemanticCache
    from typhon.memory._embed import Embedder
    from typhon.models import ModelRegistry
    from typhon.store import RunStore

__all__ = ["Memory", "open_memory", "recall_text"]


@dataclass
class Memory:
    """The configured memory of this process."""

    backend: MemoryBackend
    embedder: Embedder
    cache: SemanticCache | None
    _closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        self.backend.close()
        for close in self._closers:
            close()

    def recall(
        self, query: str, *, crew: str | None, k: int, token_budget: int
    ) -> list[MemoryRecord]:
        """The memories a run starts with: the most relevant semantic and episodic records,
        best first, within ``token_budget`` (about four characters a token)."""
        if k <= 0 or token_budget <= 0 or not query.strip():
            return []
        found = [
            *self.backend.semantic.search(query, k=k, min_score=0.3),
            *self.backend.episodic.search(query, k=k, crew=crew, min_score=0.3),
        ]
        found.sort(key=lambda r: r.score or 0.0, reverse=True)
        chosen: list[MemoryRecord] = []
        used = 0
        for rec in found:
            cost = len(rec.text) // 4 + 1
            if used + cost > token_budget:
                continue
            chosen.append(rec)
            used += cost
            if len(chosen) >= k:
                break
        return chosen


def recall_text(records: list[MemoryRecord]) -> str:
    """Memories as a prompt section."""
    return "\n".join(f"- ({r.tier}{', ' + r.kind if r.kind else ''}) {r.text}" for r in records)


_lock = threading.Lock()


def open_memory(
    config: TyphonConfig, store: RunStore, models: ModelRegistry | None = None
) -> Memory:
    """The backend the configuration names (``builtin`` or ``letta``), the embedder
    (``local`` MiniLM or a model alias), and the semantic cache (on the built-in index)."""
    from typhon.memory._builtin import BuiltinBackend
    from typhon.memory._cache import SemanticCache
    from typhon.memory._embed import EndpointEmbedder, default_embedder
    from typhon.memory._index import HnswIndex, QdrantIndex, VectorIndex

    settings = config.memory
    closers: list[Any] = []
    embedder: Embedder
    if settings.embeddings == "local":
        embedder = default_embedder()
    else:
        from typhon.models import ModelRegistry

        registry = models or ModelRegistry(config)
        endpoint = EndpointEmbedder(registry, settings.embeddings)
        closers.append(endpoint.close)
        embedder = endpoint
    index: VectorIndex
    if settings.qdrant_url:
        index = QdrantIndex(url=settings.qdrant_url)
    else:
        index = HnswIndex(store, config.home / "vectors")
    builtin = BuiltinBackend(
        store,
        embedder,
        index=index,
        max_record_chars=settings.max_record_chars,
        max_records=settings.max_records,
    )
    backend: MemoryBackend = builtin
    if settings.backend == "letta":
        backend = _letta(config, embedder, models)
        closers.append(builtin.close)  # the semantic cache stays on the built-in index
    cache = SemanticCache(store, embedder, builtin.index, settings.cache)
    return Memory(backend, embedder, cache if settings.cache.enabled else None, closers)


def _letta(config: TyphonConfig, embedder: Embedder, models: ModelRegistry | None) -> MemoryBackend:
    """The Letta backend; its archives embed through an OpenAI-compatible endpoint Letta can
    reach: ``memory.letta_embeddings_url``, else the embeddings alias's own endpoint."""
    from typhon.config import OLLAMA_PROVIDERS
    from typhon.memory._letta import LettaBackend
    from typhon.models import endpoint_of

    settings = config.memory
    assert settings.letta_url is not None  # checked by the configuration
    endpoint = settings.letta_embeddings_url
    model = embedder.model
    if endpoint is None:  # an alias (a local model needs letta_embeddings_url: validated)
        entry = config.model(settings.embeddings)
        base = endpoint_of(entry)
        endpoint = base + "/v1" if entry.litellm_params.provider in OLLAMA_PROVIDERS else base
        model = entry.litellm_params.model_id
    return LettaBackend(
        settings.letta_url,
        embedding_endpoint=endpoint,
        embedding_model=model,
        embedding_dim=embedder.dim,
        token=settings.letta_token,
        namespace=settings.letta_namespace,
        max_record_chars=settings.max_record_chars,
        max_records=settings.max_records,
    )
