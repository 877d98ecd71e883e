"""Log lines: JSON when not on a terminal, run_id on every line a run writes (ours or not)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from typhon import RunContext, RunStatus, Typhon
from typhon.config import TyphonConfig
from typhon.crews import CrewRegistry, crew
from typhon.logging import configure_logging


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("info", stream=stream)  # a StringIO is not a terminal: JSON
    yield stream
    root.handlers[:], root.level = saved
    structlog.reset_defaults()


def test_run_lines_are_json_with_run_id(captured: io.StringIO, home: Path) -> None:
    registry = CrewRegistry(builtins={})

    @crew("chatty", registry=registry)
    def chatty(ctx: RunContext) -> str:
        ctx.step("one")
        logging.getLogger("somelib").warning("third-party line")
        return "ok"

    with Typhon(TyphonConfig(home=home), registry=registry) as typhon:
        record = typhon.submit("chatty", "x").wait(30)
    assert record.status is RunStatus.SUCCEEDED
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    during = [line for line in lines if line.get("event") != "run queued"]
    assert {line["event"] for line in during} >= {"run started", "step", "third-party line"}
    assert all(line["run_id"] == record.id for line in during), during
    third = next(line for line in during if line["event"] == "third-party line")
    assert (third["logger"], third["level"], third["crew"]) == ("somelib", "warning", "chatty")
