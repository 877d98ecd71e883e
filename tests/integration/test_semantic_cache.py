"""The semantic cache over a real store (SQLite and PostgreSQL), real MiniLM and local Qdrant:
what may be served (threshold, alias, prompt version, TTL) and what never is (retired versions,
expired entries)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from typhon.config import MemoryCacheSettings
from typhon.memory._cache import SemanticCache
from typhon.memory._embed import default_embedder
from typhon.memory._index import HnswIndex
from typhon.store import RunStore

pytestmark = pytest.mark.integration

ASK = "user: What is the capital of France?"


@pytest.fixture
def cache(store: RunStore, tmp_path: Path) -> Iterator[SemanticCache]:
    vectors = HnswIndex(store)
    yield SemanticCache(store, default_embedder(), vectors, MemoryCacheSettings(threshold=0.92))
    vectors.close()


def test_identical_request_hits_and_counts(cache: SemanticCache) -> None:
    assert cache.lookup("fast", "v1", ASK) is None
    cache.put("fast", "v1", ASK, "Paris.")
    hit = cache.lookup("fast", "v1", ASK)
    assert hit is not None and hit.response == "Paris." and hit.score >= 0.99
    stats = cache.stats()
    assert stats["fast"] == {"hits": 1, "misses": 1}
    assert stats["_all"]["entries"] == 1


def test_only_the_same_alias_and_prompt_version_are_served(cache: SemanticCache) -> None:
    cache.put("fast", "v1", ASK, "Paris.")
    assert cache.lookup("big", "v1", ASK) is None
    assert cache.lookup("fast", "v2", ASK) is None


def test_below_the_threshold_is_a_miss(cache: SemanticCache) -> None:
    cache.put("fast", "v1", ASK, "Paris.")
    assert cache.lookup("fast", "v1", "user: What is the capital of Germany?") is None
    assert cache.lookup("fast", "v1", "user: Write a poem about Paris in spring") is None


def test_retired_versions_are_never_served(cache: SemanticCache) -> None:
    cache.put("fast", "v1", ASK, "Paris.")
    cache.put("fast", "v2", ASK, "Paris, France.")
    assert cache.retire("v1") == 1
    assert cache.lookup("fast", "v1", ASK) is None
    hit = cache.lookup("fast", "v2", ASK)
    assert hit is not None and hit.response == "Paris, France."


def test_entries_expire(store: RunStore, tmp_path: Path) -> None:
    vectors = HnswIndex(store)
    short = SemanticCache(store, default_embedder(), vectors, MemoryCacheSettings(ttl_s=0.5))
    try:
        short.put("fast", "v1", ASK, "Paris.")
        assert short.lookup("fast", "v1", ASK) is not None
        time.sleep(0.7)
        assert short.lookup("fast", "v1", ASK) is None
        assert short.expire() == 1
        assert short.stats()["_all"]["entries"] == 0
    finally:
        vectors.close()


def test_look_alike_requests_are_not_served(cache: SemanticCache) -> None:
    cache.put("fast", "v1", "Convert 100 degrees Fahrenheit to Celsius.", "37.8 C")
    cache.put("fast", "v1", "Write a Python function that sorts a list in ascending order.", "a")
    cache.put("fast", "v1", "Give me 5 ideas for a birthday party.", "five")
    assert cache.lookup("fast", "v1", "Convert 100 degrees Celsius to Fahrenheit.") is None
    assert (
        cache.lookup("fast", "v1", "Write a Python function that sorts a list in descending order.")
        is None
    )
    assert cache.lookup("fast", "v1", "Give me 50 ideas for a birthday party.") is None
    hit = cache.lookup("fast", "v1", "Convert 100 degrees Fahrenheit to Celsius")
    assert hit is not None and hit.response == "37.8 C"


def test_the_context_before_the_question_must_match(cache: SemanticCache) -> None:
    from typhon.memory._cache import context_hash, request_text

    system = {"role": "system", "content": "You are a terse assistant. " * 60}
    first = [system, {"role": "user", "content": "What is the capital of France?"}]
    other = [system, {"role": "user", "content": "Write a haiku about autumn rain."}]
    assert request_text(first) == "What is the capital of France?"
    cache.put("fast", "v1", request_text(first), "Paris.", context_hash(first))
    # a long shared system prompt no longer makes every request look the same
    assert cache.lookup("fast", "v1", request_text(other), context_hash(other)) is None
    hit = cache.lookup("fast", "v1", request_text(first), context_hash(first))
    assert hit is not None
    chatty = [{"role": "system", "content": "Be chatty."}, first[1]]
    assert cache.lookup("fast", "v1", request_text(chatty), context_hash(chatty)) is None


def test_the_number_of_entries_is_bounded(store: RunStore, tmp_path: Path) -> None:
    vectors = HnswIndex(store)
    small = SemanticCache(store, default_embedder(), vectors, MemoryCacheSettings(max_entries=2))
    try:
        for text in ("What is 2 plus 2?", "Name a red fruit.", "Who wrote Hamlet?"):
            small.put("fast", "v1", text, "answer")
        assert small.stats()["_all"]["entries"] == 2
        assert small.lookup("fast", "v1", "What is 2 plus 2?") is None  # the oldest went first
        assert small.lookup("fast", "v1", "Who wrote Hamlet?") is not None
    finally:
        vectors.close()


def test_a_version_retired_by_a_promotion_loses_its_entries_and_vectors(
    cache: SemanticCache, store: RunStore
) -> None:
    """Promoting a new prompt version (here as the command line does, without a cache object)
    drops the retired version's entries and their vectors."""
    import sqlalchemy as sa

    from typhon.crews.research import ResearchCrew
    from typhon.improve._prompts import PromptVersions
    from typhon.store import memory_vectors

    versions = PromptVersions(store)
    first = versions.ensure("research", ResearchCrew)
    cache.put("fast", first.tag, ASK, "Paris.")
    cache.put("fast", "other:v1", ASK, "Paris!")
    second = versions.add("research", first.prompts, parent=first.version, source="manual")
    versions.promote("research", second.version)
    assert cache.lookup("fast", first.tag, ASK) is None
    assert cache.lookup("fast", "other:v1", ASK) is not None  # other versions keep theirs
    with store.engine.connect() as conn:
        ops = conn.execute(
            sa.select(memory_vectors.c.op, sa.func.count()).group_by(memory_vectors.c.op)
        ).all()
    assert dict(ops) == {"add": 1, "del": 1}
