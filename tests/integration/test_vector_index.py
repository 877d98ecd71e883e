"""The built-in vector index (HNSW graphs over ``memory_vectors``) on SQLite and a real
PostgreSQL: what one process writes another sees, filters agree with an exact search, snapshots
are used only when they match the table, and PostgreSQL commits out of sequence order are not
lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from typhon.memory._index import HnswIndex, Match, Range, _Collection
from typhon.store import RunStore, memory_vectors

pytestmark = pytest.mark.integration

DIM = 32
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'typhon.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def store(url: str) -> Iterator[RunStore]:
    store = RunStore(url)
    store.migrate()
    yield store
    store.close()


def _vectors(n: int, seed: int = 7) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _add(
    store: RunStore, index: HnswIndex, ids: list[str], x: np.ndarray, payloads: list[Any]
) -> None:
    with store.engine.begin() as conn:
        index.add(conn, "c", ids, list(x), payloads)


def _exact(x: np.ndarray, q: np.ndarray, allowed: np.ndarray, k: int) -> list[int]:
    scores = np.where(allowed, x @ q, -np.inf)
    return [int(i) for i in np.argsort(-scores)[:k] if allowed[i]]


def test_what_one_index_writes_another_sees_and_removals_too(store: RunStore) -> None:
    other_store = RunStore(store.url)  # as another process would have
    writer, reader = HnswIndex(store), HnswIndex(other_store)
    x = _vectors(50)
    ids = [f"p{i}" for i in range(50)]
    _add(store, writer, ids[:40], x[:40], [{}] * 40)
    assert reader.query("c", x[3], 1)[0][0] == "p3"
    _add(store, writer, ids[40:], x[40:], [{}] * 10)  # after the reader loaded the collection
    assert reader.query("c", x[45], 1)[0][0] == "p45"
    with store.engine.begin() as conn:
        writer.remove(conn, "c", ["p45", "p3"])
    found = [pid for pid, _ in reader.query("c", x[45], 50)]
    assert "p45" not in found and "p3" not in found and len(found) == 48
    with store.engine.connect() as conn:  # the removed vectors are gone, their tombstones kept
        ops = conn.execute(sa.select(memory_vectors.c.op, sa.func.count()).group_by("op")).all()
    assert dict(ops) == {"add": 48, "del": 2}
    reader.close()
    writer.close()
    other_store.close()


def test_a_separate_process_writes_and_this_one_sees_it(store: RunStore) -> None:
    index = HnswIndex(store)
    x = _vectors(3)
    _add(store, index, ["a", "b"], x[:2], [{}, {}])
    assert [p for p, _ in index.query("c", x[2], 5)] != []
    script = textwrap.dedent(
        f"""
        import numpy as np
        from typhon.memory._index import HnswIndex
        from typhon.store import RunStore
        store = RunStore({store.url!r})
        index = HnswIndex(store)
        x = np.array({x[2].tolist()!r}, dtype=np.float32)
        with store.engine.begin() as conn:
            index.add(conn, "c", ["from-child"], [x], [{{"crew": "research"}}])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)
    best = index.query("c", x[2], 1, [Match("crew", "research")])
    assert best and best[0][0] == "from-child" and best[0][1] == pytest.approx(1.0, abs=1e-4)
    index.close()


@pytest.mark.parametrize("n", [600, 6000])  # exact below 4096 candidates, the graph above
def test_filters_agree_with_an_exact_search(store: RunStore, n: int) -> None:
    index = HnswIndex(store)
    x = _vectors(n)
    crews = [("research", "development", "creative")[i % 3] for i in range(n)]
    tags = [["odd"] if i % 2 else ["even", "x"] for i in range(n)]
    at = [float(i) for i in range(n)]
    payloads = [
        {"crew": c, "tags": t, "created_at": a} for c, t, a in zip(crews, tags, at, strict=True)
    ]
    _add(store, index, [str(i) for i in range(n)], x, payloads)
    rng = np.random.default_rng(1)
    agree = total = 0
    for qi in rng.choice(n, 20, replace=False):
        q = x[qi]
        cases = [
            ([Match("crew", "development")], np.array([c == "development" for c in crews])),
            ([Match("tags", "x")], np.array(["x" in t for t in tags])),
            ([Range("created_at", gte=n / 2)], np.array([a >= n / 2 for a in at])),
            (
                [Match("crew", "research"), Match("tags", "odd"), Range("created_at", lte=n / 3)],
                np.array(
                    [
                        c == "research" and "odd" in t and a <= n / 3
                        for c, t, a in zip(crews, tags, at, strict=True)
                    ]
                ),
            ),
        ]
        for conditions, allowed in cases:
            got = [int(p) for p, _ in index.query("c", q, 5, conditions)]
            assert all(allowed[i] for i in got)  # never outside the filter
            want = _exact(x, q, allowed, 5)
            agree += len(set(got) & set(want))
            total += len(want)
    assert index.query("c", x[0], 5, [Match("crew", "nobody")]) == []
    assert agree / total >= 0.95  # HNSW is approximate; exact below 4096 candidates
    index.close()


def test_the_same_id_again_keeps_the_newer_vector(store: RunStore) -> None:
    index = HnswIndex(store)
    x = _vectors(3)
    _add(store, index, ["a", "b"], x[:2], [{"v": 1.0}, {}])
    assert index.query("c", x[0], 1)[0][0] == "a"
    _add(store, index, ["a"], x[2:3], [{"v": 2.0}])
    found = index.query("c", x[0], 3)
    assert [p for p, _ in found].count("a") == 1
    assert index.query("c", x[2], 1)[0] == ("a", pytest.approx(1.0, abs=1e-4))
    assert index.query("c", x[2], 3, [Range("v", gte=1.5)])[0][0] == "a"
    index.close()


def test_snapshots_are_reused_checked_and_rebuilt_when_foreign(
    store: RunStore, tmp_path: Path
) -> None:
    snaps = tmp_path / "vectors"
    first = HnswIndex(store, snaps)
    x = _vectors(3000)
    ids = [str(i) for i in range(3000)]
    _add(store, first, ids, x, [{"crew": "r"}] * 3000)
    assert first.query("c", x[10], 1)[0][0] == "10"
    first.close()
    [snapshot] = list(snaps.iterdir())
    # changes after the snapshot: a removal and two additions
    other_store = RunStore(store.url)
    other = HnswIndex(other_store)
    with store.engine.begin() as conn:
        other.remove(conn, "c", ["10"])
    extra = _vectors(2, seed=99)
    _add(store, other, ["new1", "new2"], extra, [{"crew": "r"}] * 2)
    second = HnswIndex(store, snaps)
    assert second.count("c", DIM) == 3001
    coll: _Collection = second._collections["c"]
    assert coll.graph.ntotal == 3002  # the snapshot's 3000 graph nodes (one now dead) + 2 added
    assert second.query("c", x[10], 1)[0][0] != "10"
    assert second.query("c", extra[1], 1, [Match("crew", "r")])[0][0] == "new2"
    second.close()
    snapshot.write_bytes(b"not a snapshot")
    third = HnswIndex(store, snaps)
    assert third.count("c", DIM) == 3001 and third.query("c", x[11], 1)[0][0] == "11"
    third.close()
    other.close()
    other_store.close()


def test_a_graph_with_many_dead_vectors_is_rebuilt(store: RunStore) -> None:
    index = HnswIndex(store)
    x = _vectors(1500)
    ids = [str(i) for i in range(1500)]
    _add(store, index, ids, x, [{}] * 1500)
    index.query("c", x[0], 1)
    with store.engine.begin() as conn:
        index.remove(conn, "c", ids[:700])
    found = index.query("c", x[5], 10)
    coll: _Collection = index._collections["c"]
    assert coll.dead == 0 and coll.graph.ntotal == 800
    assert all(int(p) >= 700 for p, _ in found) and len(found) == 10
    assert index.query("c", x[900], 1)[0][0] == "900"
    index.close()


def test_a_commit_out_of_sequence_order_is_not_lost(pg_schema_url: str) -> None:
    """PostgreSQL hands out sequence numbers at insert, so a later number can commit first."""
    store = RunStore(pg_schema_url)
    store.migrate()
    index = HnswIndex(store)
    x = _vectors(3)
    _add(store, index, ["first"], x[:1], [{}])
    assert index.query("c", x[0], 1)[0][0] == "first"
    slow = store.engine.connect()
    tx = slow.begin()
    index.add(slow, "c", ["slow"], [x[1]], [{}])  # takes the lower sequence number, not committed
    _add(store, index, ["fast"], x[2:3], [{}])
    assert sorted(p for p, _ in index.query("c", x[1], 3)) == ["fast", "first"]
    tx.commit()
    slow.close()
    assert index.query("c", x[1], 1)[0][0] == "slow"
    index.close()
    store.close()
