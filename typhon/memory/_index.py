"""Vector indexes for memory and the semantic cache.

The run store's database is the source of truth for vectors too: ``memory_vectors`` holds every
vector with its payload (the fields searches filter on), written in the same transaction as the
record it belongs to, so a record never exists without its vector or the reverse. An index is a
view of that table that answers nearest-neighbour queries:

- ``HnswIndex`` (the default): an HNSW graph (faiss, inner product on unit vectors) in each process
  that searches, kept in step with the table. Every query first reads the rows added or removed
  since the last one (one indexed query on ``seq``), so what another worker wrote is seen by the
  next search. Removals are tombstones in the same table (``op = 'del'``); their vectors are
  deleted at once and the graph is rebuilt from live vectors once a third of it is dead. Under
  PostgreSQL, sequence numbers can commit out of order; numbers skipped by a read are asked for
  again for a minute before they count as rolled back. A snapshot of the graph under
  ``$TYPHON_HOME/vectors`` spares the next process the build (a minute per 100k vectors on one
  core); it is checked against the table, row by row, before use.
- ``QdrantIndex``: a Qdrant server (``memory.qdrant_url``), written alongside the table.

Filters are payload conditions: ``Match`` (a string field equals the value, or a list field holds
it) and ``Range`` (a number field within bounds).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from typhon.store import RunStore, memory_vectors

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

__all__ = ["HnswIndex", "Match", "QdrantIndex", "Range", "VectorIndex"]

log = structlog.get_logger("typhon.memory.index")

_M = 32  # HNSW links per node
_EF_CONSTRUCTION = 40
_EF_SEARCH = 64
_EXACT_BELOW = 4096  # filters that leave fewer candidates are answered exactly (a matmul)
_GAP_WAIT_S = 60.0  # how long a skipped sequence number is looked for before it counts as lost
_REBUILD_DEAD = 1 / 3
_SNAPSHOT_MIN = 2000  # smaller graphs are rebuilt in well under a second: not worth a file


@dataclass(frozen=True)
class Match:
    """``payload[key] == value``, or ``value in payload[key]`` for a list field."""

    key: str
    value: str


@dataclass(frozen=True)
class Range:
    """A number field within bounds (each optional)."""

    key: str
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None


Condition = Match | Range


class VectorIndex(Protocol):
    description: str

    def add(
        self,
        conn: Connection,
        name: str,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        payloads: Sequence[dict[str, Any]],
    ) -> None:
        """Store vectors inside the caller's transaction ``conn``."""

    def remove(self, conn: Connection, name: str, ids: Sequence[str]) -> None:
        """Remove vectors inside the caller's transaction ``conn``."""

    def query(
        self,
        name: str,
        vector: Sequence[float],
        k: int,
        conditions: Sequence[Condition] = (),
        min_score: float | None = None,
    ) -> list[tuple[str, float]]:
        """The ``k`` nearest ids (cosine, best first) among those meeting ``conditions``."""

    def close(self) -> None: ...


def _write_rows(
    conn: Connection,
    name: str,
    ids: Sequence[str],
    vectors: Sequence[Any],
    payloads: Sequence[dict[str, Any]],
) -> None:
    at = time.time()
    conn.execute(
        memory_vectors.insert(),
        [
            {
                "collection": name, "point_id": pid, "op": "add", "at": at, "payload": payload,
                "vector": np.asarray(vec, dtype=np.float32).tobytes(),
            }
            for pid, vec, payload in zip(ids, vectors, payloads, strict=True)
        ],
    )  # fmt: skip


def _remove_rows(conn: Connection, name: str, ids: Sequence[str]) -> None:
    if not ids:
        return
    t = memory_vectors.c
    conn.execute(
        memory_vectors.delete().where(
            t.collection == name, t.point_id.in_(list(ids)), t.op == "add"
        )
    )
    at = time.time()
    conn.execute(
        memory_vectors.insert(),
        [{"collection": name, "point_id": pid, "op": "del", "at": at} for pid in ids],
    )


def _faiss() -> Any:
    """faiss, loaded on first use (its typing stubs cover only part of its API)."""
    import faiss

    return faiss


def _unit(vector: Sequence[float]) -> np.ndarray:
    q = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(q))
    return q / norm if norm > 0 else q


class _Grow:
    """A growable typed array with a numpy view."""

    def __init__(self, code: str):
        self.data: array[Any] = array(code)

    def append(self, value: float | int) -> None:
        self.data.append(value)

    def view(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.data.typecode) if self.data else np.zeros(0)


class _Collection:
    """One collection's graph and payload indexes in this process."""

    def __init__(self, name: str, dim: int):
        faiss = _faiss()

        self.name = name
        self.dim = dim
        self.graph = faiss.IndexHNSWFlat(dim, _M, faiss.METRIC_INNER_PRODUCT)
        self.graph.hnsw.efConstruction = _EF_CONSTRUCTION
        self.points: list[str] = []  # internal id -> point id
        self.seqs = _Grow("q")  # internal id -> the row's seq
        self.alive = bytearray()
        self.live: dict[str, int] = {}  # point id -> internal id
        self.dead = 0
        self.strings: dict[str, dict[str, array[int]]] = {}
        self.numbers: dict[str, _Grow] = {}
        self.applied: set[int] = set()
        self.added_since_snapshot = 0

    @property
    def n(self) -> int:
        return len(self.points)

    def append(self, pid: str, seq: int, payload: dict[str, Any] | None) -> int:
        i = self.n
        if pid in self.live:  # the same id again: the newer vector wins
            self.kill(pid)
        self.points.append(pid)
        self.seqs.append(seq)
        self.alive.append(1)
        self.live[pid] = i
        for grown in self.numbers.values():
            grown.append(math.nan)
        for key, value in (payload or {}).items():
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int | float):
                column = self.numbers.get(key)
                if column is None:
                    column = self.numbers[key] = _Grow("d")
                    for _ in range(i + 1):
                        column.append(math.nan)
                column.data[i] = float(value)
            else:
                values = value if isinstance(value, list | tuple) else [value]
                by_value = self.strings.setdefault(key, {})
                for v in dict.fromkeys(str(x) for x in values):
                    by_value.setdefault(v, array("q")).append(i)
        return i

    def kill(self, pid: str, before: int | None = None) -> None:
        """Mark a point dead (only a vector added before seq ``before``, when given)."""
        i = self.live.get(pid)
        if i is None or (before is not None and self.seqs.data[i] > before):
            return
        del self.live[pid]
        if self.alive[i]:
            self.alive[i] = 0
            self.dead += 1

    def vectors(self) -> np.ndarray:
        faiss = _faiss()

        storage = faiss.downcast_index(self.graph.storage)
        flat = faiss.rev_swig_ptr(storage.get_xb(), self.graph.ntotal * self.dim)
        return np.asarray(flat).reshape(self.graph.ntotal, self.dim)

    def mask(self, conditions: Sequence[Condition]) -> np.ndarray:
        n = self.n
        mask = np.frombuffer(bytes(self.alive), dtype=np.uint8).astype(bool)
        for cond in conditions:
            if isinstance(cond, Match):
                hits = self.strings.get(cond.key, {}).get(cond.value)
                if hits is None:
                    return np.zeros(n, dtype=bool)
                keep = np.zeros(n, dtype=bool)
                keep[np.frombuffer(hits, dtype=np.int64)] = True
                mask &= keep
            else:
                grown = self.numbers.get(cond.key)
                if grown is None:
                    return np.zeros(n, dtype=bool)
                values = grown.view()[:n]
                with np.errstate(invalid="ignore"):
                    if cond.gte is not None:
                        mask &= values >= cond.gte
                    if cond.gt is not None:
                        mask &= values > cond.gt
                    if cond.lte is not None:
                        mask &= values <= cond.lte
        return mask

    def search(
        self, q: np.ndarray, k: int, conditions: Sequence[Condition]
    ) -> list[tuple[str, float]]:
        faiss = _faiss()

        n = self.n
        if n == 0:
            return []
        if not conditions and self.dead == 0:
            params = faiss.SearchParametersHNSW(efSearch=max(_EF_SEARCH, k))
            scores, ids = self.graph.search(q.reshape(1, -1), min(k, n), params=params)
            return self._pairs(ids[0], scores[0])
        mask = self.mask(conditions)
        allowed = int(np.count_nonzero(mask))
        if allowed == 0:
            return []
        if allowed > _EXACT_BELOW:
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(_EF_SEARCH, 2 * k))
            scores, ids = self.graph.search(q.reshape(1, -1), min(k, allowed), params=params)
            pairs = self._pairs(ids[0], scores[0])
            if len(pairs) >= min(k, allowed):
                return pairs
        idx = np.flatnonzero(mask)
        scores_all = self.vectors()[idx] @ q
        top = np.argsort(-scores_all)[:k] if len(idx) <= k else None
        if top is None:
            part = np.argpartition(-scores_all, k)[:k]
            top = part[np.argsort(-scores_all[part])]
        return [(self.points[int(idx[j])], float(scores_all[j])) for j in top]

    def _pairs(self, ids: np.ndarray, scores: np.ndarray) -> list[tuple[str, float]]:
        return [
            (self.points[int(i)], float(s))
            for i, s in zip(ids, scores, strict=True)
            if i >= 0 and self.alive[int(i)]
        ]


class HnswIndex:
    """HNSW graphs in this process over ``memory_vectors`` (see the module's docstring)."""

    def __init__(self, store: RunStore, snapshot_dir: Path | None = None):
        self.store = store
        self.snapshot_dir = snapshot_dir
        self.description = f"hnsw over {store.url.split('@')[-1].split('?')[0]}"
        self._collections: dict[str, _Collection] = {}
        self._lock = threading.RLock()
        self._last_seq = 0
        self._gaps: dict[int, float] = {}  # seq -> when first missed
        self._store_key = hashlib.sha256(store.url.encode()).hexdigest()[:12]

    # -- writes (the table; graphs catch up on their next query) ---------------------------------
    def add(
        self,
        conn: Connection,
        name: str,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        payloads: Sequence[dict[str, Any]],
    ) -> None:
        if ids:
            _write_rows(conn, name, ids, [_unit(v) for v in vectors], payloads)

    def remove(self, conn: Connection, name: str, ids: Sequence[str]) -> None:
        _remove_rows(conn, name, ids)

    # -- reads -----------------------------------------------------------------------------------
    def query(
        self,
        name: str,
        vector: Sequence[float],
        k: int,
        conditions: Sequence[Condition] = (),
        min_score: float | None = None,
    ) -> list[tuple[str, float]]:
        q = _unit(vector)
        with self._lock:
            coll = self._collection(name, len(q))
            if coll.dim != len(q):
                raise ValueError(f"{len(q)}-dim query for the {coll.dim}-dim collection {name}")
            found = coll.search(q, k, conditions)
        if min_score is not None:
            found = [(pid, s) for pid, s in found if s >= min_score]
        return found

    def count(self, name: str, dim: int) -> int:
        """Live vectors in a collection, as this process sees them after a sync."""
        with self._lock:
            return len(self._collection(name, dim).live)

    def _collection(self, name: str, dim: int) -> _Collection:
        """The collection, loaded on first use, after catching up with the table."""
        self.store.migrate_once()
        self._sync()
        coll = self._collections.get(name)
        if coll is None:
            coll = self._collections[name] = self._load(name, dim)
        return coll

    # -- keeping in step with the table ----------------------------------------------------------
    def _sync(self) -> None:
        """Read the rows written since the last read (every collection: sequence numbers are
        shared, so a number missing from the read is a transaction still open or rolled back)."""
        t = memory_vectors.c
        if not self._collections:  # nothing to apply yet: where the table stands is enough
            with self.store.engine.connect() as conn:
                seqs = sorted(
                    s for (s,) in conn.execute(sa.select(t.seq).where(t.seq > self._last_seq))
                )
            self._note_seen(seqs)
            return
        wanted = t.seq > self._last_seq
        if self._gaps:
            wanted = sa.or_(wanted, t.seq.in_(list(self._gaps)))
        query = sa.select(t.seq, t.collection, t.point_id, t.op, t.payload).where(wanted)
        with self.store.engine.connect() as conn:
            rows = sorted(conn.execute(query), key=lambda r: r.seq)
        self._note_seen([r.seq for r in rows])
        if rows:
            by_collection: dict[str, list[Any]] = {}
            for r in rows:
                if r.collection in self._collections:
                    by_collection.setdefault(r.collection, []).append(r)
            for name, mine in by_collection.items():
                coll = self._collections[name]
                self._apply(coll, [r for r in mine if r.seq not in coll.applied])

    def _note_seen(self, seqs: Sequence[int]) -> None:
        """Advance past ``seqs`` (ascending); numbers skipped become gaps, looked for again
        until they turn up or ``_GAP_WAIT_S`` passes."""
        now = time.time()
        if seqs:
            seen = set(seqs)
            for seq in range(self._last_seq + 1, seqs[-1]):
                if seq not in seen and seq not in self._gaps:
                    self._gaps[seq] = now
            for seq in seen:
                self._gaps.pop(seq, None)
            self._last_seq = max(self._last_seq, seqs[-1])
        for seq, since in list(self._gaps.items()):
            if now - since > _GAP_WAIT_S:
                del self._gaps[seq]

    def _apply(self, coll: _Collection, rows: Sequence[Any]) -> None:
        """Apply rows in seq order: fetch the vectors added, then add and remove."""
        if not rows:
            return
        vectors = self._vectors([r.seq for r in rows if r.op == "add"])
        batch: list[np.ndarray] = []
        for r in rows:
            coll.applied.add(r.seq)
            if r.op == "add":
                vec = vectors.get(r.seq)
                if vec is None:  # removed since the first read: its tombstone follows
                    continue
                if r.point_id in coll.live:
                    self._flush(coll, batch)
                    batch = []
                coll.append(r.point_id, r.seq, r.payload)
                batch.append(vec)
            else:
                coll.kill(r.point_id, before=r.seq)
        self._flush(coll, batch)
        if coll.n > 1000 and coll.dead > _REBUILD_DEAD * coll.n:
            self._rebuild(coll)

    def _flush(self, coll: _Collection, batch: list[np.ndarray]) -> None:
        if batch:
            coll.graph.add(np.vstack(batch).astype(np.float32))
            coll.added_since_snapshot += len(batch)

    def _vectors(self, seqs: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        t = memory_vectors.c
        with self.store.engine.connect() as conn:
            for start in range(0, len(seqs), 5000):
                chunk = list(seqs[start : start + 5000])
                for seq, blob in conn.execute(
                    sa.select(t.seq, t.vector).where(t.seq.in_(chunk), t.op == "add")
                ):
                    out[seq] = np.frombuffer(blob, dtype=np.float32)
        return out

    def _rebuild(self, coll: _Collection) -> None:
        """A fresh graph from the live vectors (dead ones only cost search time)."""
        vectors = coll.vectors()
        keep = [i for i in range(coll.n) if coll.alive[i]]
        seqs = [coll.seqs.data[i] for i in keep]
        payloads: dict[int, Any] = {}
        t = memory_vectors.c
        with self.store.engine.connect() as conn:
            for start in range(0, len(seqs), 5000):
                chunk = seqs[start : start + 5000]
                query = sa.select(t.seq, t.payload).where(t.seq.in_(chunk))
                payloads.update({s: p for s, p in conn.execute(query)})
        fresh = _Collection(coll.name, coll.dim)
        for i, seq in zip(keep, seqs, strict=True):
            fresh.append(coll.points[i], seq, payloads.get(seq))
        if keep:
            fresh.graph.add(np.ascontiguousarray(vectors[keep]))
        fresh.applied = coll.applied
        fresh.added_since_snapshot = len(keep)
        coll.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "lock"})

    # -- snapshots -------------------------------------------------------------------------------
    def _snapshot_path(self, name: str) -> Path | None:
        if self.snapshot_dir is None:
            return None
        return self.snapshot_dir / f"{name}.{self._store_key}.npz"

    def _load(self, name: str, dim: int) -> _Collection:
        """A collection from the table, on top of its snapshot when the snapshot matches the
        table row for row."""
        coll = _Collection(name, dim)
        t = memory_vectors.c
        query = sa.select(t.seq, t.point_id, t.op, t.payload).where(t.collection == name)
        with self.store.engine.connect() as conn:
            rows = sorted(conn.execute(query), key=lambda r: r.seq)
        snap = self._read_snapshot(name, dim)
        if snap is not None:
            graph, seqs, points = snap
            by_seq = {r.seq: r for r in rows}
            if all(
                (row := by_seq.get(seq)) is None or (row.op == "add" and row.point_id == pid)
                for seq, pid in zip(seqs, points, strict=True)
            ):
                coll.graph = graph
                for seq, pid in zip(seqs, points, strict=True):
                    row = by_seq.get(seq)
                    coll.append(pid, seq, row.payload if row is not None else None)
                    if row is None:  # removed since the snapshot
                        coll.kill(pid)
                coll.applied = set(seqs)
            else:
                log.warning("vector snapshot does not match the table; rebuilding", name=name)
        self._apply(coll, [r for r in rows if r.seq not in coll.applied])
        if coll.added_since_snapshot >= _SNAPSHOT_MIN:
            self._save(coll)
        return coll

    def _read_snapshot(self, name: str, dim: int) -> tuple[Any, list[int], list[str]] | None:
        faiss = _faiss()

        path = self._snapshot_path(name)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as snap:
                graph = faiss.deserialize_index(snap["graph"])
                seqs = [int(s) for s in snap["seqs"]]
                points = [str(p) for p in snap["points"]]
        except Exception as exc:  # a torn or foreign file: build from the table instead
            log.warning("vector snapshot unreadable; rebuilding", path=str(path), error=str(exc))
            return None
        if graph.d != dim or graph.ntotal != len(seqs) or len(points) != len(seqs):
            return None
        return graph, seqs, points

    def _save(self, coll: _Collection) -> None:
        faiss = _faiss()

        path = self._snapshot_path(coll.name)
        if path is None or coll.n < _SNAPSHOT_MIN:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{threading.get_ident()}.tmp.npz"
        np.savez(
            tmp,
            graph=faiss.serialize_index(coll.graph),
            seqs=coll.seqs.view().astype(np.int64),
            points=np.array(coll.points, dtype=str),
        )
        tmp.replace(path)
        coll.added_since_snapshot = 0

    def save(self) -> None:
        """Write snapshots of the collections that grew since their last one."""
        with self._lock:
            for coll in self._collections.values():
                if coll.added_since_snapshot:
                    self._save(coll)

    def close(self) -> None:
        try:
            self.save()
        except OSError as exc:
            log.warning("could not write a vector snapshot", error=str(exc))
        with self._lock:
            self._collections.clear()
            self._last_seq = 0
            self._gaps.clear()


class QdrantIndex:
    """A Qdrant server (``memory.qdrant_url``); the table keeps every vector as well. A client
    on local files (``path``) speaks the same API in one process."""

    def __init__(self, *, url: str | None = None, path: Path | None = None):
        if (url is None) == (path is None):
            raise ValueError("give url (a Qdrant server) or path (local files)")
        self.url, self.path = url, path
        self.description = f"qdrant at {url or path}"
        self._client: QdrantClient | None = None
        self._known: set[str] = set()
        self._lock = threading.Lock()

    @property
    def client(self) -> QdrantClient:
        with self._lock:
            if self._client is None:
                import warnings

                from qdrant_client import QdrantClient

                if self.url:
                    self._client = QdrantClient(url=self.url, timeout=10)
                else:
                    assert self.path is not None
                    self.path.mkdir(parents=True, exist_ok=True)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        self._client = QdrantClient(path=str(self.path))
            return self._client

    def _ensure(self, name: str, dim: int) -> None:
        if name in self._known:
            return
        from qdrant_client import models

        if not self.client.collection_exists(name):
            self.client.create_collection(
                name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
            )
        self._known.add(name)

    def add(
        self,
        conn: Connection,
        name: str,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        payloads: Sequence[dict[str, Any]],
    ) -> None:
        from qdrant_client import models

        if not ids:
            return
        _write_rows(conn, name, ids, vectors, payloads)
        self._ensure(name, len(vectors[0]))
        points = [
            models.PointStruct(id=pid, vector=list(map(float, vec)), payload=payload)
            for pid, vec, payload in zip(ids, vectors, payloads, strict=True)
        ]
        self.client.upsert(name, points=points, wait=True)

    def remove(self, conn: Connection, name: str, ids: Sequence[str]) -> None:
        from qdrant_client import models

        _remove_rows(conn, name, ids)
        if ids and self.client.collection_exists(name):
            self.client.delete(
                name, points_selector=models.PointIdsList(points=list(ids)), wait=True
            )

    def query(
        self,
        name: str,
        vector: Sequence[float],
        k: int,
        conditions: Sequence[Condition] = (),
        min_score: float | None = None,
    ) -> list[tuple[str, float]]:
        self._ensure(name, len(vector))
        found = self.client.query_points(
            name,
            query=list(map(float, vector)),
            limit=k,
            query_filter=_qdrant_filter(conditions),
            score_threshold=min_score,
        ).points
        return [(str(p.id), float(p.score)) for p in found]

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            self._known.clear()


def _qdrant_filter(conditions: Iterable[Condition]) -> Any:
    from qdrant_client import models

    must: list[Any] = []
    for cond in conditions:
        if isinstance(cond, Match):
            must.append(
                models.FieldCondition(key=cond.key, match=models.MatchValue(value=cond.value))
            )
        else:
            must.append(
                models.FieldCondition(
                    key=cond.key, range=models.Range(gte=cond.gte, gt=cond.gt, lte=cond.lte)
                )
            )
    return models.Filter(must=must) if must else None
