"""The typed context a crew runs with."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from typhon._types import RunStatus
from typhon.config import CrewSettings, TyphonConfig
from typhon.errors import RunCancelled
from typhon.models import ModelClient
from typhon.store import RunStore

if TYPE_CHECKING:
    from typhon.memory import Memory, MemoryRecord

__all__ = ["RunContext"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")


@dataclass
class RunContext:
    """Everything a crew may use: its input, a model client, progress reporting, artifacts.

    ``model`` records token usage on the run and raises :class:`RunCancelled` before a call
    when the run was cancelled, so a crew needs no cancellation code of its own.
    """

    run_id: str
    crew: str
    input: str
    options: dict[str, Any]
    settings: CrewSettings
    config: TyphonConfig
    model: ModelClient
    artifacts_dir: Path
    store: RunStore
    log: Any = field(default=None)
    artifacts: dict[str, str | bytes] = field(default_factory=dict)
    guard: Callable[[], None] | None = None
    memory: Memory | None = None  # None when memory is off for this run
    # The crew's prompt version for this run (typhon.improve): its texts and demonstrations.
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    demos: list[dict[str, str]] = field(default_factory=list)
    prompt_version: int | None = None

    def prompt(self, part: str, name: str, default: str = "") -> str:
        """One text of this run's prompt version, e.g. ``ctx.prompt("writer", "task")``."""
        return self.prompts.get(part, {}).get(name, default)

    def demo_messages(self) -> list[dict[str, str]]:
        """The version's demonstrations as chat turns to put before the request."""
        from typhon.improve._prompts import demo_messages

        return demo_messages(self.demos)

    def demo_text(self) -> str:
        """The demonstrations as text for a task description ("" when there are none)."""
        if not self.demos:
            return ""
        parts = [f"Input: {d.get('input', '')}\nOutput: {d.get('output', '')}" for d in self.demos]
        return "Examples of good results:\n\n" + "\n\n".join(parts) + "\n\n"

    def recall(self, query: str | None = None) -> list[MemoryRecord]:
        """The semantic and episodic memories most relevant to ``query`` (default: the run's
        input), within the configured count and token budget; [] when memory is off."""
        if self.memory is None:
            return []
        cfg = self.config.memory
        try:
            return self.memory.recall(
                query or self.input, crew=self.crew, k=cfg.recall_k,
                token_budget=cfg.recall_token_budget,
            )  # fmt: skip
        except Exception as exc:  # memory is an aid: a run goes on without it
            self.log.warning("memory recall failed; going on without it", error=str(exc))
            return []

    def remember(self, key: str, value: Any) -> None:
        """Working memory: keep ``value`` under ``key`` for the rest of this run."""
        if self.memory is not None:
            self.memory.backend.working.put(self.run_id, key, value)

    def recalled(self, key: str, default: Any = None) -> Any:
        """Working memory: what ``remember`` kept under ``key`` in this run."""
        if self.memory is None:
            return default
        return self.memory.backend.working.get(self.run_id, key, default)

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = structlog.get_logger("typhon.crew").bind(run_id=self.run_id, crew=self.crew)

    def check_cancelled(self) -> None:
        """Raise RunCancelled if the run was cancelled (CrewTimeoutError past its time limit)."""
        if self.guard is not None:
            self.guard()
        elif self.store.status(self.run_id) is RunStatus.CANCELLED:
            raise RunCancelled(self.run_id)

    def step(self, name: str, **data: Any) -> None:
        """Report progress (shown by ``typhon run``, kept in the run's events)."""
        self.check_cancelled()
        self.store.add_event(self.run_id, "step", {"name": name, **data})
        self.log.info("step", step=name, **data)

    def approval(self) -> dict[str, Any] | None:
        """The person's answer after this run waited for approval: ``{"decision": "approved"
        | "rejected", "note": ..., "by": ...}`` from the latest approve/reject; None if none
        came since the run last started waiting."""
        answer: dict[str, Any] | None = None
        for event in self.store.events(self.run_id):
            if event.kind == "waiting":
                answer = None
            elif event.kind in ("approved", "rejected"):
                answer = {"decision": event.kind, **event.data}
        return answer

    def add_artifact(self, name: str, content: str | bytes) -> None:
        """Keep a file with the run, written under ``$TYPHON_HOME/artifacts/RUN_ID/`` at the end."""
        if not _SAFE_NAME.match(name):
            raise ValueError(f"artifact name '{name}' must be a plain file name")
        self.artifacts[name] = content
