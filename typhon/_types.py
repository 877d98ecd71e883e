"""Data that crosses Typhon's rooms: run requests, run records, statuses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from typhon.errors import InputError

__all__ = [
    "MAX_INPUT_CHARS",
    "TERMINAL",
    "RunEvent",
    "RunRecord",
    "RunRequest",
    "RunStatus",
    "Usage",
]

MAX_INPUT_CHARS = 20_000


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # for a person (approval): holds no worker slot
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})


@dataclass(frozen=True)
class RunRequest:
    """What a trigger asks for. Built through :meth:`create`, which refuses bad input."""

    crew: str
    input: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, crew: str, input: str, options: dict[str, Any] | None = None) -> RunRequest:
        if not isinstance(input, str) or not input.strip():
            raise InputError("input is empty; give the crew something to work on")
        if len(input) > MAX_INPUT_CHARS:
            raise InputError(
                f"input is {len(input):,} characters, over the limit of {MAX_INPUT_CHARS:,};"
                " shorten it or pass documents with --docs"
            )
        return cls(crew=crew, input=input, options=dict(options or {}))


@dataclass(frozen=True)
class Usage:
    """Token usage and time spent in model calls. ``latency_s`` is wall time seen by the caller;
    ``compute_s`` the backend's own prompt + generation time where it reports one (llama-server's
    ``timings``, Ollama's durations), else the wall time."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    latency_s: float = 0.0
    compute_s: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.calls + other.calls,
            self.latency_s + other.latency_s,
            self.compute_s + other.compute_s,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RunRecord:
    """A run as the store holds it."""

    id: str
    crew: str
    input: str
    status: RunStatus
    options: dict[str, Any]
    pool: str
    model: str | None
    backend: str | None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output: str | None = None
    error: str | None = None
    usage: Usage = Usage()
    artifacts: list[str] = field(default_factory=list)
    attempts: int = 0
    heartbeat_at: datetime | None = None
    worker: str | None = None
    enqueued_at: datetime | None = None
    category: str | None = None
    rules_version: int | None = None
    degraded: bool = False  # a fallback model answered because the routed one was down
    prompt_version: int | None = None  # the crew's prompt version it used

    def to_json(self) -> dict[str, Any]:
        """The shape of ``typhon run --json`` and ``GET /v1/runs/{id}``."""
        return {
            "run_id": self.id,
            "crew": self.crew,
            "status": self.status.value,
            "input": self.input,
            "output": self.output,
            "error": self.error,
            "model": self.model,
            "backend": self.backend,
            "category": self.category,
            "rules_version": self.rules_version,
            "prompt_version": self.prompt_version,
            "degraded": self.degraded,
            "pool": self.pool,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.total_tokens,
                "calls": self.usage.calls,
                "latency_s": round(self.usage.latency_s, 3),
            },
            "artifacts": list(self.artifacts),
            "attempts": self.attempts,
            "worker": self.worker,
        }


@dataclass(frozen=True)
class RunEvent:
    run_id: str
    seq: int
    at: datetime
    kind: str
    data: dict[str, Any]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
