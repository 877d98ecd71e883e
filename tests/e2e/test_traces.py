"""Traces end to end: `typhon run` against the real llama-server exports OTLP spans to a loopback
collector (submit -> execute_run -> invoke_agent -> chat, with the GenAI attributes and the run
id), a real Celery worker joins the submitter's trace through the run record, and without an
endpoint nothing is exported and nothing is added to the run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import TYPHON_BIN, Cluster
from support.otlp_collector import OtlpCollector

CREW = """
from typhon import crew


@crew("hello", pool="research")
def hello(ctx):
    ctx.step("asking")
    return ctx.model.chat([{"role": "user", "content": "Say hi."}], max_tokens=8).content
"""


def _env(home: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "hello_crew.py").write_text(CREW)
    config = tmp_path / "typhon.yaml"
    config.write_text("crew_modules: [hello_crew]\n")
    return {
        **os.environ, "TYPHON_HOME": str(home), "TYPHON_CONFIG": str(config),
        "PYTHONPATH": str(tmp_path), **extra,
    }  # fmt: skip


def _wait_for(collector: OtlpCollector, names: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not names <= {s["name"].split(" ")[0] for s in collector.spans}:
        assert time.monotonic() < deadline, [s["name"] for s in collector.spans]
        time.sleep(0.2)


def _by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["name"].split(" ")[0]: s for s in spans}


def test_a_run_exports_its_span_tree(home: Path, tmp_path: Path) -> None:
    with OtlpCollector() as collector:
        env = _env(home, tmp_path, TYPHON_TELEMETRY__OTLP_ENDPOINT=collector.url)
        result = subprocess.run(
            [TYPHON_BIN, "run", "hello", "hi", "--json"], env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        run_id = json.loads(result.stdout)["run_id"]
        _wait_for(collector, {"typhon.submit", "typhon.execute_run", "invoke_agent", "chat"})
    spans = _by_name(collector.spans)
    submit, run, agent, chat = (
        spans[n] for n in ("typhon.submit", "typhon.execute_run", "invoke_agent", "chat")
    )
    assert len({s["trace_id"] for s in (submit, run, agent, chat)}) == 1
    assert run["parent_id"] == submit["span_id"]
    assert agent["parent_id"] == run["span_id"] and chat["parent_id"] == agent["span_id"]
    assert submit["attributes"]["typhon.run_id"] == run_id
    assert run["attributes"]["typhon.run_id"] == agent["attributes"]["typhon.run_id"] == run_id
    assert chat["attributes"]["typhon.run_id"] == run_id
    assert agent["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert agent["attributes"]["gen_ai.agent.name"] == "hello"
    attrs = chat["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "local"
    assert attrs["gen_ai.agent.name"] == "hello"
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert submit["service"] == "typhon"


def test_no_endpoint_exports_nothing(home: Path, tmp_path: Path) -> None:
    with OtlpCollector() as collector:
        env = _env(home, tmp_path)
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        result = subprocess.run(
            [TYPHON_BIN, "run", "hello", "hi", "--json"], env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert collector.requests == 0
    from typhon.store import RunStore

    store = RunStore(f"sqlite:///{home / 'typhon.db'}")
    try:
        record = store.get(json.loads(result.stdout)["run_id"])
    finally:
        store.close()
    assert "_traceparent" not in record.options


def test_a_worker_joins_the_submitter_s_trace(make_cluster: Callable[..., Cluster]) -> None:
    with OtlpCollector() as collector:
        cluster = make_cluster(CREW)
        cluster.env["TYPHON_TELEMETRY__OTLP_ENDPOINT"] = collector.url
        cluster.env["TYPHON_TELEMETRY__SERVICE_NAME"] = "typhon-test"
        cluster.start_worker()
        result = cluster.typhon("run", "hello", "hi", "--json", timeout=300)
        assert result.returncode == 0, result.stderr + cluster.worker_log()[-3000:]
        _wait_for(collector, {"typhon.submit", "typhon.execute_run", "chat"})
    spans = _by_name(collector.spans)
    submit, run = spans["typhon.submit"], spans["typhon.execute_run"]
    assert run["trace_id"] == submit["trace_id"] and run["parent_id"] == submit["span_id"]
    assert run["attributes"]["messaging.system"] == "celery"
    assert run["attributes"]["typhon.worker"] != ""
