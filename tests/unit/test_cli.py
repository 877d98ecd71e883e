"""The `typhon` command as people type it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TYPHON = str(Path(sys.executable).parent / "typhon")

NOOP_CREW = """
from typhon import crew

@crew("noop")
def noop(ctx):
    ctx.step("nothing to do")
    return "done: " + ctx.input
"""


def typhon(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [TYPHON, *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


def runs_json(env: dict[str, str] | None = None) -> list[dict[str, object]]:
    result = typhon("runs", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def noop_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "noop_crew.py").write_text(NOOP_CREW)
    return {"PYTHONPATH": str(tmp_path), "TYPHON_CREW_MODULES": "[noop_crew]"}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_unknown_crew_exit_2_names_known_crews() -> None:
    result = typhon("run", "nosuch", "topic")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "unknown crew 'nosuch'; known crews: creative, development, monitoring, research" in line
    assert runs_json() == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "input is empty"),
        ("  \n ", "input is empty"),
        ("x" * 20_001, "over the limit of 20,000"),
    ],
)
def test_bad_input_exit_2(text: str, why: str) -> None:
    result = typhon("run", "research", text)
    assert result.returncode == 2
    assert why in one_error_line(result.stderr)
    assert runs_json() == []


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("colour: blue\n", "key 'colour'"),
        ("broker_url: not-a-url\n", "key 'broker_url'"),
        ("pools:\n  - {name: research, cap: 0}\n", "key 'pools.0.cap'"),
        (
            "models:\n  - model_name: x\n    litellm_params: {model: openai/x, api_base: 'ftp://h'}\n",
            "key 'models.0.litellm_params.api_base'",
        ),
    ],
)
def test_invalid_config_exit_2_names_file_and_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    result = typhon("--config", str(path), "run", "research", "topic")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(path) in line and key in line


def test_config_in_cwd_and_env_override(tmp_path: Path) -> None:
    (tmp_path / "typhon.yaml").write_text("log_level: debug\nsearch_url: http://127.0.0.1:8888\n")
    result = typhon("config", "show", env={"TYPHON_SEARCH_URL": "http://127.0.0.1:9999"})
    assert result.returncode == 0, result.stderr
    assert "# source: typhon.yaml" in result.stdout
    assert "log_level: debug" in result.stdout
    assert "search_url: http://127.0.0.1:9999" in result.stdout


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "database_url: postgresql://typhon:hunter2@127.0.0.1:5/typhon\n"
        "models:\n  - model_name: local\n    litellm_params: {model: openai/x, "
        "api_base: 'http://127.0.0.1:5/v1', api_key: sk-secret}\n"
    )
    result = typhon("--config", str(path), "config", "show")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "sk-secret" not in result.stdout
    assert "typhon:***@127.0.0.1:5" in result.stdout and "api_key: '***'" in result.stdout


def test_config_check_reports_each_service(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "search_url: http://127.0.0.1:9\n"
        "models:\n  - model_name: local\n    litellm_params: {model: local/gemma}\n"
        "  - model_name: remote\n    litellm_params: {model: openai/x, api_base: 'http://127.0.0.1:9/v1'}\n"
    )
    result = typhon("--config", str(path), "config", "check")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok    database")
    assert lines[1].startswith("ok    broker") and "in-process" in lines[1]
    assert lines[2].startswith("ok    model local") and "llama-server" in lines[2]
    assert lines[3].startswith("FAIL  model remote")
    assert lines[4].startswith("FAIL  search")


def test_unreachable_broker_exit_1_and_no_run_left_queued() -> None:
    env = {"TYPHON_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = typhon("run", "research", "topic", env=env)
    assert result.returncode == 1
    assert "cannot reach broker at redis://127.0.0.1:1/0" in one_error_line(result.stderr)
    runs = runs_json()
    assert len(runs) == 1 and runs[0]["status"] == "failed"
    assert "cannot reach broker" in str(runs[0]["error"])


def test_custom_crew_json_contract(noop_env: dict[str, str]) -> None:
    result = typhon("run", "noop", "hello", "--json", env=noop_env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"run_id", "crew", "status", "output", "model", "started_at", "finished_at"} <= set(out)
    assert (out["crew"], out["status"], out["output"], out["model"]) == (
        "noop",
        "succeeded",
        "done: hello",
        "local",
    )
    status = typhon("status", out["run_id"], "--json", env=noop_env)
    assert json.loads(status.stdout)["status"] == "succeeded"
    assert typhon("cancel", out["run_id"], env=noop_env).returncode == 1


def test_no_wait_prints_run_id(noop_env: dict[str, str]) -> None:
    result = typhon("run", "noop", "hello", "--no-wait", env=noop_env)
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert len(run_id) == 32
    assert [r["run_id"] for r in runs_json(noop_env)] == [run_id]


def test_unknown_run_id_exit_2() -> None:
    result = typhon("status", "does-not-exist")
    assert result.returncode == 2
    assert "no run with id 'does-not-exist'" in one_error_line(result.stderr)


def test_docs_must_be_a_folder(tmp_path: Path) -> None:
    result = typhon("run", "research", "topic", "--docs", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "is not a folder" in one_error_line(result.stderr)


def test_worker_refuses_cpus_the_host_lacks() -> None:
    env = {"TYPHON_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = typhon("worker", "--pool", "research", "--cpuset", "4000-4001", env=env)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    have = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    assert "4000-4001" in line and "--cpuset" in line
    assert line.split("this host has ")[1].split(";")[0] in (
        have,
        f"0-{max(os.sched_getaffinity(0))}",
    )


def test_pools_from_live_state(noop_env: dict[str, str]) -> None:
    assert typhon("run", "noop", "x", env=noop_env).returncode == 0
    result = typhon("pools", "--json", env=noop_env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    pools = {p["name"]: p for p in data["pools"]}
    assert {n: p["cap"] for n, p in pools.items()} == {
        "research": 4, "development": 2, "creative": 2, "monitoring": 4,
    }  # fmt: skip
    assert all(p["running"] == p["queued"] == p["slots_in_use"] == 0 for p in pools.values())
    assert (data["cluster"]["sustained"], data["cluster"]["burst"]) == (12, 20)


def test_hydra_profile_pools(tmp_path: Path) -> None:
    path = tmp_path / "h.yaml"
    path.write_text("profile: hydra\n")
    data = json.loads(typhon("--config", str(path), "pools", "--json").stdout)
    assert [(p["name"], p["cap"], p["cpuset"]) for p in data["pools"]] == [
        ("research", 4, "28-33"), ("development", 2, "36-41"),
        ("creative", 2, "34-35"), ("monitoring", 4, "42-43"),
    ]  # fmt: skip
    assert data["cluster"]["burst_cpuset"] == "44-55"


def test_overlapping_cpusets_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "pools:\n  - {name: research, cap: 4, cpuset: '28-35'}\n"
        "  - {name: development, cap: 2, cpuset: '34-41'}\n"
    )
    result = typhon("--config", str(path), "pools")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(path) in line and "pools.development.cpuset (34-41) overlaps" in line


def test_unknown_pool_exit_2() -> None:
    env = {"TYPHON_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = typhon("worker", "--pool", "nosuch", env=env)
    assert result.returncode == 2
    assert "no pool 'nosuch' (configured pools: research" in one_error_line(result.stderr)


def test_hardware_without_gpu_is_not_an_error() -> None:
    result = typhon("hardware", "--json")
    assert result.returncode == 0, result.stderr
    local = json.loads(result.stdout)["local"]
    assert local["cpu"]["threads"] == os.cpu_count()
    if not Path("/proc/driver/nvidia").exists():
        assert local["gpus"] == [] and local["gpu_note"]


def test_placement_of_the_seed_cluster() -> None:
    hydra = Path(__file__).resolve().parents[2] / "deploy" / "typhon.hydra.yaml"
    result = typhon("--config", str(hydra), "placement", "--json")
    assert result.returncode == 0, result.stderr
    placed = {a: p["node"] for p in json.loads(result.stdout)["placements"] for a in p["aliases"]}
    assert placed["gpt-4"] == placed["llama-70b"] == "hydra-ai"
    assert placed["gpt-3.5-turbo"] == placed["codellama"] == "hydra-compute"


def test_placement_that_fits_nowhere_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(
        "nodes:\n  - {name: small, gpus: [{name: T4, vram_gb: 16}]}\n"
        "models:\n  - model_name: huge\n    litellm_params: {model: openai/x, "
        "api_base: 'http://127.0.0.1:9/v1'}\n    model_info: {parameters_b: 70, "
        "quantization_bits: 16, context_length: 8192}\n"
        "routing: {simple: huge, complex: huge, code: huge, creative: huge}\n"
    )
    result = typhon("--config", str(path), "placement")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "model 'huge' needs" in line and "16.0 GiB" in line
