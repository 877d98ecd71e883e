"""The built-in memory backend: records and their vectors in the run store's database (SQLite or
PostgreSQL), searched through a vector index (``typhon.memory._index``: an HNSW graph in each
process by default, or a Qdrant server at ``memory.qdrant_url``).

A record and its vector are written in one transaction, so neither is ever left without the
other. Each vector collection is named after the embedding model
(``typhon_semantic_all-minilm-l6-v2-int8``); records remember their model, and records embedded
by another model are re-embedded into the current collection on first use instead of mixing
vector spaces.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from typhon.memory._index import Condition, HnswIndex, Match, Range, VectorIndex
from typhon.memory._shared import as_utc, fold_episodes, now, perf_increments, perf_row
from typhon.memory._types import (
    EpisodicMemory,
    MemoryBackendError,
    MemoryInputError,
    MemoryRecord,
    ModelPerformanceMemory,
    SearchableMemory,
    Tier,
    WorkingMemory,
)
from typhon.store import RunStore, memory_performance, memory_records, memory_working

if TYPE_CHECKING:
    from typhon.memory._embed import Embedder

__all__ = ["BuiltinBackend"]

_REEMBED_BATCH = 64


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


class _Searchable:
    """Episodic or semantic memory on the built-in backend."""

    def __init__(self, backend: BuiltinBackend, tier: Tier):
        self.backend = backend
        self.tier: Tier = tier
        self._checked_model = False

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def _name(self) -> str:
        return f"typhon_{self.tier}_{_slug(self.backend.embedder.model)}"

    def _error(self, message: str) -> MemoryBackendError:
        return MemoryBackendError(message, tier=self.tier, backend=self.backend.name_detail)

    def _input(self, message: str) -> MemoryInputError:
        return MemoryInputError(message, tier=self.tier, backend=self.backend.name_detail)

    def _embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self.backend.embedder.embed(list(texts))
        dim = self.backend.embedder.dim
        for v in vectors:
            if len(v) != dim:
                raise self._error(
                    f"embedding model '{self.backend.embedder.model}' returned {len(v)}-dim"
                    f" vectors, expected {dim}"
                )
        return vectors

    def _ready(self) -> None:
        self.backend.store.migrate_once()
        if not self._checked_model:
            self._reembed_other_models()
            self._checked_model = True

    def _payload(self, rec: MemoryRecord) -> dict[str, Any]:
        return {
            "crew": rec.crew,
            "run_id": rec.run_id,
            "tags": list(rec.tags),
            "kind": rec.kind,
            "created_at": rec.created_at.timestamp(),
        }

    # -- writes ----------------------------------------------------------------------------------
    def add(
        self,
        text: str,
        *,
        crew: str | None = None,
        run_id: str | None = None,
        tags: Sequence[str] = (),
        kind: str = "note",
        meta: dict[str, Any] | None = None,
        created_at: datetime | None = None,
    ) -> MemoryRecord:
        if not text.strip():
            raise self._input("nothing to remember: the text is empty")
        limit = self.backend.max_record_chars
        if len(text) > limit:
            raise self._input(
                f"a record of {len(text)} characters is over the limit of {limit}"
                " (memory.max_record_chars); shorten or split it"
            )
        rec = MemoryRecord(
            id=str(uuid.uuid4()), tier=self.tier, text=text,
            created_at=as_utc(created_at) if created_at else now(), crew=crew, run_id=run_id,
            tags=tuple(dict.fromkeys(tags)), kind=kind, meta=dict(meta or {}),
        )  # fmt: skip
        self._ready()
        [vector] = self._embed([text])
        self._write([rec], [vector])
        self._enforce_budget()
        return rec

    def _write(self, records: Sequence[MemoryRecord], vectors: Sequence[list[float]]) -> None:
        """Rows and vectors in one transaction."""
        rows = [
            {
                "id": r.id, "tier": r.tier, "text": r.text, "created_at": r.created_at,
                "crew": r.crew, "run_id": r.run_id, "tags": list(r.tags), "kind": r.kind,
                "meta": r.meta, "embed_model": self.backend.embedder.model,
            }
            for r in records
        ]  # fmt: skip
        try:
            with self.backend.store.engine.begin() as conn:
                conn.execute(memory_records.insert(), rows)
                self._index_call(
                    "the vector index refused the write",
                    lambda: self.backend.index.add(
                        conn, self._name, [r.id for r in records], vectors,
                        [self._payload(r) for r in records],
                    ),
                )  # fmt: skip
        except sa.exc.SQLAlchemyError as exc:
            raise self._error(f"the database refused the write: {exc}".splitlines()[0]) from None

    def _index_call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (MemoryBackendError, sa.exc.SQLAlchemyError):
            raise
        except Exception as exc:
            raise self._error(f"{what}: {exc}") from None

    def forget(self, record_id: str) -> bool:
        self._ready()
        with self.backend.store.engine.begin() as conn:
            deleted = conn.execute(
                memory_records.delete().where(
                    memory_records.c.id == record_id, memory_records.c.tier == self.tier
                )
            ).rowcount
            if deleted:
                self._index_call(
                    f"could not remove the vector of {record_id}",
                    lambda: self.backend.index.remove(conn, self._name, [record_id]),
                )
        return bool(deleted)

    def _enforce_budget(self) -> None:
        budget = self.backend.max_records.get(self.tier)
        if budget is None:
            return
        over = self.count() - budget
        if over <= 0:
            return
        query = (
            sa.select(memory_records.c.id)
            .where(memory_records.c.tier == self.tier)
            .order_by(memory_records.c.created_at, memory_records.c.id)
            .limit(over)
        )
        with self.backend.store.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(query)]
        for record_id in ids:
            self.forget(record_id)

    # -- reads -----------------------------------------------------------------------------------
    def get(self, record_id: str) -> MemoryRecord | None:
        rows = self._rows([record_id])
        return rows.get(record_id)

    def _rows(self, ids: Sequence[str]) -> dict[str, MemoryRecord]:
        if not ids:
            return {}
        # by primary key alone: with a tier term SQLite would scan the tier's index instead
        query = sa.select(memory_records).where(memory_records.c.id.in_(list(ids)))
        self.backend.store.migrate_once()
        with self.backend.store.engine.connect() as conn:
            rows = [_record(r) for r in conn.execute(query).mappings()]
        return {r.id: r for r in rows if r.tier == self.tier}

    @staticmethod
    def _conditions(
        crew: str | None, tags: Sequence[str], kind: str | None, since: datetime | None
    ) -> list[Condition]:
        conditions: list[Condition] = []
        if crew is not None:
            conditions.append(Match("crew", crew))
        conditions.extend(Match("tags", tag) for tag in tags)
        if kind is not None:
            conditions.append(Match("kind", kind))
        if since is not None:
            conditions.append(Range("created_at", gte=as_utc(since).timestamp()))
        return conditions

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
    ) -> list[MemoryRecord]:
        if not query.strip():
            raise self._input("the search query is empty; say what to look for")
        if k <= 0:
            return []
        self._ready()
        [vector] = self._embed([query])
        found = self._index_call(
            "search failed",
            lambda: self.backend.index.query(
                self._name, vector, k, self._conditions(crew, tags, kind, since),
                min_score if min_score > 0 else None,
            ),
        )  # fmt: skip
        rows = self._rows([pid for pid, _ in found])
        out = []
        for pid, score in found:
            rec = rows.get(pid)
            if rec is not None:
                out.append(_with_score(rec, score))
        return out

    def list(
        self,
        *,
        limit: int = 50,
        crew: str | None = None,
        tags: Sequence[str] = (),
        kind: str | None = None,
        since: datetime | None = None,
    ) -> list[MemoryRecord]:
        c = memory_records.c
        query = sa.select(memory_records).where(c.tier == self.tier)
        if crew is not None:
            query = query.where(c.crew == crew)
        if kind is not None:
            query = query.where(c.kind == kind)
        if since is not None:
            query = query.where(c.created_at >= as_utc(since))
        query = query.order_by(c.created_at.desc(), c.id)
        self.backend.store.migrate_once()
        out: list[MemoryRecord] = []
        with self.backend.store.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                rec = _record(row)
                if all(t in rec.tags for t in tags):
                    out.append(rec)
                    if len(out) >= limit:
                        break
        return out

    def count(self) -> int:
        self.backend.store.migrate_once()
        query = sa.select(sa.func.count()).where(memory_records.c.tier == self.tier)
        with self.backend.store.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # -- model changes ---------------------------------------------------------------------------
    def _reembed_other_models(self) -> None:
        """Records embedded by another model go into this model's collection (re-embedded)."""
        c = memory_records.c
        model = self.backend.embedder.model
        self.backend.store.migrate_once()
        while True:
            query = (
                sa.select(memory_records)
                .where(c.tier == self.tier, c.embed_model != model)
                .limit(_REEMBED_BATCH)
            )
            with self.backend.store.engine.connect() as conn:
                rows = list(conn.execute(query).mappings())
            if not rows:
                return
            batch = [_record(r) for r in rows]
            vectors = self._embed([r.text for r in batch])
            ids = [r.id for r in batch]
            with self.backend.store.engine.begin() as conn:
                for old in {r["embed_model"] for r in rows if r["embed_model"]}:
                    mine = [r["id"] for r in rows if r["embed_model"] == old]
                    self.backend.index.remove(conn, f"typhon_{self.tier}_{_slug(old)}", mine)
                self.backend.index.add(
                    conn, self._name, ids, vectors, [self._payload(r) for r in batch]
                )
                conn.execute(memory_records.update().where(c.id.in_(ids)).values(embed_model=model))


class _Episodic(_Searchable):
    def compact(self, older_than: timedelta, summarize: Callable[[list[MemoryRecord]], str]) -> int:
        cutoff = now() - older_than
        c = memory_records.c
        query = (
            sa.select(memory_records)
            .where(c.tier == self.tier, c.created_at < cutoff, c.kind != "summary")
            .order_by(c.created_at)
        )
        self.backend.store.migrate_once()
        with self.backend.store.engine.connect() as conn:
            old = [_record(r) for r in conn.execute(query).mappings()]
        return fold_episodes(self, old, summarize, self.backend.max_record_chars)


class _Working:
    def __init__(self, backend: BuiltinBackend):
        self.backend = backend

    def put(self, run_id: str, key: str, value: Any) -> None:
        store = self.backend.store
        store.migrate_once()
        t = memory_working
        with store.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.run_id == run_id, t.c.key == key))
            conn.execute(t.insert().values(run_id=run_id, key=key, value=value, updated_at=now()))

    def get(self, run_id: str, key: str, default: Any = None) -> Any:
        return self.items(run_id).get(key, default)

    def items(self, run_id: str) -> dict[str, Any]:
        store = self.backend.store
        store.migrate_once()
        t = memory_working
        query = sa.select(t.c.key, t.c.value).where(t.c.run_id == run_id).order_by(t.c.key)
        with store.engine.connect() as conn:
            return {k: v for k, v in conn.execute(query)}

    def clear(self, run_id: str) -> int:
        store = self.backend.store
        store.migrate_once()
        t = memory_working
        with store.engine.begin() as conn:
            return int(conn.execute(t.delete().where(t.c.run_id == run_id)).rowcount)


class _Performance:
    def __init__(self, backend: BuiltinBackend):
        self.backend = backend

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
    ) -> None:
        add = perf_increments(
            calls=calls, failures=failures, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, latency_s=latency_s, gpu_s=gpu_s, runs=runs,
            runs_ok=runs_ok, qa_score=qa_score,
        )  # fmt: skip
        store = self.backend.store
        store.migrate_once()
        store.add_to_totals(
            memory_performance,
            {"alias": alias, "category": category or ""},
            add,
            updated_at=now(),
        )

    def stats(self, alias: str | None = None, category: str | None = None) -> list[dict[str, Any]]:
        store = self.backend.store
        store.migrate_once()
        t = memory_performance
        query = sa.select(t).order_by(t.c.alias, t.c.category)
        if alias is not None:
            query = query.where(t.c.alias == alias)
        if category is not None:
            query = query.where(t.c.category == category)
        with store.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
        return [perf_row(r["alias"], r["category"], dict(r)) for r in rows]


def _record(row: Any) -> MemoryRecord:
    return MemoryRecord(
        id=row["id"],
        tier=row["tier"],
        text=row["text"],
        created_at=as_utc(row["created_at"]),
        crew=row["crew"],
        run_id=row["run_id"],
        tags=tuple(row["tags"] or ()),
        kind=row["kind"],
        meta=dict(row["meta"] or {}),
    )


def _with_score(rec: MemoryRecord, score: float) -> MemoryRecord:
    from dataclasses import replace

    return replace(rec, score=score)


class BuiltinBackend:
    """The four tiers on the run store's database and a vector index."""

    name = "builtin"

    def __init__(
        self,
        store: RunStore,
        embedder: Embedder,
        *,
        index: VectorIndex | None = None,
        snapshot_dir: Path | None = None,
        max_record_chars: int = 20_000,
        max_records: dict[str, int] | None = None,
    ):
        self.store = store
        self.embedder = embedder
        self.index: VectorIndex = index or HnswIndex(store, snapshot_dir)
        db = store.url.split("@")[-1].split("?")[0]
        self.name_detail = f"builtin: {db} + {self.index.description}"
        self.max_record_chars = max_record_chars
        self.max_records = dict(max_records or {})
        self.working: WorkingMemory = _Working(self)
        self.episodic: EpisodicMemory = _Episodic(self, "episodic")
        self.semantic: SearchableMemory = _Searchable(self, "semantic")
        self.performance: ModelPerformanceMemory = _Performance(self)

    def close(self) -> None:
        self.index.close()
