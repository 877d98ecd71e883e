"""Replica groups: the choice of replica, cooldown, retries across replicas, fallbacks and the
wait while nothing is up, over scripted replicas (the same paths run against real llama-servers
in tests/integration/test_replicas.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from typhon._types import Usage
from typhon.config import LitellmParams, ModelEntry, RouterSettings
from typhon.errors import ModelResponseError, ModelUnavailableError
from typhon.models import BalancedClient, ChatResult, HealthChecker, Probe, Replica, ReplicaGroup


class FakeReplica:
    """A replica client: answers, or raises what it is told to, and can hold a call open."""

    def __init__(self, url: str):
        self.alias = "x"
        self.url = url
        self.down = False
        self.refused = True
        self.calls = 0
        self.gate: threading.Event | None = None

    def chat(self, messages: Any, **kwargs: Any) -> ChatResult:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.down:
            exc = ModelUnavailableError(f"{self.url} unreachable", alias="x", url=self.url)
            exc.refused = self.refused
            raise exc
        return ChatResult("ok", Usage(1, 1, 1, 0.01, 0.01), "m", "stop", alias="x", url=self.url)

    def stream(self, messages: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def probe(self, timeout: float = 3.0) -> Probe:
        return Probe("x", self.url, "m", not self.down, 0.001, error="down" if self.down else None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _entry(url: str, **params: Any) -> ModelEntry:
    return ModelEntry(
        model_name="x", litellm_params=LitellmParams(model="openai/m", api_base=url, **params)
    )


def _group(
    alias: str, fakes: list[FakeReplica], clock: Clock | None = None, **settings: Any
) -> ReplicaGroup:
    rs = RouterSettings(**{"cooldown_time": 10, "queue_timeout": 0, **settings})
    replicas = [
        Replica(alias, i, _entry(f.url), f.url, lambda f=f: f)  # type: ignore[misc]
        for i, f in enumerate(fakes)
    ]
    return ReplicaGroup(alias, replicas, rs, clock=clock or time.monotonic)


def _client(groups: dict[str, ReplicaGroup], alias: str) -> BalancedClient:
    return BalancedClient(alias, groups.__getitem__, groups[alias].settings, backoff_s=0)


MSG = [{"role": "user", "content": "hi"}]


def test_least_outstanding_wins_and_ties_take_turns() -> None:
    a, b = FakeReplica("http://a"), FakeReplica("http://b")
    group = _group("x", [a, b])
    first = group.pick()
    second = group.pick()
    assert first is not None and second is not None and first is not second  # 1 busy: the other
    group.release(first, ok=True)
    assert group.pick() is first  # first has 0 outstanding, second 1
    group.release(first, ok=True)
    group.release(second, ok=True)
    picks = []
    for _ in range(4):
        r = group.pick()
        assert r is not None
        picks.append(r.index)
        group.release(r, ok=True)
    assert sorted(picks) == [0, 0, 1, 1]  # idle replicas are used in turn


def test_weight_scales_the_load_a_replica_takes() -> None:
    a, b = FakeReplica("http://a"), FakeReplica("http://b")
    rs = RouterSettings()
    replicas = [
        Replica("x", 0, _entry("http://a"), "http://a", lambda: a),
        Replica("x", 1, _entry("http://b", weight=3), "http://b", lambda: b),
    ]
    group = ReplicaGroup("x", replicas, rs)
    taken = [group.pick() for _ in range(4)]
    assert [r.index for r in taken if r is not None].count(1) == 3


def test_refused_connection_cools_down_at_once_and_the_call_goes_elsewhere() -> None:
    a, b = FakeReplica("http://a"), FakeReplica("http://b")
    a.down = True
    clock = Clock()
    groups = {"x": _group("x", [a, b], clock)}
    client = _client(groups, "x")
    answers = [client.chat(MSG) for _ in range(4)]
    assert all(r.url == "http://b" for r in answers)
    assert a.calls == 1  # tried once, then cooling down
    state = groups["x"].states()[0]
    assert state["up"] is False and "unreachable" in state["last_error"]
    clock.now += 11  # cooldown over: tried again (half-open), and back once it answers
    a.down = False
    for _ in range(4):
        client.chat(MSG)
    assert a.calls > 1 and groups["x"].states()[0]["up"] is True


def test_errors_below_allowed_fails_do_not_cool_a_replica() -> None:
    a = FakeReplica("http://a")
    a.down, a.refused = True, False  # e.g. 503s, not a refused connection
    group = _group("x", [a], allowed_fails=3)
    for _ in range(2):
        r = group.pick()
        assert r is not None
        group.failed(r, RuntimeError("503"))
    assert group.states()[0]["up"] is True
    r = group.pick()
    assert r is not None
    group.failed(r, RuntimeError("503"))
    assert group.states()[0]["up"] is False


def test_fallback_answers_when_every_replica_is_down() -> None:
    big, small = FakeReplica("http://big"), FakeReplica("http://small")
    big.down = True
    rs = {"fallbacks": [{"big": ["small"]}]}
    groups = {"big": _group("big", [big], **rs), "small": _group("small", [small], **rs)}
    result = _client(groups, "big").chat(MSG)
    assert (result.alias, result.url) == ("small", "http://small")
    assert _client(groups, "big").chat(MSG).alias == "small"  # big is cooling: straight to small
    assert big.calls == 1


def test_nothing_up_waits_for_a_replica_then_answers() -> None:
    a = FakeReplica("http://a")
    a.down = True
    group = _group("x", [a], queue_timeout=10, cooldown_time=0.3)
    client = _client({"x": group}, "x")

    def revive() -> None:
        time.sleep(0.2)
        a.down = False

    threading.Thread(target=revive).start()
    assert client.chat(MSG).url == "http://a"  # first try refused; waited; then answered


def test_nothing_up_past_the_queue_timeout_is_unavailable_naming_alias_and_url() -> None:
    a = FakeReplica("http://a")
    a.down = True
    client = _client({"x": _group("x", [a], queue_timeout=0.3, cooldown_time=60)}, "x")
    with pytest.raises(
        ModelUnavailableError, match=r"model 'x': every replica is down \(http://a\)"
    ):
        client.chat(MSG)


def test_a_bad_answer_is_not_the_replicas_fault() -> None:
    a = FakeReplica("http://a")
    group = _group("x", [a])

    def bad(*args: Any, **kwargs: Any) -> ChatResult:
        raise ModelResponseError("garbled", alias="x", url="http://a")

    a.chat = bad  # type: ignore[method-assign]
    with pytest.raises(ModelResponseError):
        _client({"x": group}, "x").chat(MSG)
    assert group.states()[0] == {**group.states()[0], "up": True, "outstanding": 0}


def test_pre_call_check_skips_replicas_whose_context_is_too_small() -> None:
    small, large = FakeReplica("http://small"), FakeReplica("http://large")
    rs = RouterSettings(enable_pre_call_checks=True)
    entry_small = ModelEntry(
        model_name="x",
        litellm_params=LitellmParams(model="openai/m", api_base="http://small"),
        model_info={"context_length": 100},  # type: ignore[arg-type]
    )
    replicas = [
        Replica("x", 0, entry_small, "http://small", lambda: small),
        Replica("x", 1, _entry("http://large"), "http://large", lambda: large),
    ]
    group = ReplicaGroup("x", replicas, rs)
    client = BalancedClient("x", {"x": group}.__getitem__, rs, backoff_s=0)
    long = [{"role": "user", "content": "word " * 200}]
    assert all(client.chat(long).url == "http://large" for _ in range(3))
    only_small = ReplicaGroup("x", replicas[:1], rs)
    with pytest.raises(ModelResponseError, match="exceeds the context of every replica"):
        BalancedClient("x", {"x": only_small}.__getitem__, rs).chat(long)


def test_health_checker_marks_down_and_brings_back() -> None:
    a, b = FakeReplica("http://a"), FakeReplica("http://b")
    clock = Clock()
    group = _group("x", [a, b], clock, health_check_interval=5, cooldown_time=10)
    for r in group.replicas:
        r.client  # noqa: B018 - built, so the checker probes it
    checker = HealthChecker(lambda: [group], group.settings)
    a.down = True
    clock.now += 5
    checker.check_now()
    assert [s["up"] for s in group.states()] == [False, True]
    a.down = False
    clock.now += 5
    checker.check_now()  # still cooling down: not probed yet
    assert group.states()[0]["up"] is False
    clock.now += 6
    checker.check_now()
    assert group.states()[0]["up"] is True
