"""The router over a real run store (SQLite and PostgreSQL): rules versions seeded from the
configuration once, versions added and rolled back, each run recording the version that routed
it, and the ``typhon route`` / ``typhon routing`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from typhon.config import TyphonConfig
from typhon.crews import CrewRegistry, crew
from typhon.errors import InputError
from typhon.models import ModelRegistry, Router, rules_from_config
from typhon.orchestrator import Typhon
from typhon.store import RunStore
from typhon.testing import ScriptedModel, ScriptedModels

pytestmark = pytest.mark.integration

TYPHON = str(Path(sys.executable).parent / "typhon")

MODELS = [
    {"model_name": "fast", "litellm_params": {"model": "ollama/qwen2.5:7b", "api_base": "http://127.0.0.1:9"}},
    {"model_name": "big", "litellm_params": {"model": "openai/default", "api_base": "http://127.0.0.1:9/v1"}},
    {"model_name": "coder", "litellm_params": {"model": "ollama/qwen2.5-coder:7b", "api_base": "http://127.0.0.1:9"}},
]  # fmt: skip
ROUTING = {"simple": "fast", "complex": "big", "code": "coder", "creative": "big"}


def _config(home: Path, **over: object) -> TyphonConfig:
    data: dict[str, object] = {"home": home, "model_list": MODELS, "routing": ROUTING, **over}
    return TyphonConfig.model_validate(data)


def _router(config: TyphonConfig, store: RunStore) -> Router:
    return Router(config, store, ModelRegistry(config), ttl_s=0)


def test_rules_are_seeded_once_from_the_configuration(store: RunStore, home: Path) -> None:
    config = _config(home)
    first, second = _router(config, store), _router(config, store)
    assert first.rules().version == second.rules().version == 1
    assert len(store.rules_versions()) == 1
    row = store.active_rules()
    assert row is not None and row["source"] == "config"
    assert row["body"]["categories"]["code"] == {
        "model": "coder",
        "description": "Code generation, debugging, review",
    }


def test_a_changed_configuration_adds_a_version(store: RunStore, home: Path) -> None:
    _router(_config(home), store).rules()
    changed = _config(home, routing={**ROUTING, "code": "big"})
    rules = _router(changed, store).rules()
    assert rules.version == 2 and rules.models["code"] == "big"
    versions = store.rules_versions()
    assert [v["active"] for v in versions] == [False, True]
    assert versions[1]["parent"] == 1


def test_routes_follow_the_active_version_and_roll_back(store: RunStore, home: Path) -> None:
    config = _config(home)
    router = _router(config, store)
    code = "Fix this Python error: TypeError: 'NoneType' object is not subscriptable"
    route = router.route(code)
    assert (route.category, route.model, route.rules_version) == ("code", "coder", 1)
    assert route.backend == "http://127.0.0.1:9"
    body = {**rules_from_config(config), "source_hash": "improve-1"}
    body["categories"] = {**body["categories"], "code": {"model": "big", "description": "x"}}
    store.add_rules(body, source="improve", note="code does better on the 70B")
    moved = router.route(code)
    assert (moved.model, moved.rules_version) == ("big", 2)
    store.activate_rules(1)
    assert router.route(code).model == "coder"


def test_rules_naming_an_unconfigured_model_use_the_configuration(
    store: RunStore, home: Path
) -> None:
    config = _config(home)
    body = rules_from_config(config)
    body["categories"]["simple"] = {"model": "gone-model", "description": "x"}
    router = _router(config, store)
    router.rules()
    store.add_rules(body, source="improve")
    route = router.route("hello there!")
    assert route.model == "fast" and "gone-model" in route.reason


def test_empty_prompt_is_an_input_error(store: RunStore, home: Path) -> None:
    with pytest.raises(InputError, match="empty"):
        _router(_config(home), store).route("   ")


def test_a_run_records_category_model_and_rules_version(store: RunStore, home: Path) -> None:
    config = _config(home)
    registry = CrewRegistry(builtins={})
    crew("echo", registry=registry)(lambda ctx: ctx.model.chat([]).content)
    models = ScriptedModels(config, ScriptedModel("done"))
    with Typhon(config, store=store, registry=registry, models=models) as typhon:
        record = typhon.submit("echo", "Write a short poem about the sea at night").wait(60)
    assert record.output == "done" and models.asked == ["big"]
    assert record.category == "creative"
    assert (record.model, record.rules_version) == ("big", 1)
    assert record.to_json()["rules_version"] == 1
    queued = store.events(record.id)[0]
    assert queued.data["category"] == "creative" and queued.data["rules_version"] == 1


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TYPHON, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_route_command_json_and_history(tmp_path: Path) -> None:
    config = tmp_path / "typhon.yaml"
    config.write_text(
        json.dumps({"model_list": MODELS, "routing": ROUTING}), encoding="utf-8"
    )  # JSON is YAML
    env = {"TYPHON_CONFIG": str(config), "TYPHON_HOME": str(tmp_path / "h")}
    out = _cli("route", "hi! how are you today?", "--json", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"category", "model", "backend", "rules_version", "reason"}
    assert (data["category"], data["model"], data["rules_version"]) == ("simple", "fast", 1)
    assert data["backend"] == "http://127.0.0.1:9"
    empty = _cli("route", "  ", "--json", env=env)
    assert empty.returncode == 2 and "prompt is empty" in empty.stderr
    assert "Traceback" not in empty.stderr
    history = _cli("routing", "history", "--json", env=env)
    assert [v["version"] for v in json.loads(history.stdout)] == [1]
    missing = _cli("routing", "activate", "7", env=env)
    assert missing.returncode == 2 and "no routing rules v7" in missing.stderr
