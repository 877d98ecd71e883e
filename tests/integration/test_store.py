"""The run store over both backends (SQLite and a real PostgreSQL): schema, the run state machine
and its atomic transitions, usage, events, listing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from typhon._types import RunStatus, Usage
from typhon.errors import RunNotFoundError
from typhon.store import SCHEMA_VERSION, RunStore, normalize_database_url

pytestmark = pytest.mark.integration

T = TypeVar("T")


def _in_threads(n: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(i)`` in n threads that start together; return results in index order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return results


def _sibling(store: RunStore) -> RunStore:
    """A second RunStore on the same database (a separate engine for SQLite; for PostgreSQL the
    same engine, which carries the test's private schema)."""
    if store.dialect == "sqlite":
        return RunStore(store.url)
    return RunStore(store.url, engine=store.engine)


def _new(store: RunStore, crew: str = "research", **kwargs: Any) -> str:
    kwargs.setdefault("input", "what is typhon?")
    kwargs.setdefault("pool", "research")
    return store.create_run(crew=crew, **kwargs).id


def _running(store: RunStore) -> str:
    run_id = _new(store)
    assert store.mark_running(run_id) is True
    return run_id


# -- schema ----------------------------------------------------------------------------------------


def test_migrate_returns_the_version_and_is_idempotent(store: RunStore) -> None:
    assert store.migrate() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION
    run_id = _new(store)

    other = _sibling(store)
    try:
        assert other.migrate() == SCHEMA_VERSION
        assert other.get(run_id).status is RunStatus.QUEUED  # the data survived
    finally:
        if other.engine is not store.engine:
            other.close()
    with store.engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version FROM typhon_schema")).scalars().all()
    assert versions == [SCHEMA_VERSION]


def test_first_use_migrates_without_an_explicit_call(store: RunStore) -> None:
    run = store.create_run(crew="research", input="x", pool="research")
    assert store.get(run.id).id == run.id


def test_concurrent_migrations_on_a_fresh_database(store: RunStore) -> None:
    """Many processes (here: stores in threads) starting at once on an empty database."""
    stores = [_sibling(store) for _ in range(6)]
    try:
        assert _in_threads(len(stores), lambda i: stores[i].migrate()) == [SCHEMA_VERSION] * 6
    finally:
        for s in stores:
            if s.engine is not store.engine:
                s.close()
    assert store.get(_new(store)).status is RunStatus.QUEUED


def test_normalize_database_url() -> None:
    assert normalize_database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("sqlite:///x.db") == "sqlite:///x.db"


# -- create / get ----------------------------------------------------------------------------------


def test_create_run_is_queued_with_an_event(store: RunStore) -> None:
    run = store.create_run(
        crew="research",
        input="compare llama.cpp and vLLM",
        pool="research",
        options={"depth": 2, "sources": ["a", "b"]},
        model="local",
        backend="local:llama-server",
    )
    assert run.status is RunStatus.QUEUED
    assert run.status.finished is False
    assert (run.crew, run.input, run.pool) == ("research", "compare llama.cpp and vLLM", "research")
    assert run.options == {"depth": 2, "sources": ["a", "b"]}
    assert (run.model, run.backend) == ("local", "local:llama-server")
    assert run.started_at is None and run.finished_at is None
    assert run.output is None and run.error is None
    assert run.usage == Usage()
    assert run.artifacts == []
    assert run.attempts == 0
    assert store.status(run.id) is RunStatus.QUEUED
    assert store.get(run.id) == run

    events = store.events(run.id)
    assert [e.kind for e in events] == ["queued"]
    assert events[0].run_id == run.id
    assert events[0].data == {
        "pool": "research",
        "model": "local",
        "category": None,
        "rules_version": None,
    }


def test_create_run_with_a_given_id(store: RunStore) -> None:
    run = store.create_run(crew="c", input="i", pool="p", run_id="my-own-id")
    assert run.id == "my-own-id"
    assert store.get("my-own-id").crew == "c"


def test_run_ids_are_unique(store: RunStore) -> None:
    ids = {_new(store) for _ in range(5)}
    assert len(ids) == 5


def test_unknown_run(store: RunStore) -> None:
    with pytest.raises(RunNotFoundError) as info:
        store.get("no-such-run")
    assert info.value.run_id == "no-such-run"
    assert info.value.exit_code == 2
    with pytest.raises(RunNotFoundError):
        store.status("no-such-run")
    with pytest.raises(RunNotFoundError):
        store.finish("no-such-run", RunStatus.FAILED, error="x")
    with pytest.raises(RunNotFoundError):
        store.cancel("no-such-run")
    assert store.mark_running("no-such-run") is False
    assert store.events("no-such-run") == []


# -- transitions -----------------------------------------------------------------------------------


def test_mark_running_only_from_queued(store: RunStore) -> None:
    run_id = _new(store)
    assert store.mark_running(run_id) is True
    assert store.mark_running(run_id) is False  # a redelivered task does not take it again

    run = store.get(run_id)
    assert run.status is RunStatus.RUNNING
    assert run.attempts == 1
    assert run.started_at is not None
    assert run.finished_at is None
    assert [e.kind for e in store.events(run_id)] == ["queued", "running"]


def test_finish_succeeded_once(store: RunStore) -> None:
    run_id = _running(store)
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="the answer", artifacts=["a.md"])
    first = store.get(run_id)
    assert first.status is RunStatus.SUCCEEDED
    assert first.status.finished
    assert first.output == "the answer"
    assert first.error is None
    assert first.artifacts == ["a.md"]
    assert first.finished_at is not None
    assert first.started_at is not None
    assert first.started_at <= first.finished_at

    assert store.finish(run_id, RunStatus.FAILED, output="other", error="late failure") is False
    assert store.finish(run_id, RunStatus.CANCELLED, error="cancelled") is False
    assert store.cancel(run_id) is False
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="again", artifacts=["b.md"]) is False
    assert store.mark_running(run_id) is False

    assert store.get(run_id) == first  # output, status, finished_at, artifacts unchanged
    assert [e.kind for e in store.events(run_id)] == ["queued", "running", "succeeded"]


def test_failed_run_cannot_be_finished_again(store: RunStore) -> None:
    run_id = _running(store)
    assert store.finish(run_id, RunStatus.FAILED, error="crew crashed")
    failed = store.get(run_id)
    assert (failed.status, failed.error) == (RunStatus.FAILED, "crew crashed")
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="late") is False
    assert store.get(run_id) == failed
    assert store.events(run_id)[-1].data == {"error": "crew crashed"}


def test_succeeded_directly_from_queued_is_refused(store: RunStore) -> None:
    run_id = _new(store)
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="never ran") is False
    run = store.get(run_id)
    assert run.status is RunStatus.QUEUED
    assert run.output is None
    assert run.finished_at is None
    assert [e.kind for e in store.events(run_id)] == ["queued"]


def test_failed_directly_from_queued_is_allowed(store: RunStore) -> None:
    run_id = _new(store)
    assert store.finish(run_id, RunStatus.FAILED, error="broker unavailable") is True
    run = store.get(run_id)
    assert (run.status, run.error) == (RunStatus.FAILED, "broker unavailable")
    assert run.started_at is None
    assert run.finished_at is not None
    assert store.mark_running(run_id) is False


def test_cancel_a_queued_run(store: RunStore) -> None:
    run_id = _new(store)
    assert store.cancel(run_id) is True
    run = store.get(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error == "cancelled"
    assert run.finished_at is not None
    assert store.mark_running(run_id) is False  # a worker that picks it up later leaves it alone
    assert store.get(run_id).status is RunStatus.CANCELLED
    assert store.cancel(run_id) is False
    assert [e.kind for e in store.events(run_id)] == ["queued", "cancelled"]


def test_cancel_a_running_run(store: RunStore) -> None:
    run_id = _running(store)
    assert store.cancel(run_id) is True
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="too late") is False
    run = store.get(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.output is None


@pytest.mark.parametrize("status", [RunStatus.QUEUED, RunStatus.RUNNING])
def test_finish_with_a_non_terminal_status_is_a_value_error(
    store: RunStore, status: RunStatus
) -> None:
    run_id = _running(store)
    with pytest.raises(ValueError):
        store.finish(run_id, status)
    assert store.get(run_id).status is RunStatus.RUNNING


def test_racing_outcomes_record_exactly_one(store: RunStore) -> None:
    run_id = _running(store)
    outcomes = [
        (RunStatus.SUCCEEDED, "out-0"),
        (RunStatus.FAILED, "out-1"),
        (RunStatus.CANCELLED, "out-2"),
        (RunStatus.SUCCEEDED, "out-3"),
        (RunStatus.FAILED, "out-4"),
        (RunStatus.SUCCEEDED, "out-5"),
        (RunStatus.CANCELLED, "out-6"),
        (RunStatus.SUCCEEDED, "out-7"),
    ]

    def finish(i: int) -> bool:
        status, output = outcomes[i]
        return store.finish(run_id, status, output=output, error=f"err-{i}")

    won = _in_threads(len(outcomes), finish)

    assert won.count(True) == 1
    winner = won.index(True)
    run = store.get(run_id)
    assert run.status is outcomes[winner][0]
    assert run.output == outcomes[winner][1]
    assert run.error == f"err-{winner}"
    kinds = [e.kind for e in store.events(run_id)]
    assert kinds == ["queued", "running", outcomes[winner][0].value]


def test_racing_workers_take_a_run_once(store: RunStore) -> None:
    run_id = _new(store)
    taken = _in_threads(8, lambda _i: store.mark_running(run_id))
    assert taken.count(True) == 1
    assert store.get(run_id).attempts == 1


# -- usage, route, artifacts, events ---------------------------------------------------------------


def test_add_usage_accumulates(store: RunStore) -> None:
    run_id = _running(store)
    store.add_usage(run_id, Usage(10, 5, 1, 0.5))
    store.add_usage(run_id, Usage(3, 2, 1, 0.25))
    usage = store.get(run_id).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.calls) == (13, 7, 2)
    assert usage.latency_s == pytest.approx(0.75)
    assert store.get(run_id).to_json()["usage"]["total_tokens"] == 20


def test_add_usage_is_atomic_under_concurrency(store: RunStore) -> None:
    run_id = _running(store)
    _in_threads(20, lambda i: store.add_usage(run_id, Usage(i, 1, 1, 0.125)))
    usage = store.get(run_id).usage
    assert usage.calls == 20
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens == sum(range(20))
    assert usage.latency_s == pytest.approx(2.5)


def test_set_route(store: RunStore) -> None:
    run_id = _new(store, model=None)
    assert store.get(run_id).model is None
    store.set_route(run_id, model="llama-70b", backend="http://10.0.0.5:5000/v1")
    run = store.get(run_id)
    assert (run.model, run.backend) == ("llama-70b", "http://10.0.0.5:5000/v1")
    assert run.status is RunStatus.QUEUED


def test_artifacts_are_stored_in_order(store: RunStore) -> None:
    run_id = _running(store)
    artifacts = ["report.md", "sources/1.html", "img/portrait.png"]
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="done", artifacts=artifacts)
    assert store.get(run_id).artifacts == artifacts
    assert store.get(run_id).to_json()["artifacts"] == artifacts


def test_events_order_and_paging(store: RunStore) -> None:
    run_id = _running(store)
    other = _new(store)
    for i in range(5):
        store.add_event(run_id, "step", {"n": i, "note": "näive ✓"})
        store.add_event(other, "noise", {"n": i})
    store.add_event(run_id, "bare")
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="ok")

    events = store.events(run_id)
    kinds = [e.kind for e in events]
    assert kinds == [
        "queued",
        "running",
        "step",
        "step",
        "step",
        "step",
        "step",
        "bare",
        "succeeded",
    ]
    assert [e.data.get("n") for e in events if e.kind == "step"] == [0, 1, 2, 3, 4]
    assert events[2].data["note"] == "näive ✓"
    assert events[7].data == {}
    assert all(e.run_id == run_id for e in events)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e.at for e in events] == sorted(e.at for e in events)

    assert store.events(run_id, after=events[3].seq) == events[4:]
    assert store.events(run_id, after=events[-1].seq) == []
    # paging: follow the log a page at a time
    seen: list[Any] = []
    cursor = 0
    while True:
        page = store.events(run_id, after=cursor)[:2]
        if not page:
            break
        seen.extend(page)
        cursor = page[-1].seq
    assert seen == events


# -- listing ---------------------------------------------------------------------------------------


def test_list_runs_newest_first_with_filters_and_limit(store: RunStore) -> None:
    made = []
    for i in range(6):
        crew = "research" if i % 2 == 0 else "development"
        made.append(_new(store, crew=crew, input=f"task {i}", pool=crew))
    assert store.mark_running(made[1])
    assert store.finish(made[1], RunStatus.SUCCEEDED, output="ok")
    assert store.finish(made[4], RunStatus.FAILED, error="x")

    ids = [r.id for r in store.list_runs()]
    assert ids == list(reversed(made))
    created = [r.created_at for r in store.list_runs()]
    assert created == sorted(created, reverse=True)

    assert [r.id for r in store.list_runs(limit=2)] == [made[5], made[4]]
    assert [r.id for r in store.list_runs(crew="research")] == [made[4], made[2], made[0]]
    assert [r.id for r in store.list_runs(status=RunStatus.QUEUED)] == [
        made[5],
        made[3],
        made[2],
        made[0],
    ]
    assert [r.id for r in store.list_runs(status=RunStatus.QUEUED, crew="development")] == [
        made[5],
        made[3],
    ]
    assert [r.id for r in store.list_runs(status=RunStatus.SUCCEEDED)] == [made[1]]
    assert store.list_runs(crew="creative") == []
    assert store.list_runs(status=RunStatus.CANCELLED) == []


def test_list_runs_on_an_empty_store(store: RunStore) -> None:
    assert store.list_runs() == []


# -- datetimes and JSON ----------------------------------------------------------------------------


def _assert_utc(value: datetime | None, before: datetime, after: datetime) -> None:
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= value <= after + timedelta(seconds=5)


def test_datetimes_are_aware_utc(store: RunStore) -> None:
    before = datetime.now(UTC)
    run_id = _running(store)
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="ok")
    after = datetime.now(UTC)

    run = store.get(run_id)
    for value in (run.created_at, run.started_at, run.finished_at):
        _assert_utc(value, before, after)
    assert run.created_at <= run.started_at <= run.finished_at  # type: ignore[operator]
    for event in store.events(run_id):
        _assert_utc(event.at, before, after)
    for listed in store.list_runs():
        _assert_utc(listed.created_at, before, after)


def test_datetimes_are_utc_whatever_the_session_time_zone(store: RunStore) -> None:
    """A PostgreSQL server set to local time must not leak its offset into run records."""
    if store.dialect == "postgresql":

        @sa.event.listens_for(store.engine, "connect")
        def _tz(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cur:
                cur.execute("SET TIME ZONE 'America/New_York'")
            dbapi_conn.commit()

        store.engine.dispose()  # connections made from now on get the listener

    before = datetime.now(UTC)
    run_id = _running(store)
    after = datetime.now(UTC)
    run = store.get(run_id)
    _assert_utc(run.created_at, before, after)
    _assert_utc(run.started_at, before, after)
    _assert_utc(store.events(run_id)[0].at, before, after)
    assert run.to_json()["created_at"].endswith("+00:00")


def test_to_json_shape(store: RunStore) -> None:
    run_id = _new(store, input="hello", model="local", backend="local:llama-server")
    assert store.mark_running(run_id)
    store.add_usage(run_id, Usage(4, 2, 1, 0.1234))
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="world")

    data = store.get(run_id).to_json()
    assert {"run_id", "crew", "status", "output", "model", "started_at", "finished_at"} <= set(data)
    assert data["run_id"] == run_id
    assert data["crew"] == "research"
    assert data["status"] == "succeeded"
    assert data["input"] == "hello"
    assert data["output"] == "world"
    assert data["model"] == "local"
    assert data["backend"] == "local:llama-server"
    assert data["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "total_tokens": 6,
        "calls": 1,
        "latency_s": 0.123,
    }
    for key in ("created_at", "started_at", "finished_at"):
        parsed = datetime.fromisoformat(data[key])
        assert parsed.utcoffset() == timedelta(0)

    queued = store.get(_new(store)).to_json()
    assert queued["started_at"] is None and queued["finished_at"] is None
    assert queued["status"] == "queued"


def test_dead_connections_are_replaced(postgres_url: str) -> None:
    """A restarted PostgreSQL kills pooled connections; the next call reconnects and succeeds."""
    store = RunStore(postgres_url)
    try:
        run = store.create_run(crew="c", input="i", pool="p")
        admin = sa.create_engine(postgres_url)
        with admin.begin() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND datname = current_database()"
                )
            ).scalar()
        admin.dispose()
        assert killed >= 1
        assert store.status(run.id) is RunStatus.QUEUED
        assert store.claim(run.id) is not None
    finally:
        store.close()


def test_a_refused_statement_leaves_the_store_usable(store: RunStore) -> None:
    """A duplicate id is refused with SQLAlchemy's IntegrityError on both backends, and the
    connections that the hot path (create, status, get, claim, finish) used still hold
    transactions together afterwards: a rolled-back transaction changes nothing."""
    from typhon.store import runs

    run_id = _new(store, run_id="dup")
    with pytest.raises(sa.exc.IntegrityError):
        store.create_run(crew="c", input="i", pool="p", run_id="dup")
    assert store.status(run_id) is RunStatus.QUEUED
    assert store.claim(run_id) is not None
    with pytest.raises(RuntimeError), store.engine.begin() as conn:
        conn.execute(runs.update().where(runs.c.id == run_id).values(crew="changed"))
        raise RuntimeError("roll back")
    assert store.get(run_id).crew == "research"
    assert store.finish(run_id, RunStatus.SUCCEEDED, output="ok")
