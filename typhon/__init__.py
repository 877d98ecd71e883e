"""Typhon: multi-agent orchestration for self-hosted AI clusters.

Importing ``typhon`` is cheap: it starts nothing and imports neither crewai nor langgraph; the
names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Typhon": "typhon.orchestrator",
    "RunHandle": "typhon.orchestrator",
    "RunContext": "typhon.context",
    "Crew": "typhon.crews",
    "CrewOutput": "typhon.crews",
    "CrewRegistry": "typhon.crews",
    "crew": "typhon.crews",
    "RunRequest": "typhon._types",
    "RunRecord": "typhon._types",
    "RunStatus": "typhon._types",
    "Usage": "typhon._types",
    "TyphonConfig": "typhon.config",
    "load_config": "typhon.config",
    "TyphonError": "typhon.errors",
    "ConfigError": "typhon.errors",
    "InputError": "typhon.errors",
    "UnknownCrewError": "typhon.errors",
    "ModelError": "typhon.errors",
    "ModelUnavailableError": "typhon.errors",
    "BrokerUnavailableError": "typhon.errors",
    "RunNotFoundError": "typhon.errors",
    "RunTimeoutError": "typhon.errors",
    "RunCancelled": "typhon.errors",
}

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "Crew",
    "CrewOutput",
    "CrewRegistry",
    "InputError",
    "ModelError",
    "ModelUnavailableError",
    "RunCancelled",
    "RunContext",
    "RunHandle",
    "RunNotFoundError",
    "RunRecord",
    "RunRequest",
    "RunStatus",
    "RunTimeoutError",
    "Typhon",
    "TyphonConfig",
    "TyphonError",
    "UnknownCrewError",
    "Usage",
    "__version__",
    "crew",
    "load_config",
]

if TYPE_CHECKING:
    from typhon._types import RunRecord, RunRequest, RunStatus, Usage
    from typhon.config import TyphonConfig, load_config
    from typhon.context import RunContext
    from typhon.crews import Crew, CrewOutput, CrewRegistry, crew
    from typhon.errors import (
        BrokerUnavailableError,
        ConfigError,
        InputError,
        ModelError,
        ModelUnavailableError,
        RunCancelled,
        RunNotFoundError,
        RunTimeoutError,
        TyphonError,
        UnknownCrewError,
    )
    from typhon.orchestrator import RunHandle, Typhon


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'typhon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
