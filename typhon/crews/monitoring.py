"""The Monitoring crew: the seed's critical alerts, checked every minute from Celery beat.

=================== ============= ====================================
alert (``kind``)    threshold     action
=================== ============= ====================================
VRAM critical       > 95%         Reduce context or switch model
GPU temp high       > 80 °C       Check cooling, reduce power limit
Agent failure rate  > 20% (1 h)   Review logs, check model health
Storage full        > 95%         Cleanup or expand array
=================== ============= ====================================

Thresholds and the window come from ``config.monitoring``. Each check is a pure function that
turns a hardware summary (``hardware.local_summary()`` or ``cluster_summary()``) or run counts
into :class:`Finding` objects, one per condition evaluated, firing or not. :func:`monitor`
applies them to the ``alerts`` table of the run store:

- a firing finding opens an alert, unless one is open for the same ``kind`` and ``subject``
  already: that one gets the new value, message and ``last_seen_at`` (one alert per episode);
- a finding that does not fire resolves the open alert of its ``kind`` and ``subject``;
- an alert whose condition was not evaluated this time stays as it is: a node that did not
  answer, a GPU that no longer reports its temperature or memory, or a disk no longer listed
  cannot show that the condition cleared.

The failure rate counts runs that finished (succeeded or failed) in the last
``failure_window_s``, Monitoring's own runs and cancelled runs left out, and fires only with at
least ``min_runs`` of them: one failure out of two runs is 50%, and says little about the
cluster. With fewer runs the rate is "not above the threshold", so an open alert resolves.

Subjects: ``NODE/gpuN`` for a GPU, ``NODE:MOUNT`` for a disk (``NODE`` is the configured node's
name, or this host's name), ``cluster`` for the failure rate.

The crew (``typhon run monitoring "check"``) runs the same checks and answers with a Markdown
report; it makes no model call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from typhon._types import RunStatus
from typhon.crews._base import Crew, CrewOutput
from typhon.store import alerts, runs

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from typhon.config import MonitoringConfig, TyphonConfig
    from typhon.context import RunContext
    from typhon.store import RunStore

__all__ = [
    "ACTIONS",
    "Alert",
    "Finding",
    "MonitorReport",
    "MonitoringCrew",
    "apply_findings",
    "failure_rate_finding",
    "hardware_findings",
    "list_alerts",
    "monitor",
    "render_alerts",
    "render_markdown",
    "run_outcomes",
    "storage_findings",
    "temperature_findings",
    "vram_findings",
]

VRAM = "vram_critical"
GPU_TEMP = "gpu_temp_high"
FAILURE_RATE = "agent_failure_rate"
STORAGE = "storage_full"
CLUSTER = "cluster"

# The seed's actions, word for word.
ACTIONS = {
    VRAM: "Reduce context or switch model",
    GPU_TEMP: "Check cooling, reduce power limit",
    FAILURE_RATE: "Review logs, check model health",
    STORAGE: "Cleanup or expand array",
}

GIB = 1024**3


@dataclass(frozen=True)
class Finding:
    """One condition evaluated on one subject, firing or not."""

    kind: str
    subject: str
    value: float | None
    threshold: float
    firing: bool
    message: str

    @property
    def action(self) -> str:
        return ACTIONS[self.kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "subject": self.subject, "value": self.value,
            "threshold": self.threshold, "firing": self.firing, "message": self.message,
        }  # fmt: skip


@dataclass(frozen=True)
class Alert:
    """One episode of a condition: open while ``resolved_at`` is None."""

    id: int
    kind: str
    subject: str
    message: str
    action: str
    value: float | None
    threshold: float
    opened_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None

    @property
    def open(self) -> bool:
        return self.resolved_at is None

    def to_json(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "id": self.id, "kind": self.kind, "subject": self.subject, "message": self.message,
            "action": self.action, "value": self.value, "threshold": self.threshold,
            "opened_at": iso(self.opened_at), "last_seen_at": iso(self.last_seen_at),
            "resolved_at": iso(self.resolved_at),
        }  # fmt: skip


@dataclass(frozen=True)
class MonitorReport:
    """What one check found and changed. ``open`` is every alert open after it, of any node."""

    checked_at: datetime
    findings: tuple[Finding, ...]
    opened: tuple[Alert, ...]
    resolved: tuple[Alert, ...]
    open: tuple[Alert, ...]
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at.isoformat(),
            "findings": [f.to_json() for f in self.findings],
            "opened": [a.to_json() for a in self.opened],
            "resolved": [a.to_json() for a in self.resolved],
            "open": [a.to_json() for a in self.open],
            "notes": list(self.notes),
        }


# -- checks (pure) ----------------------------------------------------------------------------


def _percent(x: float) -> str:
    return f"{x:.1f}%"


def _gpu_label(subject: str, gpu: dict[str, Any]) -> str:
    return f"{subject} ({gpu['name']})" if gpu.get("name") else subject


def vram_findings(node: str, gpus: Iterable[dict[str, Any]], threshold: float) -> list[Finding]:
    """VRAM used/total per GPU above ``threshold`` percent. A GPU that cannot report its
    memory is not evaluated."""
    out = []
    for gpu in gpus:
        total, used = gpu.get("vram_total_bytes"), gpu.get("vram_used_bytes")
        if not isinstance(total, int | float) or not isinstance(used, int | float) or total <= 0:
            continue
        subject = f"{node}/gpu{gpu.get('index', '?')}"
        share = 100 * used / total
        firing, value = share > threshold, round(share, 2)
        out.append(Finding(VRAM, subject, value, threshold, firing,
            f"VRAM {'critical' if firing else 'ok'} on {_gpu_label(subject, gpu)}:"
            f" {_percent(value)} used ({used / GIB:.1f} of {total / GIB:.1f} GiB),"
            f" {'above' if firing else 'within'} {_percent(threshold)}",
        ))  # fmt: skip
    return out


def temperature_findings(
    node: str, gpus: Iterable[dict[str, Any]], threshold: float
) -> list[Finding]:
    """GPU temperature above ``threshold`` °C. A GPU that cannot report it is not evaluated."""
    out = []
    for gpu in gpus:
        temp = gpu.get("temperature_c")
        if not isinstance(temp, int | float):
            continue
        subject = f"{node}/gpu{gpu.get('index', '?')}"
        firing = temp > threshold
        out.append(Finding(GPU_TEMP, subject, float(temp), threshold, firing,
            f"GPU temperature {'high' if firing else 'ok'} on {_gpu_label(subject, gpu)}:"
            f" {temp:g} °C, {'above' if firing else 'within'} {threshold:g} °C",
        ))  # fmt: skip
    return out


def _disk_percent(disk: dict[str, Any]) -> float | None:
    percent = disk.get("percent")
    if isinstance(percent, int | float):
        return float(percent)
    used, free = disk.get("used_bytes"), disk.get("free_bytes")
    if isinstance(used, int) and isinstance(free, int) and used + free > 0:
        return round(100 * used / (used + free), 1)
    return None


def storage_findings(node: str, disks: Iterable[dict[str, Any]], threshold: float) -> list[Finding]:
    """Every disk whose used share is above ``threshold`` percent."""
    out = []
    for disk in disks:
        percent = _disk_percent(disk)
        if percent is None or not disk.get("mount"):
            continue
        subject = f"{node}:{disk['mount']}"
        device = f" ({disk['device']})" if disk.get("device") else ""
        firing = percent > threshold
        out.append(Finding(STORAGE, subject, percent, threshold, firing,
            f"Storage {'full' if firing else 'ok'} on {subject}{device}: {_percent(percent)} used,"
            f" {'above' if firing else 'within'} {_percent(threshold)}",
        ))  # fmt: skip
    return out


def failure_rate_finding(
    failed: int, finished: int, *, threshold: float, min_runs: int, window_s: float
) -> Finding:
    """Failed / finished runs in the window above ``threshold`` (a fraction), judged only with
    at least ``min_runs`` finished runs; with fewer it does not fire."""
    rate = failed / finished if finished else 0.0
    firing = finished >= min_runs and rate > threshold
    window = f"{window_s / 3600:g} h" if window_s % 3600 == 0 else f"{window_s:g} s"
    if finished < min_runs:
        why = f"too few finished runs to judge (fewer than {min_runs})"
    else:
        why = f"{'above' if firing else 'within'} {threshold:.0%}"
    message = (
        f"Agent failure rate {rate:.0%} over the last {window}:"
        f" {failed} of {finished} finished runs failed, {why}"
    )
    return Finding(FAILURE_RATE, CLUSTER, round(rate, 4), threshold, firing, message)


def _hosts(summary: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(name, host summary) to check, each host once, and notes on nodes that could not be.
    Takes a host summary or a cluster summary; a configured node keeps its configured name."""
    if "local" not in summary:
        return [(str(summary.get("host") or "local"), summary)], []
    found: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    seen: set[str] = set()
    for node in summary.get("nodes") or []:
        body = node.get("summary")
        if node.get("reachable") and isinstance(body, dict):
            if str(body.get("host")) not in seen:
                seen.add(str(body.get("host")))
                found.append((str(node.get("name")), body))
        elif node.get("reachable") is False:
            notes.append(
                f"node {node.get('name')} did not answer ({node.get('error')});"
                " its alerts stay as they were"
            )
        else:
            notes.append(f"node {node.get('name')} has no url; not checked")
    local = summary.get("local")
    if isinstance(local, dict) and str(local.get("host")) not in seen:
        found.insert(0, (str(local.get("host") or "local"), local))
    return found, notes


def hardware_findings(
    summary: dict[str, Any], settings: MonitoringConfig
) -> tuple[list[Finding], list[str]]:
    """VRAM, temperature and storage findings of every host the summary holds, and notes on
    what could not be checked (unreachable nodes, GPUs that do not report a value)."""
    hosts, notes = _hosts(summary)
    findings: list[Finding] = []
    for name, host in hosts:
        gpus = [g for g in host.get("gpus") or [] if isinstance(g, dict)]
        findings += vram_findings(name, gpus, settings.vram_percent)
        findings += temperature_findings(name, gpus, settings.gpu_temp_c)
        findings += storage_findings(name, host.get("disks") or [], settings.storage_percent)
        for gpu in gpus:
            missing = [
                what
                for what, keys in (("memory", ("vram_total_bytes", "vram_used_bytes")),
                                   ("temperature", ("temperature_c",)))
                if any(gpu.get(k) is None for k in keys)
            ]  # fmt: skip
            if missing:
                notes.append(
                    f"{name}/gpu{gpu.get('index', '?')} does not report its"
                    f" {' or '.join(missing)}; not checked"
                )
        if host.get("gpu_note"):
            notes.append(f"{name}: {host['gpu_note']}")
    return findings, notes


# -- the store --------------------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _alert(row: Any) -> Alert:
    return Alert(
        id=int(row["id"]), kind=row["kind"], subject=row["subject"], message=row["message"],
        action=row["action"], value=row["value"], threshold=float(row["threshold"]),
        opened_at=_utc(row["opened_at"]) or datetime.now(UTC),
        last_seen_at=_utc(row["last_seen_at"]) or datetime.now(UTC),
        resolved_at=_utc(row["resolved_at"]),
    )  # fmt: skip


def run_outcomes(
    store: RunStore, *, since: datetime, exclude_crews: Sequence[str] = ("monitoring",)
) -> tuple[int, int]:
    """(failed, finished) runs that finished since ``since``; cancelled runs are not counted
    (a person stopped them; the agents did not fail)."""
    c = runs.c
    failed = sa.func.sum(sa.case((c.status == RunStatus.FAILED.value, 1), else_=0))
    query = sa.select(failed, sa.func.count()).where(
        c.status.in_((RunStatus.SUCCEEDED.value, RunStatus.FAILED.value)),
        c.finished_at >= since,
        c.crew.not_in(list(exclude_crews)),
    )
    store.migrate_once()
    with store.engine.connect() as conn:
        row = conn.execute(query).one()
    return int(row[0] or 0), int(row[1] or 0)


def _fields(finding: Finding, *names: str) -> dict[str, Any]:
    return {name: getattr(finding, name) for name in names}


def _open_clause(kind: str, subject: str) -> Any:
    return sa.and_(
        alerts.c.kind == kind, alerts.c.subject == subject, alerts.c.resolved_at.is_(None)
    )


def _raise(conn: Connection, finding: Finding, now: datetime) -> Alert | None:
    """Open an alert for a firing finding, or refresh the open one. The new alert, or None."""
    refresh = (
        alerts.update()
        .where(_open_clause(finding.kind, finding.subject))
        .values(last_seen_at=now, **_fields(finding, "value", "message", "threshold"))
        .returning(alerts.c.id)
    )
    for _ in (1, 2):
        if conn.execute(refresh).first() is not None:
            return None
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        stmt = (
            insert(alerts)
            .values(
                opened_at=now,
                last_seen_at=now,
                **_fields(finding, "kind", "subject", "message", "action", "value", "threshold"),
            )
            .on_conflict_do_nothing(
                index_elements=[alerts.c.kind, alerts.c.subject],
                index_where=alerts.c.resolved_at.is_(None),
            )
            .returning(*alerts.c)
        )
        row = conn.execute(stmt).mappings().first()
        if row is not None:
            return _alert(row)
        # another check opened it between the two statements: refresh that one
    return None


def _clear(conn: Connection, finding: Finding, now: datetime) -> Alert | None:
    """Resolve the open alert of a finding that no longer fires. Its message and value stay
    those last seen while it fired: the record says what the episode was."""
    update = (
        alerts.update()
        .where(_open_clause(finding.kind, finding.subject))
        .values(resolved_at=now)
        .returning(*alerts.c)
    )
    row = conn.execute(update).mappings().first()
    return None if row is None else _alert(row)


def apply_findings(
    store: RunStore, findings: Iterable[Finding], *, now: datetime | None = None
) -> tuple[list[Alert], list[Alert]]:
    """Open, refresh and resolve alerts from ``findings``, in one transaction. Returns the
    alerts opened and resolved; alerts of conditions not among ``findings`` are left alone."""
    now = now or datetime.now(UTC)
    opened: list[Alert] = []
    resolved: list[Alert] = []
    store.migrate_once()
    with store.engine.begin() as conn:
        for finding in findings:
            if finding.firing:
                if (alert := _raise(conn, finding, now)) is not None:
                    opened.append(alert)
            elif (alert := _clear(conn, finding, now)) is not None:
                resolved.append(alert)
    return opened, resolved


def list_alerts(
    store: RunStore, *, include_resolved: bool = False, since: datetime | None = None
) -> list[Alert]:
    """Open alerts, newest first; with ``include_resolved``, also those resolved since
    ``since`` (all of them when None)."""
    query = sa.select(alerts).order_by(alerts.c.opened_at.desc(), alerts.c.id.desc())
    if not include_resolved:
        query = query.where(alerts.c.resolved_at.is_(None))
    elif since is not None:
        query = query.where(sa.or_(alerts.c.resolved_at.is_(None), alerts.c.resolved_at >= since))
    store.migrate_once()
    with store.engine.connect() as conn:
        return [_alert(r) for r in conn.execute(query).mappings()]


def monitor(
    config: TyphonConfig,
    store: RunStore,
    summary: dict[str, Any] | None = None,
    *,
    now: datetime | None = None,
) -> MonitorReport:
    """Check the hardware (``summary``, or the cluster's as it is now) and the failure rate
    against ``config.monitoring``, and open, refresh and resolve alerts accordingly."""
    settings = config.monitoring
    now = now or datetime.now(UTC)
    if summary is None:
        from typhon.resources.hardware import cluster_summary

        summary = cluster_summary(config)
    findings, notes = hardware_findings(summary, settings)
    failed, finished = run_outcomes(store, since=now - timedelta(seconds=settings.failure_window_s))
    rate = failure_rate_finding(
        failed,
        finished,
        threshold=settings.failure_rate,
        min_runs=settings.min_runs,
        window_s=settings.failure_window_s,
    )
    findings.append(rate)
    opened, resolved = apply_findings(store, findings, now=now)
    return MonitorReport(
        checked_at=now,
        findings=tuple(findings),
        opened=tuple(opened),
        resolved=tuple(resolved),
        open=tuple(list_alerts(store)),
        notes=tuple(notes),
    )


# -- text -------------------------------------------------------------------------------------


def _value(kind: str, value: float | None) -> str:
    if value is None:
        return "?"
    if kind == GPU_TEMP:
        return f"{value:g} °C"
    if kind == FAILURE_RATE:
        return f"{value:.0%}"
    return _percent(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _alert_rows(items: Iterable[Alert]) -> list[str]:
    rows = ["| kind | subject | value | threshold | since | action |", "|---|---|---|---|---|---|"]
    for a in items:
        rows.append(
            f"| {a.kind} | {_cell(a.subject)} | {_value(a.kind, a.value)}"
            f" | {_value(a.kind, a.threshold)} | {a.opened_at:%Y-%m-%d %H:%M:%S} UTC"
            f" | {a.action} |"
        )
    return rows


def render_markdown(report: MonitorReport) -> str:
    """The report as Markdown: open alerts, what changed, every check, and notes."""
    firing = [f for f in report.findings if f.firing]
    n = len(report.open)
    lines = [
        f"# Monitoring: {n} open alert{'' if n == 1 else 's'}",
        "",
        f"Checked at {report.checked_at:%Y-%m-%d %H:%M:%S} UTC: {len(report.findings)} checks,"
        f" {len(firing)} over the threshold.",
        "",
    ]
    if report.open:
        lines += ["## Open alerts", "", *_alert_rows(report.open), ""]
        lines += [f"- **{a.kind}** {_cell(a.message)}. *{a.action}.*" for a in report.open]
        lines.append("")
    if report.opened:
        lines += ["## Opened by this check", ""]
        lines += [f"- {a.kind} on {a.subject} (alert {a.id})" for a in report.opened] + [""]
    if report.resolved:
        lines += ["## Resolved by this check", ""]
        lines += [f"- {a.kind} on {a.subject} (alert {a.id}): {a.message}" for a in report.resolved]
        lines.append("")
    lines += ["## Checks", "", "| check | subject | value | threshold | state |",
              "|---|---|---|---|---|"]  # fmt: skip
    for f in report.findings:
        lines.append(
            f"| {f.kind} | {_cell(f.subject)} | {_value(f.kind, f.value)}"
            f" | {_value(f.kind, f.threshold)} | {'ALERT' if f.firing else 'ok'} |"
        )
    if report.notes:
        lines += ["", "## Not checked", ""] + [f"- {_cell(note)}" for note in report.notes]
    return "\n".join(lines) + "\n"


def render_alerts(items: Sequence[Alert]) -> str:
    """Alerts as plain lines for ``typhon alerts``."""
    if not items:
        return "no alerts"
    lines = []
    for a in items:
        state = "open" if a.open else f"resolved {a.resolved_at:%Y-%m-%d %H:%M:%S}"
        lines.append(
            f"{a.id:>5}  {a.kind:<18} {a.subject:<24} {_value(a.kind, a.value):>8}"
            f"  since {a.opened_at:%Y-%m-%d %H:%M:%S}  {state}\n"
            f"       {a.message}\n       action: {a.action}"
        )
    return "\n".join(lines)


# -- the crew ---------------------------------------------------------------------------------


class MonitoringCrew(Crew):
    """Runs the checks now (as beat does every minute) and reports them in Markdown. It opens
    and resolves alerts like the scheduled check does; it calls no model."""

    name = "monitoring"
    description = "Cluster health: VRAM, GPU temperature, agent failure rate, storage."
    pool = "monitoring"
    category = "simple"

    def run(self, ctx: RunContext) -> CrewOutput:
        ctx.step("checking")
        report = monitor(ctx.config, ctx.store)
        return CrewOutput(
            render_markdown(report), {"monitoring.json": json.dumps(report.to_json(), indent=2)}
        )
