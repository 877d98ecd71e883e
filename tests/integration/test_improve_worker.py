"""The learning loop in a cluster: a run finished on a research worker sends ``typhon.review``
to the improve queue, which a real worker of the monitoring pool serves on the real Redis
(reviewing with the real local llama-server); the review sweep and the daily report run there
too. And the beat entries and worker queues, as the Celery app declares them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery.schedules import crontab
from conftest import Cluster

from typhon._types import RunStatus
from typhon.config import ImproveConfig, PoolConfig, TyphonConfig, load_config
from typhon.store import RunStore, run_reviews
from workers.celery_app import (
    REPORT_TASK,
    REVIEW_SWEEP_TASK,
    REVIEW_TASK,
    WEEKLY_TASK,
    control_queue,
    create_app,
    improve_queue,
    worker_argv,
)

pytestmark = pytest.mark.integration

CREWS = """
from typhon import crew

@crew("quick", pool="research")
def quick(ctx):
    answer = ctx.model.chat([{"role": "user", "content": ctx.input}], max_tokens=16).content
    return "RVV is the RISC-V vector extension. " + answer
"""


def test_beat_entries_and_queues() -> None:
    config = TyphonConfig(improve=ImproveConfig(report_hour_utc=5))
    app = create_app(config)
    try:
        schedule = app.conf.beat_schedule
        report = schedule["typhon-improve-report"]
        assert report["task"] == REPORT_TASK
        assert report["schedule"] == crontab(minute=0, hour=5)
        name = config.cluster.name
        assert report["options"]["queue"] == control_queue(config) == f"typhon-control-{name}"
        weekly = schedule["typhon-improve-weekly"]
        assert weekly["task"] == WEEKLY_TASK
        assert weekly["schedule"] == crontab(minute=30, hour=5, day_of_week="sun")
        assert weekly["options"]["queue"] == improve_queue(config) == f"typhon-improve-{name}"
        sweep = schedule["typhon-review-sweep"]
        assert (sweep["task"], sweep["schedule"]) == (REVIEW_SWEEP_TASK, 600.0)
        assert sweep["options"]["queue"] == improve_queue(config)
        assert {REVIEW_TASK, REVIEW_SWEEP_TASK, REPORT_TASK, WEEKLY_TASK} <= set(app.tasks)
        assert improve_queue(config) in {q.name for q in app.conf.task_queues}
    finally:
        app.close()
    off = create_app(TyphonConfig(improve=ImproveConfig(review=False)))
    try:
        assert "typhon-review-sweep" not in off.conf.beat_schedule
        assert "typhon-improve-report" in off.conf.beat_schedule
    finally:
        off.close()


def _queues(argv: list[str]) -> list[str]:
    [arg] = [a for a in argv if a.startswith("--queues=")]
    return arg.removeprefix("--queues=").split(",")


def test_the_improve_pools_workers_serve_the_improve_queue() -> None:
    config = TyphonConfig()
    assert improve_queue(config) in _queues(worker_argv(config, "monitoring"))
    assert improve_queue(config) not in _queues(worker_argv(config, "research"))
    moved = TyphonConfig(improve=ImproveConfig(pool="research"))
    assert improve_queue(moved) in _queues(worker_argv(moved, "research"))
    assert improve_queue(moved) not in _queues(worker_argv(moved, "monitoring"))
    # no pool of that name: every worker serves it
    lone = TyphonConfig(pools=[PoolConfig(name="research", cap=1)])
    assert _queues(worker_argv(lone, "research")) == [
        "research", control_queue(lone), improve_queue(lone),
    ]  # fmt: skip


def _wait_for(predicate: Callable[[], Any], cluster: Cluster, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting\n{cluster.worker_log()[-6000:]}")
        time.sleep(0.3)


def _reviews(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    c = run_reviews.c
    with store.engine.connect() as conn:
        query = sa.select(run_reviews).where(c.run_id == run_id).order_by(c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def test_a_run_is_reviewed_on_a_monitoring_worker(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(
        CREWS,
        pools={"research": "cap: 1", "monitoring": "cap: 1"},
        extra_yaml="improve: {self_review: true}\n",  # the one local model reviews itself
    )
    research = cluster.start_worker(pool="research")
    monitoring = cluster.start_worker(pool="monitoring")
    config = load_config(cluster.config_path, environ={})
    store = RunStore(config.effective_database_url)
    app = create_app(config)
    try:
        result = cluster.typhon("run", "quick", "What is RVV?", "--json", timeout=300)
        assert result.returncode == 0, result.stderr + cluster.worker_log()[-4000:]
        run_id = json.loads(result.stdout)["run_id"]

        [review] = _wait_for(
            lambda: [r for r in _reviews(store, run_id) if r["status"] != "pending"], cluster
        )
        # the tiny model's reply is schema-enforced: a review, or a failed one with its raw text
        assert review["status"] in ("ok", "failed") and review["reviewer"] == "local"
        assert review["raw"]
        if review["status"] == "ok":
            assert 0 <= review["score"] <= 1 and review["verdict"] in ("pass", "fail")
        assert store.get(run_id).status is RunStatus.SUCCEEDED  # the run is untouched
        logs = {p.pid: (cluster.dir / f"worker-{i}.log").read_text(errors="replace")
                for i, p in enumerate(cluster.workers)}  # fmt: skip
        assert "run reviewed" in logs[monitoring.pid]
        assert "run reviewed" not in logs[research.pid]

        # a review left pending by a process that went away: the sweep takes it up
        left = store.create_run(crew="quick", input="y", pool="research", model="local")
        assert store.claim(left.id) is not None
        assert store.finish(left.id, RunStatus.FAILED, error="the worker went away")
        with store.engine.begin() as conn:
            conn.execute(run_reviews.insert().values(
                run_id=left.id, crew="quick", reviewer="local", status="pending", issues=[],
                created_at=datetime.now(UTC) - timedelta(minutes=11),
            ))  # fmt: skip
        app.send_task(REVIEW_SWEEP_TASK, queue=improve_queue(config), retry=False)
        [swept] = _wait_for(
            lambda: [r for r in _reviews(store, left.id) if r["status"] != "pending"], cluster
        )
        assert (swept["status"], swept["verdict"], swept["reviewer"]) == ("ok", "fail", "rules")

        # the daily report, from the control queue
        app.send_task(REPORT_TASK, queue=control_queue(config), retry=False)
        reports = cluster.home / "reports"
        [written] = _wait_for(lambda: list(reports.glob("report-*.json")), cluster)
        assert json.loads(written.read_text())["overall"]["runs"] == 2
    finally:
        app.close()
        store.close()
