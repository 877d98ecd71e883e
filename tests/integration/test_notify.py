"""Run-finished notifications: in-process and over the broker's Redis."""

from __future__ import annotations

import threading

import pytest

from typhon._notify import LocalNotifier, Notifier, RedisNotifier, notifier_for


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
