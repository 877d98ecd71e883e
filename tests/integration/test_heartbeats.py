"""Heartbeats on real Redis: one thread per process renews the slot leases of every run the
process is running and marks those runs alive in the store, until each run ends."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from typhon._notify import LocalNotifier
from typhon._runtime import Runtime
from typhon.config import ClusterConfig, PoolConfig, TyphonConfig
from typhon.resources.slots import RedisSlots
from typhon.store import RunStore

TTL_S = 0.6  # renewed every 0.2 s
POOL = PoolConfig(name="research", cap=2)


def _heartbeat_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "typhon-heartbeat")


def test_one_thread_beats_every_run_until_it_ends(
    redis_url: str, store: RunStore, tmp_path: Path
) -> None:
    cluster = ClusterConfig(
        name=f"t{uuid.uuid4().hex[:8]}", sustained=2, burst=2, lease_ttl_s=TTL_S
    )
    slots = RedisSlots(redis_url, cluster, name=cluster.name)
    runtime = Runtime(
        TyphonConfig(home=tmp_path / "home", cluster=cluster),
        store=store, slots=slots, notifier=LocalNotifier(),
    )  # fmt: skip
    threads = _heartbeat_threads()
    try:
        runs = [store.create_run(crew="c", input="i", pool=POOL.name) for _ in range(2)]
        claimed = [store.claim(run.id, worker="w:1") for run in runs]
        leases = [slots.try_acquire(POOL, run.id) for run in runs]
        assert all(claimed) and all(leases)
        (a, b), (lease_a, lease_b) = runs, leases
        assert lease_a is not None and lease_b is not None
        with runtime.heartbeats.beating(b.id, lease_b):
            with runtime.heartbeats.beating(a.id, lease_a):
                assert _heartbeat_threads() == threads + 1  # one thread for both runs
                time.sleep(3 * TTL_S)  # unrenewed, both leases would have expired
                assert slots.in_use() == {POOL.name: 2, "_cluster": 2}
            beaten_a = store.get(a.id).heartbeat_at
            beaten_b = store.get(b.id).heartbeat_at
            assert beaten_a and beaten_b
            assert beaten_a > claimed[0].heartbeat_at  # type: ignore[operator, union-attr]
            time.sleep(3 * TTL_S)  # a has ended: its lease lapses, b's is still renewed
            assert slots.in_use() == {POOL.name: 1, "_cluster": 1}
            assert store.get(a.id).heartbeat_at == beaten_a
            assert store.get(b.id).heartbeat_at > beaten_b  # type: ignore[operator]
        slots.release(lease_b)
        time.sleep(2 * TTL_S)  # no renewal under way retakes a released slot
        assert slots.in_use() == {}
        assert _heartbeat_threads() == threads + 1  # kept for the process's next runs
    finally:
        runtime.close()
    assert _heartbeat_threads() == threads
