"""deploy/prometheus and deploy/grafana: the seed's four alerts checked and unit-tested with
promtool (Debian's prometheus package, which scripts/test installs), the scrape config checked,
and every Grafana panel's query parsed by promtool.

Nothing here connects anywhere: promtool only reads files (and any socket connect of this
process fails the test)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from typhon.crews.monitoring import ACTIONS

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
SCRAPE = PROMETHEUS / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"

# seed Part 10: alert -> (Monitoring crew kind, threshold as written in the rules)
SEED_ALERTS = {
    "VRAMCritical": ("vram_critical", "> 95"),
    "GPUTempHigh": ("gpu_temp_high", "> 80"),
    "AgentFailureRateHigh": ("agent_failure_rate", "> 0.2"),
    "StorageFull": ("storage_full", "> 95"),
}
SOURCES = {
    "VRAMCritical": {"dcgm", "typhon"},
    "GPUTempHigh": {"dcgm", "typhon"},
    "AgentFailureRateHigh": {"typhon", "seed"},
    "StorageFull": {"node", "typhon"},
}
# the metric names the seed uses, each in some rule
SEED_METRICS = (
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "activity_completed",
)
SEED_SUCCESS_RATE = (
    'sum(rate(activity_completed{status="success"}[1h])) / sum(rate(activity_completed[1h])) * 100'
)
SEED_VRAM = "sum(DCGM_FI_DEV_FB_USED) / sum(DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE) * 100"
SEED_DASHBOARDS = {
    "cluster-overview.json": "Typhon / Cluster overview",
    "inference-performance.json": "Typhon / Inference performance",
    "agent-activity.json": "Typhon / Agent activity",
    "resource-allocation.json": "Typhon / Resource allocation",
}
# Grafana's variables, replaced by values Prometheus accepts before promtool reads a query
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$crew": ".+",
    "$pool": ".+",
    "$alias": ".+",
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"test tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: scripts/test installs it (Debian's prometheus package);"
            " or run apt-get install --no-install-recommends prometheus"
        )
    return path


def _promtool(promtool: str, *args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# -- alert rules ---------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    out = _promtool(promtool, "check", "rules", ALERTS)
    assert f"SUCCESS: {len(_rules())} rules found" in out


def test_alert_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    out = _promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=PROMETHEUS)
    assert "SUCCESS" in out


def test_the_seeds_four_alerts_on_every_source_with_the_seeds_actions() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} == set(SEED_ALERTS)
    for name, (kind, threshold) in SEED_ALERTS.items():
        mine = [r for r in rules if r["alert"] == name]
        assert {r["labels"]["source"] for r in mine} == SOURCES[name]
        for rule in mine:
            assert rule["labels"]["kind"] == kind
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert rule["annotations"]["action"] == ACTIONS[kind]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert re.fullmatch(r"\d+m", rule["for"])
            if rule["labels"]["source"] != "seed":
                assert threshold in rule["expr"], (name, rule["labels"]["source"])
    exprs = "\n".join(r["expr"] for r in rules)
    for metric in SEED_METRICS:
        assert re.search(rf"\b{metric}\b", exprs), metric
    seed = next(r for r in rules if r["labels"]["source"] == "seed")
    assert SEED_SUCCESS_RATE in " ".join(seed["expr"].split())  # the seed's query, as written


def test_every_alert_rule_has_a_firing_and_a_silent_unit_test() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    assert yaml.safe_load(ALERT_TESTS.read_text())["rule_files"] == [ALERTS.name]
    fired: set[tuple[str, str]] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            if not case["exp_alerts"]:
                silent.add(case["alertname"])
            for alert in case["exp_alerts"]:
                fired.add((case["alertname"], alert["exp_labels"]["source"]))
    assert fired == {(name, source) for name, sources in SOURCES.items() for source in sources}
    assert silent == set(SEED_ALERTS)


# A wrong threshold, duration or filter in one rule of alerts.yml must make its unit tests fail:
# each change below, made alone to the rule of that alert and source, breaks at least one
# expectation of alerts.test.yml. (alert, source, field, old, new)
MUTATIONS = [
    ("VRAMCritical", "dcgm", "expr", "> 95", "> 90"),
    ("VRAMCritical", "typhon", "expr", "> 95", ">= 95"),
    ("GPUTempHigh", "dcgm", "expr", "> 80", ">= 80"),
    ("GPUTempHigh", "typhon", "expr", "> 80", ">= 80"),
    ("AgentFailureRateHigh", "typhon", "expr", "> 0.2", ">= 0.2"),
    ("AgentFailureRateHigh", "typhon", "expr", ">= 5", ">= 1"),
    ("AgentFailureRateHigh", "typhon", "expr", ', crew!="monitoring"', ""),
    ("AgentFailureRateHigh", "seed", "expr", "< 80", "< 95"),
    ("AgentFailureRateHigh", "seed", "expr", "unless on() count(activity_completed_total)", ""),
    ("StorageFull", "node", "expr", "> 95", "> 94"),
    ("StorageFull", "node", "expr", 'fstype!~"tmpfs|', 'fstype!~"none|'),
    ("StorageFull", "typhon", "expr", "> 95", ">= 95"),
] + [(alert, source, "for", "", "0m") for alert, sources in SOURCES.items() for source in sources]


def _mutation_id(m: tuple[str, str, str, str, str]) -> str:
    alert, source, field, old, new = m
    return f"{alert}-{source}-{field}:{old or 'any'}->{new or 'nothing'}"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[_mutation_id(m) for m in MUTATIONS])
def test_the_unit_tests_catch_a_wrong_rule(
    promtool: str, tmp_path: Path, mutation: tuple[str, str, str, str, str]
) -> None:
    alert, source, field, old, new = mutation
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [
        r
        for g in doc["groups"]
        for r in g["rules"]
        if r["alert"] == alert and r["labels"]["source"] == source
    ]
    if old:
        assert old in rule[field], mutation
        rule[field] = rule[field].replace(old, new)
    else:
        rule[field] = new
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    _promtool(promtool, "check", "rules", tmp_path / ALERTS.name)  # still a valid rule file
    done = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode != 0, f"{mutation}: the unit tests still pass\n{done.stdout}"


def test_the_unmutated_copy_passes(promtool: str, tmp_path: Path) -> None:
    """The copies above are written through YAML: unchanged, such a copy passes."""
    doc = yaml.safe_load(ALERTS.read_text())
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    _promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=tmp_path)


# -- scrape config -------------------------------------------------------------------------------


def test_scrape_config_passes_promtool_check(promtool: str, tmp_path: Path) -> None:
    """The whole check (the rule file it names included), with the API token file it reads put
    where the copy says."""
    token = tmp_path / "typhon-token"
    token.write_text("token\n")
    text = SCRAPE.read_text()
    assert "credentials_file: /etc/prometheus/typhon-token" in text
    (tmp_path / SCRAPE.name).write_text(text.replace("/etc/prometheus/typhon-token", str(token)))
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    out = _promtool(promtool, "check", "config", tmp_path / SCRAPE.name)
    assert "SUCCESS: 1 rule files found" in out
    assert f"SUCCESS: {len(_rules())} rules found" in out


def test_scrape_targets_are_service_names_or_loopback() -> None:
    """The seed's LAN addresses appear only in comments: nothing is ever scraped there by
    default."""
    config = yaml.safe_load(SCRAPE.read_text())
    assert config["rule_files"] == [ALERTS.name]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"typhon", "prometheus", "flower", "dcgm", "node"} <= set(jobs)
    targets = [t for job in jobs.values() for sc in job["static_configs"] for t in sc["targets"]]
    assert targets, "no target at all"
    for target in targets:
        host = target.rsplit(":", 1)[0]
        assert host == "127.0.0.1" or re.fullmatch(r"[a-z][a-z0-9-]*", host), target
    assert "api:8700" in targets
    for line in SCRAPE.read_text().splitlines():
        if "192.168." in line:
            assert line.lstrip().startswith("#"), line


# -- Grafana -------------------------------------------------------------------------------------


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _panel_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in board["panels"]:
        for target in panel["targets"]:
            yield f"{panel['id']}_{target['refId']}", target["expr"]


def _promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def test_the_seeds_four_dashboards() -> None:
    boards = _dashboards()
    assert {name: b["title"] for name, b in boards.items()} == SEED_DASHBOARDS
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        assert "typhon" in board["tags"]
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids) >= 8, name
        for panel in board["panels"]:
            assert panel["title"] and panel["targets"], (name, panel["title"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, (name, panel["title"])
            for target in panel["targets"]:
                assert target["expr"].strip(), (name, panel["title"])


def test_dashboards_show_what_the_seed_names() -> None:
    boards = _dashboards()
    text = {name: json.dumps(b) for name, b in boards.items()}
    overview = text["cluster-overview.json"]
    for needle in ("DCGM_FI_DEV_GPU_TEMP", "typhon_gpu_temperature_celsius", SEED_VRAM,
                   "typhon_gpu_memory_used_bytes", "up"):  # fmt: skip
        assert needle in overview, needle
    inference = text["inference-performance.json"]
    for needle in ('kind=\\"completion\\"', "histogram_quantile(0.95",
                   "typhon_model_latency_seconds_bucket", "typhon_queue_depth",
                   "rate(tabbyapi_tokens_generated_total[5m])"):  # fmt: skip
        assert needle in inference, needle
    activity = boards["agent-activity.json"]
    exprs = [expr for _, expr in _panel_queries(activity)]
    assert SEED_SUCCESS_RATE in exprs
    assert any("typhon_runs_running" in e for e in exprs)
    assert any("typhon_run_duration_seconds_bucket" in e for e in exprs)
    assert any("typhon_qa_score" in e for e in exprs)
    allocation = text["resource-allocation.json"]
    for needle in ("typhon_pool_cap", "typhon_pool_burst_cap", "typhon_cluster_slots",
                   "typhon_slots_in_use", "node_cpu_seconds_total"):  # fmt: skip
        assert needle in allocation, needle


def test_every_panel_query_parses_with_promtool(promtool: str, tmp_path: Path) -> None:
    """Each query, Grafana's variables filled in, as a recording rule that promtool checks (it
    parses each expression as Prometheus would); the variables' label_values() selectors too."""
    for name, board in _dashboards().items():
        slug = name.removesuffix(".json").replace("-", "_")
        rules = [
            {"record": f"grafana:{slug}:panel_{key}", "expr": _promql(expr)}
            for key, expr in _panel_queries(board)
        ]
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
            assert found, variable["definition"]
            rules.append({"record": f"grafana:{slug}:var_{variable['name']}",
                          "expr": f"count by ({found[2]}) ({found[1]})"})  # fmt: skip
        path = tmp_path / f"{slug}.rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": slug, "rules": rules}]}))
        out = _promtool(promtool, "check", "rules", path)
        assert f"SUCCESS: {len(rules)} rules found" in out, name


def test_a_broken_panel_query_is_caught(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.rules.yml"
    broken = {"record": "grafana:broken", "expr": "sum by (alias (rate(x[5m]))"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [broken]}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "parse error" in done.stdout + done.stderr


def test_grafana_provisioning() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/typhon.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/typhon.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/typhon"
