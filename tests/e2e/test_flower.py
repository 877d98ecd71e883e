"""`typhon flower` on real Redis with a real worker per pool: Flower's API lists the workers with
their pools' queues, and the runs as tasks named by crew."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from conftest import Cluster

from typhon.models import free_port

CREWS = """
import time
from typhon import crew

for _name in ("research", "development"):
    @crew(f"nap_{_name}", pool=_name)
    def _nap(ctx, _name=_name):
        ctx.step("napping")
        time.sleep(0.2)
        return "rested"
"""


def _get(url: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.5)


def test_flower_shows_workers_per_pool_and_runs_by_crew(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(CREWS, pools={"research": "cap: 1", "development": "cap: 1"})
    cluster.start_worker(pool="research")
    cluster.start_worker(pool="development")
    port = free_port()
    cluster._spawn(["flower", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    for crew in ("nap_research", "nap_development"):
        result = cluster.typhon("run", crew, "x", timeout=300)
        assert result.returncode == 0, result.stderr + cluster.worker_log()[-3000:]
    deadline = time.monotonic() + 120
    while True:
        workers = _get(f"{base}/api/workers?refresh=1")
        queues = {q["name"] for info in workers.values() for q in (info.get("active_queues") or [])}
        if {cluster.queues["research"], cluster.queues["development"]} <= queues:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(1)
    while True:
        tasks = _get(f"{base}/api/tasks")
        names = {t.get("name") for t in tasks.values() if t.get("state") == "SUCCESS"}
        if {"typhon.run.nap_research", "typhon.run.nap_development"} <= names:
            break
        assert time.monotonic() < deadline, tasks
        time.sleep(1)


def test_flower_off_loopback_needs_basic_auth(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster("")
    result = cluster.typhon("flower", "--address", "0.0.0.0")
    assert result.returncode == 2
    assert "flower on 0.0.0.0 needs --basic-auth user:password" in result.stderr
