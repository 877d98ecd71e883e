"""The reaper: recovers runs whose worker died, stopped heartbeating, or whose message was lost.

One pass (``reap``) applies three rules, each through a conditional update in the run store, so
two reapers (or a reaper racing a worker that came back) cannot both act on a run:

1. A running run past its crew's hard time limit is failed.
2. A running run whose heartbeat is older than the lease TTL lost its worker: it is queued again
   and re-published (its next attempt starts from the beginning), or failed once it has had
   ``max_attempts`` attempts. An outcome is only ever recorded by the attempt that holds the run,
   so a worker that was merely slow cannot record over its successor.
3. A queued run last handed to the broker more than ``stale_queue_s`` ago is re-published (a
   broker restart can lose messages; a duplicate is harmless: only one delivery can claim it).

Embedded mode has no broker to re-publish to and no other process to finish its runs: there,
rules 1 and 2 fail the run, and rule 3 does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from typhon._types import RunRecord, RunStatus
from typhon.config import TyphonConfig
from typhon.store import RunStore

__all__ = ["ReapReport", "reap"]

log = structlog.get_logger("typhon.reaper")


@dataclass
class ReapReport:
    failed: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.failed or self.requeued or self.republished)


def reap(
    config: TyphonConfig,
    store: RunStore,
    republish: Callable[[RunRecord], None] | None,
    *,
    now: datetime | None = None,
) -> ReapReport:
    """One pass. ``republish`` hands a run to its queue again; None in embedded mode."""
    now = now or datetime.now(UTC)
    cluster = config.cluster
    report = ReapReport()
    shortest = min([config.crew_settings(c).hard_limit_s for c in config.crews] + [
        config.crew_settings("").hard_limit_s])  # fmt: skip
    for run in store.running_since(now - timedelta(seconds=shortest)):
        limit = config.crew_settings(run.crew).hard_limit_s
        if run.started_at and run.started_at < now - timedelta(seconds=limit):
            error = f"run {run.id} passed its hard time limit of {limit:g}s; its worker was stopped"
            if store.finish(run.id, RunStatus.FAILED, error=error, attempt=run.attempts):
                report.failed.append(run.id)
    stale_before = now - timedelta(seconds=cluster.lease_ttl_s)
    for run in store.stale_running(stale_before):
        if republish is None or run.attempts >= cluster.max_attempts:
            why = (
                "the process running it ended"
                if republish is None
                else f"its worker died {run.attempts} times"
            )
            if store.finish(run.id, RunStatus.FAILED, error=f"run {run.id} failed: {why}",
                            attempt=run.attempts):  # fmt: skip
                report.failed.append(run.id)
        elif store.requeue(run.id, stale_before):
            republish(run)
            report.requeued.append(run.id)
    if republish is not None:
        for run in store.stale_queued(now - timedelta(seconds=cluster.stale_queue_s)):
            if store.mark_enqueued(run.id):
                republish(run)
                report.republished.append(run.id)
    if report:
        log.warning("reaped runs", failed=report.failed, requeued=report.requeued,
                    republished=report.republished)  # fmt: skip
    return report
