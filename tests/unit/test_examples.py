"""The shipped example crew registers and runs through the normal dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from typhon import RunStatus, Typhon
from typhon.config import TyphonConfig
from typhon.crews import default_registry
from typhon.testing import ScriptedModel, ScriptedModels


def test_example_crew_is_short_and_runs(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    source = REPO / "examples" / "custom_crew.py"
    assert len(source.read_text().splitlines()) < 30
    monkeypatch.syspath_prepend(str(source.parent))
    config = TyphonConfig(home=home, crew_modules=["custom_crew"])
    model = ScriptedModel("Rain taps the tin roof")
    with Typhon(config, models=ScriptedModels(config, model)) as typhon:
        record = typhon.submit("haiku", "autumn rain").wait(30)
    assert "haiku" in default_registry().names()
    assert record.status is RunStatus.SUCCEEDED
    assert record.output == "Rain taps the tin roof"
    assert "autumn rain" in model.calls[0]["messages"][-1]["content"]
    assert Path(record.artifacts[0]).read_text() == "Rain taps the tin roof"
