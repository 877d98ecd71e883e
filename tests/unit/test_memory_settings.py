"""Memory settings and where memory is on: bad settings stop with the key named; a cluster
worker without a Qdrant server runs with memory off; beat schedules the daily maintenance."""

from __future__ import annotations

from pathlib import Path

import pytest

from typhon._runtime import Runtime
from typhon.config import TyphonConfig, load_config
from typhon.errors import ConfigError


def _load(tmp_path: Path, text: str) -> TyphonConfig:
    path = tmp_path / "typhon.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("memory: {backend: letta}\n", "needs memory.letta_url"),
        (
            "memory: {backend: letta, letta_url: 'http://127.0.0.1:8283'}\n",
            "needs memory.letta_embeddings_url",
        ),
        ("memory: {embeddings: nomic}\n", "memory.embeddings names model 'nomic'"),
        ("memory: {cache: {threshold: 1.5}}\n", "memory.cache.threshold"),
        ("memory: {qdrant_url: 'qdrant:6333'}\n", "memory.qdrant_url"),
    ],
)
def test_bad_memory_settings_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert needle in f"{info.value} {info.value.key}"
    assert info.value.exit_code == 2


def test_a_cluster_worker_has_memory_on_the_builtin_index(tmp_path: Path) -> None:
    """The built-in index admits many processes (its vectors live in the database)."""
    config = TyphonConfig(home=tmp_path, broker_url="redis://127.0.0.1:1/0")
    runtime = Runtime(config, notifier=object(), slots=object())  # type: ignore[arg-type]
    try:
        memory = runtime.memory
        assert memory is not None and "hnsw" in memory.backend.name_detail  # type: ignore[attr-defined]
        memory.close()
    finally:
        runtime.store.close()


def test_an_embedded_process_has_memory_and_a_closed_runtime_reopens_none(
    tmp_path: Path,
) -> None:
    runtime = Runtime(TyphonConfig(home=tmp_path))
    memory = runtime.memory
    assert memory is not None and memory.backend.name == "builtin"
    runtime.close()
    assert runtime.memory is None


def test_beat_runs_memory_maintenance_daily_on_the_control_queue() -> None:
    from workers.celery_app import MEMORY_TASK, control_queue, create_app

    config = TyphonConfig()
    entry = create_app(config).conf.beat_schedule["typhon-memory-maintenance"]
    assert entry["task"] == MEMORY_TASK and entry["schedule"] == 24 * 3600.0
    assert entry["options"]["queue"] == control_queue(config)
