"""Run-finished notifications, so waiting for a run does not mean polling the store.

The store stays the truth: a waiter subscribes, then reads the store, then sleeps until a
notification or a fallback interval, and reads the store again. A lost notification costs at
most one interval. In-process runs notify through a condition variable; runs on Celery workers
through Redis pub/sub on the broker (any other broker falls back to polling).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["LocalNotifier", "Notifier", "RedisNotifier", "notifier_for"]

_CHANNEL = "typhon:run:"


class Subscription(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until a notification (True) or the timeout (False)."""
        ...


class Notifier(Protocol):
    def publish(self, run_id: str) -> None: ...

    def subscribe(self, run_id: str) -> contextlib.AbstractContextManager[Subscription]: ...

    def close(self) -> None: ...


class _Sleep:
    def wait(self, timeout: float) -> bool:
        threading.Event().wait(timeout)
        return False


class LocalNotifier:
    """Within one process: one condition variable, a counter per run."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seen: dict[str, int] = {}

    def publish(self, run_id: str) -> None:
        with self._cond:
            self._seen[run_id] = self._seen.get(run_id, 0) + 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def subscribe(self, run_id: str) -> Iterator[Subscription]:
        notifier = self

        class _Sub:
            def __init__(self) -> None:
                with notifier._cond:
                    self.mark = notifier._seen.get(run_id, 0)

            def wait(self, timeout: float) -> bool:
                with notifier._cond:
                    got = notifier._cond.wait_for(
                        lambda: notifier._seen.get(run_id, 0) != self.mark, timeout
                    )
                    self.mark = notifier._seen.get(run_id, 0)
                    return bool(got)

        yield _Sub()

    def close(self) -> None:
        pass


class RedisNotifier:
    """Across processes: ``PUBLISH typhon:run:ID`` on the broker's Redis."""

    def __init__(self, url: str):
        import redis

        self._redis: Any = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)

    def publish(self, run_id: str) -> None:
        with contextlib.suppress(Exception):  # a lost notification costs one poll interval
            self._redis.publish(_CHANNEL + run_id, "done")

    @contextlib.contextmanager
    def subscribe(self, run_id: str) -> Iterator[Subscription]:
        try:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(_CHANNEL + run_id)
        except Exception:
            yield _Sleep()
            return

        class _Sub:
            def wait(self, timeout: float) -> bool:
                # get_message answers None for the (ignored) subscribe confirmation too
                deadline = time.monotonic() + timeout
                try:
                    while (left := deadline - time.monotonic()) > 0:
                        if pubsub.get_message(timeout=left) is not None:
                            return True
                except Exception:
                    pass
                return False

        try:
            yield _Sub()
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()

    def close(self) -> None:
        self._redis.close()
        self._redis.connection_pool.disconnect()


def notifier_for(broker_url: str | None) -> Notifier:
    if broker_url is None:
        return LocalNotifier()
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisNotifier(broker_url)
    return LocalNotifier()  # other brokers: waiters in other processes poll the store
