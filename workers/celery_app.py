"""The Celery app: one queue per pool, late acks, prefetch 1, and these tasks:
``typhon.execute_run`` (on the pool's queue); ``typhon.reap`` (on the control queue, every
``cluster.reaper_interval_s`` from Celery beat: ``typhon beat``, or ``typhon worker --beat``);
``typhon.memory_maintenance`` (daily, control queue); ``typhon.monitor`` (the Monitoring crew's
checks every ``monitoring.interval_s``, on the monitoring pool's queue); the learning loop's
``typhon.review`` (a run's QA review, sent when the run finishes) and ``typhon.review_sweep``
(pending reviews left behind, every 10 minutes) on the improve queue, which the workers of the
``improve.pool`` pool serve; ``typhon.improve_report`` (daily at ``improve.report_hour_utc``,
control queue) and ``typhon.improve_weekly`` (the optimizer pass, Sundays, improve queue).

A task carries only the run id (and its pool); the run itself lives in the run store, so a
redelivered message finds the run already taken or finished and records nothing twice.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown
from kombu.entity import Queue

from typhon._runtime import Runtime, execute_run
from typhon._types import RunRecord
from typhon.config import TyphonConfig, load_config
from typhon.errors import BrokerUnavailableError
from typhon.resources.reaper import reap

__all__ = [
    "REAP_TASK",
    "TASK_NAME",
    "check_broker",
    "control_queue",
    "create_app",
    "improve_queue",
    "publish",
    "worker_argv",
]

TASK_NAME = "typhon.execute_run"
REAP_TASK = "typhon.reap"
MEMORY_TASK = "typhon.memory_maintenance"
MONITOR_TASK = "typhon.monitor"
REVIEW_TASK = "typhon.review"
REVIEW_SWEEP_TASK = "typhon.review_sweep"
REPORT_TASK = "typhon.improve_report"
WEEKLY_TASK = "typhon.improve_weekly"
REVIEW_TIME_LIMIT_S = 900
REVIEW_SWEEP_S = 600.0
_CONNECT_TIMEOUT_S = 3.0

# One runtime per worker process (prefork child), built on its first task.
_runtime: Runtime | None = None


def _process_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(load_config(os.environ.get("TYPHON_CONFIG") or None), pin_burst=True)
    return _runtime


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None


def control_queue(config: TyphonConfig) -> str:
    return f"typhon-control-{config.cluster.name}"


def improve_queue(config: TyphonConfig) -> str:
    """The learning loop's queue (reviews, the sweep, the weekly pass)."""
    return f"typhon-improve-{config.cluster.name}"


def _serves_improve(config: TyphonConfig, pool: str) -> bool:
    """The ``improve.pool`` pool's workers serve the improve queue; every worker does when no
    pool has that name."""
    names = [p.name for p in config.pools]
    return pool == config.improve.pool or config.improve.pool not in names


def create_app(config: TyphonConfig) -> Celery:
    # set_as_current=False and shared=False on every task: apps made in one process (tests, the
    # API) do not lend each other their tasks when they finalize
    app = Celery("typhon", broker=config.broker_url, set_as_current=False)
    hard_limits = [config.crew_settings(c).hard_limit_s for c in [*config.crews, ""]]
    interval = config.cluster.reaper_interval_s
    app.conf.update(
        task_queues=[Queue(p.queue) for p in config.pools]
        + [Queue(control_queue(config)), Queue(improve_queue(config))],
        task_default_queue=config.pools[0].queue if config.pools else "research",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # above the longest hard limit: a message is redelivered only when its worker is gone
        broker_transport_options={"visibility_timeout": int(max(hard_limits) * 1.5 + 60)},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=_CONNECT_TIMEOUT_S,
        worker_hijack_root_logger=False,
        worker_send_task_events=config.cluster.task_events,
        task_send_sent_event=config.cluster.task_events,
        beat_schedule={
            "typhon-reap": {
                "task": REAP_TASK,
                "schedule": interval,
                "options": {"queue": control_queue(config), "expires": interval},
            },
            "typhon-memory-maintenance": {
                "task": MEMORY_TASK,
                "schedule": 24 * 3600.0,
                "options": {"queue": control_queue(config), "expires": 3600.0},
            },
            **_monitor_entry(config),
            **_improve_entries(config),
        },
    )

    @app.task(name=TASK_NAME, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def run_task(run_id: str, pool: str | None = None) -> str:
        return execute_run(_process_runtime(), run_id, pool).value

    @app.task(name=MEMORY_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def memory_task() -> dict[str, int] | None:
        from typhon.memory._retention import maintain

        runtime = _process_runtime()
        memory = runtime.memory
        if memory is None:
            return None
        return maintain(memory, compact_after_days=runtime.config.memory.compact_after_days)

    @app.task(name=MONITOR_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def monitor_task() -> dict[str, Any]:
        """The Monitoring crew's checks, from beat: opens and resolves alerts. It records no
        run: a run every minute would bury people's runs (``typhon run monitoring`` makes one
        on demand)."""
        from typhon.crews.monitoring import monitor

        runtime = _process_runtime()
        report = monitor(runtime.config, runtime.store)
        return {
            "opened": [a.id for a in report.opened],
            "resolved": [a.id for a in report.resolved],
            "open": [a.id for a in report.open],
        }

    @app.task(name=REVIEW_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def review_task(run_id: str) -> dict[str, Any] | None:
        from typhon.improve._review import review_in

        return review_in(_process_runtime(), run_id)

    @app.task(name=REVIEW_SWEEP_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def review_sweep_task() -> list[dict[str, Any]]:
        from typhon.improve._review import review_pending

        rt = _process_runtime()
        return review_pending(
            rt.config, rt.store, rt.models, older_than_s=REVIEW_SWEEP_S,
            registry=rt.registry, memory=rt.memory,
        )  # fmt: skip

    @app.task(name=REPORT_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def report_task() -> dict[str, str]:
        from typhon.improve._report import write_report

        rt = _process_runtime()
        written = write_report(rt.config, rt.store)
        return {"markdown": written["markdown"], "json": written["json"]}

    @app.task(name=WEEKLY_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def weekly_task() -> Any:
        from typhon.improve._optimize import weekly_pass  # type: ignore[import-not-found,unused-ignore]

        rt = _process_runtime()
        return weekly_pass(rt.config, rt.store)

    @app.task(name=REAP_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def reap_task() -> dict[str, list[str]]:
        runtime = _process_runtime()
        cfg = runtime.config
        report = reap(cfg, runtime.store, lambda run: publish(app, cfg, run))
        return {"failed": report.failed, "requeued": report.requeued,
                "republished": report.republished}  # fmt: skip

    return app


def _monitor_entry(config: TyphonConfig) -> dict[str, Any]:
    """The Monitoring crew's checks every ``monitoring.interval_s`` on the monitoring pool's
    queue (the control queue when no pool is named so), unless monitoring is off. A check
    not taken within its interval expires: the next one is due by then."""
    if not config.monitoring.enabled:
        return {}
    queue = next((p.queue for p in config.pools if p.name == "monitoring"), control_queue(config))
    interval = config.monitoring.interval_s
    return {
        "typhon-monitor": {
            "task": MONITOR_TASK,
            "schedule": interval,
            "options": {"queue": queue, "expires": interval},
        }
    }


def _improve_entries(config: TyphonConfig) -> dict[str, Any]:
    """The learning loop's beat entries: the sweep of pending reviews (unless reviews are off),
    the daily report and the weekly optimizer pass."""
    from celery.schedules import crontab

    hour = config.improve.report_hour_utc
    entries: dict[str, Any] = {
        "typhon-improve-report": {
            "task": REPORT_TASK,
            "schedule": crontab(minute=0, hour=hour),
            "options": {"queue": control_queue(config), "expires": 3600.0},
        },
        "typhon-improve-weekly": {
            "task": WEEKLY_TASK,
            "schedule": crontab(minute=30, hour=hour, day_of_week="sun"),
            "options": {"queue": improve_queue(config), "expires": 6 * 3600.0},
        },
    }
    if config.improve.review:
        entries["typhon-review-sweep"] = {
            "task": REVIEW_SWEEP_TASK,
            "schedule": REVIEW_SWEEP_S,
            "options": {"queue": improve_queue(config), "expires": REVIEW_SWEEP_S},
        }
    return entries


def check_broker(app: Celery, url: str) -> None:
    """Raise BrokerUnavailableError unless the broker answers within a few seconds."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=_CONNECT_TIMEOUT_S)
    except Exception as exc:  # OSError, or kombu's wrappers of transport errors
        raise BrokerUnavailableError(url, str(exc) or type(exc).__name__) from None


def publish(app: Celery, config: TyphonConfig, run: RunRecord) -> None:
    """Hand a run to its pool's queue; the worker kills it past its crew's hard time limit."""
    try:
        app.send_task(
            TASK_NAME,
            args=[run.id, run.pool],
            queue=config.pool(run.pool).queue,
            retry=False,
            time_limit=config.crew_settings(run.crew).hard_limit_s,
            shadow=f"typhon.run.{run.crew}",  # the name Flower and the logs show: by crew
        )
    except Exception as exc:
        raise BrokerUnavailableError(
            config.broker_url or "", str(exc) or type(exc).__name__
        ) from None


def worker_argv(
    config: TyphonConfig, pool_name: str, *, loglevel: str = "INFO", beat: bool = False
) -> list[str]:
    """argv for ``celery worker`` serving one pool: its queue and the control queue (and the
    improve queue for the ``improve.pool`` pool), concurrency = the pool's ceiling (cap, or
    burst_cap)."""
    pool = config.pool(pool_name)
    extra = ["--beat", f"--schedule={config.home / 'celerybeat-schedule'}"] if beat else []
    queues = [pool.queue, control_queue(config)]
    if _serves_improve(config, pool.name):
        queues.append(improve_queue(config))
    return [
        "worker",
        f"--queues={','.join(queues)}",
        *extra,
        f"--concurrency={pool.ceiling}",
        f"--hostname={pool.name}@%h",
        f"--loglevel={loglevel}",
        "--prefetch-multiplier=1",
        "--without-gossip",
        "--without-mingle",
    ]
