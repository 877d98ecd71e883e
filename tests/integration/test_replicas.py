"""Replica groups against two real llama-server replicas of one alias: sharing the load, failing
over when one is killed, bringing it back, fallbacks to another alias, waiting while nothing is up,
and a degraded run through the embedded orchestrator."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.llama import LlamaProcess, start_llama_server

from typhon import RunContext, RunStatus
from typhon.config import TyphonConfig
from typhon.crews import CrewRegistry, crew
from typhon.errors import ModelUnavailableError
from typhon.models import ChatResult, ModelRegistry, free_port
from typhon.orchestrator import Typhon

pytestmark = pytest.mark.integration

MAX_TOKENS = 4
BACK_WITHIN_S = 60.0  # a generous deadline for a restarted replica to be seen up again
SETTINGS: dict[str, Any] = {
    "cooldown_time": 2,
    "allowed_fails": 1,
    "health_check_interval": 0.5,
    "health_check_timeout": 1,  # a busy replica that answers calls is not marked down by it
    "queue_timeout": 10,
}


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Count to {i % 7 + 2}."}]


def _v1(server: LlamaProcess) -> str:
    return f"{server.url}/v1"


def _entry(alias: str, api_base: str) -> dict[str, Any]:
    return {"model_name": alias, "litellm_params": {"model": "openai/gemma", "api_base": api_base}}


@pytest.fixture(scope="module")
def replicas(
    shared_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LlamaProcess, LlamaProcess]]:
    model = shared_models_dir / "gemma-3-270m-q4_k_m.gguf"
    logs = tmp_path_factory.mktemp("replica-logs")
    a = start_llama_server(model, parallel=4, log_path=logs / "a.log")
    try:
        b = start_llama_server(model, parallel=4, log_path=logs / "b.log")
    except BaseException:
        a.kill()
        raise
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


@pytest.fixture(autouse=True)
def _both_alive(replicas: tuple[LlamaProcess, LlamaProcess]) -> None:
    """Each test starts with both replicas serving, whatever the one before it killed."""
    for server in replicas:
        if not server.healthy():
            server.restart()


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[Callable[..., ModelRegistry]]:
    made: list[ModelRegistry] = []

    def make(models: list[dict[str, Any]], **settings: Any) -> ModelRegistry:
        config = _config(tmp_path, models, {**SETTINGS, **settings})
        registry = ModelRegistry(config)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


def _config(
    tmp_path: Path, models: list[dict[str, Any]], settings: dict[str, Any], **extra: Any
) -> TyphonConfig:
    alias = models[-1]["model_name"]
    return TyphonConfig(
        home=tmp_path / "home",
        model_list=models,
        router_settings=settings,
        routing=dict.fromkeys(("simple", "complex", "code", "creative"), alias),
        **extra,
    )


def _by_url(registry: ModelRegistry, alias: str) -> dict[str, dict[str, Any]]:
    return {s["url"]: s for s in registry.group(alias).states()}


def _wait_for(what: str, check: Callable[[], bool], describe: Callable[[], object]) -> None:
    deadline = time.monotonic() + BACK_WITHIN_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {BACK_WITHIN_S:g}s: {describe()}")
        time.sleep(0.05)


def _concurrent_chats(
    client: Any, n: int, started: Callable[[], None] | None = None
) -> tuple[list[ChatResult], list[BaseException]]:
    """``n`` chat calls at once from ``n`` threads; ``started`` runs once they are all released."""
    results: list[ChatResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n + 1)

    def call(i: int) -> None:
        barrier.wait()
        try:
            result = client.chat(_messages(i), max_tokens=MAX_TOKENS, temperature=0)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(result)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    barrier.wait()
    if started is not None:
        started()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a chat call never returned"
    return results, errors


def test_concurrent_calls_are_shared_by_both_replicas(
    replicas: tuple[LlamaProcess, LlamaProcess], make_registry: Callable[..., ModelRegistry]
) -> None:
    a, b = replicas
    registry = make_registry([_entry("fast", _v1(a)), _entry("fast", _v1(b))])
    client = registry.client("fast")
    before = {url: s["served"] for url, s in _by_url(registry, "fast").items()}
    assert before == {_v1(a): 0, _v1(b): 0}

    results, errors = _concurrent_chats(client, 40)

    assert errors == []
    assert len(results) == 40
    assert {r.alias for r in results} == {"fast"}
    assert {r.url for r in results} == {_v1(a), _v1(b)}
    assert all(r.usage.completion_tokens >= 1 for r in results)
    states = _by_url(registry, "fast")
    served = {url: s["served"] - before[url] for url, s in states.items()}
    assert sum(served.values()) == 40
    assert min(served.values()) >= 10, served
    for url in (_v1(a), _v1(b)):
        assert served[url] == sum(r.url == url for r in results)
        assert states[url]["outstanding"] == 0


def test_killed_replica_fails_over_then_comes_back(
    replicas: tuple[LlamaProcess, LlamaProcess], make_registry: Callable[..., ModelRegistry]
) -> None:
    a, b = replicas
    registry = make_registry([_entry("fast", _v1(a)), _entry("fast", _v1(b))])
    client = registry.client("fast")
    group = registry.group("fast")
    in_flight_at_kill: list[int] = []

    def kill_a_while_busy() -> None:
        _wait_for(
            "a call in flight on replica a",
            lambda: _by_url(registry, "fast")[_v1(a)]["outstanding"] >= 1,
            group.states,
        )
        in_flight_at_kill.append(_by_url(registry, "fast")[_v1(a)]["outstanding"])
        a.kill()

    results, errors = _concurrent_chats(client, 20, started=kill_a_while_busy)

    assert in_flight_at_kill and in_flight_at_kill[0] >= 1
    assert errors == []  # the calls in flight on the killed replica went to the other one
    assert len(results) == 20
    _wait_for("replica a marked down", lambda: not _by_url(registry, "fast")[_v1(a)]["up"],
              group.states)  # fmt: skip
    down = _by_url(registry, "fast")[_v1(a)]
    assert isinstance(down["last_error"], str) and down["last_error"]
    assert down["outstanding"] == 0
    assert _by_url(registry, "fast")[_v1(b)]["up"]
    # while a is down, b answers everything
    answered = [client.chat(_messages(i), max_tokens=MAX_TOKENS) for i in range(3)]
    assert {r.url for r in answered} == {_v1(b)}

    a.restart()
    _wait_for("replica a brought back by the health checker",
              lambda: _by_url(registry, "fast")[_v1(a)]["up"], group.states)  # fmt: skip
    back = _by_url(registry, "fast")[_v1(a)]
    assert back["failures"] == 0
    served_before = back["served"]
    results, errors = _concurrent_chats(client, 8)
    assert errors == []
    assert _v1(a) in {r.url for r in results}
    assert _by_url(registry, "fast")[_v1(a)]["served"] > served_before


def test_fallback_answers_while_every_replica_of_an_alias_is_down(
    replicas: tuple[LlamaProcess, LlamaProcess], make_registry: Callable[..., ModelRegistry]
) -> None:
    a, b = replicas
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    registry = make_registry(
        [_entry("big", dead), _entry("fast", _v1(a)), _entry("fast", _v1(b))],
        fallbacks=[{"big": ["fast"]}],
    )
    client = registry.client("big")

    first = client.chat(_messages(1), max_tokens=MAX_TOKENS)
    assert first.alias == "fast"
    assert first.url in {_v1(a), _v1(b)}
    (big,) = registry.group("big").states()
    assert big["url"] == dead and not big["up"]
    assert big["last_error"] and dead in big["last_error"]
    # cooling down: the next call goes to the fallback straight away
    second = client.chat(_messages(2), max_tokens=MAX_TOKENS)
    assert second.alias == "fast"
    assert sum(s["served"] for s in registry.group("fast").states()) == 2
    assert registry.group("big").states()[0]["served"] == 0


def test_call_waits_for_a_replica_that_comes_back(
    replicas: tuple[LlamaProcess, LlamaProcess], make_registry: Callable[..., ModelRegistry]
) -> None:
    _, b = replicas
    b.kill()
    # the waiting call tries the replica again each time its cooldown ends; those tries are
    # bounded by queue_timeout, not by num_retries
    registry = make_registry([_entry("solo", _v1(b))], queue_timeout=30, cooldown_time=1)
    client = registry.client("solo")
    restarted = threading.Event()

    def restart_later() -> None:
        time.sleep(6)
        b.restart()
        restarted.set()

    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    try:
        result = client.chat(_messages(3), max_tokens=MAX_TOKENS)
    finally:
        thread.join(timeout=120)
    assert restarted.is_set()
    assert result.alias == "solo" and result.url == _v1(b)
    (state,) = registry.group("solo").states()
    assert state["up"] and state["served"] == 1 and state["outstanding"] == 0
    assert state["last_error"]  # it was down (refused) before it came back


def test_call_fails_after_queue_timeout_naming_alias_and_url(
    replicas: tuple[LlamaProcess, LlamaProcess], make_registry: Callable[..., ModelRegistry]
) -> None:
    _, b = replicas
    b.kill()
    registry = make_registry([_entry("solo", _v1(b))], queue_timeout=1)
    client = registry.client("solo")

    with pytest.raises(ModelUnavailableError) as caught:
        client.chat(_messages(4), max_tokens=MAX_TOKENS)

    message = str(caught.value)
    assert "'solo'" in message and _v1(b) in message
    assert caught.value.alias == "solo"
    assert _v1(b) in caught.value.url
    (state,) = registry.group("solo").states()
    assert not state["up"] and state["served"] == 0 and state["outstanding"] == 0


def test_run_through_a_fallback_is_marked_degraded(
    replicas: tuple[LlamaProcess, LlamaProcess], tmp_path: Path
) -> None:
    a, b = replicas
    crews = CrewRegistry(builtins={})

    @crew("via_big", registry=crews, category="simple", model="big")
    def via_big(ctx: RunContext) -> str:
        return ctx.model.chat(_messages(5), max_tokens=MAX_TOKENS, temperature=0).content

    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = _config(
        tmp_path,
        [_entry("big", dead), _entry("fast", _v1(a)), _entry("fast", _v1(b))],
        {**SETTINGS, "fallbacks": [{"big": ["fast"]}]},
        database_url=f"sqlite:///{tmp_path / 'runs.db'}",
        crews={"via_big": {"model": "big", "max_retries": 0}},
    )
    with Typhon(config, registry=crews) as typhon:
        handle = typhon.submit("via_big", "say something")
        record = handle.wait(120)
        events = typhon.store.events(handle.run_id)
        stats = typhon.store.model_stats()
        (big,) = typhon.runtime.models.group("big").states()

    assert record.status is RunStatus.SUCCEEDED, record.error
    assert record.model == "big" and record.backend == dead
    assert record.degraded is True
    assert record.usage.calls == 1
    degraded = [e for e in events if e.kind == "degraded"]
    assert len(degraded) == 1
    assert degraded[0].data["requested"] == "big" and degraded[0].data["used"] == "fast"
    assert not big["up"]
    fast = [row for row in stats if row["alias"] == "fast"]
    assert len(fast) == 1
    assert fast[0]["calls"] >= 1 and fast[0]["failures"] == 0
    assert fast[0]["gpu_s"] >= 0
    assert fast[0]["category"] == "simple"
