"""One conformance suite for every memory backend: the same tests of the four tiers over the
built-in backend on SQLite and on PostgreSQL (its HNSW index), on SQLite with the Qdrant index
(qdrant-client on local files: the same API a Qdrant server answers) and over a real Letta server
(scripts/letta), all with the real MiniLM embeddings. Tests of one backend's own mechanics (the
vector index, re-embedding) take the run store directly."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from typhon.memory._builtin import BuiltinBackend
from typhon.memory._embed import default_embedder
from typhon.memory._index import QdrantIndex
from typhon.memory._types import MemoryBackend, MemoryBackendError, MemoryInputError
from typhon.store import RunStore, memory_vectors

pytestmark = pytest.mark.integration


@pytest.fixture(params=["builtin-sqlite", "builtin-postgresql", "builtin-qdrant", "letta"])
def memory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryBackend]:
    """The same tier tests over every backend: built-in on SQLite and on a real PostgreSQL
    (the HNSW index), built-in with the Qdrant index, and a real Letta server."""
    if request.param == "letta":
        from support.letta import LettaFactory, embeddings_endpoint, letta_url

        with embeddings_endpoint() as endpoint, LettaFactory(letta_url(), endpoint) as factory:
            yield factory.backend(
                working_char_limit=100_000,
                max_record_chars=2000,
                max_records={"episodic": 50, "semantic": 50},
            )
        return
    url = (
        f"sqlite:///{tmp_path / 'typhon.db'}"
        if request.param != "builtin-postgresql"
        else request.getfixturevalue("pg_schema_url")
    )
    store = RunStore(url)
    index = QdrantIndex(path=tmp_path / "qdrant") if request.param == "builtin-qdrant" else None
    backend = BuiltinBackend(
        store,
        default_embedder(),
        index=index,
        max_record_chars=2000,
        max_records={"episodic": 50, "semantic": 50},
    )
    yield backend
    backend.close()
    store.close()


FACTS = [
    ("The cluster's 70B model runs on TabbyAPI with a 5090 and a 4090.", ("hardware",)),
    ("Ollama serves the 7B models on ports 11434 and 11435.", ("hardware", "ollama")),
    ("The user prefers short answers with bullet points.", ("preference",)),
    ("Sourdough needs a starter fed the day before baking.", ("cooking",)),
]


def test_semantic_search_by_meaning_and_filters(memory: MemoryBackend) -> None:
    for text, tags in FACTS:
        memory.semantic.add(text, crew="research", tags=tags, kind="fact")
    memory.semantic.add("Bake bread at 230 C for 40 minutes.", crew="creative", kind="fact")
    hits = memory.semantic.search("which GPUs run the large language model?", k=2)
    assert "TabbyAPI" in hits[0].text
    assert hits[0].score is not None and 0 < hits[0].score <= 1
    assert hits[0].score >= hits[1].score  # type: ignore[operator]
    bread = memory.semantic.search("how to bake bread", k=5, crew="creative")
    assert [h.crew for h in bread] == ["creative"]
    tagged = memory.semantic.search("ports", k=5, tags=("hardware", "ollama"))
    assert [h.text for h in tagged] == [FACTS[1][0]]
    assert memory.semantic.search("anything", k=3, kind="nope") == []
    assert memory.semantic.count() == 5


def test_records_round_trip_and_forget(memory: MemoryBackend) -> None:
    rec = memory.episodic.add(
        "run 42 failed: the model timed out", crew="research", run_id="r42",
        tags=("failure",), kind="run", meta={"status": "failed"},
    )  # fmt: skip
    got = memory.episodic.get(rec.id)
    assert got is not None
    assert (got.text, got.crew, got.run_id, got.tags, got.kind, got.meta) == (
        rec.text, "research", "r42", ("failure",), "run", {"status": "failed"},
    )  # fmt: skip
    assert memory.episodic.search("timeout", k=1)[0].id == rec.id
    assert memory.episodic.forget(rec.id) is True
    assert memory.episodic.forget(rec.id) is False
    assert memory.episodic.get(rec.id) is None
    assert memory.episodic.search("timeout", k=3) == []
    assert memory.semantic.get(rec.id) is None  # tiers are separate


def test_list_is_newest_first_with_filters(memory: MemoryBackend) -> None:
    first = memory.episodic.add("first", crew="a", tags=("x",))
    second = memory.episodic.add("second", crew="b", tags=("x", "y"))
    assert [r.id for r in memory.episodic.list()] == [second.id, first.id]
    assert [r.id for r in memory.episodic.list(crew="a")] == [first.id]
    assert [r.id for r in memory.episodic.list(tags=("y",))] == [second.id]
    future = datetime.now(UTC) + timedelta(hours=1)
    assert memory.episodic.list(since=future) == []
    assert memory.episodic.search("second", k=5, since=future) == []


def test_bad_input_names_tier_and_backend(memory: MemoryBackend) -> None:
    with pytest.raises(MemoryInputError, match=rf"semantic memory \({memory.name}.*query is empty"):
        memory.semantic.search("  ")
    with pytest.raises(MemoryInputError, match=r"episodic memory .*over the limit of 2000"):
        memory.episodic.add("x" * 2001)
    with pytest.raises(MemoryInputError, match="text is empty"):
        memory.semantic.add("")
    assert memory.episodic.count() == 0


def test_budget_drops_the_oldest(memory: MemoryBackend) -> None:
    ids = [memory.semantic.add(f"fact number {i}").id for i in range(52)]
    assert memory.semantic.count() == 50
    assert memory.semantic.get(ids[0]) is None and memory.semantic.get(ids[1]) is None
    assert memory.semantic.get(ids[-1]) is not None


def test_compaction_keeps_a_summary(memory: MemoryBackend) -> None:
    add = memory.episodic.add  # type: ignore[attr-defined]
    old = datetime.now(UTC) - timedelta(days=40)
    for i in range(3):
        add(f"old run {i} succeeded", crew="research", kind="run", created_at=old)
    recent = memory.episodic.add("recent run", crew="research", kind="run")

    def summarize(records: list[object]) -> str:
        return f"{len(records)} older research runs, all succeeded"

    assert memory.episodic.compact(timedelta(days=30), summarize) == 3  # type: ignore[arg-type]
    left = memory.episodic.list()
    assert {r.kind for r in left} == {"run", "summary"}
    summary = next(r for r in left if r.kind == "summary")
    assert summary.text == "3 older research runs, all succeeded"
    assert len(summary.meta["replaces"]) == 3
    assert recent.id in {r.id for r in left} and len(left) == 2


def test_working_memory_lives_with_its_run(memory: MemoryBackend) -> None:
    memory.working.put("run-1", "plan", ["search", "write"])
    memory.working.put("run-1", "plan", ["write"])
    memory.working.put("run-1", "notes", {"source": 3})
    memory.working.put("run-2", "plan", "other")
    assert memory.working.items("run-1") == {"notes": {"source": 3}, "plan": ["write"]}
    assert memory.working.get("run-1", "missing", 7) == 7
    assert memory.working.clear("run-1") == 2
    assert memory.working.items("run-1") == {}
    assert memory.working.get("run-2", "plan") == "other"


def test_model_performance_totals(memory: MemoryBackend) -> None:
    perf = memory.performance
    perf.record(
        "gpt-4", "complex", calls=3, failures=1, latency_s=6.0, gpu_s=9.0, runs=1, runs_ok=1
    )
    perf.record("gpt-4", "complex", calls=1, latency_s=2.0, qa_score=0.8, runs=1)
    perf.record("codellama", "code", calls=2, latency_s=1.0)
    [row] = perf.stats("gpt-4")
    assert (row["calls"], row["failures"], row["runs"], row["runs_ok"]) == (4, 1, 2, 1)
    assert row["failure_rate"] == 0.25 and row["success_rate"] == 0.5
    assert row["mean_latency_s"] == 2.0 and row["gpu_s"] == 9.0
    assert row["qa_score"] == 0.8 and row["qa_reviews"] == 1
    assert [r["alias"] for r in perf.stats()] == ["codellama", "gpt-4"]


def test_a_new_embedding_model_reembeds_instead_of_mixing(store: RunStore, tmp_path: Path) -> None:
    class Other:
        model = "other-model"
        dim = 8

        def embed(self, texts: list[str]) -> list[list[float]]:
            return [[float(len(t) % 7 + 1), *([1.0] * 7)] for t in texts]

    first = BuiltinBackend(store, Other())
    rec = first.semantic.add("the cluster has three nodes")
    first.close()
    second = BuiltinBackend(store, default_embedder())
    try:
        hits = second.semantic.search("how many machines are in the cluster?", k=1)
        assert [h.id for h in hits] == [rec.id] and hits[0].score is not None
        assert hits[0].score > 0.3  # a MiniLM score, not the toy model's
    finally:
        second.close()


def test_wrong_dimension_is_refused_and_leaves_nothing(store: RunStore, tmp_path: Path) -> None:
    class Broken:
        model = "broken"
        dim = 384

        def embed(self, texts: list[str]) -> list[list[float]]:
            return [[0.1] * 12 for _ in texts]

    backend = BuiltinBackend(store, Broken())
    try:
        with pytest.raises(MemoryBackendError, match="returned 12-dim vectors, expected 384"):
            backend.semantic.add("a fact")
        assert backend.semantic.count() == 0
    finally:
        backend.close()


def test_a_vector_index_failure_leaves_no_row(store: RunStore, tmp_path: Path) -> None:
    index = QdrantIndex(path=tmp_path / "q")
    backend = BuiltinBackend(store, default_embedder(), index=index)
    try:
        backend.semantic.add("first")
        index.client.delete_collection(backend.semantic._name)  # the index gone under it
        with pytest.raises(MemoryBackendError, match="vector index refused the write"):
            backend.semantic.add("second")
        assert [r.text for r in backend.semantic.list()] == ["first"]
        with store.engine.connect() as conn:
            kept = conn.execute(sa.select(sa.func.count()).select_from(memory_vectors)).scalar()
        assert kept == 1  # the vector of "first" only
    finally:
        backend.close()
