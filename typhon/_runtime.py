"""What a process needs to run crews (config, store, crews, models), and the task body itself.

:func:`execute_run` is the one piece of code that runs a crew. The Celery task and the in-process
dispatcher both call it, so embedded and cluster runs behave the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
import structlog

from typhon import telemetry
from typhon._notify import MESSAGE, Notifier, RedisNotifier, channel, notifier_for
from typhon._types import RunRecord, RunStatus, Usage
from typhon.config import CrewSettings, TyphonConfig
from typhon.context import RunContext
from typhon.crews import Crew, CrewOutput, CrewRegistry, default_registry
from typhon.errors import (
    CrewTimeoutError,
    ModelError,
    ModelUnavailableError,
    RunCancelled,
    RunWaiting,
    TyphonError,
)
from typhon.improve._prompts import PromptVersion, PromptVersions, code_prompts
from typhon.improve._review import queue_review
from typhon.memory import Memory, open_memory
from typhon.memory._cache import CachingClient, prompt_version_of
from typhon.models import (
    ChatResult,
    ModelClient,
    ModelRegistry,
    RecordingClient,
    Router,
    endpoint_of,
)
from typhon.resources import parse_cpuset
from typhon.resources.slots import Lease, RedisSlots, Slots, acquire, slots_for
from typhon.store import RunStore

__all__ = ["Runtime", "execute_run"]

log = structlog.get_logger("typhon.worker")


class Runtime:
    """Per-process state, built from the configuration. ``close()`` stops what it started."""

    def __init__(
        self,
        config: TyphonConfig,
        *,
        store: RunStore | None = None,
        registry: CrewRegistry | None = None,
        models: ModelRegistry | None = None,
        notifier: Notifier | None = None,
        slots: Slots | None = None,
        pin_burst: bool = False,
    ):
        self.config = config
        telemetry.configure(config)
        self.notifier = notifier or notifier_for(config.broker_url)
        self.slots = slots or slots_for(config.broker_url, config.cluster)
        self.pin_burst = pin_burst  # only worker processes move to the burst CPU set
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.store = store or RunStore(config.effective_database_url)
        self.registry = registry or default_registry()
        self.registry.load_modules(config.crew_modules)
        self.models = models or ModelRegistry(config)
        self._router: Router | None = None
        self._memory: Memory | None = None
        self._memory_state = "closed"  # closed | open | off
        self._memory_lock = threading.Lock()
        self.heartbeats = _Heartbeats(self)
        # Slots and notifications on the same Redis: releasing a run's slots also publishes its
        # notification, in one script (one round trip for both).
        slots, notifier = self.slots, self.notifier
        self._publishing_slots = (
            slots
            if isinstance(slots, RedisSlots)
            and isinstance(notifier, RedisNotifier)
            and slots.url == notifier.url
            else None
        )

    @property
    def artifacts_root(self) -> Path:
        return self.config.home / "artifacts"

    @property
    def memory(self) -> Memory | None:
        """This process's memory, opened on first use; None when it is off."""
        with self._memory_lock:
            if self._memory_state == "closed":
                try:
                    self._memory = open_memory(self.config, self.store, self.models)
                    self._memory_state = "open"
                except TyphonError as exc:
                    log.warning("memory off: cannot open it", error=str(exc))
                    self._memory_state = "off"
            return self._memory

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self.config, self.store, self.models)
        return self._router

    def release(self, lease: Lease, *, notify: bool) -> None:
        """Free a run's slots, then, with ``notify``, tell its waiters that it has finished."""
        if notify and self._publishing_slots is not None:
            self._publishing_slots.release(lease, publish=(channel(lease.run_id), MESSAGE))
            return
        self.slots.release(lease)
        if notify:
            self.notifier.publish(lease.run_id)

    def close(self) -> None:
        self.heartbeats.close()
        with self._memory_lock:
            memory, self._memory, self._memory_state = self._memory, None, "off"
        if memory is not None:  # a run still finishing on another thread reopens nothing
            memory.close()
        self.models.close()
        self.store.close()
        self.notifier.close()
        self.slots.close()
        telemetry.shutdown()


def _write_artifacts(root: Path, run_id: str, artifacts: dict[str, str | bytes]) -> list[str]:
    if not artifacts:
        return []
    folder = root / run_id
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name, content in artifacts.items():
        path = folder / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        tmp.replace(path)
        written.append(str(path))
    return written


class _Guard:
    """Per run: stops the crew (at its next step or model call) when the run was cancelled or
    taken back by the reaper, or when it passes its soft time limit."""

    def __init__(self, store: RunStore, run_id: str, attempt: int, limit_s: float):
        self.store = store
        self.run_id = run_id
        self.attempt = attempt
        self.limit_s = limit_s
        self.deadline = time.monotonic() + limit_s

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def __call__(self) -> None:
        record = self.store.get(self.run_id)
        if record.status is not RunStatus.RUNNING or record.attempts != self.attempt:
            raise RunCancelled(self.run_id)
        if self.expired:
            raise CrewTimeoutError(self.run_id, self.limit_s)


class _Heartbeats:
    """One thread per process: every third of the lease TTL it renews the slot leases of the
    runs this process is running and marks each of those runs alive in the store.

    A run is beaten from :meth:`beating` entry to exit; exit waits for a renewal of that run
    that is under way, so that no renewal retakes slots after they have been released."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime
        self._lock = threading.Lock()
        self._beats: set[_Beat] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def beating(self, run_id: str, lease: Lease) -> Iterator[None]:
        beat = _Beat(run_id, lease)
        with self._lock:
            self._beats.add(beat)
            if self._thread is None or not self._thread.is_alive():  # first run, or forked
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._loop, name="typhon-heartbeat", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._beats.discard(beat)
            # wait out a renewal under way (bounded, as a thread join would be)
            got = beat.lock.acquire(timeout=5)
            beat.ended = True
            if got:
                beat.lock.release()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _loop(self) -> None:
        interval = self._runtime.config.cluster.lease_ttl_s / 3
        while not self._stop.wait(interval):
            with self._lock:
                beats = list(self._beats)
            # leases first: a slow database must not let them expire
            for step in (self._renew, self._heartbeat):
                for beat in beats:
                    with beat.lock:
                        if not beat.ended:
                            step(beat)

    def _renew(self, beat: _Beat) -> None:
        try:
            if not self._runtime.slots.renew(beat.lease):
                log.warning("slot lease lost and not retaken", run_id=beat.run_id)
        except Exception as exc:  # Redis away: keep running, retry later
            log.warning("heartbeat failed; retrying", run_id=beat.run_id, error=str(exc))

    def _heartbeat(self, beat: _Beat) -> None:
        try:
            self._runtime.store.heartbeat(beat.run_id)
        except Exception as exc:  # the database away: keep running, retry later
            log.warning("heartbeat failed; retrying", run_id=beat.run_id, error=str(exc))


class _Beat:
    """A run being beaten: its lease, and a lock held while it is renewed."""

    __slots__ = ("ended", "lease", "lock", "run_id")

    def __init__(self, run_id: str, lease: Lease):
        self.run_id = run_id
        self.lease = lease
        self.lock = threading.Lock()
        self.ended = False


def _pin_burst(runtime: Runtime, lease: Lease) -> set[int] | None:
    """Move this process to the burst CPU set while it runs a run on a burst slot."""
    cpus = runtime.config.cluster.burst_cpuset
    if not (lease.burst and cpus and runtime.pin_burst):
        return None
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, parse_cpuset(cpus))
    except OSError as exc:
        log.warning("cannot move to the burst CPU set", cpuset=cpus, error=str(exc))
        return None
    return before


def execute_run(runtime: Runtime, run_id: str, pool_name: str | None = None) -> RunStatus:
    """Run one queued run to its outcome. Safe to call twice: only one call records an outcome.

    Waits for a pool slot and a cluster slot (leases), claims the run, and heartbeats while the
    crew works; the slots are released whatever happens."""
    store = runtime.store
    pool = runtime.config.pool(pool_name or store.get(run_id).pool)

    def still_queued() -> None:
        if store.status(run_id) is not RunStatus.QUEUED:
            raise RunCancelled(run_id)

    try:
        lease = acquire(runtime.slots, pool, run_id, check=still_queued)
    except RunCancelled:
        status = store.status(run_id)
        log.info("run left the queue while waiting for a slot", run_id=run_id, status=status.value)
        return status
    ran = False  # the crew ran to an outcome (recorded or not): its waiters are told
    try:
        claimed = store.claim(run_id, worker=runtime.worker_name)
        if claimed is None:
            status = store.status(run_id)
            log.info("run not queued; skipped", run_id=run_id, status=status.value)
            return status
        if lease.burst:
            store.add_event(run_id, "burst", {"pool_slot": lease.pool_slot,
                                              "cluster_slot": lease.cluster_slot})  # fmt: skip
        pinned = _pin_burst(runtime, lease)
        try:
            with (
                runtime.heartbeats.beating(run_id, lease),
                structlog.contextvars.bound_contextvars(run_id=run_id, crew=claimed.crew),
            ):
                outcome = _run(runtime, claimed)
        finally:
            if pinned is not None:
                os.sched_setaffinity(0, pinned)
        ran = True
    finally:
        runtime.release(lease, notify=ran)
    return outcome


def _run(runtime: Runtime, record: RunRecord) -> RunStatus:
    with telemetry.span(
        f"typhon.execute_run {record.crew}",
        kind=telemetry.SpanKind.CONSUMER,
        parent=record.options.get("_traceparent"),
        attributes={
            "typhon.run_id": record.id, "typhon.crew": record.crew, "typhon.pool": record.pool,
            "typhon.attempt": record.attempts, "typhon.worker": runtime.worker_name,
            "messaging.system": "celery" if runtime.config.broker_url else None,
        },
    ) as span:  # fmt: skip
        outcome = _run_traced(runtime, record)
        span.set_attribute("typhon.status", outcome.value)
        return outcome


def _run_traced(runtime: Runtime, record: RunRecord) -> RunStatus:
    settings = runtime.config.crew_settings(record.crew)
    guard = _Guard(runtime.store, record.id, record.attempts, settings.timeout_s)
    outcome = RunStatus.FAILED
    try:
        recorded, outcome = _run_with_retries(runtime, record, guard, settings)
    finally:
        if outcome is not RunStatus.WAITING:  # a waiting run keeps its working memory
            _forget_working(runtime, record.id)
    if outcome is RunStatus.WAITING and recorded:
        log.info("run waiting", status=outcome.value)
        return outcome
    if not recorded:
        outcome = runtime.store.status(record.id)
        log.info("outcome ignored: run already finished or taken back", status=outcome.value)
    else:
        log.info("run finished", status=outcome.value)
        _remember_outcome(runtime, record.id)
        queue_review(runtime, record.id)
    return outcome


def _memory_for(runtime: Runtime, record: RunRecord) -> Memory | None:
    if record.options.get("no_memory"):
        return None
    return runtime.memory


def _forget_working(runtime: Runtime, run_id: str) -> None:
    """Working memory lives and dies with the run."""
    memory = runtime._memory  # only if this run opened it
    if memory is None:
        return
    try:
        memory.backend.working.clear(run_id)
    except Exception as exc:  # memory is an aid: it never fails a run
        log.warning("could not clear working memory", error=str(exc))


def _remember_outcome(runtime: Runtime, run_id: str) -> None:
    """After a run: its outcome as an episode, its model calls into model performance."""
    record = runtime.store.get(run_id)
    memory = _memory_for(runtime, record)
    if memory is None:
        return
    status = record.status.value
    text = f"{record.crew} run {status}: {record.input[:400]}"
    if record.output:
        text += f"\n-> {record.output[:800]}"
    if record.error:
        text += f"\n(error: {record.error[:300]})"
    meta = {
        "status": status, "model": record.model, "category": record.category,
        "rules_version": record.rules_version, "degraded": record.degraded,
        "tokens": record.usage.total_tokens,
    }  # fmt: skip
    tags = tuple(t for t in (status, record.category, record.model) if t)
    try:
        memory.backend.episodic.add(
            text, crew=record.crew, run_id=record.id, kind="run", tags=tags, meta=meta
        )
        by_alias = runtime.store.run_calls_by_alias(record.id) or [
            {"alias": record.model or "", "calls": 0}
        ]
        for i, calls in enumerate(by_alias):
            alias = str(calls.pop("alias"))
            if not alias:
                continue
            first = i == 0
            memory.backend.performance.record(
                alias, record.category, runs=int(first),
                runs_ok=int(first and record.status is RunStatus.SUCCEEDED), **calls,
            )  # fmt: skip
    except Exception as exc:  # memory is an aid: it never fails a run
        log.warning("could not record the run in memory", error=str(exc))


def _run_with_retries(
    runtime: Runtime, record: RunRecord, guard: _Guard, settings: CrewSettings
) -> tuple[bool, RunStatus]:
    """Run the crew; after a transient model error, run it again (exponential backoff)."""
    store, run_id, max_retries = runtime.store, record.id, settings.max_retries
    contexts: list[RunContext] = []

    def kept() -> list[str]:
        """What the crew kept before it stopped (a failed run keeps its artifacts too)."""
        return _write_artifacts(
            runtime.artifacts_root, run_id, contexts[-1].artifacts if contexts else {}
        )

    for retry in range(max_retries + 1):
        try:
            output = _attempt(runtime, record, record.model, guard, contexts)
        except RunCancelled:
            return False, RunStatus.CANCELLED
        except RunWaiting as exc:
            waiting = store.wait(
                run_id, reason=exc.reason, attempt=record.attempts, artifacts=kept()
            )
            log.info("run waits", reason=exc.reason)
            return waiting, RunStatus.WAITING
        except ModelUnavailableError as exc:
            if retry == max_retries or guard.expired:
                failed = store.finish(
                    run_id, RunStatus.FAILED, error=str(exc), attempt=record.attempts,
                    artifacts=kept(),
                )  # fmt: skip
                return failed, RunStatus.FAILED
            delay = min(settings.retry_backoff_s * 2.0**retry, 60.0)
            store.add_event(
                run_id, "retry", {"retry": retry + 1, "delay_s": delay, "error": str(exc)}
            )
            log.warning("transient model error; retrying", error=str(exc), delay_s=delay)
            if not _sleep_unless_stopped(guard, delay):
                return False, RunStatus.CANCELLED
            continue
        except Exception as exc:
            if not isinstance(exc, TyphonError):
                log.error("crew raised", error=repr(exc), traceback=traceback.format_exc())
            error = _describe(exc, guard)
            failed = store.finish(
                run_id, RunStatus.FAILED, error=error, attempt=record.attempts, artifacts=kept()
            )
            return failed, RunStatus.FAILED
        artifacts = _write_artifacts(runtime.artifacts_root, run_id, output.artifacts)
        done = store.finish(
            run_id, RunStatus.SUCCEEDED, output=output.text, artifacts=artifacts,
            attempt=record.attempts,
        )  # fmt: skip
        return done, RunStatus.SUCCEEDED
    raise AssertionError("unreachable")


def _describe(exc: BaseException, guard: _Guard) -> str:
    if isinstance(exc, CrewTimeoutError) or guard.expired:
        return str(CrewTimeoutError(guard.run_id, guard.limit_s))
    if isinstance(exc, TyphonError):  # ModelError's message names the alias and URL
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _sleep_unless_stopped(guard: _Guard, seconds: float) -> bool:
    """Sleep, checking the guard each second; False when the run was cancelled meanwhile."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 1.0))
        try:
            guard()
        except RunCancelled:
            return False
    return True


def _attempt(
    runtime: Runtime,
    record: RunRecord,
    alias: str | None,
    guard: _Guard,
    contexts: list[RunContext],
) -> CrewOutput:
    crew_cls = runtime.registry.get(record.crew)
    if alias is None:  # recorded without a route (an older version): route it now
        alias = runtime.router.route(record.input, category=crew_cls.category).model
    version = _prompt_version(runtime, record, crew_cls)
    ctx = RunContext(
        run_id=record.id,
        crew=record.crew,
        input=record.input,
        options=dict(record.options),
        settings=runtime.config.crew_settings(record.crew),
        config=runtime.config,
        model=_model_client(runtime, record, alias, guard),
        artifacts_dir=runtime.artifacts_root / record.id,
        store=runtime.store,
        guard=guard,
        memory=_memory_for(runtime, record),
        prompts=version.prompts if version else code_prompts(crew_cls),
        demos=list(version.demos) if version else [],
        prompt_version=version.version if version else None,
    )
    contexts.append(ctx)
    log.info("run started", model=alias, attempt=record.attempts)
    with telemetry.span(
        f"invoke_agent {record.crew}",
        attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": record.crew,
            "gen_ai.request.model": alias, "typhon.run_id": record.id,
            "typhon.prompt_version": ctx.prompt_version,
        },
    ):  # fmt: skip
        result = crew_cls().run(ctx)
    output = result if isinstance(result, CrewOutput) else CrewOutput(str(result))
    return CrewOutput(output.text, {**ctx.artifacts, **output.artifacts})


def _prompt_version(
    runtime: Runtime, record: RunRecord, crew_cls: type[Crew]
) -> PromptVersion | None:
    """The prompt version this run uses: the one it already used (a retry or a resumed run),
    one the run asks for (``prompt_version``, or inline ``prompts``/``demos`` for evaluation),
    else the canary for its share of live runs or the active one; recorded on the run."""
    opts = record.options
    if isinstance(opts.get("prompts"), dict):
        return PromptVersion(
            crew=record.crew, version=int(opts.get("prompt_version") or 0), status="candidate",
            source="inline", prompts=opts["prompts"], demos=list(opts.get("demos") or []),
        )  # fmt: skip
    versions = PromptVersions(runtime.store)
    wanted = record.prompt_version or opts.get("prompt_version")
    if wanted:
        return versions.get(record.crew, int(wanted))
    try:
        chosen = versions.choose(record.crew, crew_cls)
        runtime.store.set_prompt_version(record.id, chosen.version)
    except sa.exc.SQLAlchemyError as exc:  # the loop's tables are an aid: run with the code's
        log.warning("prompt versions unavailable; using the crew's code", error=str(exc))
        return None
    return chosen


def _model_client(runtime: Runtime, run: RunRecord, alias: str, guard: _Guard) -> RecordingClient:
    """The run's model client: records usage on the run and every call's cost per model and
    category, marks the run degraded when a fallback answered, stops at cancellation or the time
    limit."""
    store, config = runtime.store, runtime.config

    def record(result: ChatResult) -> None:
        if result.url == "cache":  # answered by the semantic cache: no model call was made
            store.add_event(run.id, "cache_hit", {"model": alias})
            return
        used = result.alias or alias
        store.add_usage(run.id, result.usage)
        store.add_model_call(
            alias=used, requested=alias, url=result.url, usage=result.usage,
            gpu_s=result.usage.compute_s * _gpus(config, used, result.url),
            run_id=run.id, category=run.category,
        )  # fmt: skip
        if used != alias:
            reason = f"every replica of '{alias}' was down; '{used}' answered"
            if store.mark_degraded(run.id, requested=alias, used=used, reason=reason):
                log.warning("run degraded", requested=alias, used=used)

    def failed(exc: Exception, elapsed: float) -> None:
        if isinstance(exc, ModelError):
            store.add_model_call(
                alias=alias, requested=alias, url=exc.url, usage=Usage(calls=1, latency_s=elapsed),
                gpu_s=0.0, ok=False, error=str(exc)[:500], run_id=run.id, category=run.category,
            )  # fmt: skip

    def resolve() -> ModelClient:
        client = runtime.models.client(alias)
        memory = None if run.options.get("no_cache") else _memory_for(runtime, run)
        if memory is None or memory.cache is None:
            return client
        crew_cls = runtime.registry.get(run.crew)
        current = runtime.store.get(run.id)
        inline = run.options.get("prompts")
        if current.prompt_version and not inline:  # retired versions' entries get dropped
            version = f"{run.crew}:v{current.prompt_version}"
        else:
            version = prompt_version_of(
                crew_cls.name, inline or code_prompts(crew_cls), run.options.get("demos")
            )
        return CachingClient(client, memory.cache, prompt_version=version, alias=alias)

    return RecordingClient(
        alias,
        runtime.models.endpoint(alias),
        resolve,
        record=record,
        before=guard,
        failed=failed,
        span_attributes={"typhon.run_id": run.id, "gen_ai.agent.name": run.crew},
    )


def _gpus(config: TyphonConfig, alias: str, url: str) -> int:
    """GPUs one request to this deployment occupies (GPU-seconds = compute time x GPUs)."""
    entries = config.deployments(alias)
    for entry in entries:
        if endpoint_of(entry) == url:
            return entry.gpus
    return entries[0].gpus
