"""The Letta memory backend against a real Letta server (scripts/letta: Letta 0.16.8 on
PostgreSQL + pgvector), embedding through Typhon's embeddings server over MiniLM."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support.letta import EmbeddingEndpoint, LettaFactory, embeddings_endpoint, letta_url

from typhon.memory._letta import LettaBackend
from typhon.memory._types import MemoryBackend, MemoryBackendError, MemoryInputError, MemoryRecord

pytestmark = pytest.mark.integration

FACTS = [
    ("The cluster's 70B model runs on TabbyAPI with a 5090 and a 4090.", ("hardware",)),
    ("Ollama serves the 7B models on ports 11434 and 11435.", ("hardware", "ollama")),
    ("The user prefers short answers with bullet points.", ("preference",)),
    ("Sourdough needs a starter fed the day before baking.", ("cooking",)),
]


@pytest.fixture(scope="module")
def letta_embeddings() -> Iterator[EmbeddingEndpoint]:
    with embeddings_endpoint() as endpoint:
        yield endpoint


@pytest.fixture
def letta_factory(letta_embeddings: EmbeddingEndpoint) -> Iterator[LettaFactory]:
    with LettaFactory(letta_url(), letta_embeddings) as factory:
        yield factory


@pytest.fixture
def letta_memory(letta_factory: LettaFactory) -> LettaBackend:
    """A backend in a namespace of this test's own, deleted after it."""
    return letta_factory.backend()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_backend_satisfies_the_contract(letta_memory: LettaBackend) -> None:
    backend: MemoryBackend = letta_memory
    assert backend.name == "letta"
    assert backend.semantic.tier == "semantic" and backend.episodic.tier == "episodic"


# -- working memory: one block per run ------------------------------------------------------------


def test_working_memory_lives_with_its_run(letta_memory: LettaBackend) -> None:
    memory = letta_memory
    memory.working.put("run-1", "plan", ["search", "write"])
    memory.working.put("run-1", "plan", ["write"])
    memory.working.put("run-1", "notes", {"source": 3, "why": "café ☕"})
    memory.working.put("run-2", "plan", "other")
    assert memory.working.items("run-1") == {
        "plan": ["write"],
        "notes": {"source": 3, "why": "café ☕"},
    }
    assert memory.working.get("run-1", "missing", 7) == 7
    assert memory.working.items("never-ran") == {}
    assert memory.working.clear("run-1") == 2
    assert memory.working.clear("run-1") == 0
    assert memory.working.items("run-1") == {}
    assert memory.working.get("run-2", "plan") == "other"


def test_working_memory_is_a_letta_block(letta_memory: LettaBackend) -> None:
    letta_memory.working.put("r7", "step", 3)
    label = f"{letta_memory.namespace}-working-r7"
    [block] = letta_memory.client.blocks.list(label=label).items
    assert block.value == '{"step":3}'
    assert block.limit == 100_000  # Letta's default for a block


def test_working_memory_respects_the_block_limit(letta_factory: LettaFactory) -> None:
    memory = letta_factory.backend(working_char_limit=60)
    memory.working.put("r1", "a", "x" * 20)
    with pytest.raises(
        MemoryInputError,
        match=rf"^working memory \(letta at {re.escape(memory.url)}\): 'b' would make run r1's"
        r" working memory \d+ characters, over the block's limit of 60$",
    ):
        memory.working.put("r1", "b", "y" * 40)
    assert memory.working.items("r1") == {"a": "x" * 20}  # unchanged
    with pytest.raises(MemoryInputError, match="limit of 60"):
        memory.working.put("r2", "big", "z" * 100)  # the first write of a run, too
    assert memory.working.items("r2") == {}
    with pytest.raises(MemoryInputError, match="not JSON"):
        memory.working.put("r1", "c", object())


def test_working_memory_is_shared_by_clients(letta_factory: LettaFactory) -> None:
    first = letta_factory.backend()
    second = letta_factory.backend(namespace=first.namespace)
    first.working.put("r1", "k", 1)
    assert second.working.get("r1", "k") == 1
    second.working.put("r1", "k", 2)
    assert first.working.get("r1", "k") == 2


# -- episodic and semantic: archival passages -----------------------------------------------------


def test_semantic_search_by_meaning_and_filters(letta_memory: LettaBackend) -> None:
    memory = letta_memory
    for text, tags in FACTS:
        memory.semantic.add(text, crew="research", tags=tags, kind="fact")
    memory.semantic.add("Bake bread at 230 C for 40 minutes.", crew="creative", kind="fact")
    hits = memory.semantic.search("which GPUs run the large language model?", k=2)
    assert len(hits) == 2
    assert "TabbyAPI" in hits[0].text
    assert hits[0].score is not None and hits[1].score is not None
    assert 0 < hits[1].score <= hits[0].score <= 1
    bread = memory.semantic.search("how to bake bread", k=5, crew="creative")
    assert [h.crew for h in bread] == ["creative"]
    tagged = memory.semantic.search("ports", k=5, tags=("hardware", "ollama"))
    assert [h.text for h in tagged] == [FACTS[1][0]]
    assert memory.semantic.search("anything", k=3, kind="nope") == []
    assert memory.semantic.search("anything", k=0) == []
    assert memory.semantic.search("bread", k=5, min_score=0.99) == []
    assert memory.semantic.count() == 5
    assert memory.episodic.count() == 0  # tiers are separate archives


def test_records_round_trip_and_forget(letta_memory: LettaBackend) -> None:
    memory = letta_memory
    rec = memory.episodic.add(
        "run 42 failed: the model timed out", crew="research", run_id="r42",
        tags=("failure", "failure", "timeout"), kind="run", meta={"status": "failed", "n": [1, 2]},
    )  # fmt: skip
    assert rec.id.startswith("passage-") and rec.tier == "episodic" and rec.score is None
    assert rec.tags == ("failure", "timeout")
    assert abs((datetime.now(UTC) - rec.created_at).total_seconds()) < 60
    got = memory.episodic.get(rec.id)
    assert got == rec
    found = memory.episodic.search("timeout", k=1)
    assert [f.id for f in found] == [rec.id]
    assert (found[0].crew, found[0].run_id, found[0].meta) == ("research", "r42", rec.meta)
    assert memory.semantic.get(rec.id) is None
    assert memory.semantic.forget(rec.id) is False  # not in the semantic archive
    assert memory.episodic.forget(rec.id) is True
    assert memory.episodic.forget(rec.id) is False
    assert memory.episodic.forget("not-a-passage-id") is False
    assert memory.episodic.get(rec.id) is None
    assert memory.episodic.search("timeout", k=3) == []


def test_list_is_newest_first_with_filters(letta_memory: LettaBackend) -> None:
    memory = letta_memory
    first = memory.episodic.add("first", crew="a", tags=("x",))
    second = memory.episodic.add("second", crew="b", tags=("x", "y"), kind="run")
    assert [r.id for r in memory.episodic.list()] == [second.id, first.id]
    assert [r.id for r in memory.episodic.list(limit=1)] == [second.id]
    assert [r.id for r in memory.episodic.list(crew="a")] == [first.id]
    assert [r.id for r in memory.episodic.list(tags=("y",))] == [second.id]
    assert [r.id for r in memory.episodic.list(tags=("x", "y"))] == [second.id]
    assert [r.id for r in memory.episodic.list(kind="run")] == [second.id]
    future = datetime.now(UTC) + timedelta(hours=1)
    assert memory.episodic.list(since=future) == []
    assert memory.episodic.search("second", k=5, since=future) == []
    past = datetime.now(UTC) - timedelta(hours=1)
    assert len(memory.episodic.search("second", k=5, since=past)) == 2


def test_scans_page_past_letta_s_hundred(letta_memory: LettaBackend) -> None:
    memory = letta_memory
    added = [memory.semantic.add(f"fact number {i}", tags=(f"n{i % 3}",)).id for i in range(105)]
    assert memory.semantic.count() == 105
    listed = memory.semantic.list(limit=500)
    assert [r.id for r in listed] == list(reversed(added))  # newest first
    assert len(memory.semantic.list(limit=500, tags=("n0",))) == 35
    assert memory.semantic.get(added[0]) is not None and memory.semantic.get(added[-1]) is not None


def test_compaction_keeps_a_summary(letta_memory: LettaBackend) -> None:
    memory = letta_memory
    add: Any = memory.episodic.add  # takes created_at, as the built-in backend's does
    old = datetime.now(UTC) - timedelta(days=40)
    olds = [
        add(f"old run {i} succeeded", crew="research", kind="run", created_at=old + timedelta(i))
        for i in range(3)
    ]
    other = add("old creative run", crew="creative", kind="run", created_at=old)
    recent = memory.episodic.add("recent run", crew="research", kind="run")
    seen: list[list[MemoryRecord]] = []

    def summarize(records: list[MemoryRecord]) -> str:
        seen.append(records)
        return f"{len(records)} older {records[0].crew} runs, all succeeded"

    assert memory.episodic.compact(timedelta(days=30), summarize) == 4
    assert sorted(len(group) for group in seen) == [1, 3]
    left = memory.episodic.list()
    assert {r.kind for r in left} == {"run", "summary"} and len(left) == 3
    summary = next(r for r in left if r.kind == "summary" and r.crew == "research")
    assert summary.text == "3 older research runs, all succeeded"
    assert summary.meta["replaces"] == [r.id for r in olds]
    assert summary.tags == ("summary",)
    assert summary.created_at == olds[-1].created_at
    assert recent.id in {r.id for r in left}
    assert memory.episodic.get(other.id) is None
    # summaries are not folded again
    assert memory.episodic.compact(timedelta(days=30), summarize) == 0


def test_bad_input_names_tier_and_backend(letta_memory: LettaBackend) -> None:
    memory = letta_memory
    where = re.escape(f"letta at {memory.url}")
    with pytest.raises(MemoryInputError, match=rf"^semantic memory \({where}\): .*query is empty"):
        memory.semantic.search("  ")
    with pytest.raises(MemoryInputError, match=rf"^episodic memory \({where}\): .*text is empty"):
        memory.episodic.add("")
    with pytest.raises(MemoryInputError, match="meta must be JSON"):
        memory.semantic.add("x", meta={"bad": object()})
    assert memory.episodic.count() == 0 and memory.semantic.count() == 0


# -- model performance: one block of totals -------------------------------------------------------


def test_model_performance_totals(letta_memory: LettaBackend) -> None:
    perf = letta_memory.performance
    assert perf.stats() == []
    perf.record(
        "gpt-4", "complex", calls=3, failures=1, latency_s=6.0, gpu_s=9.0, runs=1, runs_ok=1
    )
    perf.record("gpt-4", "complex", calls=1, latency_s=2.0, qa_score=0.8, runs=1)
    perf.record("gpt-4", None, calls=2, prompt_tokens=10, completion_tokens=5)
    perf.record("codellama", "code", calls=2, latency_s=1.0)
    [row] = perf.stats("gpt-4", "complex")
    assert (row["calls"], row["failures"], row["runs"], row["runs_ok"]) == (4, 1, 2, 1)
    assert row["failure_rate"] == 0.25 and row["success_rate"] == 0.5
    assert row["mean_latency_s"] == 2.0 and row["gpu_s"] == 9.0
    assert row["qa_score"] == 0.8 and row["qa_reviews"] == 1
    assert [(r["alias"], r["category"]) for r in perf.stats()] == [
        ("codellama", "code"), ("gpt-4", None), ("gpt-4", "complex"),
    ]  # fmt: skip
    [plain] = perf.stats("gpt-4", "")
    assert (plain["prompt_tokens"], plain["completion_tokens"], plain["qa_score"]) == (10, 5, None)
    label = f"{letta_memory.namespace}-model-performance"
    assert len(letta_memory.client.blocks.list(label=label).items) == 1


# -- failures -------------------------------------------------------------------------------------


def test_unreachable_letta_names_tier_and_backend(letta_embeddings: EmbeddingEndpoint) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    backend = LettaBackend(
        url,
        embedding_endpoint=letta_embeddings.url,
        embedding_model=letta_embeddings.model,
        embedding_dim=letta_embeddings.dim,
        timeout=5,
    )
    calls: dict[str, Callable[[], object]] = {
        "working": lambda: backend.working.put("r1", "k", 1),
        "episodic": lambda: backend.episodic.add("something happened"),
        "semantic": lambda: backend.semantic.search("anything"),
        "performance": lambda: backend.performance.record("m", None, calls=1),
    }
    with backend:
        for tier, call in calls.items():
            with pytest.raises(MemoryBackendError) as info:
                call()
            err = info.value
            assert (err.tier, err.backend) == (tier, f"letta at {url}")
            assert str(err).startswith(f"{tier} memory (letta at {url}): ")
            assert "cannot reach Letta" in str(err) and "\n" not in str(err)


def test_an_archive_made_for_other_embeddings_is_refused(letta_factory: LettaFactory) -> None:
    first = letta_factory.backend()
    first.semantic.add("made with MiniLM")
    other = letta_factory.backend(namespace=first.namespace, embedding_model="another-model")
    with pytest.raises(
        MemoryBackendError, match=r"^semantic memory .*cannot change an archive's embeddings"
    ):
        other.semantic.count()


def test_a_failing_embeddings_endpoint_is_a_backend_error(letta_factory: LettaFactory) -> None:
    # an endpoint that answers 404 at once (a dead one fails the same way, after Letta's retries)
    memory = letta_factory.backend(embedding_endpoint=f"{letta_factory.url}/no-such-embeddings/v1")
    with pytest.raises(MemoryBackendError, match=r"^episodic memory .*Letta answered 500") as info:
        memory.episodic.add("cannot be embedded")
    assert "\n" not in str(info.value)
    assert memory.episodic.count() == 0


def test_a_wrong_dimension_is_a_backend_error(letta_factory: LettaFactory) -> None:
    memory = letta_factory.backend(embedding_dim=100)  # MiniLM gives 384
    with pytest.raises(MemoryBackendError, match=r"^semantic memory .*longer than 100 dimensions"):
        memory.semantic.add("a fact")
    assert memory.semantic.count() == 0  # not kept
    assert memory.semantic.search("fact") == []
