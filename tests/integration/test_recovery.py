"""Slots and the reaper, on every store backend and on real Redis."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from typhon._types import RunRecord, RunStatus
from typhon.config import ClusterConfig, CrewSettings, PoolConfig, TyphonConfig
from typhon.resources.reaper import reap
from typhon.resources.slots import LocalSlots, RedisSlots, Slots, acquire
from typhon.store import RunStore

POOL = PoolConfig(name="research", cap=2, burst_cap=3)
OTHER = PoolConfig(name="creative", cap=1)
CLUSTER = ClusterConfig(name="t", sustained=2, burst=3, lease_ttl_s=1)


@pytest.fixture(params=["local", "redis"])
def slots(request: pytest.FixtureRequest) -> Slots:
    if request.param == "local":
        return LocalSlots(CLUSTER)
    cluster = CLUSTER.model_copy(update={"name": f"t{uuid.uuid4().hex[:8]}"})
    return RedisSlots(request.getfixturevalue("redis_url"), cluster, name=cluster.name)


def test_sustained_slots_first_then_burst_then_none(slots: Slots) -> None:
    first = slots.try_acquire(POOL, "r1")
    second = slots.try_acquire(POOL, "r2")
    third = slots.try_acquire(POOL, "r3")
    assert first is not None and second is not None and third is not None
    assert [(x.pool_slot, x.cluster_slot, x.burst) for x in (first, second, third)] == [
        (0, 0, False), (1, 1, False), (2, 2, True),
    ]  # fmt: skip
    assert slots.try_acquire(POOL, "r4") is None  # the pool's burst_cap
    assert slots.try_acquire(OTHER, "o1") is None  # the cluster's burst cap, all or nothing
    assert slots.in_use() == {"research": 3, "_cluster": 3}
    slots.release(second)
    got = slots.try_acquire(OTHER, "o1")
    assert got is not None and (got.pool_slot, got.cluster_slot, got.burst) == (0, 1, False)
    slots.close()


def test_release_only_frees_our_own_slots(slots: Slots) -> None:
    lease = slots.try_acquire(POOL, "mine")
    assert lease is not None
    slots.release(lease)
    other = slots.try_acquire(POOL, "theirs")
    assert other is not None and other.pool_slot == lease.pool_slot
    slots.release(lease)  # stale release of a slot now held by "theirs"
    assert slots.in_use()["research"] == 1
    slots.close()


def test_redis_leases_expire_when_not_renewed(redis_url: str) -> None:
    import time

    cluster = ClusterConfig(name=f"t{uuid.uuid4().hex[:8]}", sustained=1, burst=1, lease_ttl_s=0.3)
    slots = RedisSlots(redis_url, cluster, name=cluster.name)
    lease = slots.try_acquire(OTHER, "dead-worker")
    assert lease is not None and slots.try_acquire(OTHER, "waiting") is None
    renewed = slots.renew(lease)
    assert renewed
    time.sleep(0.6)  # the holder died: nobody renews
    assert slots.try_acquire(OTHER, "waiting") is not None
    slots.close()


def test_acquire_waits_and_can_be_stopped() -> None:
    slots = LocalSlots(CLUSTER)
    held = [slots.try_acquire(OTHER, "a")]
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise RuntimeError("stopped")

    threading.Timer(0.1, stop.set).start()
    with pytest.raises(RuntimeError, match="stopped"):
        acquire(slots, OTHER, "b", check=check, poll_s=0.01)
    assert held[0] is not None
    slots.release(held[0])
    assert acquire(slots, OTHER, "b", check=check, poll_s=0.01).pool_slot == 0


# -- the reaper --------------------------------------------------------------------------------


def _config(**cluster: object) -> TyphonConfig:
    base = {"lease_ttl_s": 30, "stale_queue_s": 300, "max_attempts": 2}
    return TyphonConfig(
        cluster=ClusterConfig(**{**base, **cluster}),  # type: ignore[arg-type]
        crews={"slow": CrewSettings(timeout_s=60, hard_timeout_s=120)},
    )


def _running(store: RunStore, crew: str = "x") -> RunRecord:
    run = store.create_run(crew=crew, input="i", pool="research")
    claimed = store.claim(run.id, worker="w:1")
    assert claimed is not None
    return claimed


def test_dead_worker_run_is_requeued_and_republished(store: RunStore) -> None:
    run = _running(store)
    republished: list[str] = []
    later = datetime.now(UTC) + timedelta(seconds=31)
    report = reap(_config(), store, lambda r: republished.append(r.id), now=later)
    assert report.requeued == [run.id] and republished == [run.id]
    again = store.get(run.id)
    assert again.status is RunStatus.QUEUED and again.worker is None
    assert [e.kind for e in store.events(run.id)][-1] == "requeued"
    # the old attempt cannot record an outcome over the next one
    assert store.claim(run.id, worker="w:2") is not None
    assert not store.finish(run.id, RunStatus.SUCCEEDED, output="late", attempt=1)
    assert store.finish(run.id, RunStatus.SUCCEEDED, output="ok", attempt=2)


def test_fresh_heartbeat_is_left_alone(store: RunStore) -> None:
    run = _running(store)
    store.heartbeat(run.id)
    report = reap(_config(), store, lambda r: None, now=datetime.now(UTC) + timedelta(seconds=5))
    assert not report and store.status(run.id) is RunStatus.RUNNING


def test_run_out_of_attempts_is_failed(store: RunStore) -> None:
    run = _running(store)
    later = datetime.now(UTC) + timedelta(seconds=31)
    assert reap(_config(), store, lambda r: None, now=later).requeued == [run.id]
    assert store.claim(run.id, worker="w:2") is not None  # attempt 2 dies too
    report = reap(_config(), store, lambda r: None, now=later + timedelta(seconds=31))
    assert report.failed == [run.id]
    assert "its worker died 2 times" in str(store.get(run.id).error)


def test_hard_time_limit_fails_the_run(store: RunStore) -> None:
    run = _running(store, crew="slow")
    store.heartbeat(run.id)
    report = reap(_config(lease_ttl_s=10_000), store, lambda r: None,
                  now=datetime.now(UTC) + timedelta(seconds=121))  # fmt: skip
    assert report.failed == [run.id]
    assert "hard time limit of 120s" in str(store.get(run.id).error)


def test_lost_message_is_republished(store: RunStore) -> None:
    run = store.create_run(crew="x", input="i", pool="research")
    republished: list[str] = []
    early = reap(_config(), store, lambda r: republished.append(r.id),
                 now=datetime.now(UTC) + timedelta(seconds=10))  # fmt: skip
    assert not early
    report = reap(_config(), store, lambda r: republished.append(r.id),
                  now=datetime.now(UTC) + timedelta(seconds=301))  # fmt: skip
    assert report.republished == [run.id] == republished
    assert store.status(run.id) is RunStatus.QUEUED


def test_embedded_mode_fails_orphans(store: RunStore) -> None:
    run = _running(store)
    queued = store.create_run(crew="x", input="i", pool="research")
    later = datetime.now(UTC) + timedelta(seconds=400)
    report = reap(_config(), store, None, now=later)
    assert report.failed == [run.id] and not report.republished
    assert "the process running it ended" in str(store.get(run.id).error)
    assert store.status(queued.id) is RunStatus.QUEUED
