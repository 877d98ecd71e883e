"""Concurrency slots: per-type caps and cluster-wide sustained/burst caps.

A run needs two slots before it starts: one of its pool's (``cap`` sustained, up to
``burst_cap`` with burst) and one of the cluster's (``sustained``, up to ``burst``). Slots are
taken lowest-numbered first, so burst slots are used only when the sustained ones are full. A
run on a burst slot is marked ``burst`` (its worker moves it to the burst CPU set).

On a Celery cluster the slots are Redis keys with a time-to-live (leases): the holder renews them
while it runs, and a killed worker's slots expire ``lease_ttl_s`` later, so capacity never leaks.
In-process, the same rules hold with a lock instead of Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from typhon.config import ClusterConfig, PoolConfig

__all__ = ["Lease", "LocalSlots", "RedisSlots", "Slots", "acquire", "slots_for"]

_CLUSTER = "_cluster"

# Take the lowest free pool slot and the lowest free cluster slot, atomically; all or nothing.
_ACQUIRE = """
local held = nil
for i = 0, tonumber(ARGV[2]) - 1 do
  if redis.call('SET', ARGV[1] .. i, ARGV[5], 'NX', 'PX', ARGV[6]) then held = i break end
end
if held == nil then return {-1, -1} end
for k = 0, tonumber(ARGV[4]) - 1 do
  if redis.call('SET', ARGV[3] .. k, ARGV[5], 'NX', 'PX', ARGV[6]) then return {held, k} end
end
redis.call('DEL', ARGV[1] .. held)
return {-1, -1}
"""
# Extend our keys; retake one that vanished (Redis restarted); count what we hold.
_RENEW = """
local n = 0
for _, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) n = n + 1
  elseif not owner and redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then n = n + 1 end
end
return n
"""
# Free our keys; then, given a channel and a message, publish it (the run's waiters wake).
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
if ARGV[2] then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"""


@dataclass(frozen=True)
class Lease:
    """The two slots a run holds. ``burst`` when either is beyond its sustained range."""

    run_id: str
    pool: str
    pool_slot: int
    cluster_slot: int
    burst: bool

    def keys(self, prefix: str) -> list[str]:
        return [f"{prefix}{self.pool}:{self.pool_slot}", f"{prefix}{_CLUSTER}:{self.cluster_slot}"]


class Slots(Protocol):
    def try_acquire(self, pool: PoolConfig, run_id: str) -> Lease | None: ...

    def renew(self, lease: Lease) -> bool: ...

    def release(self, lease: Lease) -> None: ...

    def in_use(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def _lease(pool: PoolConfig, cluster: ClusterConfig, run_id: str, i: int, k: int) -> Lease:
    return Lease(run_id, pool.name, i, k, burst=i >= pool.cap or k >= cluster.sustained)


class LocalSlots:
    """Slots within one process (embedded mode): slot number -> holder, per scope."""

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self._held: dict[str, dict[int, str]] = {}
        self._lock = threading.Lock()

    def _first_free(self, scope: str, limit: int) -> int | None:
        held = self._held.setdefault(scope, {})
        return next((i for i in range(limit) if i not in held), None)

    def try_acquire(self, pool: PoolConfig, run_id: str) -> Lease | None:
        with self._lock:
            i = self._first_free(pool.name, pool.ceiling)
            k = self._first_free(_CLUSTER, self.cluster.burst)
            if i is None or k is None:
                return None
            self._held[pool.name][i] = run_id
            self._held[_CLUSTER][k] = run_id
            return _lease(pool, self.cluster, run_id, i, k)

    def renew(self, lease: Lease) -> bool:
        return True

    def release(self, lease: Lease) -> None:
        with self._lock:
            for scope, slot in ((lease.pool, lease.pool_slot), (_CLUSTER, lease.cluster_slot)):
                held = self._held.get(scope, {})
                if held.get(slot) == lease.run_id:
                    del held[slot]

    def in_use(self) -> dict[str, int]:
        with self._lock:
            return {scope: len(held) for scope, held in self._held.items() if held}

    def close(self) -> None:
        pass


class RedisSlots:
    """Slots as Redis keys ``typhon:NAME:slot:SCOPE:N`` holding the run id, with a TTL."""

    def __init__(self, url: str, cluster: ClusterConfig, *, name: str = "default"):
        import redis

        self.url = url
        self.cluster = cluster
        self.prefix = f"typhon:{name}:slot:"
        self._ttl_ms = int(cluster.lease_ttl_s * 1000)
        self._redis: Any = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    def try_acquire(self, pool: PoolConfig, run_id: str) -> Lease | None:
        i, k = self._acquire(
            args=[f"{self.prefix}{pool.name}:", pool.ceiling, f"{self.prefix}{_CLUSTER}:",
                  self.cluster.burst, run_id, self._ttl_ms],
        )  # fmt: skip
        if int(i) < 0:
            return None
        return _lease(pool, self.cluster, run_id, int(i), int(k))

    def renew(self, lease: Lease) -> bool:
        keys = lease.keys(self.prefix)
        return int(self._renew(keys=keys, args=[lease.run_id, self._ttl_ms])) == len(keys)

    def release(self, lease: Lease, *, publish: tuple[str, str] | None = None) -> None:
        """Free the lease's slots; with ``publish`` (channel, message), also publish that
        message on this Redis in the same script: one round trip for both."""
        args = [lease.run_id, *(publish or ())]
        self._release(keys=lease.keys(self.prefix), args=args)

    def in_use(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in self._redis.scan_iter(match=f"{self.prefix}*", count=500):
            scope = key.decode().removeprefix(self.prefix).rsplit(":", 1)[0]
            counts[scope] = counts.get(scope, 0) + 1
        return counts

    def close(self) -> None:
        self._redis.close()


def slots_for(broker_url: str | None, cluster: ClusterConfig) -> Slots:
    if broker_url and broker_url.startswith(("redis://", "rediss://")):
        return RedisSlots(broker_url, cluster, name=cluster.name)
    return LocalSlots(cluster)


def acquire(
    slots: Slots,
    pool: PoolConfig,
    run_id: str,
    *,
    check: Callable[[], None],
    poll_s: float = 0.05,
    max_poll_s: float = 1.0,
) -> Lease:
    """Wait for a lease. ``check()`` runs between tries and may raise (e.g. the run was
    cancelled while it waited)."""
    delay = poll_s
    while True:
        lease = slots.try_acquire(pool, run_id)
        if lease is not None:
            return lease
        check()
        time.sleep(delay)
        delay = min(delay * 1.5, max_poll_s)
