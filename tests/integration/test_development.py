"""The Development crew in an embedded Typhon (real store, real sandbox, LangGraph checkpoints on
the run store's database), with a scripted model so that each path of the graph is taken on
purpose: pass first time, revise until the tests pass, run out of budget, a repository, approval
and rejection, and generated code that loops, eats memory or tries the network."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from typhon import RunStatus
from typhon.config import TyphonConfig
from typhon.models import Message
from typhon.orchestrator import Typhon
from typhon.testing import ScriptedModel, ScriptedModels

pytestmark = pytest.mark.integration

GOOD = {
    "mathx.py": "def add(a, b):\n    return a + b\n",
    "test_mathx.py": "from mathx import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}
BAD = {**GOOD, "mathx.py": "def add(a, b):\n    return a - b\n"}
ACCEPT = json.dumps({"verdict": "accept", "critique": "fine"})
REVISE = json.dumps({"verdict": "revise", "critique": "add is wrong"})


def files(mapping: dict[str, str]) -> str:
    return json.dumps({"files": [{"path": p, "content": c} for p, c in mapping.items()]})


def by_node(plan: str = "1. write add", implement: Sequence[str] = (), review: Sequence[str] = ()):
    """A model that answers by node (the system prompt tells them apart), in turn."""
    answers = {"implement": list(implement), "review": list(review)}

    def reply(messages: Sequence[Message]) -> str:
        system = str(messages[0]["content"])
        node = "review" if "reviewer" in system else "implement" if "complete" in system else "plan"
        if node == "plan":
            return plan
        queue = answers[node]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return reply


def _typhon(home: Path, reply: Any, **development: Any) -> tuple[Typhon, ScriptedModel]:
    config = TyphonConfig(
        home=home,
        development={"max_iterations": 3, **development},
        memory={"cache": {"enabled": False}},
    )
    model = ScriptedModel(reply)
    return Typhon(config, models=ScriptedModels(config, model)), model


def _nodes(typhon: Typhon, run_id: str) -> list[tuple[str, str]]:
    return [
        (e.data["name"], e.data["phase"])
        for e in typhon.store.events(run_id)
        if e.kind == "step" and "phase" in e.data
    ]


def test_a_task_that_passes_first_time(home: Path) -> None:
    typhon, _ = _typhon(home, by_node(implement=[files(GOOD)], review=[ACCEPT]))
    with typhon:
        record = typhon.submit("development", "write add(a, b) with a test").wait(120)
        nodes = _nodes(typhon, record.id)
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert nodes == [
        (n, p)
        for n in ("plan", "implement", "test", "review", "finalize")
        for p in ("start", "end")
    ]
    art = {Path(p).name: Path(p) for p in record.artifacts}
    assert {"changes.diff", "test-output.txt", "review.md", "report.md", "project.tar.gz"} <= set(
        art
    )
    diff = art["changes.diff"].read_text()
    assert "--- /dev/null\n+++ b/mathx.py" in diff and "+    return a + b" in diff
    assert "1 passed" in art["test-output.txt"].read_text()
    with tarfile.open(art["project.tar.gz"]) as tar:
        assert sorted(tar.getnames()) == ["project/mathx.py", "project/test_mathx.py"]
    assert "tests pass and the review accepts after 1 iteration" in (record.output or "")
    assert not (home / "sandbox" / record.id).exists()  # the workspace went with the run


def test_failing_tests_are_revised_until_they_pass(home: Path) -> None:
    typhon, model = _typhon(
        home, by_node(implement=[files(BAD), files(GOOD)], review=[REVISE, ACCEPT])
    )
    with typhon:
        record = typhon.submit("development", "write add(a, b) with a test").wait(120)
        nodes = [n for n, p in _nodes(typhon, record.id) if p == "start"]
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert nodes == ["plan", "implement", "test", "review", "revise", "test", "review", "finalize"]
    revise_prompt = str(model.calls[3]["messages"][1]["content"])  # plan, impl, review, revise
    assert "add is wrong" in revise_prompt and "assert" in revise_prompt  # critique + test output


def test_the_budget_ends_the_loop_and_the_failure_keeps_its_artifacts(home: Path) -> None:
    typhon, _ = _typhon(home, by_node(implement=[files(BAD)], review=[REVISE]), max_iterations=2)
    with typhon:
        record = typhon.submit("development", "write add(a, b) with a test").wait(120)
    assert record.status is RunStatus.FAILED
    assert record.error == (
        "the tests still fail after 2 iteration(s) (budget spent: 2 iterations); the diff,"
        " test output and review are the run's artifacts"
    )
    names = {Path(p).name for p in record.artifacts}
    assert {"changes.diff", "test-output.txt", "review.md"} <= names
    output = next(Path(p) for p in record.artifacts if p.endswith("test-output.txt")).read_text()
    assert "1 failed" in output


def test_a_repository_is_copied_and_diffed_never_changed(home: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mathx.py").write_text("def add(a, b):\n    return 0\n")
    (repo / "test_mathx.py").write_text(GOOD["test_mathx.py"])
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    typhon, model = _typhon(
        home, by_node(implement=[files({"mathx.py": GOOD["mathx.py"]})], review=[ACCEPT])
    )
    with typhon:
        record = typhon.submit("development", "fix add", repo=str(repo)).wait(120)
    assert record.status is RunStatus.SUCCEEDED, record.error
    diff = next(Path(p) for p in record.artifacts if p.endswith("changes.diff")).read_text()
    assert "--- a/mathx.py\n+++ b/mathx.py" in diff
    assert "-    return 0\n+    return a + b" in diff
    assert (repo / "mathx.py").read_text() == "def add(a, b):\n    return 0\n"  # untouched
    assert not any(Path(p).name == "project.tar.gz" for p in record.artifacts)
    assert "test_mathx.py" in str(model.calls[0]["messages"][1]["content"])  # it saw the repo


def test_approval_waits_without_a_slot_then_reject_and_approve(home: Path) -> None:
    typhon, model = _typhon(home, by_node(implement=[files(GOOD)], review=[ACCEPT]), approval=True)
    with typhon:
        handle = typhon.submit("development", "write add(a, b) with a test")
        record = handle.wait(120)
        assert record.status is RunStatus.WAITING
        assert typhon.runtime.slots.in_use().get("development", 0) == 0
        assert any(p.endswith("changes.diff") for p in record.artifacts)  # to review
        typhon.reject(record.id, note="name it plus instead", by="alice")
        record = handle.wait(120)
        assert record.status is RunStatus.WAITING  # revised, tested, reviewed: asks again
        assert "name it plus instead" in str(
            model.calls[-2]["messages"][1]["content"]
        )  # revise, review
        typhon.approve(record.id, note="ok", by="alice")
        record = handle.wait(120)
        kinds = [e.kind for e in typhon.store.events(record.id)]
        plans = [n for n, p in _nodes(typhon, record.id) if (n, p) == ("plan", "start")]
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert kinds.count("waiting") == 2 and "rejected" in kinds and "approved" in kinds
    assert plans == ["plan"]  # resumed from the checkpoint each time, never restarted


def test_approving_a_run_that_does_not_wait_is_refused(home: Path) -> None:
    from typhon.errors import InputError

    typhon, _ = _typhon(home, by_node(implement=[files(GOOD)], review=[ACCEPT]))
    with typhon:
        record = typhon.submit("development", "write add").wait(120)
        with pytest.raises(InputError, match="is succeeded, not waiting for approval"):
            typhon.approve(record.id)


@pytest.mark.parametrize(
    ("code", "stopped"),
    [
        ("while True:\n    pass\n", "cpu time"),
        ("x = bytearray(4 * 1024 ** 3)\n", "memory"),
        ("import time\ntime.sleep(600)\n", "wall time"),
    ],
)
def test_runaway_code_is_stopped_and_reported(home: Path, code: str, stopped: str) -> None:
    bad = {"test_runaway.py": f"def test_it():\n    pass\n\n{code}"}
    typhon, _ = _typhon(
        home,
        by_node(implement=[files(bad)], review=[REVISE]),
        max_iterations=1,
        sandbox={"cpu_s": 3, "memory_mb": 512, "wall_s": 8},
    )
    with typhon:
        record = typhon.submit("development", "runaway").wait(120)
        again = typhon.submit("development", "runaway").wait(120)  # the worker is unharmed
    assert record.status is RunStatus.FAILED and again.status is RunStatus.FAILED
    output = next(Path(p) for p in record.artifacts if p.endswith("test-output.txt")).read_text()
    assert f"stopped by the sandbox ({stopped})" in output or (
        stopped == "memory" and "MemoryError" in output
    )


def test_generated_code_cannot_reach_the_network_or_write_outside(
    home: Path, tmp_path: Path, redis_url: str
) -> None:
    outside = tmp_path / "outside.txt"
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    probe = (
        "import socket\n\n\n"
        "def test_no_network():\n"
        "    s = socket.socket()\n"
        "    s.settimeout(3)\n"
        "    try:\n"
        f"        s.connect(('127.0.0.1', {port}))\n"
        "    except OSError:\n"
        "        return\n"
        "    raise AssertionError('connected')\n\n\n"
        "def test_no_writes_outside():\n"
        "    try:\n"
        f"        open({str(outside)!r}, 'w').write('x')\n"
        "    except OSError:\n"
        "        return\n"
        "    raise AssertionError('wrote outside')\n"
    )
    typhon, _ = _typhon(home, by_node(implement=[files({"test_probe.py": probe})], review=[ACCEPT]))
    with typhon:
        record = typhon.submit("development", "probe the sandbox").wait(120)
    assert record.status is RunStatus.SUCCEEDED, record.error  # both probes were refused
    output = next(Path(p) for p in record.artifacts if p.endswith("test-output.txt")).read_text()
    assert "2 passed" in output
    assert not outside.exists()
