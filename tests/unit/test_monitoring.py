"""The Monitoring crew's checks (at, below and above each threshold; GPUs that cannot report),
and alert episodes on a real SQLite store: open once, stay open without duplicates, resolve,
reopen as a new alert; a node that did not answer keeps its alerts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from typhon.config import MonitoringConfig, TyphonConfig
from typhon.crews.monitoring import (
    ACTIONS,
    MonitoringCrew,
    failure_rate_finding,
    hardware_findings,
    list_alerts,
    monitor,
    render_alerts,
    render_markdown,
    storage_findings,
    temperature_findings,
    vram_findings,
)
from typhon.store import RunStore

GIB = 1024**3


def gpu(
    index: int = 0,
    *,
    total: int | None = 32 * GIB,
    used: int | None = 1 * GIB,
    temp: int | None = 45,
    name: str | None = "NVIDIA GeForce RTX 5090",
) -> dict[str, Any]:
    """One GPU exactly as ``hardware.GpuInfo.to_json()`` writes it."""
    return {
        "index": index, "name": name, "uuid": f"GPU-{index}", "vram_total_bytes": total,
        "vram_used_bytes": used, "vram_total_gib": None if total is None else round(total / GIB, 2),
        "vram_used_gib": None if used is None else round(used / GIB, 2), "temperature_c": temp,
        "utilization_percent": None, "compute_capability": "12.0", "driver": "575.57.08",
    }  # fmt: skip


def disk(mount: str = "/", percent: float = 40.0, device: str = "/dev/nvme0n1p2") -> dict[str, Any]:
    total = 1000 * GIB
    used = int(total * percent / 100)
    return {
        "device": device, "mount": mount, "total_bytes": total, "used_bytes": used,
        "free_bytes": total - used, "percent": percent,
    }  # fmt: skip


def host(
    name: str = "gpu-a",
    gpus: list[dict[str, Any]] | None = None,
    disks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A host summary shaped like ``hardware.local_summary()``."""
    return {
        "host": name,
        "cpu": {"model": "AMD EPYC 9354", "cores": 32, "threads": 64, "affinity": "0-63"},
        "memory": {
            "total_bytes": 256 * GIB,
            "available_bytes": 200 * GIB,
            "total_gib": 256.0,
            "available_gib": 200.0,
        },
        "disks": [disk()] if disks is None else disks,
        "gpus": [gpu()] if gpus is None else gpus,
        "gpu_note": None,
    }


def cluster(local: dict[str, Any], *nodes: dict[str, Any]) -> dict[str, Any]:
    """A summary shaped like ``hardware.cluster_summary()``."""
    return {"generated_at": "2025-01-01T00:00:00+00:00", "local": local, "nodes": list(nodes)}


def node(name: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": name, "url": f"http://127.0.0.1:1/{name}", "reachable": summary is not None,
        "error": None if summary else "http://127.0.0.1:1/hardware/summary: ConnectError: refused",
        "summary": summary, "gpus_configured": [],
    }  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    yield s
    s.close()


@pytest.fixture
def config(tmp_path: Path) -> TyphonConfig:
    return TyphonConfig(home=tmp_path / "home")


# -- the checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(("used_gib", "firing"), [(18.0, False), (19.0, False), (19.5, True)])
def test_vram_fires_only_above_its_threshold(used_gib: float, firing: bool) -> None:
    """A 20 GiB card: 19 GiB is exactly 95%, which is not above it."""
    (f,) = vram_findings("gpu-a", [gpu(total=20 * GIB, used=int(used_gib * GIB))], 95)
    assert f.kind == "vram_critical" and f.subject == "gpu-a/gpu0" and f.firing is firing
    assert f.value == pytest.approx(100 * used_gib / 20)
    assert f.action == ACTIONS["vram_critical"] == "Reduce context or switch model"
    assert "RTX 5090" in f.message and ("above" in f.message) is firing


@pytest.mark.parametrize(("temp", "firing"), [(79, False), (80, False), (81, True)])
def test_gpu_temperature_fires_only_above_its_threshold(temp: int, firing: bool) -> None:
    (f,) = temperature_findings("gpu-a", [gpu(temp=temp)], 80)
    assert f.kind == "gpu_temp_high" and f.firing is firing and f.value == temp
    assert f.action == "Check cooling, reduce power limit"


@pytest.mark.parametrize(("percent", "firing"), [(94.9, False), (95.0, False), (95.1, True)])
def test_storage_fires_only_above_its_threshold(percent: float, firing: bool) -> None:
    (f,) = storage_findings("gpu-a", [disk("/data", percent, "/dev/md0")], 95)
    assert f.kind == "storage_full" and f.subject == "gpu-a:/data" and f.firing is firing
    assert f.action == "Cleanup or expand array" and "/dev/md0" in f.message


@pytest.mark.parametrize(("failed", "firing"), [(1, False), (2, False), (3, True)])
def test_failure_rate_fires_only_above_its_threshold(failed: int, firing: bool) -> None:
    """Ten runs: 2 failed is exactly 20%, not above it."""
    f = failure_rate_finding(failed, 10, threshold=0.2, min_runs=5, window_s=3600)
    assert f.kind == "agent_failure_rate" and f.subject == "cluster" and f.firing is firing
    assert f.value == pytest.approx(failed / 10)
    assert f.action == "Review logs, check model health"
    assert f"{failed} of 10 finished runs failed" in f.message and "1 h" in f.message


def test_failure_rate_needs_min_runs_before_it_fires() -> None:
    few = failure_rate_finding(4, 4, threshold=0.2, min_runs=5, window_s=3600)
    assert not few.firing and few.value == 1.0 and "too few" in few.message
    none = failure_rate_finding(0, 0, threshold=0.2, min_runs=5, window_s=3600)
    assert not none.firing and none.value == 0.0
    enough = failure_rate_finding(5, 5, threshold=0.2, min_runs=5, window_s=3600)
    assert enough.firing


def test_gpus_that_cannot_report_are_not_checked_and_are_noted() -> None:
    summary = host(gpus=[gpu(0, total=None, used=None, temp=None), gpu(1, temp=None), gpu(2)])
    findings, notes = hardware_findings(summary, MonitoringConfig())
    by_kind = {(f.kind, f.subject) for f in findings}
    assert ("vram_critical", "gpu-a/gpu0") not in by_kind
    assert ("gpu_temp_high", "gpu-a/gpu0") not in by_kind
    assert ("vram_critical", "gpu-a/gpu1") in by_kind
    assert ("gpu_temp_high", "gpu-a/gpu1") not in by_kind
    assert {("vram_critical", "gpu-a/gpu2"), ("gpu_temp_high", "gpu-a/gpu2")} <= by_kind
    assert any("gpu-a/gpu0" in n and "memory or temperature" in n for n in notes)
    assert any("gpu-a/gpu1" in n and "temperature" in n for n in notes)


def test_a_host_without_gpus_checks_its_disks_and_notes_why() -> None:
    summary = {**host(gpus=[]), "gpu_note": "no NVIDIA driver/GPU found (NVML: ...)"}
    findings, notes = hardware_findings(summary, MonitoringConfig())
    assert [(f.kind, f.subject) for f in findings] == [("storage_full", "gpu-a:/")]
    assert any("no NVIDIA driver" in n for n in notes)


def test_every_disk_of_every_reachable_node_is_checked_each_host_once() -> None:
    summary = cluster(
        host("orchestrator", gpus=[], disks=[disk("/", 50)]),
        node("gpu-a", host("gpu-a-host", disks=[disk("/", 96), disk("/models", 10, "/dev/sdb")])),
        node("gpu-b", None),
        node("self", host("orchestrator", gpus=[], disks=[disk("/", 50)])),  # this host again
    )
    findings, notes = hardware_findings(summary, MonitoringConfig())
    storage = {f.subject: f.firing for f in findings if f.kind == "storage_full"}
    assert storage == {"gpu-a:/": True, "gpu-a:/models": False, "self:/": False}
    assert any(n.startswith("node gpu-b did not answer") for n in notes)


# -- alert episodes ---------------------------------------------------------------------------


def _kinds(alerts: Any) -> list[tuple[str, str]]:
    return sorted((a.kind, a.subject) for a in alerts)


def test_an_alert_opens_once_stays_open_resolves_and_reopens_as_a_new_one(
    config: TyphonConfig, store: RunStore
) -> None:
    t0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    hot = host(gpus=[gpu(temp=90)])
    first = monitor(config, store, hot, now=t0)
    assert _kinds(first.opened) == [("gpu_temp_high", "gpu-a/gpu0")]
    alert = first.opened[0]
    assert alert.action == "Check cooling, reduce power limit" and alert.value == 90
    assert alert.threshold == 80 and alert.open and alert.opened_at == t0

    hotter = host(gpus=[gpu(temp=92)])
    second = monitor(config, store, hotter, now=t0 + timedelta(minutes=1))
    assert second.opened == () and second.resolved == ()
    (still,) = second.open
    assert still.id == alert.id and still.value == 92 and "92" in still.message
    assert still.opened_at == t0 and still.last_seen_at == t0 + timedelta(minutes=1)
    assert len(list_alerts(store, include_resolved=True)) == 1

    cool = monitor(config, store, host(gpus=[gpu(temp=60)]), now=t0 + timedelta(minutes=2))
    (resolved,) = cool.resolved
    assert resolved.id == alert.id and resolved.resolved_at == t0 + timedelta(minutes=2)
    assert resolved.value == 92 and "high" in resolved.message  # what the episode was
    assert cool.open == () and list_alerts(store) == []

    again = monitor(config, store, hot, now=t0 + timedelta(minutes=3))
    (reopened,) = again.opened
    assert reopened.id != alert.id and reopened.opened_at == t0 + timedelta(minutes=3)
    history = list_alerts(store, include_resolved=True)
    assert [(a.id, a.open) for a in history] == [(reopened.id, True), (alert.id, False)]


def test_each_subject_is_its_own_episode(config: TyphonConfig, store: RunStore) -> None:
    summary = host(
        gpus=[gpu(0, used=int(31.5 * GIB), temp=85), gpu(1, temp=85)],
        disks=[disk("/", 99), disk("/data", 20, "/dev/sdb")],
    )
    report = monitor(config, store, summary)
    assert _kinds(report.opened) == [
        ("gpu_temp_high", "gpu-a/gpu0"),
        ("gpu_temp_high", "gpu-a/gpu1"),
        ("storage_full", "gpu-a:/"),
        ("vram_critical", "gpu-a/gpu0"),
    ]
    assert {a.kind: a.action for a in report.opened} == {
        "gpu_temp_high": "Check cooling, reduce power limit",
        "storage_full": "Cleanup or expand array",
        "vram_critical": "Reduce context or switch model",
    }
    # gpu1 cools down; the rest stay as they are
    summary["gpus"][1]["temperature_c"] = 50
    later = monitor(config, store, summary)
    assert _kinds(later.resolved) == [("gpu_temp_high", "gpu-a/gpu1")]
    assert len(later.open) == 3 and later.opened == ()


def test_a_node_that_did_not_answer_keeps_its_alerts(config: TyphonConfig, store: RunStore) -> None:
    hot_b = host("gpu-b-host", gpus=[gpu(temp=95)])
    report = monitor(config, store, cluster(host("cpu", gpus=[]), node("gpu-b", hot_b)))
    assert _kinds(report.opened) == [("gpu_temp_high", "gpu-b/gpu0")]

    silent = monitor(config, store, cluster(host("cpu", gpus=[]), node("gpu-b", None)))
    assert silent.resolved == () and _kinds(silent.open) == [("gpu_temp_high", "gpu-b/gpu0")]
    assert any("gpu-b did not answer" in n and "stay" in n for n in silent.notes)

    # a GPU that stops reporting its temperature keeps its alert too
    mute = host("gpu-b-host", gpus=[gpu(temp=None)])
    muted = monitor(config, store, cluster(host("cpu", gpus=[]), node("gpu-b", mute)))
    assert muted.resolved == () and len(muted.open) == 1

    cool_b = host("gpu-b-host", gpus=[gpu(temp=50)])
    back = monitor(config, store, cluster(host("cpu", gpus=[]), node("gpu-b", cool_b)))
    assert _kinds(back.resolved) == [("gpu_temp_high", "gpu-b/gpu0")] and back.open == ()


def test_thresholds_come_from_the_configuration(tmp_path: Path, store: RunStore) -> None:
    config = TyphonConfig(
        home=tmp_path, monitoring=MonitoringConfig(gpu_temp_c=50, storage_percent=30)
    )
    report = monitor(config, store, host(gpus=[gpu(temp=55)], disks=[disk("/", 40)]))
    assert _kinds(report.opened) == [("gpu_temp_high", "gpu-a/gpu0"), ("storage_full", "gpu-a:/")]
    assert {a.threshold for a in report.opened} == {50, 30}


def test_failure_rate_reads_finished_runs_of_the_window_not_monitorings_own(
    config: TyphonConfig, store: RunStore
) -> None:
    from typhon._types import RunStatus

    def finished(crew: str, status: RunStatus) -> None:
        run = store.create_run(crew=crew, input="x", pool="research")
        store.claim(run.id)
        store.finish(run.id, status, error="boom" if status is RunStatus.FAILED else None)

    for status in [RunStatus.FAILED] * 2 + [RunStatus.SUCCEEDED] * 3:
        finished("research", status)
    for _ in range(5):
        finished("monitoring", RunStatus.SUCCEEDED)  # would dilute the rate to 20%
    finished("research", RunStatus.CANCELLED)  # a person's choice, not a failure
    report = monitor(config, store, host(gpus=[], disks=[]))
    (rate,) = [f for f in report.findings if f.kind == "agent_failure_rate"]
    assert rate.value == pytest.approx(0.4) and rate.firing
    assert _kinds(report.opened) == [("agent_failure_rate", "cluster")]
    # an hour later the window is empty: fewer than min_runs, so the alert resolves
    later = monitor(
        config, store, host(gpus=[], disks=[]), now=datetime.now(UTC) + timedelta(hours=2)
    )
    assert _kinds(later.resolved) == [("agent_failure_rate", "cluster")]


def test_the_report_renders_as_markdown_and_json(config: TyphonConfig, store: RunStore) -> None:
    report = monitor(config, store, host(gpus=[gpu(temp=85)]))
    text = render_markdown(report)
    assert text.startswith("# Monitoring: 1 open alert\n")
    assert "| gpu_temp_high | gpu-a/gpu0 | 85 °C | 80 °C |" in text
    assert "Check cooling, reduce power limit" in text and "| storage_full | gpu-a:/ |" in text
    data = json.loads(json.dumps(report.to_json()))
    assert data["opened"][0]["kind"] == "gpu_temp_high" and len(data["open"]) == 1
    assert "gpu_temp_high" in render_alerts(report.open)
    assert render_alerts([]) == "no alerts"


def test_the_crew_is_described_for_the_monitoring_pool() -> None:
    from typhon.crews._base import default_registry

    assert default_registry().get("monitoring") is MonitoringCrew
    assert MonitoringCrew.pool == "monitoring" and MonitoringCrew.category == "simple"


def test_beat_checks_every_interval_on_the_monitoring_queue() -> None:
    from workers.celery_app import MONITOR_TASK, create_app

    config = TyphonConfig(monitoring=MonitoringConfig(interval_s=30))
    entry = create_app(config).conf.beat_schedule["typhon-monitor"]
    assert MONITOR_TASK == "typhon.monitor"
    assert entry["task"] == MONITOR_TASK and entry["schedule"] == 30
    assert entry["options"]["queue"] == config.pool("monitoring").queue == "monitoring"
    default = create_app(TyphonConfig()).conf.beat_schedule["typhon-monitor"]
    assert default["schedule"] == 60


def test_beat_has_no_monitor_entry_when_monitoring_is_off() -> None:
    from workers.celery_app import create_app

    config = TyphonConfig(monitoring=MonitoringConfig(enabled=False))
    assert "typhon-monitor" not in create_app(config).conf.beat_schedule


def test_typhon_alerts_lists_open_ones_and_with_all_the_resolved() -> None:
    import os
    import subprocess
    import sys

    from typhon.config import load_config

    config = load_config()  # the test's own TYPHON_HOME: the store `typhon alerts` opens
    store = RunStore(config.effective_database_url)
    try:
        monitor(config, store, host(gpus=[gpu(0, temp=90), gpu(1, temp=90)]))
        monitor(config, store, host(gpus=[gpu(0, temp=90), gpu(1, temp=40)]))
    finally:
        store.close()
    typhon = str(Path(sys.executable).parent / "typhon")

    def alerts(*args: str) -> str:
        done = subprocess.run(
            [typhon, "alerts", *args], capture_output=True, text=True, env=os.environ.copy()
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    open_only = json.loads(alerts("--json"))
    assert [(a["subject"], a["resolved_at"]) for a in open_only] == [("gpu-a/gpu0", None)]
    assert open_only[0]["action"] == "Check cooling, reduce power limit"
    every = json.loads(alerts("--all", "--json"))
    assert sorted((a["subject"], a["resolved_at"] is None) for a in every) == [
        ("gpu-a/gpu0", True),
        ("gpu-a/gpu1", False),
    ]
    text = alerts()
    assert "gpu_temp_high" in text and "gpu-a/gpu0" in text and "gpu-a/gpu1" not in text
    assert "action: Check cooling, reduce power limit" in text
