"""Monitoring alerts on SQLite and PostgreSQL: episodes, the failure rate from real run records,
concurrent checks, the v7 migration; and the ``typhon.monitor`` task through a real Celery
worker of the monitoring pool on the real Redis, seen by ``typhon alerts --json``."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Cluster

from typhon._types import RunStatus
from typhon.config import MonitoringConfig, TyphonConfig, load_config
from typhon.crews.monitoring import Finding, apply_findings, list_alerts, monitor
from typhon.store import MIGRATIONS, SCHEMA_VERSION, RunStore, schema_table

pytestmark = pytest.mark.integration

GIB = 1024**3


def _host(temp: int | None = 45, disk_percent: float = 40.0) -> dict[str, Any]:
    """A host summary shaped like ``hardware.local_summary()``."""
    total = 1000 * GIB
    used = int(total * disk_percent / 100)
    return {
        "host": "gpu-a",
        "cpu": {"model": "x", "cores": 8, "threads": 16, "affinity": "0-15"},
        "memory": {"total_bytes": 64 * GIB, "available_bytes": 32 * GIB, "total_gib": 64.0,
                   "available_gib": 32.0},
        "disks": [{"device": "/dev/md0", "mount": "/", "total_bytes": total, "used_bytes": used,
                   "free_bytes": total - used, "percent": disk_percent}],
        "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-0",
                  "vram_total_bytes": 24 * GIB, "vram_used_bytes": 2 * GIB, "vram_total_gib": 24.0,
                  "vram_used_gib": 2.0, "temperature_c": temp, "utilization_percent": 3,
                  "compute_capability": "8.9", "driver": "575.57.08"}],
        "gpu_note": None,
    }  # fmt: skip


def _finish(store: RunStore, crew: str, status: RunStatus) -> str:
    run = store.create_run(crew=crew, input="x", pool="research")
    if status is not RunStatus.CANCELLED:
        assert store.claim(run.id) is not None
    error = None if status is RunStatus.SUCCEEDED else "it broke"
    assert store.finish(run.id, status, error=error)
    return run.id


def test_alert_episodes_on_each_backend(store: RunStore, config: TyphonConfig) -> None:
    t0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
    opened = monitor(config, store, _host(temp=88), now=t0).opened
    assert [(a.kind, a.subject, a.value) for a in opened] == [("gpu_temp_high", "gpu-a/gpu0", 88)]
    first = opened[0]
    for minute, temp in ((1, 89), (2, 90)):
        report = monitor(config, store, _host(temp=temp), now=t0 + timedelta(minutes=minute))
        assert report.opened == () and [a.id for a in report.open] == [first.id]
    (seen,) = list_alerts(store)
    assert seen.value == 90 and seen.opened_at == t0
    assert seen.last_seen_at == t0 + timedelta(minutes=2)

    resolved = monitor(config, store, _host(temp=70), now=t0 + timedelta(minutes=3)).resolved
    assert [a.id for a in resolved] == [first.id] and list_alerts(store) == []
    again = monitor(config, store, _host(temp=85), now=t0 + timedelta(minutes=4)).opened
    assert len(again) == 1 and again[0].id != first.id
    history = list_alerts(store, include_resolved=True)
    assert [(a.id, a.resolved_at) for a in history] == [
        (again[0].id, None),
        (first.id, t0 + timedelta(minutes=3)),
    ]
    recent = list_alerts(store, include_resolved=True, since=t0 + timedelta(minutes=5))
    assert [a.id for a in recent] == [again[0].id]


def test_failure_rate_from_real_run_records(store: RunStore, tmp_path: Path) -> None:
    config = TyphonConfig(home=tmp_path, monitoring=MonitoringConfig(min_runs=4))
    quiet = _host()
    for status in (RunStatus.FAILED, RunStatus.SUCCEEDED, RunStatus.SUCCEEDED):
        _finish(store, "research", status)
    report = monitor(config, store, quiet)
    (rate,) = [f for f in report.findings if f.kind == "agent_failure_rate"]
    assert not rate.firing and "3 finished runs" in rate.message  # below min_runs

    _finish(store, "development", RunStatus.FAILED)
    for _ in range(6):
        _finish(store, "monitoring", RunStatus.SUCCEEDED)  # Monitoring's own runs do not count
    _finish(store, "research", RunStatus.CANCELLED)  # nor do cancelled ones
    running = store.create_run(crew="research", input="x", pool="research")
    store.claim(running.id)  # nor unfinished ones
    report = monitor(config, store, quiet)
    (alert,) = report.opened
    assert (alert.kind, alert.subject, alert.value, alert.threshold) == (
        "agent_failure_rate", "cluster", 0.5, 0.2,
    )  # fmt: skip
    assert "2 of 4 finished runs failed" in alert.message
    assert alert.action == "Review logs, check model health"

    for _ in range(6):
        _finish(store, "research", RunStatus.SUCCEEDED)  # 2 of 10: 20%, not above it
    assert [a.id for a in monitor(config, store, quiet).resolved] == [alert.id]

    for _ in range(2):
        _finish(store, "research", RunStatus.FAILED)  # 4 of 12
    (reopened,) = monitor(config, store, quiet).opened
    assert reopened.id != alert.id
    # past the window every run has aged out: too few to judge, so it resolves
    later = monitor(config, store, quiet, now=datetime.now(UTC) + timedelta(hours=1, minutes=1))
    assert [a.id for a in later.resolved] == [reopened.id]


def test_concurrent_checks_open_one_alert(store: RunStore) -> None:
    finding = Finding("storage_full", "gpu-a:/", 99.0, 95.0, True, "Storage full on gpu-a:/")
    barrier = threading.Barrier(6)
    opened: list[int] = []
    errors: list[BaseException] = []

    def check() -> None:
        try:
            barrier.wait()
            opened.extend(a.id for a in apply_findings(store, [finding])[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=check) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(opened) == 1
    assert [a.id for a in list_alerts(store, include_resolved=True)] == opened


def test_a_v6_database_gains_the_alerts_table(store: RunStore) -> None:
    with store.engine.begin() as conn:
        schema_table.create(conn)
        for version, step in MIGRATIONS:
            if version <= 6:
                step(conn)
        conn.execute(schema_table.insert().values(id=1, version=6))
    assert store.migrate() == SCHEMA_VERSION >= 7
    inspector = sa.inspect(store.engine)
    assert "alerts" in inspector.get_table_names()
    assert "ix_runs_finished_at" in {i["name"] for i in inspector.get_indexes("runs")}
    assert "ux_alerts_open" in {i["name"] for i in inspector.get_indexes("alerts")}
    assert store.migrate() == SCHEMA_VERSION  # idempotent


# -- a real worker ----------------------------------------------------------------------------


def _wait_for(predicate: Callable[[], Any], cluster: Cluster, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting\n{cluster.worker_log()[-4000:]}")
        time.sleep(0.2)


def test_the_monitor_task_runs_on_a_monitoring_worker_and_typhon_alerts_lists_it(
    make_cluster: Callable[..., Cluster],
) -> None:
    from workers.celery_app import MONITOR_TASK, create_app

    cluster = make_cluster(pools={"monitoring": "cap: 1"})
    cluster.env["TYPHON_MONITORING__STORAGE_PERCENT"] = "0.1"  # the real disk is above it
    cluster.start_worker(pool="monitoring")
    config = load_config(cluster.config_path, environ={})
    app = create_app(config)
    app.send_task(MONITOR_TASK, queue=cluster.queues["monitoring"], retry=False)

    store = RunStore(config.effective_database_url)
    try:
        alerts = _wait_for(
            lambda: [a for a in list_alerts(store) if a.kind == "storage_full"], cluster
        )
        assert f"{socket.gethostname()}:/" in {a.subject for a in alerts}
        assert store.list_runs() == []  # the scheduled check records no run

        result = cluster.typhon("alerts", "--json", timeout=120)
        assert result.returncode == 0, result.stderr
        listed = json.loads(result.stdout)
        storage = [a for a in listed if a["kind"] == "storage_full"]
        assert {a["id"] for a in storage} == {a.id for a in alerts}
        assert set(storage[0]) == {
            "id", "kind", "subject", "message", "action", "value", "threshold", "opened_at",
            "last_seen_at", "resolved_at",
        }  # fmt: skip
        assert storage[0]["action"] == "Cleanup or expand array"
        assert storage[0]["threshold"] == 0.1 and storage[0]["resolved_at"] is None

        # a second check keeps the same episode open: no duplicate
        app.send_task(MONITOR_TASK, queue=cluster.queues["monitoring"], retry=False)
        first_seen = {a.id: a.last_seen_at for a in alerts}
        _wait_for(
            lambda: all(
                a.last_seen_at > first_seen[a.id] for a in list_alerts(store) if a.id in first_seen
            ),
            cluster,
        )
        assert {a.id for a in list_alerts(store, include_resolved=True)} == set(first_seen)

        # on demand: a run of the Monitoring crew on the same worker, answered in Markdown
        run = cluster.typhon("run", "monitoring", "check", "--json", timeout=300)
        assert run.returncode == 0, run.stderr + cluster.worker_log()[-4000:]
        record = json.loads(run.stdout)
        assert record["crew"] == "monitoring" and record["status"] == "succeeded"
        assert record["output"].startswith("# Monitoring:") and "storage_full" in record["output"]
        assert {a.id for a in list_alerts(store, include_resolved=True)} == set(first_seen)
    finally:
        store.close()
        app.close()
