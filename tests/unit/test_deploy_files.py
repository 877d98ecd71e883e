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
# pool -> (cap, cpuset, worker mem_limit), seed Parts 4 and 7 (the shipped hydra profile)
SEED_POOLS = {
    "research": (4, "28-33", "16g"),
    "creative": (2, "34-35", "8g"),
    "development": (2, "36-41", "16g"),
    "monitoring": (4, "42-43", "4g"),
}
SEED_SUSTAINED, SEED_BURST, SEED_BURST_CPUSET = 12, 20, "44-55"
SEED_RESERVED = {"system": "0-7", "services": "8-19", "n8n": "20-27"}
API_PORT = 8700  # seed Part 6: hydra-tools-api


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


def _typhon_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the Typhon image (workers, beat, api)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "build" in svc or str(svc.get("image", "")).startswith("typhon")
    }


def _by_subcommand(compose: dict[str, Any], sub: str) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in _typhon_services(compose).items()
        if _argv(svc)[:2] == ["typhon", sub]
    }


def _cpus(service: dict[str, Any]) -> frozenset[int]:
    return parse_cpuset(str(service["cpuset"]))


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
        "fallbacks": [{"gpt-4": ["gpt-3.5-turbo"]}, {"llama-70b": ["llama-7b"]}],
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


def test_hydra_uses_the_shipped_hydra_profile() -> None:
    raw = yaml.safe_load(HYDRA.read_text(encoding="utf-8"))
    assert raw["profile"] == "hydra"


def test_hydra_pools(hydra: TyphonConfig) -> None:
    got = {p.name: (p.queue, p.cap, parse_cpuset(p.cpuset or "")) for p in hydra.pools}
    assert got == {
        name: (name, cap, parse_cpuset(cpus)) for name, (cap, cpus, _) in SEED_POOLS.items()
    }
    for pool in hydra.pools:
        # burst_cap (per-type ceiling including burst slots) may be absent: it defaults to cap
        burst_cap = getattr(pool, "burst_cap", None) or pool.cap
        assert pool.cap <= burst_cap <= hydra.cluster.burst, pool.name
    # the pools must not share CPUs, and stay in the seed's agent range (cores 28-43)
    seen: set[int] = set()
    for pool in hydra.pools:
        assert pool.cpuset is not None
        cpus = parse_cpuset(pool.cpuset)
        assert not cpus & seen, f"pool {pool.name} overlaps another pool"
        assert cpus <= set(range(28, 44))
        seen |= cpus


def test_hydra_cluster_caps(hydra: TyphonConfig) -> None:
    cluster = hydra.cluster
    assert (cluster.sustained, cluster.burst) == (SEED_SUSTAINED, SEED_BURST)
    # the sustained slots are the pools' caps: 4 + 2 + 2 + 4
    assert sum(p.cap for p in hydra.pools) == cluster.sustained
    assert cluster.burst_cpuset is not None
    assert parse_cpuset(cluster.burst_cpuset) == parse_cpuset(SEED_BURST_CPUSET)
    assert {k: parse_cpuset(v) for k, v in cluster.reserved_cpusets.items()} == {
        k: parse_cpuset(v) for k, v in SEED_RESERVED.items()
    }
    # system + services + n8n + pools + burst: the whole 56-core EPYC, each CPU once
    every = [parse_cpuset(v) for v in cluster.reserved_cpusets.values()]
    every += [parse_cpuset(p.cpuset or "") for p in hydra.pools]
    every.append(parse_cpuset(cluster.burst_cpuset))
    assert sum(len(c) for c in every) == 56
    assert frozenset().union(*every) == frozenset(range(56))


def test_hydra_nodes(hydra: TyphonConfig) -> None:
    nodes = {n.name: n for n in hydra.nodes}
    ai = nodes["hydra-ai"]
    assert [(g.name, g.vram_gb) for g in ai.gpus] == [
        ("NVIDIA GeForce RTX 5090", 32),
        ("NVIDIA GeForce RTX 4090", 24),
    ]
    assert ai.tensor_parallel is True
    compute = nodes["hydra-compute"]
    assert [(g.name, g.vram_gb) for g in compute.gpus] == [("NVIDIA GeForce RTX 5070 Ti", 16)] * 2
    assert compute.tensor_parallel is False
    # hydra-ai's two GPUs hold the 70B at 4.0bpw (~52GB of 56GB)
    assert sum(g.vram_gb for g in ai.gpus) == 56


def test_hydra_profile_ships_with_the_package() -> None:
    assert (ROOT / "typhon" / "profiles" / "hydra.yaml").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "profiles/*.yaml" in pyproject, "the profiles must be package data (the image uses them)"


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
    # the hub services start with a plain `docker compose up`
    for name in ("redis", "postgres", "flower"):
        assert "profiles" not in services[name], name


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
    assert hydra.cluster.burst_cpuset is not None
    burst = parse_cpuset(hydra.cluster.burst_cpuset)
    workers = _workers(compose)
    assert workers == _by_subcommand(compose, "worker")
    pools: list[str] = []
    for name, svc in workers.items():
        argv = _argv(svc)
        assert argv[:3] == ["typhon", "worker", "--pool"], f"{name} runs {argv}"
        # concurrency comes from the pool (cap / burst_cap): no -c, no --cpuset override
        assert len(argv) == 4, f"{name} runs {argv}"
        pools.append(argv[3])
        spec = hydra.pool(argv[3])  # raises if the pool is not configured
        assert spec.cpuset is not None
        # `typhon worker` pins to the pool's cpuset; a child on a burst slot to the burst set
        assert _cpus(svc) == parse_cpuset(spec.cpuset) | burst, (
            f"{name} is not pinned to its pool's CPUs plus the burst pool"
        )
        assert svc["mem_limit"] == SEED_POOLS[argv[3]][2]
        assert "profiles" not in svc, f"{name} must start with a plain `docker compose up`"
        assert svc["stop_grace_period"], f"{name} must let running crews finish"
        assert int(svc.get("deploy", {}).get("replicas", 1)) == 1, name
    assert sorted(pools) == sorted(p.name for p in hydra.pools)


def test_compose_runs_a_single_beat(compose: dict[str, Any]) -> None:
    beats = _by_subcommand(compose, "beat")
    assert list(beats) == ["beat"], f"exactly one beat service, got {sorted(beats)}"
    svc = beats["beat"]
    assert _argv(svc) == ["typhon", "beat"]
    assert "profiles" not in svc, "beat (the reaper) must start with a plain `docker compose up`"
    assert int(svc.get("deploy", {}).get("replicas", 1)) == 1
    assert "scale" not in svc
    assert svc["mem_limit"] == "512m"
    # no other service runs Celery beat (a worker with -B/--beat would be a second scheduler)
    for name, other in compose["services"].items():
        if name != "beat":
            argv = _argv(other)
            assert "beat" not in argv and "-B" not in argv and "--beat" not in argv, name


def test_compose_runs_the_api(compose: dict[str, Any], hydra: TyphonConfig) -> None:
    apis = _by_subcommand(compose, "serve")
    assert list(apis) == ["api"]
    svc = apis["api"]
    assert "profiles" not in svc  # Prometheus scrapes it: it starts with the cluster
    assert _argv(svc) == ["typhon", "serve", "--host", "0.0.0.0", "--port", str(API_PORT)]
    assert svc["ports"] == [f"{API_PORT}:{API_PORT}"]
    assert svc["mem_limit"] == "2g"
    # the nodes' URLs in the hydra config point at this port
    storage = {n.name: n for n in hydra.nodes}["hydra-storage"]
    assert urlsplit(storage.url or "").port == API_PORT


def test_compose_typhon_services_get_the_hydra_config(compose: dict[str, Any]) -> None:
    services = _typhon_services(compose)
    assert set(services) == {"beat", "api"} | set(_workers(compose))
    for name, svc in services.items():
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


def test_compose_runs_prometheus_and_grafana_on_the_shipped_files(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert services["prometheus"]["volumes"] == ["./prometheus:/etc/prometheus:ro"]
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()
    mounts = services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./grafana/dashboards:/var/lib/grafana/dashboards/typhon:ro" in mounts
    assert len(list((DEPLOY / "grafana" / "dashboards").glob("*.json"))) == 4


def test_compose_builds_the_project_image(compose: dict[str, Any]) -> None:
    for name, svc in _typhon_services(compose).items():
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / "pyproject.toml").is_file(), name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"pip install \.", text)
    assert _entrypoint() == ["typhon"]


def test_compose_cpusets_follow_the_seed_allocation(
    compose: dict[str, Any], hydra: TyphonConfig
) -> None:
    cluster = hydra.cluster
    assert cluster.burst_cpuset is not None
    reserved = {k: parse_cpuset(v) for k, v in cluster.reserved_cpusets.items()}
    agents = parse_cpuset(cluster.burst_cpuset).union(
        *(parse_cpuset(p.cpuset or "") for p in hydra.pools)
    )
    workers = _workers(compose)
    seen: dict[int, str] = {}
    for name, svc in compose["services"].items():
        if svc.get("profiles") == ["observability"]:  # may run on another machine
            assert "cpuset" not in svc, f"{name}: pin it where it runs"
            continue
        cpus = _cpus(svc)
        assert cpus, name
        assert not cpus & reserved["system"], f"{name} uses the cores reserved for the system"
        assert not cpus & reserved["n8n"], f"{name} uses the cores reserved for n8n"
        if name in workers:
            assert cpus <= agents, f"{name} leaves the pool and burst CPUs"
            continue
        # the hub services: on the services cores, each on CPUs of its own
        assert cpus <= reserved["services"], f"{name} is not on the services cores"
        assert not cpus & agents, f"{name} shares CPUs with a pool or the burst pool"
        for cpu in cpus:
            assert cpu not in seen, f"{name} and {seen[cpu]} both pinned to CPU {cpu}"
            seen[cpu] = name
