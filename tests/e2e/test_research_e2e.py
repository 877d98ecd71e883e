"""`typhon run research` end to end: CrewAI against the real llama-server, as people type it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TYPHON_BIN, Cluster

from typhon.store import RunStore

TOPIC = "RISC-V vector extension"
# Short answers keep the suite quick on two cores; the crew and the server are the real ones.
FAST = {"TYPHON_CREWS__RESEARCH__MAX_TOKENS": "48"}


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "rvv_overview.md").write_text(
        "# RVV overview\n\nThe RISC-V vector extension (RVV) 1.0 was ratified in 2021.\n\n"
        "Vector length is set at run time with vsetvli, so code is length-agnostic."
    )
    return folder


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TYPHON_HOME": str(home), **FAST, **extra}


def _server_gone(home: Path) -> None:
    assert not list((home / "run").glob("llama-*.json")), "llama-server state left behind"


def test_embedded_run_writes_a_brief(home: Path, docs: Path) -> None:
    """The README's first command on a fresh TYPHON_HOME: nothing to start by hand."""
    result = subprocess.run(
        [TYPHON_BIN, "run", "research", TOPIC, "--docs", str(docs), "--json"],
        env=_env(home), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["crew"], out["status"], out["model"]) == ("research", "succeeded", "local")
    assert out["backend"] == "local:llama-server"
    assert out["usage"]["calls"] >= 3 and out["usage"]["completion_tokens"] > 0
    brief = Path(out["artifacts"][0])
    assert brief == home / "artifacts" / out["run_id"] / "brief.md"
    assert brief.read_text() == out["output"]
    assert out["output"].startswith("# ")
    assert f"## Sources\n\n1. rvv overview: `{docs / 'rvv_overview.md'}`" in out["output"]
    assert (home / "models" / "gemma-3-270m-q4_k_m.gguf").is_file()
    assert (home / "logs" / "llama-server-local.log").stat().st_size > 0
    _server_gone(home)


def test_run_through_redis_and_a_worker(make_cluster: Callable[[str], Cluster]) -> None:
    cluster = make_cluster("")
    cluster.env.update(FAST)
    cluster.start_worker()
    result = cluster.typhon("run", "research", TOPIC, "--json", timeout=600)
    assert result.returncode == 0, result.stderr + cluster.worker_log()
    out = json.loads(result.stdout)
    assert (out["status"], out["model"], out["pool"]) == ("succeeded", "local", "research")
    assert "## Sources" in out["output"]
    store = RunStore(_db_url(cluster))
    try:
        assert store.dialect == "postgresql"
        record = store.get(out["run_id"])
        steps = [e.data.get("name") for e in store.events(record.id) if e.kind == "step"]
    finally:
        store.close()
    assert record.output == out["output"] and record.usage.calls >= 3
    assert steps == ["gathering sources", "researcher", "analyst", "writer"]
    cluster.stop()
    _server_gone(cluster.home)


def _db_url(cluster: Cluster) -> str:
    for line in cluster.config_path.read_text().splitlines():
        if line.startswith("database_url:"):
            return line.split(":", 1)[1].strip().strip("'")
    raise AssertionError("no database_url")


def test_unreachable_model_fails_the_run_naming_alias_and_url(home: Path, tmp_path: Path) -> None:
    config = tmp_path / "down.yaml"
    config.write_text(
        "models:\n  - model_name: gpt-4\n    litellm_params:\n      model: openai/default\n"
        "      api_base: http://127.0.0.1:1/v1\n      max_retries: 1\n"
        "routing: {simple: gpt-4, complex: gpt-4, code: gpt-4, creative: gpt-4}\n"
        "router_settings: {queue_timeout: 1}\n"
    )
    result = subprocess.run(
        [TYPHON_BIN, "--config", str(config), "run", "research", TOPIC],
        env=_env(home), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "model 'gpt-4' at http://127.0.0.1:1/v1 unreachable" in result.stderr
    runs = subprocess.run(
        [TYPHON_BIN, "--config", str(config), "runs", "--json"],
        env=_env(home), capture_output=True, text=True, check=True,
    )  # fmt: skip
    (run,) = json.loads(runs.stdout)
    assert run["status"] == "failed" and "http://127.0.0.1:1/v1" in run["error"]


def test_ctrl_c_cancels_the_run(home: Path) -> None:
    proc = subprocess.Popen(
        [TYPHON_BIN, "run", "research", TOPIC],
        env=_env(home, TYPHON_CREWS__RESEARCH__MAX_TOKENS="400"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    store = RunStore(f"sqlite:///{home / 'typhon.db'}")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            if (home / "typhon.db").exists():
                runs = store.list_runs()
                if runs and any(
                    e.data.get("name") == "researcher" for e in store.events(runs[0].id)
                ):
                    break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        (run,) = store.list_runs()
        assert run.status.value == "cancelled"
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()
    _server_gone(home)
