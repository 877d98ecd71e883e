"""`typhon run development` end to end against the real local llama-server, embedded and on a
real worker that is killed mid-run (the run resumes from its LangGraph checkpoint), and the
approval commands as people type them.

The bundled model is a tiny base model: its code rarely passes its own tests, so these tests
assert what the crew must do whatever the model writes (every node runs and reports, the diff,
test output and review are kept, the outcome says what happened), not that the code is good.
The graph's paths to success are tested with a scripted model in
tests/integration/test_development.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import TYPHON_BIN, Cluster

from typhon.store import RunStore

TASK = "write a python function is_even(n) in evens.py with a pytest test"
FAST = {
    "TYPHON_CREWS__DEVELOPMENT__MAX_TOKENS": "200",
    "TYPHON_DEVELOPMENT__MAX_ITERATIONS": "1",
}
NODES = ["plan", "implement", "test", "review", "finalize"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TYPHON_HOME": str(home), **FAST, **extra}


def _node_starts(store: RunStore, run_id: str) -> list[str]:
    return [
        e.data["name"]
        for e in store.events(run_id)
        if e.kind == "step" and e.data.get("phase") == "start"
    ]


def test_embedded_development_run_on_the_real_model(home: Path) -> None:
    result = subprocess.run(
        [TYPHON_BIN, "run", "development", TASK, "--json"],
        env=_env(home), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = json.loads(result.stdout)
    assert out["crew"] == "development" and out["model"] == "local"
    assert out["status"] in ("succeeded", "failed"), out
    assert result.returncode == (0 if out["status"] == "succeeded" else 1)
    if out["status"] == "failed":  # what the tiny model usually earns: said plainly
        assert out["error"].endswith("the diff, test output and review are the run's artifacts")
    names = {Path(p).name for p in out["artifacts"]}
    assert {"changes.diff", "test-output.txt", "review.md", "report.md"} <= names
    store = RunStore(f"sqlite:///{home / 'typhon.db'}")
    try:
        assert _node_starts(store, out["run_id"]) == NODES
    finally:
        store.close()
    # plan and review always answer; implement's JSON can be cut off by the token limit
    assert out["usage"]["calls"] >= 2


def test_a_killed_worker_s_run_resumes_from_its_checkpoint(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        "",
        pools={"development": "cap: 1"},
        extra_yaml=(
            "cluster: {name: CLUSTER, lease_ttl_s: 1.5, reaper_interval_s: 0.5,"
            " stale_queue_s: 3, max_attempts: 5}\n"
        ),
    )
    cluster.config_path.write_text(cluster.config_path.read_text().replace("CLUSTER", cluster.name))
    cluster.env.update(FAST)
    cluster.start_beat()
    worker = cluster.start_worker(pool="development")
    submitted = cluster.typhon("run", "development", TASK, "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    store = RunStore(_db_url(cluster))
    try:
        deadline = time.monotonic() + 300
        # killed once the plan's checkpoint is written: the next node has started
        while "implement" not in _node_starts(store, run_id):
            assert time.monotonic() < deadline, cluster.worker_log()[-4000:]
            time.sleep(0.05)
        cluster.kill(worker)
        cluster.start_worker(pool="development")
        while not store.get(run_id).status.finished:
            assert time.monotonic() < deadline, cluster.worker_log()[-4000:]
            time.sleep(0.2)
        record = store.get(run_id)
        starts = _node_starts(store, run_id)
        resumed = [
            e.data for e in store.events(run_id) if e.data.get("name") == "resumed from checkpoint"
        ]
    finally:
        store.close()
    assert record.attempts >= 2, "the kill did not hit the run"
    assert starts.count("plan") == 1, starts  # not started over
    assert resumed and resumed[0]["next"] in (["implement"], ["test"]), resumed
    assert starts[-1] == "finalize" and record.status.value in ("succeeded", "failed")


def _db_url(cluster: Cluster) -> str:
    for line in cluster.config_path.read_text().splitlines():
        if line.startswith("database_url:"):
            return line.split(":", 1)[1].strip().strip("'")
    raise AssertionError("no database_url")


CREW = """
from typhon import crew
from typhon.errors import RunWaiting


@crew("gate", pool="research")
def gate(ctx):
    answer = ctx.approval()
    if answer is None:
        ctx.add_artifact("proposal.txt", "the proposal")
        raise RunWaiting(ctx.run_id)
    if answer["decision"] == "rejected":
        raise RuntimeError("rejected: " + answer["note"])
    return "approved by " + answer["by"] + ": " + answer["note"]


@crew("echo_options", pool="research")
def echo_options(ctx):
    import json

    return json.dumps(ctx.options, sort_keys=True)
"""


def test_approve_and_reject_commands(home: Path, tmp_path: Path) -> None:
    (tmp_path / "gate_crew.py").write_text(CREW)
    config = tmp_path / "typhon.yaml"
    config.write_text("crew_modules: [gate_crew]\n")
    env = _env(home, PYTHONPATH=str(tmp_path), TYPHON_CONFIG=str(config), USER="alice")

    def typhon(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TYPHON_BIN, *args], env=env, capture_output=True, text=True, timeout=120
        )

    waiting = typhon("run", "gate", "ship it", "--json")
    assert waiting.returncode == 3, waiting.stderr
    run_id = json.loads(waiting.stdout)["run_id"]
    assert json.loads(waiting.stdout)["status"] == "waiting"
    assert f"waits for approval: `typhon approve {run_id}`" in waiting.stderr
    assert Path(json.loads(waiting.stdout)["artifacts"][0]).read_text() == "the proposal"
    approved = typhon("approve", run_id, "--note", "looks good", "--json")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["output"] == "approved by alice: looks good"
    again = typhon("approve", run_id)
    assert again.returncode == 2
    assert f"run {run_id} is succeeded, not waiting for approval" in again.stderr
    second = json.loads(typhon("run", "gate", "ship that", "--json").stdout)["run_id"]
    rejected = typhon("reject", second, "--note", "not yet")
    assert rejected.returncode == 1 and "rejected: not yet" in rejected.stderr
    echoed = typhon("run", "echo_options", "x", "-o", "images=2", "--option", "style=ink wash")
    assert echoed.returncode == 0, echoed.stderr
    assert json.loads(echoed.stdout.strip()) == {"images": 2, "style": "ink wash"}
    bad = typhon("run", "echo_options", "x", "--option", "images")
    assert bad.returncode == 2
    assert "--option 'images' is not KEY=VALUE; e.g. --option images=2" in bad.stderr
