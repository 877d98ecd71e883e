"""The deployment files in deploy/: the Hydra cluster config and the hub's compose file.

Nothing here connects anywhere: the files are only parsed and validated (and any socket connect
fails the test).
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from typhon.config import TyphonConfig, load_config, masked
from typhon.resources import parse_cpuset

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HYDRA = DEPLOY / "typhon.hydra.yaml"
COMPOSE = DEPLOY / "compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

TABBY = "http://192.168.1.250:5000/v1"
OLLAMA_LB = "http://192.168.1.203:11400"
OLLAMA_GPU0 = "http://192.168.1.203:11434"
OLLAMA_GPU1 = "http://192.168.1.203:11435"

# alias -> (litellm model, api_base), seed Part 5
SEED_MODELS = {
    "gpt-4": ("openai/default", TABBY),
    "llama-70b": ("openai/default", TABBY),
    "gpt-3.5-turbo": ("ollama/qwen2.5:7b", OLLAMA_LB),
    "llama-7b": ("ollama/llama3.2:latest", OLLAMA_LB),
    "codellama": ("ollama/qwen2.5-coder:7b", OLLAMA_GPU0),
    "text-embedding-ada-002": ("ollama/nomic-embed-text", OLLAMA_GPU1),
}
# pool -> (cap, cpuset, worker mem_limit), seed Parts 4 and 7
SEED_POOLS = {
    "research": (4, "28-35", "16g"),
    "development": (2, "36-43", "16g"),
    "creative": (2, "44-49", "8g"),
    "monitoring": (4, "50-55", "4g"),
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"test tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def hydra() -> TyphonConfig:
    return load_config(HYDRA, environ={})


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "worker" in _argv(svc)[1:2] or name.startswith("worker")
    }


def _entrypoint() -> list[str]:
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("ENTRYPOINT "):
            value = json.loads(line.removeprefix("ENTRYPOINT "))
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("deploy/Dockerfile has no exec-form ENTRYPOINT")


def _argv(service: dict[str, Any]) -> list[str]:
    """The full argv a service built from deploy/Dockerfile runs."""
    command = service.get("command", [])
    command = command.split() if isinstance(command, str) else list(command)
    entry = service.get("entrypoint")
    if entry is None:
        entry = _entrypoint() if "build" in service else []
    elif isinstance(entry, str):
        entry = entry.split()
    return [*entry, *command]


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Docker Compose's ${VAR}, ${VAR:?msg}, ${VAR:-default} substitution."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg or ""
        raise AssertionError(f"{name} is required: {arg}")

    return re.sub(r"\$\{(\w+)(?:(:[?-])([^}]*))?\}", sub, value)


# -- deploy/typhon.hydra.yaml --------------------------------------------------------------------


def test_hydra_models_are_the_seed_model_list(hydra: TyphonConfig) -> None:
    got = {m.model_name: (m.litellm_params.model, m.litellm_params.api_base) for m in hydra.models}
    assert got == SEED_MODELS


def test_hydra_uses_litellm_model_list_key_and_router_settings() -> None:
    raw = yaml.safe_load(HYDRA.read_text(encoding="utf-8"))
    assert "model_list" in raw and "models" not in raw
    assert raw["router_settings"] == {
        "routing_strategy": "usage-based-routing",
        "enable_pre_call_checks": True,
    }


def test_hydra_model_info(hydra: TyphonConfig) -> None:
    big = hydra.model("gpt-4").model_info
    assert big.max_tokens == 32768
    assert big.description == "70B model on RTX 5090+4090 tensor parallel"
    assert big.parameters_b == 70
    assert big.quantization_bits == 4.0
    assert big.context_length == 32768
    assert hydra.model("llama-70b").model_info.parameters_b == 70
    assert (
        hydra.model("gpt-3.5-turbo").model_info.description
        == "7B model, load balanced across 2x RTX 5070 Ti"
    )


def test_hydra_routing_follows_seed_routing_rules(hydra: TyphonConfig) -> None:
    assert hydra.routing == {
        "simple": "gpt-3.5-turbo",
        "complex": "gpt-4",
        "code": "codellama",
        "creative": "gpt-4",
    }
    # the backends of ROUTING_RULES
    assert hydra.model(hydra.routing["simple"]).litellm_params.api_base == OLLAMA_LB
    assert hydra.model(hydra.routing["complex"]).litellm_params.api_base == TABBY
    assert hydra.model(hydra.routing["code"]).litellm_params.api_base == OLLAMA_GPU0


def test_hydra_services(hydra: TyphonConfig) -> None:
    assert hydra.broker_url == "redis://192.168.1.244:6379/0"
    assert hydra.search_url == "http://192.168.1.244:8888"
    assert hydra.database_url == "postgresql+psycopg://typhon@192.168.1.244:5432/typhon"


def test_hydra_pools(hydra: TyphonConfig) -> None:
    got = {p.name: (p.queue, p.cap, p.cpuset) for p in hydra.pools}
    assert got == {name: (name, cap, cpus) for name, (cap, cpus, _) in SEED_POOLS.items()}
    # the pools must not share CPUs, and stay in the seed's agent + burst range (cores 28-55)
    seen: set[int] = set()
    for pool in hydra.pools:
        assert pool.cpuset is not None
        cpus = parse_cpuset(pool.cpuset)
        assert not cpus & seen, f"pool {pool.name} overlaps another pool"
        assert cpus <= set(range(28, 56))
        seen |= cpus


def test_hydra_crews(hydra: TyphonConfig) -> None:
    research = hydra.crew_settings("research")
    assert (research.pool, research.model, research.category) == ("research", None, "simple")
    dev = hydra.crew_settings("development")
    assert (dev.pool, dev.model) == ("development", "gpt-4")
    creative = hydra.crew_settings("creative")
    assert (creative.pool, creative.model) == ("creative", "gpt-4")


def test_hydra_holds_no_secret() -> None:
    raw = yaml.safe_load(HYDRA.read_text(encoding="utf-8"))
    assert urlsplit(raw["database_url"]).password is None
    for entry in raw["model_list"]:
        assert not entry["litellm_params"].get("api_key")


def test_hydra_password_comes_from_the_environment() -> None:
    url = "postgresql+psycopg://typhon:s3cret@192.168.1.244:5432/typhon"
    config = load_config(HYDRA, environ={"TYPHON_DATABASE_URL": url})
    assert config.database_url == url
    shown = masked(config.model_dump(mode="json"))
    assert "s3cret" not in json.dumps(shown)


# -- deploy/compose.yml and deploy/Dockerfile ----------------------------------------------------


def test_compose_has_hub_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["redis"]["cpuset"] == "12-15"
    assert services["postgres"]["image"].split(":")[0] == "postgres"
    assert services["postgres"]["cpuset"] == "8-11"
    assert services["postgres"]["mem_limit"] == "32g"
    assert services["flower"]["image"].split(":")[0] == "mher/flower"
    assert "--broker=redis://redis:6379/0" in str(services["flower"]["command"])


def test_compose_secrets_come_from_variables(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "typhon"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${TYPHON_PG_PASSWORD"
    )
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH")
    # the LAN addresses belong in the Typhon config, not in the compose file
    assert "192.168." not in COMPOSE.read_text(encoding="utf-8")


def test_compose_runs_one_worker_per_configured_pool(
    compose: dict[str, Any], hydra: TyphonConfig
) -> None:
    workers = _workers(compose)
    pools: list[str] = []
    for name, svc in workers.items():
        argv = _argv(svc)
        assert argv[:3] == ["typhon", "worker", "--pool"], f"{name} runs {argv}"
        assert len(argv) == 4, f"{name} runs {argv}"
        pools.append(argv[3])
        spec = hydra.pool(argv[3])  # raises if the pool is not configured
        assert svc["cpuset"] == spec.cpuset, f"{name} is not pinned to its pool's CPUs"
        assert svc["mem_limit"] == SEED_POOLS[argv[3]][2]
    assert sorted(pools) == sorted(p.name for p in hydra.pools)


def test_compose_workers_get_the_hydra_config(compose: dict[str, Any]) -> None:
    for name, svc in _workers(compose).items():
        env = svc["environment"]
        target = env["TYPHON_CONFIG"]
        mounts = [v for v in svc["volumes"] if isinstance(v, str)]
        assert any(
            (DEPLOY / m.split(":")[0]).resolve() == HYDRA and m.split(":")[1:] == [target, "ro"]
            for m in mounts
        ), f"{name} does not mount {HYDRA.name} read-only at {target}"
        worker_env = {
            key: _interpolate(str(value), {"TYPHON_PG_PASSWORD": "pw"})
            for key, value in env.items()
            if key.startswith("TYPHON_") and key != "TYPHON_CONFIG"
        }
        assert worker_env["TYPHON_BROKER_URL"] == "redis://redis:6379/0"
        config = load_config(HYDRA, environ=worker_env)
        assert urlsplit(config.broker_url or "").hostname == "redis"
        db = urlsplit(config.database_url or "")
        assert (db.hostname, db.username, db.password) == ("postgres", "typhon", "pw")


def test_compose_builds_the_project_image(compose: dict[str, Any]) -> None:
    for name, svc in _workers(compose).items():
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / "pyproject.toml").is_file(), name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"pip install \.", text)
    assert _entrypoint() == ["typhon"]


def test_compose_cpusets_follow_the_seed_allocation(compose: dict[str, Any]) -> None:
    seen: dict[int, str] = {}
    for name, svc in compose["services"].items():
        cpus = parse_cpuset(svc["cpuset"])
        assert not cpus & set(range(8)), f"{name} uses the cores reserved for the system"
        for cpu in cpus:
            assert cpu not in seen, f"{name} and {seen[cpu]} both pinned to CPU {cpu}"
            seen[cpu] = name
