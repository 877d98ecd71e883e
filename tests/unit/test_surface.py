"""The public surface: exported names, and no heavy work at import."""

from __future__ import annotations

import json
import subprocess
import sys

import typhon


def test_exported_names_are_pinned() -> None:
    assert typhon.__all__ == [
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
    for name in typhon.__all__:
        assert getattr(typhon, name) is not None


def _modules_after(code: str) -> dict[str, bool]:
    probe = (
        f"{code}\nimport json, sys, threading\n"
        "print(json.dumps({'crewai': 'crewai' in sys.modules, 'langgraph': 'langgraph' in "
        "sys.modules, 'celery': 'celery' in sys.modules, 'threads': threading.active_count()}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_import_typhon_is_light() -> None:
    loaded = _modules_after("import typhon")
    assert loaded == {"crewai": False, "langgraph": False, "celery": False, "threads": 1}


def test_api_and_crew_registry_stay_light() -> None:
    """Typhon's API, even with the research crew looked up, imports no crewai or langgraph."""
    loaded = _modules_after(
        "import typhon\ntyphon.Typhon\nfrom typhon.crews import default_registry\n"
        "default_registry().get('research')"
    )
    assert loaded["crewai"] is False and loaded["langgraph"] is False


def test_research_crew_description_without_crewai() -> None:
    from typhon.crews import default_registry

    cls = default_registry().get("research")
    assert (cls.name, cls.pool, cls.category) == ("research", "research", None)


def test_tests_cannot_leave_loopback() -> None:
    """The suite's guard (conftest) stops any connection to anything but loopback."""
    import socket

    import pytest

    with socket.socket() as sock, pytest.raises(AssertionError, match="only loopback"):
        sock.connect(("203.0.113.7", 80))  # TEST-NET-3: documentation only, never routed
