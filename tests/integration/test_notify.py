"""Run-finished notifications: in-process and over the broker's Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from typhon._notify import LocalNotifier, Notifier, RedisNotifier, channel, notifier_for
from typhon.config import ClusterConfig, PoolConfig
from typhon.resources.slots import RedisSlots


@pytest.fixture(params=["local", "redis"])
def notifier(request: pytest.FixtureRequest) -> Notifier:
    if request.param == "local":
        return LocalNotifier()
    return RedisNotifier(request.getfixturevalue("redis_url"))


def test_waiter_wakes_on_publish(notifier: Notifier) -> None:
    with notifier.subscribe("run-a") as sub:
        threading.Timer(0.05, notifier.publish, args=("run-a",)).start()
        assert sub.wait(30) is True
    notifier.close()


def test_other_runs_do_not_wake_a_waiter(notifier: Notifier) -> None:
    with notifier.subscribe("run-b") as sub:
        notifier.publish("run-c")
        assert sub.wait(0.2) is False
    notifier.close()


def test_notifier_follows_the_broker(redis_url: str) -> None:
    assert isinstance(notifier_for(None), LocalNotifier)
    assert isinstance(notifier_for(redis_url), RedisNotifier)
    assert isinstance(notifier_for("amqp://127.0.0.1:5672//"), LocalNotifier)


def test_unreachable_redis_degrades_to_polling() -> None:
    down = RedisNotifier("redis://127.0.0.1:1/0")
    down.publish("run-d")  # lost, not raised: waiters read the store again after poll_s
    with down.subscribe("run-d") as sub:
        assert sub.wait(0.05) is False


# -- Redis: one subscriber connection per process --------------------------------------------------
def _redis(redis_url: str) -> Any:
    import redis

    return redis.Redis.from_url(redis_url)


def _subscribers(client: Any, run_id: str) -> int:
    return int(client.pubsub_numsub(channel(run_id))[0][1])


def _until(what: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _listener_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "typhon-notify")


def test_waiters_share_one_subscriber_connection(redis_url: str) -> None:
    client = _redis(redis_url)
    notifier = RedisNotifier(redis_url)
    ids = [f"run-{uuid.uuid4().hex}" for _ in range(20)]
    woken: dict[str, bool] = {}
    pubsub_clients = len(client.client_list(_type="pubsub"))

    def wait(run_id: str) -> None:
        with notifier.subscribe(run_id) as sub:
            woken[run_id] = sub.wait(30)

    threads = [threading.Thread(target=wait, args=(run_id,)) for run_id in ids]
    for thread in threads:
        thread.start()
    _until(lambda: all(_subscribers(client, run_id) == 1 for run_id in ids))
    assert len(client.client_list(_type="pubsub")) == pubsub_clients + 1
    for run_id in ids:
        notifier.publish(run_id)
    for thread in threads:
        thread.join(30)
    assert woken == dict.fromkeys(ids, True)
    _until(lambda: all(_subscribers(client, run_id) == 0 for run_id in ids))  # unsubscribed
    notifier.close()
    client.close()


def test_two_waiters_on_one_run(redis_url: str) -> None:
    client = _redis(redis_url)
    notifier = RedisNotifier(redis_url)
    with notifier.subscribe("run-e") as first:
        with notifier.subscribe("run-e") as second:
            notifier.publish("run-e")
            assert first.wait(30) is True and second.wait(30) is True
        assert _subscribers(client, "run-e") == 1  # the other waiter still listens
        notifier.publish("run-e")
        assert first.wait(30) is True
    _until(lambda: _subscribers(client, "run-e") == 0)
    notifier.close()
    client.close()


def test_a_lost_connection_wakes_waiters_and_is_restored(redis_url: str) -> None:
    """Notifications sent while the connection is down are lost: every waiter is woken to read
    the store again, and the listener reconnects and subscribes again."""
    client = _redis(redis_url)
    notifier = RedisNotifier(redis_url)
    with notifier.subscribe("run-f") as sub:
        assert sub.wait(0.05) is False
        client.client_kill_filter(_type="pubsub")
        assert sub.wait(30) is True
        _until(lambda: _subscribers(client, "run-f") == 1)
        notifier.publish("run-f")
        assert sub.wait(30) is True
    notifier.close()
    client.close()


def test_close_stops_the_listener(redis_url: str) -> None:
    before = _listener_threads()
    notifier = RedisNotifier(redis_url)
    with notifier.subscribe("run-g") as sub:
        assert sub.wait(0.01) is False
    assert _listener_threads() == before + 1
    notifier.close()
    assert _listener_threads() == before


def test_slot_release_can_publish_in_the_same_script(redis_url: str) -> None:
    cluster = ClusterConfig(name=f"t{uuid.uuid4().hex[:8]}", sustained=1, burst=1)
    slots = RedisSlots(redis_url, cluster, name=cluster.name)
    notifier = RedisNotifier(redis_url)
    pool = PoolConfig(name="research", cap=1)
    lease = slots.try_acquire(pool, "run-h")
    assert lease is not None
    with notifier.subscribe("run-h") as sub:
        slots.release(lease, publish=(channel("run-h"), "done"))
        assert sub.wait(30) is True
    assert slots.in_use() == {}
    notifier.close()
    slots.close()
