"""Typhon's exceptions.

Every error a user can meet derives from :class:`TyphonError` and carries the data a caller needs
to act on it. Exceptions do not log; the CLI and the HTTP API turn them into one line or a 4xx.

    TyphonError
    ├── ConfigError              invalid or unreadable configuration (file, key)
    ├── InputError               a request refused before anything was stored
    │   └── UnknownCrewError     no crew registered under that name
    ├── RunNotFoundError         no run with that id
    ├── DispatchError            the run could not be handed to a worker
    │   └── BrokerUnavailableError
    ├── ModelError               a model call failed
    │   ├── ModelUnavailableError   endpoint unreachable or answering 5xx / 429 after retries
    │   └── ModelResponseError      endpoint answered, but not with what we asked for
    ├── CrewError                a crew failed for a reason of its own
    │   └── CrewTimeoutError     a crew ran past its time limit
    └── RunTimeoutError          waiting for a run took longer than asked

Control-flow signals are kept apart from failures:

    RunCancelled                 raised inside a crew when its run was cancelled
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "CrewError",
    "CrewTimeoutError",
    "DispatchError",
    "InputError",
    "ModelError",
    "ModelResponseError",
    "ModelUnavailableError",
    "RunCancelled",
    "RunNotFoundError",
    "RunTimeoutError",
    "TyphonError",
    "UnknownCrewError",
]


class TyphonError(Exception):
    """Base class of every Typhon error. ``code`` is stable and used by the HTTP API."""

    code = "typhon_error"
    exit_code = 1


class ConfigError(TyphonError):
    """The configuration is invalid. ``source`` names the file, ``key`` the setting."""

    code = "invalid_config"
    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        where = ", ".join(p for p in (source, f"key '{key}'" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class InputError(TyphonError):
    """A request was refused before anything was stored."""

    code = "invalid_input"
    exit_code = 2


class UnknownCrewError(InputError):
    code = "unknown_crew"

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(
            f"unknown crew '{name}'; known crews: {', '.join(known) or '(none registered)'}"
        )


class RunNotFoundError(TyphonError):
    code = "run_not_found"
    exit_code = 2

    def __init__(self, run_id: str):
        self.run_id = run_id
        super().__init__(f"no run with id '{run_id}'; list runs with `typhon runs`")


class DispatchError(TyphonError):
    code = "dispatch_failed"


class BrokerUnavailableError(DispatchError):
    code = "broker_unavailable"

    def __init__(self, url: str, reason: str = ""):
        self.url = url
        super().__init__(
            f"cannot reach broker at {url}"
            + (f" ({reason})" if reason else "")
            + "; start it or unset broker_url to run in-process"
        )


class ModelError(TyphonError):
    """A model call failed. ``alias`` is the model alias, ``url`` the endpoint."""

    code = "model_error"

    def __init__(self, message: str, *, alias: str, url: str, retryable: bool = False):
        self.alias = alias
        self.url = url
        self.retryable = retryable  # another try may well succeed (garbled or cut-off answer)
        self.status: int | None = None  # the HTTP status that refused the request, if any
        super().__init__(message)


class ModelUnavailableError(ModelError):
    code = "model_unavailable"
    refused = False  # the connection itself was refused: the server is not there at all


class ModelResponseError(ModelError):
    code = "model_bad_response"
    content: str | None = None  # the whole unusable answer, when there was one


class CrewError(TyphonError):
    code = "crew_failed"


class CrewTimeoutError(CrewError):
    code = "crew_timeout"

    def __init__(self, run_id: str, limit_s: float):
        self.run_id = run_id
        self.limit_s = limit_s
        super().__init__(f"run {run_id} ran past its time limit of {limit_s:g}s and was stopped")


class RunTimeoutError(TyphonError):
    code = "timeout"

    def __init__(self, run_id: str, timeout: float):
        self.run_id = run_id
        super().__init__(f"run {run_id} did not finish within {timeout:g}s; it keeps running")


class RunCancelled(Exception):
    """Raised inside a crew's thread when its run was cancelled; not a failure."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        super().__init__(f"run {run_id} was cancelled")


class RunWaiting(Exception):
    """Raised by a crew to stop and wait for a person (``reason``: ``approval``); the run is
    recorded as waiting and gives its worker slot back until it is approved or rejected."""

    def __init__(self, run_id: str, reason: str = "approval"):
        self.run_id = run_id
        self.reason = reason
        super().__init__(f"run {run_id} waits for {reason}")
