"""The semantic cache in front of model calls.

A request is served from the cache only when an earlier answer's request is at least
``threshold`` similar (cosine of the MiniLM embeddings; 0.92 by default, as in the seed), was
answered by the same model alias, under the same prompt-template version, within ``ttl_s``.
Entries of a retired prompt version are deleted and never served. Hits and misses are counted
per alias in the database.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from typhon._types import Usage
from typhon.config import MemoryCacheSettings
from typhon.memory._builtin import _slug, _Vectors
from typhon.memory._embed import Embedder
from typhon.models._client import ChatResult, ChatStream, Message, ModelClient
from typhon.store import RunStore, metadata

__all__ = ["CacheHit", "CachingClient", "SemanticCache", "request_text"]

cache_entries = sa.Table(
    "memory_cache",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("alias", sa.String(128), nullable=False, index=True),
    sa.Column("prompt_version", sa.String(128), nullable=False, index=True),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("hits", sa.Integer, nullable=False, server_default="0"),
)

cache_counts = sa.Table(
    "memory_cache_counts",
    metadata,
    sa.Column("alias", sa.String(128), primary_key=True),
    sa.Column("hits", sa.Integer, nullable=False, server_default="0"),
    sa.Column("misses", sa.Integer, nullable=False, server_default="0"),
)


def request_text(messages: Sequence[Message]) -> str:
    """What the cache compares: the request's messages, role by role."""
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages)


@dataclass(frozen=True)
class CacheHit:
    id: str
    response: str
    score: float
    request: str


class SemanticCache:
    """Answers by meaning, on the run store's database and a Qdrant collection."""

    def __init__(
        self,
        store: RunStore,
        embedder: Embedder,
        vectors: _Vectors,
        settings: MemoryCacheSettings | None = None,
    ):
        self.store = store
        self.embedder = embedder
        self.vectors = vectors
        self.settings = settings or MemoryCacheSettings()
        self._ready = False

    @property
    def _name(self) -> str:
        return f"typhon_cache_{_slug(self.embedder.model)}"

    def _prepare(self) -> None:
        if not self._ready:
            self.store.migrate_once()
            with self.store.engine.begin() as conn:
                metadata.create_all(conn, tables=[cache_entries, cache_counts])
            self.vectors.ensure(self._name, self.embedder.dim)
            self._ready = True

    def _filter(self, alias: str, prompt_version: str, now: float) -> Any:
        from qdrant_client import models

        return models.Filter(
            must=[
                models.FieldCondition(key="alias", match=models.MatchValue(value=alias)),
                models.FieldCondition(
                    key="prompt_version", match=models.MatchValue(value=prompt_version)
                ),
                models.FieldCondition(key="expires_at", range=models.Range(gt=now)),
            ]
        )

    def lookup(self, alias: str, prompt_version: str, request: str) -> CacheHit | None:
        """The best earlier answer at or above the threshold, or None (counted either way)."""
        self._prepare()
        [vector] = self.embedder.embed([request])
        found = self.vectors.client.query_points(
            self._name,
            query=vector,
            limit=1,
            query_filter=self._filter(alias, prompt_version, time.time()),
            score_threshold=self.settings.threshold,
        ).points
        hit: CacheHit | None = None
        if found:
            query = sa.select(cache_entries).where(cache_entries.c.id == str(found[0].id))
            with self.store.engine.connect() as conn:
                row = conn.execute(query).mappings().first()
            if row is not None and row["expires_at"] > time.time():
                hit = CacheHit(row["id"], row["response"], float(found[0].score), row["request"])
        self._count(alias, hit is not None, hit.id if hit else None)
        return hit

    def put(self, alias: str, prompt_version: str, request: str, response: str) -> str:
        from qdrant_client import models

        self._prepare()
        [vector] = self.embedder.embed([request])
        entry_id = str(uuid.uuid4())
        expires = time.time() + self.settings.ttl_s
        with self.store.engine.begin() as conn:
            conn.execute(
                cache_entries.insert().values(
                    id=entry_id, alias=alias, prompt_version=prompt_version, request=request,
                    response=response, created_at=datetime.now(UTC), expires_at=expires,
                )
            )  # fmt: skip
            self.vectors.client.upsert(
                self._name,
                points=[
                    models.PointStruct(
                        id=entry_id,
                        vector=vector,
                        payload={
                            "alias": alias,
                            "prompt_version": prompt_version,
                            "expires_at": expires,
                        },
                    )
                ],
                wait=True,
            )
        return entry_id

    def retire(self, prompt_version: str) -> int:
        """Delete every entry of a retired prompt version."""
        from qdrant_client import models

        self._prepare()
        with self.store.engine.begin() as conn:
            gone = conn.execute(
                cache_entries.delete().where(cache_entries.c.prompt_version == prompt_version)
            ).rowcount
        self.vectors.client.delete(
            self._name,
            points_selector=models.FilterSelector(
                filter=models.Filter(
                    must=[
                        models.FieldCondition(
                            key="prompt_version", match=models.MatchValue(value=prompt_version)
                        )
                    ]
                )
            ),
            wait=True,
        )
        return int(gone)

    def expire(self) -> int:
        """Delete expired entries (their vectors too)."""
        from qdrant_client import models

        self._prepare()
        now = time.time()
        with self.store.engine.begin() as conn:
            gone = conn.execute(
                cache_entries.delete().where(cache_entries.c.expires_at <= now)
            ).rowcount
        self.vectors.client.delete(
            self._name,
            points_selector=models.FilterSelector(
                filter=models.Filter(
                    must=[models.FieldCondition(key="expires_at", range=models.Range(lte=now))]
                )
            ),
            wait=True,
        )
        return int(gone)

    def _count(self, alias: str, hit: bool, entry_id: str | None) -> None:
        if self.store.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        t = cache_counts
        stmt = insert(t).values(alias=alias, hits=int(hit), misses=int(not hit))
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.alias],
            set_={
                "hits": t.c.hits + stmt.excluded.hits,
                "misses": t.c.misses + stmt.excluded.misses,
            },
        )
        with self.store.engine.begin() as conn:
            conn.execute(stmt)
            if entry_id is not None:
                conn.execute(
                    cache_entries.update()
                    .where(cache_entries.c.id == entry_id)
                    .values(hits=cache_entries.c.hits + 1)
                )

    def stats(self) -> dict[str, dict[str, int]]:
        self._prepare()
        with self.store.engine.connect() as conn:
            rows = list(conn.execute(sa.select(cache_counts)).mappings())
            entries = int(
                conn.execute(sa.select(sa.func.count()).select_from(cache_entries)).scalar_one()
            )
        out = {r["alias"]: {"hits": int(r["hits"]), "misses": int(r["misses"])} for r in rows}
        out["_all"] = {
            "hits": sum(v["hits"] for v in out.values()),
            "misses": sum(v["misses"] for v in out.values()),
            "entries": entries,
        }
        return out


def prompt_version_of(*parts: object) -> str:
    """A short stable version id for a set of prompt templates (until they are versioned)."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
    return f"h:{digest}"


class CachingClient:
    """A ModelClient in front of another: plain chat calls (no tools) are answered from the
    semantic cache when it has a close enough earlier answer, and stored when it has not."""

    def __init__(
        self,
        inner: ModelClient,
        cache: SemanticCache,
        *,
        prompt_version: str,
        alias: str | None = None,
    ):
        self.inner = inner
        self.cache = cache
        self.prompt_version = prompt_version
        self.alias = alias or inner.alias
        self.url = inner.url

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        cacheable = not tools
        request = request_text(messages)
        if cacheable:
            hit = self.cache.lookup(self.alias, self.prompt_version, request)
            if hit is not None:
                return ChatResult(
                    hit.response, Usage(), "cache", "stop", alias=self.alias, url="cache"
                )
        result = self.inner.chat(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            response_format=response_format,
            tools=tools,
            stop=stop,
        )
        if cacheable and result.content and not result.tool_calls:
            self.cache.put(self.alias, self.prompt_version, request, result.content)
        return result

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        request = request_text(messages)
        hit = self.cache.lookup(self.alias, self.prompt_version, request)
        if hit is not None:
            text = hit.response

            def cached() -> Iterator[str]:
                yield text

            return ChatStream(
                cached(),
                lambda: ChatResult(text, Usage(), "cache", "stop", alias=self.alias, url="cache"),
            )
        inner = self.inner.stream(messages, max_tokens=max_tokens, temperature=temperature)

        def chunks() -> Iterator[str]:
            yield from inner

        def finish() -> ChatResult:
            assert inner.result is not None
            if inner.result.content:
                self.cache.put(self.alias, self.prompt_version, request, inner.result.content)
            return inner.result

        return ChatStream(chunks(), finish)
