"""Replica groups: one alias served by several endpoints, balanced, health-checked, with fallbacks.

Entries of the ``model_list`` that share a ``model_name`` are one group (LiteLLM's convention). A
call goes to the available replica with the fewest outstanding requests (ties: in turn, or by
measured latency under ``latency-based-routing``). A replica that refuses the connection, or
fails ``allowed_fails`` times in a row, cools down for ``cooldown_time`` seconds; after that it is
tried again (or brought back sooner by a health probe). Health probes run in the background
every ``health_check_interval`` seconds and mark a silent replica down before a request finds it.

While every replica of an alias is down, the call goes to the first alias of its fallback chain
that has one up (the answer names the alias that gave it, so the run can be marked degraded).
With nothing up anywhere, the call waits up to ``queue_timeout`` seconds for a replica to come
back before it fails. Counts are per process: each worker balances its own calls.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog

from typhon.config import ModelEntry, RouterSettings
from typhon.errors import ModelResponseError, ModelUnavailableError
from typhon.models._client import ChatResult, ChatStream, Message, ModelClient, Probe

__all__ = ["BalancedClient", "HealthChecker", "Replica", "ReplicaGroup"]

log = structlog.get_logger("typhon.models")


class Replica:
    """One endpoint of a group, with its load and health as this process sees them."""

    def __init__(
        self,
        alias: str,
        index: int,
        entry: ModelEntry,
        url: str,
        factory: Callable[[], ModelClient],
    ):
        self.alias = alias
        self.index = index
        self.entry = entry
        self.url = url
        self._factory = factory
        self._client: ModelClient | None = None
        self._client_lock = threading.Lock()
        self.weight = float((entry.litellm_params.model_extra or {}).get("weight") or 1.0)
        self.outstanding = 0
        self.served = 0
        self.failures = 0  # in a row
        self.down_until: float | None = None  # monotonic time; None while up
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.latency_s: float | None = None  # moving average of successful calls
        self.last_probe = 0.0
        self.last_ok: float | None = None  # monotonic time of the last answer

    @property
    def id(self) -> str:
        return f"{self.alias}#{self.index}"

    @property
    def built(self) -> bool:
        return self._client is not None

    @property
    def client(self) -> ModelClient:
        client = self._client
        if client is None:
            with self._client_lock:  # one client (one connection pool) per replica
                if self._client is None:
                    self._client = self._factory()
                client = self._client
        return client

    def available(self, now: float) -> bool:
        return self.down_until is None or now >= self.down_until

    def state(self, now: float) -> dict[str, Any]:
        return {
            "replica": self.id,
            "url": self.url,
            "up": self.down_until is None,
            "cooling_s": round(max(0.0, self.down_until - now), 1) if self.down_until else 0.0,
            "outstanding": self.outstanding,
            "served": self.served,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class ReplicaGroup:
    """The replicas of one alias and the rules for choosing among them."""

    def __init__(
        self,
        alias: str,
        replicas: Sequence[Replica],
        settings: RouterSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not replicas:
            raise ValueError(f"model '{alias}' has no replicas")
        self.alias = alias
        self.replicas = list(replicas)
        self.settings = settings
        self.clock = clock
        self.changed = threading.Condition()
        self.closed = False  # set when the registry closes: waiting calls give up at once
        self._turn = random.randrange(len(self.replicas))  # workers do not all start on #0

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def fits(self, replica: Replica, tokens: int | None) -> bool:
        if tokens is None or not self.settings.enable_pre_call_checks:
            return True
        window = replica.entry.context_window
        return window is None or tokens <= window

    def pick(
        self, tokens: int | None = None, exclude: frozenset[int] = frozenset()
    ) -> Replica | None:
        """Take the least-loaded available replica (its outstanding count goes up by one)."""
        with self.changed:
            now = self.clock()
            candidates = [
                r
                for r in self.replicas
                if r.available(now) and r.index not in exclude and self.fits(r, tokens)
            ]
            if not candidates:
                return None
            n = len(self.replicas)
            latency_first = self.settings.routing_strategy == "latency-based-routing"

            def key(r: Replica) -> tuple[float, float, int]:
                latency = (r.latency_s or 0.0) if latency_first else 0.0
                return (r.outstanding / r.weight, latency, (r.index - self._turn) % n)

            chosen = min(candidates, key=key)
            self._turn = (chosen.index + 1) % n
            chosen.outstanding += 1
            return chosen

    def any_fits(self, tokens: int | None) -> bool:
        return any(self.fits(r, tokens) for r in self.replicas)

    def release(self, replica: Replica, *, ok: bool, latency_s: float | None = None) -> None:
        with self.changed:
            replica.outstanding -= 1
            if ok:
                replica.served += 1
                replica.last_ok = self.clock()
                if latency_s is not None:
                    old = replica.latency_s
                    replica.latency_s = latency_s if old is None else 0.8 * old + 0.2 * latency_s
                self._mark_up(replica, "answered")
            self.changed.notify_all()

    def failed(self, replica: Replica, error: BaseException, *, refused: bool = False) -> None:
        """A call failed for want of the server: count it; cool the replica down when due."""
        with self.changed:
            replica.outstanding -= 1
            self._failure(replica, f"{error}"[:300], force=refused)
            self.changed.notify_all()

    def probed(self, replica: Replica, probe: Probe, started: float | None = None) -> None:
        with self.changed:
            replica.last_probe = self.clock()
            if probe.reachable:
                replica.failures = 0
                self._mark_up(replica, "health check passed")
            elif started is not None and replica.last_ok is not None and replica.last_ok >= started:
                pass  # it answered a call while the probe waited: busy, not down
            else:
                self._failure(replica, f"health check: {probe.error}", force=True)
            self.changed.notify_all()

    def wait(self, timeout: float) -> None:
        with self.changed:
            if not self.closed:
                self.changed.wait(timeout)

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def states(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self.changed:
            return [r.state(now) for r in self.replicas]

    # -- under the lock --------------------------------------------------------------------------
    def _failure(self, replica: Replica, error: str, *, force: bool) -> None:
        replica.failures += 1
        replica.last_error = error
        on_trial = replica.down_until is not None  # cooled down before: tried again
        if not force and not on_trial and replica.failures < self.settings.allowed_fails:
            return
        now = self.clock()
        was_up = replica.down_until is None
        replica.down_until = now + self.settings.cooldown_time
        if was_up:
            replica.down_since = now
            log.warning(
                "replica down", model=self.alias, replica=replica.id, url=replica.url,
                cooldown_s=self.settings.cooldown_time, error=error,
            )  # fmt: skip

    def _mark_up(self, replica: Replica, why: str) -> None:
        replica.failures = 0
        if replica.down_until is not None:
            down_for = self.clock() - (replica.down_since or self.clock())
            replica.down_until = None
            replica.down_since = None
            log.info(
                "replica up", model=self.alias, replica=replica.id, url=replica.url,
                why=why, down_s=round(down_for, 2),
            )  # fmt: skip


def _estimate_tokens(messages: Sequence[Message], max_tokens: int | None) -> int:
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return chars // 4 + (max_tokens or 0)


class BalancedClient:
    """A ``ModelClient`` for an alias: balances its replica group, fails over along the fallback
    chain, and waits while nothing is up. ``ChatResult.alias``/``url`` say who answered."""

    def __init__(
        self,
        alias: str,
        group: Callable[[str], ReplicaGroup],
        settings: RouterSettings,
        *,
        backoff_s: float = 0.25,
    ):
        self.alias = alias
        self._group = group
        self.settings = settings
        self.chain = [alias, *settings.fallbacks_for(alias)]
        self.backoff_s = backoff_s
        self.url = ",".join(group(alias).urls)

    def _acquire(
        self, tokens: int | None, failed: set[tuple[str, int]], deadline: float
    ) -> tuple[str, ReplicaGroup, Replica]:
        """The replica to call next: the alias's own first, then its fallbacks; replicas that
        failed this call only when nothing else is left; wait while none is available."""
        groups = [(name, self._group(name)) for name in self.chain]
        if not any(g.any_fits(tokens) for _, g in groups):
            first = groups[0][1]
            raise ModelResponseError(
                f"model '{self.alias}': a prompt of about {tokens} tokens exceeds the context"
                f" of every replica (pre-call check); shorten it or route to a larger model",
                alias=self.alias,
                url=",".join(first.urls),
            )
        waited = False
        while True:
            if any(g.closed for _, g in groups):
                raise ModelUnavailableError(
                    f"model '{self.alias}': not called, the model registry is closed",
                    alias=self.alias,
                    url=",".join(groups[0][1].urls),
                )
            for name, group in groups:
                skip = frozenset(i for n, i in failed if n == name)
                replica = group.pick(tokens, skip)
                if replica is not None:
                    return name, group, replica
            for name, group in groups:  # only replicas that failed this very call are left
                replica = group.pick(tokens)
                if replica is not None:
                    time.sleep(self.backoff_s * (1 + random.random()))
                    return name, group, replica
            left = deadline - time.monotonic()
            if left <= 0:
                urls = ", ".join(u for _, g in groups for u in g.urls)
                last = [r.last_error for _, g in groups for r in g.replicas if r.last_error]
                raise ModelUnavailableError(
                    f"model '{self.alias}': every replica is down ({urls})"
                    + (f"; waited {self.settings.queue_timeout:g}s" if waited else "")
                    + (f"; last error: {last[0]}" if last else ""),
                    alias=self.alias,
                    url=",".join(groups[0][1].urls),
                )
            if not waited:
                waited = True
                log.warning("no replica up; waiting", model=self.alias, timeout_s=left)
            groups[0][1].wait(min(left, 0.25))

    def _attempts(self) -> int:
        return self.settings.num_retries + 1

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        tokens = _estimate_tokens(messages, max_tokens)
        deadline = time.monotonic() + self.settings.queue_timeout
        failed: set[tuple[str, int]] = set()
        errors = 0
        while True:
            name, group, replica = self._acquire(tokens, failed, deadline)
            on_trial = replica.down_until is not None  # its cooldown is over: trying it again
            started = time.perf_counter()
            try:
                result = replica.client.chat(
                    messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    response_format=response_format,
                    tools=tools,
                    stop=stop,
                )
            except ModelUnavailableError as exc:
                group.failed(replica, exc, refused=exc.refused)
                failed.add((name, replica.index))
                if on_trial and time.monotonic() < deadline:
                    continue  # waiting for a replica to come back: queue_timeout bounds it
                errors += 1
                if errors >= self._attempts():
                    raise
                deadline = max(deadline, time.monotonic() + self.settings.queue_timeout)
                continue
            except BaseException:
                group.release(replica, ok=True)  # it answered (badly): the server is up
                raise
            group.release(replica, ok=True, latency_s=time.perf_counter() - started)
            return dataclasses.replace(result, alias=name, url=replica.url)

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        holder: dict[str, ChatResult] = {}

        def chunks() -> Iterator[str]:
            tokens = _estimate_tokens(messages, max_tokens)
            deadline = time.monotonic() + self.settings.queue_timeout
            failed: set[tuple[str, int]] = set()
            errors = 0
            while True:
                name, group, replica = self._acquire(tokens, failed, deadline)
                on_trial = replica.down_until is not None
                started = time.perf_counter()
                inner = replica.client.stream(
                    messages, max_tokens=max_tokens, temperature=temperature
                )
                sent = False
                try:
                    for delta in inner:
                        sent = True
                        yield delta
                except ModelUnavailableError as exc:
                    group.failed(replica, exc, refused=exc.refused)
                    failed.add((name, replica.index))
                    if not sent and on_trial and time.monotonic() < deadline:
                        continue
                    errors += 1
                    if sent or errors >= self._attempts():
                        raise
                    continue
                except BaseException:
                    group.release(replica, ok=True)
                    raise
                group.release(replica, ok=True, latency_s=time.perf_counter() - started)
                assert inner.result is not None
                holder["result"] = dataclasses.replace(inner.result, alias=name, url=replica.url)
                return

        return ChatStream(chunks(), lambda: holder["result"])


class HealthChecker:
    """Probes every replica in the background: up ones every ``health_check_interval`` seconds,
    cooled-down ones once their cooldown is over (then every second until they answer)."""

    def __init__(self, groups: Callable[[], list[ReplicaGroup]], settings: RouterSettings):
        self._groups = groups
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="typhon-health", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def check_now(self) -> None:
        for group in self._groups():
            now = group.clock()
            for replica in group.replicas:
                if self._due(replica, now):
                    self._probe(group, replica)

    def _due(self, replica: Replica, now: float) -> bool:
        if not replica.built:
            return False
        if replica.down_until is None:
            return now - replica.last_probe >= self.settings.health_check_interval
        return now >= replica.down_until and now - replica.last_probe >= 1.0

    def _probe(self, group: ReplicaGroup, replica: Replica) -> None:
        probe = getattr(replica.client, "probe", None)
        if probe is None:
            return
        started = group.clock()
        try:
            result = probe(timeout=self.settings.health_check_timeout)
        except Exception as exc:  # a probe must never kill the checker
            log.warning("health probe crashed", replica=replica.id, error=str(exc))
            return
        group.probed(replica, result, started)

    def _loop(self) -> None:
        tick = min(1.0, self.settings.health_check_interval)
        while not self._stop.wait(tick):
            self.check_now()
