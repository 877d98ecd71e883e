"""What a process needs to run crews (config, store, crews, models), and the task body itself.

:func:`execute_run` is the one piece of code that runs a crew. The Celery task and the in-process
dispatcher both call it, so embedded and cluster runs behave the same.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import structlog

from typhon._notify import Notifier, notifier_for
from typhon._types import RunRecord, RunStatus, Usage
from typhon.config import TyphonConfig
from typhon.context import RunContext
from typhon.crews import CrewOutput, CrewRegistry, default_registry
from typhon.errors import RunCancelled, TyphonError
from typhon.models import ModelRegistry, RecordingClient
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
    ):
        self.config = config
        self.notifier = notifier or notifier_for(config.broker_url)
        self.store = store or RunStore(config.effective_database_url)
        self.registry = registry or default_registry()
        self.registry.load_modules(config.crew_modules)
        self.models = models or ModelRegistry(config)

    @property
    def artifacts_root(self) -> Path:
        return self.config.home / "artifacts"

    def close(self) -> None:
        self.models.close()
        self.store.close()
        self.notifier.close()


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


def execute_run(runtime: Runtime, run_id: str) -> RunStatus:
    """Run one queued run to its outcome. Safe to call twice: only one call records an outcome."""
    store = runtime.store
    record = store.claim(run_id)
    if record is None:
        status = store.status(run_id)
        log.info("run not queued; skipped", run_id=run_id, status=status.value)
        return status
    with structlog.contextvars.bound_contextvars(run_id=run_id, crew=record.crew):
        outcome = _run(runtime, record)
    runtime.notifier.publish(run_id)
    return outcome


def _run(runtime: Runtime, record: RunRecord) -> RunStatus:
    store = runtime.store
    run_id, crew_name, alias = record.id, record.crew, record.model
    try:
        crew_cls = runtime.registry.get(crew_name)
        alias = alias or crew_cls.model or runtime.config.routing[crew_cls.category]
        ctx = RunContext(
            run_id=run_id,
            crew=crew_name,
            input=record.input,
            options=dict(record.options),
            settings=runtime.config.crew_settings(crew_name),
            config=runtime.config,
            model=_model_client(runtime, run_id, alias),
            artifacts_dir=runtime.artifacts_root / run_id,
            store=store,
        )
        log.info("run started", model=alias)
        result = crew_cls().run(ctx)
        output = result if isinstance(result, CrewOutput) else CrewOutput(str(result))
        artifacts = _write_artifacts(
            runtime.artifacts_root, run_id, {**ctx.artifacts, **output.artifacts}
        )
        recorded = store.finish(
            run_id, RunStatus.SUCCEEDED, output=output.text, artifacts=artifacts
        )
        outcome = RunStatus.SUCCEEDED
    except RunCancelled:
        recorded = store.cancel(run_id)
        outcome = RunStatus.CANCELLED
    except TyphonError as exc:  # ModelError included: its message names the alias and URL
        recorded = store.finish(run_id, RunStatus.FAILED, error=str(exc))
        outcome = RunStatus.FAILED
    except Exception as exc:
        log.error("crew raised", error=repr(exc), traceback=traceback.format_exc())
        recorded = store.finish(run_id, RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        outcome = RunStatus.FAILED
    if not recorded:
        outcome = store.status(run_id)
        log.info("outcome ignored: run already finished", status=outcome.value)
    else:
        log.info("run finished", status=outcome.value)
    return outcome


def _model_client(runtime: Runtime, run_id: str, alias: str) -> RecordingClient:
    """The run's model client: records usage on the run and stops at cancellation."""
    store = runtime.store

    def record(usage: Usage) -> None:
        store.add_usage(run_id, usage)

    def before() -> None:
        if store.status(run_id) is RunStatus.CANCELLED:
            raise RunCancelled(run_id)

    return RecordingClient(
        alias,
        runtime.models.endpoint(alias),
        lambda: runtime.models.client(alias),
        record=record,
        before=before,
    )
