"""Run-finished notifications, so waiting for a run does not mean polling the store.

The store stays the truth: a waiter subscribes, then reads the store, then sleeps until a
notification or a fallback interval, and reads the store again. A lost notification costs at
most one interval. In-process runs notify through a condition variable; runs on Celery workers
through Redis pub/sub on the broker (any other broker falls back to polling).

Over Redis a process keeps one subscriber connection, opened by its first wait, and one listener
thread that reads it and wakes the waiters of each run (as Celery's result consumer does), rather
than a connection per wait. When that connection breaks, the listener wakes every waiter (each
reads the store again: notifications sent meanwhile are lost), reconnects while anyone waits, and
subscribes their runs again.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["LocalNotifier", "Notifier", "RedisNotifier", "channel", "notifier_for"]

_CHANNEL = "typhon:run:"
MESSAGE = "done"


def channel(run_id: str) -> str:
    """The Redis pub/sub channel of a run's notifications."""
    return _CHANNEL + run_id


class Subscription(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until a notification (True) or the timeout (False)."""
        ...


class Notifier(Protocol):
    def publish(self, run_id: str) -> None: ...

    def subscribe(self, run_id: str) -> contextlib.AbstractContextManager[Subscription]: ...

    def close(self) -> None: ...


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


class _Waiter:
    """One wait() on one run: woken by the listener thread."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


class _Listener:
    """One subscriber connection and the thread that reads it.

    The thread alone connects, reads and reconnects. Other threads only register waiters and,
    while connected, send SUBSCRIBE/UNSUBSCRIBE (under the lock, so commands go out in the order
    of the changes they stand for). The connection speaks RESP2, where a message is a plain
    ``[b"message", channel, data]`` reply.
    """

    _MAX_BACKOFF_S = 2.0
    _CONNECT_TIMEOUT_S = 3.0

    def __init__(self, url: str) -> None:
        import redis

        client = redis.Redis.from_url(
            url, protocol=2, socket_connect_timeout=self._CONNECT_TIMEOUT_S, socket_timeout=10,
            socket_keepalive=True,
        )  # fmt: skip
        self._conn: Any = client.connection_pool.make_connection()  # ours alone, never pooled
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._waiters: dict[bytes, set[_Waiter]] = {}
        self._connected = False
        self._attempts = 0  # connection attempts finished (successful or not)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="typhon-notify", daemon=True)
        self._thread.start()

    def add(self, channel: bytes, waiter: _Waiter) -> None:
        """Register ``waiter`` for ``channel``; on return its SUBSCRIBE has been sent, unless
        Redis cannot be reached (then the waiter just sleeps: its caller polls the store)."""
        with self._cond:
            waiters = self._waiters.setdefault(channel, set())
            waiters.add(waiter)
            if self._connected:
                if len(waiters) == 1:
                    self._send(b"SUBSCRIBE", channel)
                return
            # Not connected: have the thread try now, and wait for that try (it subscribes every
            # registered channel when it connects), as a connection per wait would have.
            tried = self._attempts
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: self._attempts > tried or self._closed, self._CONNECT_TIMEOUT_S + 1.0
            )

    def remove(self, channel: bytes, waiter: _Waiter) -> None:
        with self._cond:
            waiters = self._waiters.get(channel)
            if waiters is None:
                return
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[channel]
                if self._connected:
                    self._send(b"UNSUBSCRIBE", channel)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._connected = False
            self._cond.notify_all()
            with contextlib.suppress(Exception):
                self._conn.disconnect()  # ends the thread's blocking read
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _send(self, *args: bytes) -> None:
        """Send a command (caller holds the lock). A failure leaves the reconnecting to the
        thread, which is woken by the broken socket."""
        try:
            self._conn.send_command(*args, check_health=False)
        except Exception:
            self._connected = False

    def _loop(self) -> None:
        backoff = 0.0  # pause before reconnecting; grows while connections keep failing
        while True:
            with self._cond:
                if not self._connected:
                    connected = self._connect(backoff)
                    if connected is None:
                        return  # closed
                    backoff = connected
            try:
                reply = self._conn.read_response(timeout=None, disconnect_on_error=False)
            except Exception:
                with self._cond:
                    if self._closed:
                        return
                    self._lost()
                backoff = min(max(backoff * 2, 0.1), self._MAX_BACKOFF_S)
                continue
            backoff = 0.0
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                with self._cond:
                    for waiter in self._waiters.get(reply[1], ()):
                        waiter.wake()

    def _connect(self, backoff: float) -> float | None:
        """Connect and subscribe every registered channel (caller holds the lock): retried while
        anyone waits, parked while nobody does. Returns the backoff reached, None once closed."""
        while not self._closed:
            if not self._waiters:
                self._cond.wait()  # until a waiter arrives (its add() notifies) or close()
                continue
            if backoff:
                self._cond.wait(backoff)  # a new waiter cuts the pause short
                if self._closed:
                    break
            try:
                self._conn.connect()
                if self._waiters:
                    self._conn.send_command(b"SUBSCRIBE", *self._waiters, check_health=False)
                self._connected = True
            except Exception:
                with contextlib.suppress(Exception):
                    self._conn.disconnect()
                backoff = min(max(backoff * 2, 0.1), self._MAX_BACKOFF_S)
            finally:
                self._attempts += 1
                self._cond.notify_all()
            if self._connected:
                return backoff
        return None

    def _lost(self) -> None:
        """The connection broke (caller holds the lock): notifications may have been missed, so
        every waiter reads the store again."""
        self._connected = False
        with contextlib.suppress(Exception):
            self._conn.disconnect()
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.wake()


class RedisNotifier:
    """Across processes: ``PUBLISH typhon:run:ID`` on the broker's Redis; waiters of a process
    share one subscriber connection."""

    def __init__(self, url: str):
        import redis

        self.url = url
        self._redis: Any = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
        self._lock = threading.Lock()
        self._listener: _Listener | None = None

    def publish(self, run_id: str) -> None:
        with contextlib.suppress(Exception):  # a lost notification costs one poll interval
            self._redis.publish(channel(run_id), MESSAGE)

    def _current_listener(self) -> _Listener:
        with self._lock:
            if self._listener is None or self._listener.pid != os.getpid():  # none, or forked
                self._listener = _Listener(self.url)
            return self._listener

    @contextlib.contextmanager
    def subscribe(self, run_id: str) -> Iterator[Subscription]:
        listener = self._current_listener()
        name = channel(run_id).encode()
        waiter = _Waiter()
        listener.add(name, waiter)
        try:
            yield waiter
        finally:
            listener.remove(name, waiter)

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None and listener.pid == os.getpid():
            listener.close()
        self._redis.close()
        self._redis.connection_pool.disconnect()


def notifier_for(broker_url: str | None) -> Notifier:
    if broker_url is None:
        return LocalNotifier()
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisNotifier(broker_url)
    return LocalNotifier()  # other brokers: waiters in other processes poll the store
