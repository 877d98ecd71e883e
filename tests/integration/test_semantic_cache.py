"""The semantic cache over a real store (SQLite and PostgreSQL), real MiniLM and local Qdrant:
what may be served (threshold, alias, prompt version, TTL) and what never is (retired versions,
expired entries)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from typhon.config import MemoryCacheSettings
from typhon.memory._builtin import _Vectors
from typhon.memory._cache import SemanticCache
from typhon.memory._embed import default_embedder
from typhon.store import RunStore

pytestmark = pytest.mark.integration

ASK = "user: What is the capital of France?"


@pytest.fixture
def cache(store: RunStore, tmp_path: Path) -> Iterator[SemanticCache]:
    vectors = _Vectors(path=tmp_path / "q", url=None, backend="test")
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
    vectors = _Vectors(path=tmp_path / "q", url=None, backend="test")
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
