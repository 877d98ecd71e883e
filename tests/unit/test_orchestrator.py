"""The orchestrator and the task body, in-process, with a scripted model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import peak_concurrency

from typhon import RunContext, RunStatus, Typhon
from typhon._runtime import execute_run
from typhon.config import TyphonConfig
from typhon.crews import Crew, CrewOutput, CrewRegistry, crew
from typhon.errors import (
    InputError,
    ModelUnavailableError,
    RunNotFoundError,
    UnknownCrewError,
)
from typhon.testing import ScriptedModel, ScriptedModels


@pytest.fixture
def registry() -> CrewRegistry:
    reg = CrewRegistry(builtins={})

    @crew("echo", registry=reg)
    def echo(ctx: RunContext) -> str:
        ctx.step("thinking")
        return ctx.model.chat([{"role": "user", "content": ctx.input}]).content

    @crew("files", registry=reg)
    def files(ctx: RunContext) -> CrewOutput:
        ctx.add_artifact("notes.txt", "hello")
        return CrewOutput("done", {"data.bin": b"\x00\x01"})

    @crew("boom", registry=reg)
    def boom(ctx: RunContext) -> str:
        raise RuntimeError("the crew broke")

    return reg


def make(config: TyphonConfig, registry: CrewRegistry, *replies: object) -> Typhon:
    model = ScriptedModel(*replies) if replies else ScriptedModel("ok")  # type: ignore[arg-type]
    return Typhon(config, registry=registry, models=ScriptedModels(config, model))


def test_submit_runs_crew_and_records_outcome(config: TyphonConfig, registry: CrewRegistry) -> None:
    with make(config, registry, "the answer") as typhon:
        handle = typhon.submit("echo", "a question")
        record = handle.wait(30)
        assert record.status is RunStatus.SUCCEEDED
        assert record.output == "the answer"
        assert record.model == "local"
        assert record.backend == "local:llama-server"
        assert record.pool == "research"
        assert record.usage.calls == 1
        assert record.usage.completion_tokens == 2
        kinds = [e.kind for e in typhon.store.events(handle.run_id)]
        assert kinds == ["queued", "running", "step", "succeeded"]
        assert record.started_at is not None and record.finished_at is not None


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "empty"), ("   \n\t", "empty"), ("x" * 20_001, "over the limit")],
)
def test_bad_input_is_refused_and_stores_nothing(
    config: TyphonConfig, registry: CrewRegistry, text: str, why: str
) -> None:
    with make(config, registry) as typhon:
        with pytest.raises(InputError, match=why):
            typhon.submit("echo", text)
        assert typhon.runs() == []


def test_unknown_crew_names_the_known_ones(config: TyphonConfig, registry: CrewRegistry) -> None:
    with make(config, registry) as typhon:
        with pytest.raises(UnknownCrewError) as err:
            typhon.submit("nope", "x")
        assert "boom, echo, files" in str(err.value)
        assert err.value.exit_code == 2
        assert typhon.runs() == []


def test_unknown_model_alias_is_bad_input(config: TyphonConfig, registry: CrewRegistry) -> None:
    with make(config, registry) as typhon:
        with pytest.raises(InputError, match="no model 'gpt-9'"):
            typhon.submit("echo", "x", model="gpt-9")
        assert typhon.runs() == []


def test_crew_exception_fails_the_run(config: TyphonConfig, registry: CrewRegistry) -> None:
    with make(config, registry) as typhon:
        record = typhon.submit("boom", "x").wait(30)
    assert record.status is RunStatus.FAILED
    assert record.error == "RuntimeError: the crew broke"


def test_model_error_fails_with_alias_and_url(config: TyphonConfig, registry: CrewRegistry) -> None:
    down = ModelUnavailableError(
        "model 'local' at http://127.0.0.1:9/v1 unreachable", alias="local", url="x"
    )
    with make(config, registry, down) as typhon:
        record = typhon.submit("echo", "x").wait(30)
    assert record.status is RunStatus.FAILED
    assert "'local'" in (record.error or "") and "http://127.0.0.1:9/v1" in (record.error or "")


def test_artifacts_are_written_under_home(
    config: TyphonConfig, registry: CrewRegistry, home: Path
) -> None:
    with make(config, registry) as typhon:
        record = typhon.submit("files", "x").wait(30)
    folder = home / "artifacts" / record.id
    assert sorted(record.artifacts) == [str(folder / "data.bin"), str(folder / "notes.txt")]
    assert (folder / "notes.txt").read_text() == "hello"
    assert (folder / "data.bin").read_bytes() == b"\x00\x01"


def test_cancel_running_run_stops_at_next_model_call(
    config: TyphonConfig, registry: CrewRegistry
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(_messages: object) -> str:
        started.set()
        release.wait(10)
        return "first"

    @crew("two_calls", registry=registry)
    def two_calls(ctx: RunContext) -> str:
        ctx.model.chat([{"role": "user", "content": "1"}])
        ctx.model.chat([{"role": "user", "content": "2"}])
        return "should not get here"

    model = ScriptedModel(slow, "second")
    with Typhon(config, registry=registry, models=ScriptedModels(config, model)) as typhon:
        handle = typhon.submit("two_calls", "x")
        assert started.wait(10)
        assert handle.cancel() is True
        release.set()
        record = handle.wait(30)
        assert record.status is RunStatus.CANCELLED
        assert record.output is None
        assert len(model.calls) == 1  # the second call was refused: the run was cancelled
        assert handle.cancel() is False  # already finished


def test_execute_twice_records_one_outcome(config: TyphonConfig, registry: CrewRegistry) -> None:
    with make(config, registry, "one", "two") as typhon:
        record = typhon.submit("echo", "x").wait(30)
        assert execute_run(typhon.runtime, record.id) is RunStatus.SUCCEEDED
        again = typhon.store.get(record.id)
        assert again.output == "one" and again.attempts == 1


def test_cancel_queued_run_is_never_started(config: TyphonConfig, registry: CrewRegistry) -> None:
    class Hold:
        def __init__(self) -> None:
            self.runs: list[str] = []

        def dispatch(self, run: object, queue_name: str) -> None:
            self.runs.append(run.id)  # type: ignore[attr-defined]

        def close(self) -> None:
            pass

    hold = Hold()
    model = ScriptedModel("x")
    with Typhon(
        config, registry=registry, models=ScriptedModels(config, model), dispatcher=hold
    ) as typhon:
        handle = typhon.submit("echo", "x")
        assert handle.status() is RunStatus.QUEUED
        assert typhon.cancel(handle.run_id)
        assert execute_run(typhon.runtime, hold.runs[0]) is RunStatus.CANCELLED
        assert model.calls == []


def test_fixed_model_and_pool_from_class(config: TyphonConfig, registry: CrewRegistry) -> None:
    class Pinned(Crew):
        name = "pinned"
        pool = "development"
        category = "code"
        model = "local"

        def run(self, ctx: RunContext) -> str:
            return ctx.model.alias

    registry.register(Pinned)
    with make(config, registry) as typhon:
        record = typhon.submit("pinned", "x").wait(30)
    assert (record.status, record.pool, record.output) == (
        RunStatus.SUCCEEDED,
        "development",
        "local",
    )


def test_run_handle_for_unknown_id(config: TyphonConfig, registry: CrewRegistry) -> None:
    with make(config, registry) as typhon, pytest.raises(RunNotFoundError):
        typhon.run("nope")


def _with_crew_settings(config: TyphonConfig, **settings: object) -> TyphonConfig:
    from typhon.config import CrewSettings

    return config.model_copy(update={"crews": {"echo": CrewSettings(**settings)}})  # type: ignore[arg-type]


def test_transient_model_error_is_retried(config: TyphonConfig, registry: CrewRegistry) -> None:
    down = ModelUnavailableError("model 'local' at x answered 503", alias="local", url="x")
    config = _with_crew_settings(config, max_retries=2, retry_backoff_s=0.01)
    with make(config, registry, down, "recovered") as typhon:
        handle = typhon.submit("echo", "x")
        record = handle.wait(30)
        retries = [e.data for e in typhon.store.events(handle.run_id) if e.kind == "retry"]
    assert (record.status, record.output) == (RunStatus.SUCCEEDED, "recovered")
    assert len(retries) == 1 and "503" in retries[0]["error"]


def test_retries_run_out(config: TyphonConfig, registry: CrewRegistry) -> None:
    down = ModelUnavailableError("model 'local' at x answered 503", alias="local", url="x")
    config = _with_crew_settings(config, max_retries=1, retry_backoff_s=0.01)
    with make(config, registry, down) as typhon:
        record = typhon.submit("echo", "x").wait(30)
    assert record.status is RunStatus.FAILED and "503" in str(record.error)


def test_other_model_errors_are_not_retried(config: TyphonConfig, registry: CrewRegistry) -> None:
    from typhon.errors import ModelResponseError

    bad = ModelResponseError("model 'local' at x refused the request (400)", alias="local", url="x")
    config = _with_crew_settings(config, max_retries=3, retry_backoff_s=0.01)
    model = ScriptedModel(bad, "never")
    with Typhon(config, registry=registry, models=ScriptedModels(config, model)) as typhon:
        record = typhon.submit("echo", "x").wait(30)
    assert record.status is RunStatus.FAILED and len(model.calls) == 1


def test_soft_time_limit_stops_the_crew(config: TyphonConfig, registry: CrewRegistry) -> None:
    import time

    @crew("dawdle", registry=registry)
    def dawdle(ctx: RunContext) -> str:
        while True:
            ctx.step("still going")
            time.sleep(0.02)

    from typhon.config import CrewSettings

    config = config.model_copy(update={"crews": {"dawdle": CrewSettings(timeout_s=0.2)}})
    with make(config, registry) as typhon:
        record = typhon.submit("dawdle", "x").wait(30)
    assert record.status is RunStatus.FAILED
    assert "ran past its time limit of 0.2s" in str(record.error)


def test_in_process_caps_hold(config: TyphonConfig, registry: CrewRegistry) -> None:
    """Embedded mode enforces the same caps: per pool (threads and slots) and cluster-wide."""
    import time

    from typhon.config import ClusterConfig, PoolConfig

    @crew("nap", registry=registry, pool="research")
    def nap(ctx: RunContext) -> str:
        time.sleep(0.05)
        return "ok"

    @crew("nap2", registry=registry, pool="monitoring")
    def nap2(ctx: RunContext) -> str:
        time.sleep(0.05)
        return "ok"

    config = config.model_copy(
        update={
            "pools": [
                PoolConfig(name="research", cap=2, burst_cap=3),
                PoolConfig(name="monitoring", cap=2),
            ],
            "cluster": ClusterConfig(sustained=3, burst=4),
        }
    )
    with make(config, registry) as typhon:
        handles = [typhon.submit(name, "x") for _ in range(15) for name in ("nap", "nap2")]
        records = [h.wait(60) for h in handles]

    def peak(pool: str | None) -> int:
        return peak_concurrency(records, pool)

    assert {r.status for r in records} == {RunStatus.SUCCEEDED}
    assert peak("research") <= 3 and peak("monitoring") <= 2 and peak(None) <= 4
    assert peak(None) >= 3  # the caps were reached, not just respected
