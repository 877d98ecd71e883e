"""Dispatch through real Redis to real `typhon worker` processes, state in real PostgreSQL."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cluster

from typhon import RunStatus, Typhon
from typhon.config import load_config

CREWS = """
import os, time
from typhon import crew

@crew("whoami")
def whoami(ctx):
    ctx.step("looking")
    return f"pid={os.getpid()}"

@crew("breaks")
def breaks(ctx):
    raise ValueError("bad data in " + ctx.input)

@crew("waits")
def waits(ctx):
    for _ in range(600):
        ctx.step("waiting")
        time.sleep(0.1)
    return "waited"
"""


@pytest.fixture
def cluster(make_cluster: Callable[[str], Cluster]) -> Iterator[Cluster]:
    cluster = make_cluster(CREWS)
    cluster.start_worker()
    yield cluster


@pytest.fixture
def typhon(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Typhon]:
    monkeypatch.syspath_prepend(str(cluster.dir))
    with Typhon(load_config(cluster.config_path, environ={})) as client:
        assert not client.embedded
        yield client


def _wait(typhon: Typhon, crew: str, text: str = "x", timeout: float = 120) -> object:
    return typhon.submit(crew, text).wait(timeout)


def test_run_goes_through_a_worker_process(typhon: Typhon, cluster: Cluster) -> None:
    record = typhon.submit("whoami", "x").wait(120)
    assert record.status is RunStatus.SUCCEEDED, cluster.worker_log()
    worker_pid = int(str(record.output).removeprefix("pid="))
    assert worker_pid != os.getpid()
    assert record.attempts == 1
    assert typhon.store.dialect == "postgresql"
    kinds = [e.kind for e in typhon.store.events(record.id)]
    assert kinds == ["queued", "running", "step", "succeeded"]


def test_crew_failure_is_recorded(typhon: Typhon, cluster: Cluster) -> None:
    record = typhon.submit("breaks", "row 7").wait(120)
    assert record.status is RunStatus.FAILED, cluster.worker_log()
    assert record.error == "ValueError: bad data in row 7"


def test_cancel_running_run_on_a_worker(typhon: Typhon, cluster: Cluster) -> None:
    handle = typhon.submit("waits", "x")
    deadline = time.monotonic() + 60
    while handle.status() is not RunStatus.RUNNING:
        assert time.monotonic() < deadline, cluster.worker_log()
        time.sleep(0.05)
    assert handle.cancel()
    record = handle.wait(60)
    assert record.status is RunStatus.CANCELLED
    time.sleep(0.5)  # the worker notices at its next step and must not record anything else
    after = typhon.store.get(record.id)
    assert after.status is RunStatus.CANCELLED and after.output is None


def test_redelivered_message_records_one_outcome(typhon: Typhon, cluster: Cluster) -> None:
    from workers.celery_app import publish

    record = typhon.submit("whoami", "x").wait(120)
    assert record.status is RunStatus.SUCCEEDED
    app = typhon.dispatcher.app  # type: ignore[attr-defined]
    publish(app, typhon.config, record)  # a duplicate delivery
    deadline = time.monotonic() + 60
    while "run not queued; skipped" not in cluster.worker_log():
        assert time.monotonic() < deadline, cluster.worker_log()
        time.sleep(0.1)
    again = typhon.store.get(record.id)
    assert (again.status, again.output, again.attempts) == (record.status, record.output, 1)


def _cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def test_worker_and_children_are_pinned(make_cluster: Callable[[str], Cluster]) -> None:
    cluster = make_cluster(CREWS)
    proc = cluster.start_worker("--cpuset", "0")
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2:  # concurrency = the pool's cap (2)
        assert proc.poll() is None and time.monotonic() < deadline, cluster.worker_log()
        time.sleep(0.2)
    assert _cpus_allowed(proc.pid) == "0"
    assert [_cpus_allowed(c) for c in _children(proc.pid)] == ["0", "0"]
