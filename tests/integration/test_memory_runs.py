"""Memory in runs, end to end in an embedded Typhon (real store, real MiniLM, local Qdrant): the
outcome becomes an episode, model calls go to model performance, working memory dies with the
run, recall feeds the next run, and the semantic cache answers a repeated request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from typhon.config import TyphonConfig
from typhon.context import RunContext
from typhon.crews import CrewRegistry, crew
from typhon.orchestrator import Typhon
from typhon.testing import ScriptedModel, ScriptedModels

pytestmark = pytest.mark.integration

TYPHON = str(Path(sys.executable).parent / "typhon")


def _eventually(check: Any, timeout: float = 30.0) -> Any:
    """What ``check()`` returns once it is truthy: a run's memories are written just after its
    outcome, which is what ``wait()`` returns on."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "memory not written in time"
        time.sleep(0.1)
    return value


def _typhon(config: TyphonConfig, model: ScriptedModel, seen: dict[str, Any]) -> Typhon:
    registry = CrewRegistry(builtins={})

    @crew("notes", registry=registry, category="simple")
    def notes(ctx: RunContext) -> str:
        seen["recalled"] = [r.text for r in ctx.recall()]
        ctx.remember("draft", {"step": 1})
        seen["working"] = ctx.recalled("draft")
        return ctx.model.chat([{"role": "user", "content": ctx.input}]).content

    return Typhon(config, registry=registry, models=ScriptedModels(config, model))


def test_a_run_leaves_an_episode_and_model_performance(home: Path) -> None:
    config = TyphonConfig(home=home)
    seen: dict[str, Any] = {}
    with _typhon(config, ScriptedModel("Lisbon is the capital of Portugal."), seen) as typhon:
        record = typhon.submit("notes", "What is the capital of Portugal?").wait(60)
        memory = typhon.runtime.memory
        assert memory is not None
        assert seen["working"] == {"step": 1}
        assert memory.backend.working.items(record.id) == {}  # gone with the run
        [episode] = _eventually(lambda: memory.backend.episodic.list(crew="notes"))
        assert episode.run_id == record.id and episode.kind == "run"
        assert "succeeded" in episode.text and "Lisbon" in episode.text
        assert episode.meta["model"] == "local" and episode.meta["category"] == "simple"
        [perf] = _eventually(lambda: memory.backend.performance.stats("local"))
        assert (perf["runs"], perf["runs_ok"], perf["category"]) == (1, 1, "simple")

        second = typhon.submit("notes", "Portugal's capital city?").wait(60)
    assert second.status.value == "succeeded"
    assert any("Lisbon" in text for text in seen["recalled"])  # the first run, recalled


def test_the_cache_answers_a_paraphrase_and_no_cache_skips_it(home: Path) -> None:
    config = TyphonConfig(home=home)
    model = ScriptedModel("first answer", "second answer", "third answer")
    seen: dict[str, Any] = {}
    with _typhon(config, model, seen) as typhon:
        first = typhon.submit("notes", "How many GPUs does the 70B node have?").wait(60)
        cached = typhon.submit("notes", "How many GPUs does the 70B node have?").wait(60)
        fresh = typhon.submit("notes", "How many GPUs does the 70B node have?", no_cache=True).wait(
            60
        )
        other = typhon.submit("notes", "Write a haiku about autumn rain").wait(60)
        memory = typhon.runtime.memory
        assert memory is not None and memory.cache is not None
        stats = memory.cache.stats()
    assert (first.output, cached.output) == ("first answer", "first answer")
    assert fresh.output == "second answer"  # --no-cache: the model was asked
    assert other.output == "third answer"  # not similar enough: a miss
    assert len(model.calls) == 3
    assert stats["local"]["hits"] == 1 and stats["local"]["misses"] == 2


def test_memory_cli(tmp_path: Path) -> None:
    env = {**os.environ, "TYPHON_HOME": str(tmp_path / "h")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TYPHON, *args], capture_output=True, text=True, env=env)

    added = cli("memory", "add", "The 70B model runs on a 5090 and a 4090", "--tag", "hw", "--json")
    assert added.returncode == 0, added.stderr
    rec = json.loads(added.stdout)
    cli("memory", "add", "Sourdough needs a fed starter")
    found = cli("memory", "search", "which GPUs run the large model", "--json", "-k", "1")
    assert [h["id"] for h in json.loads(found.stdout)] == [rec["id"]]
    empty = cli("memory", "search", " ")
    assert empty.returncode == 2 and "query is empty" in empty.stderr
    big = cli("memory", "add", "x" * 30_000)
    assert big.returncode == 2 and "over the limit" in big.stderr and "Traceback" not in big.stderr
    assert cli("memory", "forget", rec["id"]).returncode == 0
    gone = cli("memory", "forget", rec["id"])
    assert gone.returncode == 2 and "no memory" in gone.stderr
    stats = json.loads(cli("memory", "stats", "--json").stdout)
    assert (stats["semantic"], stats["episodic"]) == (1, 0)


def test_maintenance_compacts_old_episodes_into_a_summary(home: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from typhon.memory import open_memory
    from typhon.memory._retention import maintain
    from typhon.store import RunStore

    config = TyphonConfig(home=home)
    store = RunStore(config.effective_database_url)
    memory = open_memory(config, store)
    try:
        old = datetime.now(UTC) - timedelta(days=45)
        add = memory.backend.episodic.add
        for i, status in enumerate(["succeeded", "succeeded", "failed"]):
            add(  # type: ignore[call-arg]
                f"research run {status}: topic {i}", crew="research", kind="run",
                meta={"status": status}, created_at=old + timedelta(hours=i),
            )  # fmt: skip
        add("research run succeeded: fresh topic", crew="research", kind="run")
        report = maintain(memory, compact_after_days=30)
        assert report == {"episodes_compacted": 3, "cache_entries_expired": 0}
        [summary] = memory.backend.episodic.list(kind="summary")
        assert summary.text.startswith("Summary of 3 earlier research episodes")
        assert "2 succeeded, 1 failed" in summary.text and "topic 2" in summary.text
        assert memory.backend.episodic.count() == 2
        hits = memory.backend.episodic.search("topic 1", k=1)
        assert hits[0].kind == "summary"  # what was folded is still found through its summary
    finally:
        memory.close()
        store.close()


def test_runs_remember_in_letta_when_configured(home: Path) -> None:
    import uuid

    from letta_client import Letta
    from support.letta import embeddings_endpoint, letta_url

    url = letta_url()
    namespace = f"t{uuid.uuid4().hex[:12]}"
    with embeddings_endpoint() as endpoint:
        memory_settings = {
            "backend": "letta", "letta_url": url, "letta_embeddings_url": endpoint.url,
            "letta_namespace": namespace,
        }  # fmt: skip
        config = TyphonConfig.model_validate({"home": home, "memory": memory_settings})
        seen: dict[str, Any] = {}
        try:
            with _typhon(config, ScriptedModel("Lisbon."), seen) as typhon:
                record = typhon.submit("notes", "What is the capital of Portugal?").wait(60)
                memory = typhon.runtime.memory
                assert memory is not None and memory.backend.name == "letta"
                assert seen["working"] == {"step": 1}  # a Letta block while the run lived
                [episode] = _eventually(lambda: memory.backend.episodic.list(crew="notes"))
                assert episode.run_id == record.id and "Lisbon" in episode.text
                [perf] = _eventually(lambda: memory.backend.performance.stats("local"))
                assert perf["runs_ok"] == 1
                _eventually(lambda: memory.backend.working.items(record.id) == {})
        finally:
            with Letta(base_url=url, timeout=30) as client:
                for tier in ("episodic", "semantic"):
                    for archive in client.archives.list(name=f"{namespace}-{tier}").items:
                        client.archives.delete(archive.id)
                for block in client.blocks.list(label_search=f"{namespace}-", limit=1000).items:
                    if (block.label or "").startswith(f"{namespace}-"):
                        client.blocks.delete(block.id)


def test_embeddings_serve_and_memory_compact_commands(tmp_path: Path) -> None:
    import signal
    import time

    import httpx

    from typhon.models import free_port

    env = {**os.environ, "TYPHON_HOME": str(tmp_path / "h")}
    port = free_port()
    proc = subprocess.Popen(
        [TYPHON, "embeddings", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/v1/embeddings",
                    json={"model": "m", "input": ["a cat", "a dog"]},
                    timeout=10,
                )
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.2)
        assert answer.status_code == 200
        assert [len(row["embedding"]) for row in answer.json()["data"]] == [384, 384]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    refused = subprocess.run(
        [TYPHON, "embeddings", "serve", "--host", "0.0.0.0", "--port", str(port)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "cannot serve embeddings" in refused.stderr

    compact = subprocess.run(
        [TYPHON, "memory", "compact", "--json"], capture_output=True, text=True, env=env
    )
    assert compact.returncode == 0, compact.stderr
    assert json.loads(compact.stdout) == {"episodes_compacted": 0, "cache_entries_expired": 0}
