"""The orchestrator: validate -> route -> record (queued) -> dispatch.

``Typhon`` is the Python API and what the CLI and HTTP API call. With no ``broker_url`` runs go to
an in-process dispatcher (threads, one bounded pool per worker pool, the same task code); with
one, to the Celery queue of the crew's pool.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from typhon import telemetry
from typhon._runtime import Runtime, execute_run
from typhon._types import RunRecord, RunRequest, RunStatus
from typhon.config import TyphonConfig, load_config
from typhon.crews import CrewRegistry
from typhon.errors import DispatchError, InputError, RunTimeoutError, TyphonError
from typhon.models import ModelRegistry, Route
from typhon.resources.reaper import reap
from typhon.store import RunStore

__all__ = ["CeleryDispatcher", "Dispatcher", "InProcessDispatcher", "RunHandle", "Typhon"]

log = structlog.get_logger("typhon")


class Dispatcher(Protocol):
    """Hands a recorded run to whatever executes it."""

    def dispatch(self, run: RunRecord, queue_name: str) -> None: ...

    def close(self) -> None: ...


class InProcessDispatcher:
    """Runs crews on daemon threads of this process, at most ``cap`` at a time per pool.

    Daemon threads, so that Ctrl-C ends the process at once: the run is marked cancelled first,
    and a run cut off by the process ending is never recorded as anything else.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._queues: dict[str, queue.SimpleQueue[tuple[str, str] | None]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _worker(self, work: queue.SimpleQueue[tuple[str, str] | None]) -> None:
        while (item := work.get()) is not None:
            execute_run(self.runtime, *item)

    def dispatch(self, run: RunRecord, queue_name: str) -> None:
        with self._lock:
            work = self._queues.get(queue_name)
            if work is None:
                work = self._queues[queue_name] = queue.SimpleQueue()
                for i in range(self.runtime.config.pool(run.pool).ceiling):
                    thread = threading.Thread(
                        target=self._worker,
                        args=(work,),
                        name=f"typhon-{queue_name}-{i}",
                        daemon=True,
                    )
                    thread.start()
                    self._threads.append(thread)
        work.put((run.id, run.pool))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the runner threads: each finishes its current run first (a cancelled run stops
        at its next step), waited for up to ``timeout`` seconds in all."""
        with self._lock:
            for work in self._queues.values():
                for _ in range(len(self._threads)):
                    work.put(None)
            threads, self._threads = list(self._threads), []
            self._queues.clear()
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


class CeleryDispatcher:
    """Publishes ``typhon.execute_run(run_id)`` to the pool's queue through the broker."""

    def __init__(self, config: TyphonConfig):
        from workers.celery_app import create_app

        self.url = config.broker_url or ""
        self.config = config
        self.app = create_app(config)
        self._checked = False

    def check(self) -> None:
        from workers.celery_app import check_broker

        check_broker(self.app, self.url)
        self._checked = True

    def dispatch(self, run: RunRecord, queue_name: str) -> None:
        from workers.celery_app import publish

        if not self._checked:
            self.check()
        publish(self.app, self.config, run)  # to the run's pool queue, as queue_name names

    def close(self) -> None:
        self.app.close()


class RunHandle:
    """A submitted run: poll it, wait for it, cancel it."""

    def __init__(self, typhon: Typhon, run_id: str):
        self._typhon = typhon
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"

    def status(self) -> RunStatus:
        return self._typhon.store.status(self.run_id)

    def result(self) -> RunRecord:
        return self._typhon.store.get(self.run_id)

    def cancel(self) -> bool:
        return self._typhon.cancel(self.run_id)

    def wait(self, timeout: float | None = None, *, poll_s: float = 0.5) -> RunRecord:
        """Block until the run finishes or waits for a person; RunTimeoutError after
        ``timeout`` seconds.

        Wakes on the run's finished notification; ``poll_s`` is only the fallback interval at
        which the store is read again in case a notification was lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self._typhon.store
        with self._typhon.runtime.notifier.subscribe(self.run_id) as subscription:
            while True:
                record = store.get(self.run_id)
                if record.status.finished or record.status is RunStatus.WAITING:
                    return record
                left = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
                if left <= 0:
                    raise RunTimeoutError(self.run_id, timeout or 0)
                subscription.wait(left)


class Typhon:
    """Submit crews, follow runs. ``Typhon.from_config()`` reads typhon.yaml and TYPHON_* vars."""

    def __init__(
        self,
        config: TyphonConfig | None = None,
        *,
        registry: CrewRegistry | None = None,
        store: RunStore | None = None,
        models: ModelRegistry | None = None,
        dispatcher: Dispatcher | None = None,
    ):
        self.config = config or TyphonConfig()
        self.runtime = Runtime(self.config, store=store, registry=registry, models=models)
        self.store = self.runtime.store
        self.crews = self.runtime.registry
        self.dispatcher = dispatcher or (
            CeleryDispatcher(self.config)
            if self.config.broker_url
            else InProcessDispatcher(self.runtime)
        )
        if isinstance(self.dispatcher, InProcessDispatcher):
            # runs left `running` by an embedded process that died can only be failed
            reap(self.config, self.store, None)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Typhon:
        return cls(load_config(path), **kwargs)

    def __enter__(self) -> Typhon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.dispatcher.close()
        self.runtime.close()

    @property
    def embedded(self) -> bool:
        return isinstance(self.dispatcher, InProcessDispatcher)

    def route_for(self, crew: str, input: str, model: str | None = None) -> Route:
        """The route a run of ``crew`` on ``input`` would take. The category: the crew's own
        (settings, then class), else the one the router reads in the input. The model: an
        explicit alias, the crew's fixed one, else the active routing rules' for the category."""
        cls = self.crews.get(crew)
        settings = self.config.crew_settings(crew)
        category = settings.category or cls.category
        fixed = model or settings.model or cls.model
        why = "model given" if model else "model fixed by the crew"
        return self.runtime.router.route(input, category=category, model=fixed, fixed_by=why)

    def submit(self, crew: str, input: str, **options: Any) -> RunHandle:
        """Validate, route, record the run as queued and dispatch it. Bad input stores nothing."""
        with telemetry.span(
            f"typhon.submit {crew}", kind=telemetry.SpanKind.PRODUCER,
            attributes={"typhon.crew": crew, "gen_ai.agent.name": crew},
        ) as span:  # fmt: skip
            handle = self._submit(crew, input, options)
            span.set_attribute("typhon.run_id", handle.run_id)
            return handle

    def _submit(self, crew: str, input: str, options: dict[str, Any]) -> RunHandle:
        cls = self.crews.get(crew)
        model = options.pop("model", None)
        request = RunRequest.create(crew, input, options)
        if model is not None and not isinstance(model, str):
            raise InputError("model must be an alias from the model list")
        try:
            route = self.route_for(crew, request.input, model)
        except TyphonError as exc:
            raise InputError(str(exc)) from None
        pool = self.config.pool(self.config.crew_settings(crew).pool or cls.pool)
        traceparent = telemetry.inject()  # how the worker joins this trace
        record = self.store.create_run(
            crew=crew,
            input=request.input,
            pool=pool.name,
            options={**request.options, **({"_traceparent": traceparent} if traceparent else {})},
            model=route.model,
            backend=route.backend,
            category=route.category,
            rules_version=route.rules_version,
        )
        try:
            self.dispatcher.dispatch(record, pool.queue)
        except DispatchError as exc:
            self.store.finish(record.id, RunStatus.FAILED, error=str(exc))
            raise
        log.info(
            "run queued", run_id=record.id, crew=crew, pool=pool.name, model=route.model,
            category=route.category, rules_version=route.rules_version,
        )  # fmt: skip
        return RunHandle(self, record.id)

    def run(self, run_id: str) -> RunHandle:
        self.store.status(run_id)  # raises RunNotFoundError
        return RunHandle(self, run_id)

    def runs(self, *, limit: int = 50, crew: str | None = None) -> list[RunRecord]:
        return self.store.list_runs(limit=limit, crew=crew)

    def republisher(self) -> Callable[[RunRecord], None] | None:
        """How the reaper hands a run back to its queue; None in embedded mode."""
        if not isinstance(self.dispatcher, CeleryDispatcher):
            return None
        dispatcher = self.dispatcher

        def republish(run: RunRecord) -> None:
            dispatcher.dispatch(run, self.config.pool(run.pool).queue)

        return republish

    def pools(self) -> dict[str, Any]:
        """Each pool's limits and live use: runs running/queued (store), slots held (leases)."""
        counts = self.store.counts()
        slots = self.runtime.slots.in_use()
        cluster = self.config.cluster
        return {
            "pools": [
                {
                    "name": p.name,
                    "queue": p.queue,
                    "cap": p.cap,
                    "burst_cap": p.ceiling,
                    "cpuset": p.cpuset,
                    "running": counts.get(p.name, {}).get("running", 0),
                    "queued": counts.get(p.name, {}).get("queued", 0),
                    "slots_in_use": slots.get(p.name, 0),
                }
                for p in self.config.pools
            ],
            "cluster": {
                "sustained": cluster.sustained,
                "burst": cluster.burst,
                "burst_cpuset": cluster.burst_cpuset,
                "slots_in_use": slots.get("_cluster", 0),
            },
        }

    def approve(self, run_id: str, *, note: str = "", by: str = "") -> RunHandle:
        """Let a run that waits for approval go on to its result."""
        return self._answer(run_id, "approved", note, by)

    def reject(self, run_id: str, *, note: str = "", by: str = "") -> RunHandle:
        """Send a waiting run back with a note (it revises while its budget lasts)."""
        return self._answer(run_id, "rejected", note, by)

    def _answer(self, run_id: str, decision: str, note: str, by: str) -> RunHandle:
        record = self.store.resume(run_id, decision, {"note": note, "by": by})
        if record is None:
            status = self.store.status(run_id)  # RunNotFoundError for an unknown id
            raise InputError(
                f"run {run_id} is {status.value}, not waiting for approval;"
                " only a waiting run can be approved or rejected"
            )
        try:
            self.dispatcher.dispatch(record, self.config.pool(record.pool).queue)
        except DispatchError as exc:
            self.store.finish(record.id, RunStatus.FAILED, error=str(exc))
            raise
        log.info("run resumed", run_id=run_id, decision=decision)
        return RunHandle(self, run_id)

    def cancel(self, run_id: str) -> bool:
        """Cancel a queued, running or waiting run; False when it had already finished."""
        cancelled = self.store.cancel(run_id)
        if cancelled:
            self.runtime.notifier.publish(run_id)
        return cancelled
