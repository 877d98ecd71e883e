"""The model list as users keep it: the seed's LiteLLM config verbatim, replica groups, fallbacks,
and the bad entries that must stop with a clear error naming the entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from typhon.config import RouterSettings, TyphonConfig, load_config
from typhon.errors import ConfigError
from typhon.models import endpoint_of
from typhon.models._inspect import list_models

TYPHON_BIN = str(Path(sys.executable).parent / "typhon")
SEED = Path(__file__).parents[1] / "data" / "seed_litellm.yaml"


def _config_file(tmp_path: Path, models: str, extra: str = "") -> Path:
    path = tmp_path / "typhon.yaml"
    path.write_text(textwrap.dedent(models) + textwrap.dedent(extra), encoding="utf-8")
    return path


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return info.value


def test_the_seed_litellm_config_loads_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "typhon.yaml"
    path.write_text(SEED.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_config(path, environ={"TYPHON_HOME": str(tmp_path / "h")})
    assert cfg.aliases() == [
        "gpt-4", "llama-70b", "gpt-3.5-turbo", "llama-7b", "codellama", "text-embedding-ada-002",
    ]  # fmt: skip
    gpt4 = cfg.model("gpt-4")
    assert gpt4.model_info.max_tokens == 32768
    assert gpt4.model_info.description == "70B model on RTX 5090+4090 tensor parallel"
    assert endpoint_of(gpt4) == "http://192.168.1.250:5000/v1"
    # Ollama entries use the native API at the server root
    assert endpoint_of(cfg.model("codellama")) == "http://192.168.1.203:11434"
    assert cfg.model("codellama").litellm_params.model_id == "qwen2.5-coder:7b"
    assert cfg.router_settings.routing_strategy == "usage-based-routing"
    assert cfg.router_settings.enable_pre_call_checks is True


def test_entries_sharing_a_name_are_one_replica_group(tmp_path: Path) -> None:
    path = _config_file(
        tmp_path,
        """
        model_list:
          - model_name: fast
            litellm_params: {model: ollama/qwen2.5:7b, api_base: "http://10.0.0.3:11434"}
          - model_name: fast
            litellm_params: {model: ollama/qwen2.5:7b, api_base: "http://10.0.0.3:11435", weight: 2}
          - model_name: big
            litellm_params: {model: openai/default, api_base: "http://10.0.0.2:5000/v1"}
            model_info: {parameters_b: 70, gpus: 2}
        router_settings:
          fallbacks: [{big: [fast]}]
          cooldown_time: 5
        routing: {simple: fast, complex: big, code: fast, creative: big}
        """,
    )
    cfg = load_config(path, environ={})
    assert [endpoint_of(e) for e in cfg.deployments("fast")] == [
        "http://10.0.0.3:11434",
        "http://10.0.0.3:11435",
    ]
    assert cfg.router_settings.fallbacks_for("big") == ["fast"]
    assert cfg.router_settings.fallbacks_for("fast") == []
    assert cfg.model("big").gpus == 2 and cfg.model("fast").gpus == 1
    rows = {r["alias"]: r for r in list_models(cfg)}
    assert rows["fast"]["replicas"] == 2 and rows["big"]["fallbacks"] == ["fast"]
    assert rows["big"]["routed_categories"] == ["complex", "creative"]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (
            '{model: anthropic/claude-3, api_base: "http://x:1"}',
            "unsupported provider 'anthropic/'",
        ),
        ("{model: openai/default}", "needs litellm_params.api_base"),
        ('{model: gpt-4, api_base: "http://x:1"}', "PROVIDER/NAME"),
        ('{model: openai/default, api_base: "ftp://x:1"}', "scheme http or https"),
    ],
)
def test_bad_model_entries_name_the_entry(tmp_path: Path, entry: str, needle: str) -> None:
    path = _config_file(
        tmp_path, f"model_list:\n  - model_name: broken\n    litellm_params: {entry}\n"
    )
    err = _error(path)
    assert needle in str(err)
    assert "broken" in str(err) or "model_list.0" in str(err)
    assert err.exit_code == 2


def test_replicas_of_mixed_kinds_are_refused(tmp_path: Path) -> None:
    path = _config_file(
        tmp_path,
        """
        model_list:
          - model_name: fast
            litellm_params: {model: ollama/qwen2.5:7b, api_base: "http://a:11434"}
          - model_name: fast
            litellm_params: {model: openai/qwen, api_base: "http://b:8000/v1"}
        """,
    )
    assert "replicas of different kinds" in str(_error(path))


def test_fallback_to_an_unknown_alias_is_refused(tmp_path: Path) -> None:
    path = _config_file(
        tmp_path,
        "router_settings:\n  fallbacks: [{local: [nowhere]}]\n",
    )
    assert "fallbacks names model 'nowhere'" in str(_error(path))


def test_unknown_routing_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing_strategy 'fastest'"):
        RouterSettings(routing_strategy="fastest")


def test_unknown_alias_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"no model 'gpt-5' in the model list \(known: local\)"):
        TyphonConfig().deployments("gpt-5")


def test_cli_unknown_model_on_run_exits_2_and_records_nothing(tmp_path: Path) -> None:
    env = dict(os.environ)
    proc = subprocess.run(
        [TYPHON_BIN, "run", "research", "hello", "--model", "gpt-5"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no model 'gpt-5'" in lines[0], proc.stderr
    runs = subprocess.run(
        [TYPHON_BIN, "runs", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert json.loads(runs.stdout) == []


def test_cli_models_list_json_on_the_hydra_file() -> None:
    hydra = Path(__file__).parents[2] / "deploy" / "typhon.hydra.yaml"
    proc = subprocess.run(
        [TYPHON_BIN, "--config", str(hydra), "models", "list", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["alias"]: r for r in json.loads(proc.stdout)}
    assert rows["gpt-4"]["parameters_b"] == 70
    assert rows["gpt-3.5-turbo"]["routed_categories"] == ["simple"]
    assert rows["text-embedding-ada-002"]["mode"] == "embedding"
    raw = yaml.safe_load(hydra.read_text(encoding="utf-8"))
    assert len(rows) == len({m["model_name"] for m in raw["model_list"]})


def test_cli_models_stats_sums_calls_per_model_and_category(tmp_path: Path) -> None:
    from typhon._types import Usage
    from typhon.store import RunStore

    home = tmp_path / "h"
    store = RunStore(f"sqlite:///{home / 'typhon.db'}")
    for ok in (True, True, False):
        store.add_model_call(
            alias="gpt-4", requested="gpt-4", url="http://127.0.0.1:9/v1", category="code",
            usage=Usage(10, 5, 1, 0.5, 0.4), gpu_s=0.8, ok=ok,
        )  # fmt: skip
    store.close()
    env = {**os.environ, "TYPHON_HOME": str(home)}
    proc = subprocess.run(
        [TYPHON_BIN, "models", "stats", "--json"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert (row["alias"], row["category"], row["calls"], row["failures"]) == ("gpt-4", "code", 3, 1)
    assert row["gpu_s"] == pytest.approx(2.4) and row["prompt_tokens"] == 30
