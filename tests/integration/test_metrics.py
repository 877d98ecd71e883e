"""Typhon's Prometheus metrics over a real run store (SQLite and PostgreSQL) and the real test
Redis, parsed back with prometheus_client's parser and checked value by value; the shipped alert
rules and the seed's success-rate query evaluated by promtool on what the collector exposes; and
``typhon metrics`` as a subprocess, its output linted by ``promtool check metrics``."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TYPHON_BIN
from prometheus_client.parser import text_string_to_metric_families

from typhon._types import RunStatus, Usage
from typhon.api._metrics import CONTENT_TYPE, render
from typhon.config import TyphonConfig
from typhon.crews.monitoring import Finding, apply_findings
from typhon.resources.hardware import local_summary
from typhon.store import RunStore, cache_counts, run_feedback, run_reviews, runs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
GIB = 1024**3
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BUILTIN = ("creative", "development", "monitoring", "research")
SEED_SUCCESS_RATE = (
    'sum(rate(activity_completed{status="success"}[1h])) / sum(rate(activity_completed[1h])) * 100'
)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"sample twice: {key}"
            out[key] = s.value
    return out


def _get(samples: Samples, name: str, /, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def _host() -> dict[str, Any]:
    """A host summary shaped like ``hardware.local_summary()``: two GPUs (one that cannot tell
    its temperature) and two disks."""
    return {
        "host": "gpu-a",
        "cpu": {"model": "x", "cores": 8, "threads": 16, "affinity": "0-15"},
        "memory": {"total_bytes": 64 * GIB, "available_bytes": 32 * GIB},
        "disks": [
            {"device": "/dev/md0", "mount": "/", "total_bytes": 100, "used_bytes": 41,
             "free_bytes": 59, "percent": 41.0},
            {"device": "/dev/md1", "mount": "/mnt/user", "total_bytes": 100, "used_bytes": 97,
             "free_bytes": 3, "percent": 97.0},
        ],
        "gpus": [
            {"index": 0, "name": "NVIDIA GeForce RTX 5090", "uuid": "GPU-0",
             "vram_total_bytes": 32 * GIB, "vram_used_bytes": 31 * GIB, "temperature_c": 84,
             "utilization_percent": 97},
            {"index": 1, "name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-1",
             "vram_total_bytes": 24 * GIB, "vram_used_bytes": 2 * GIB, "temperature_c": None,
             "utilization_percent": None},
        ],
        "gpu_note": None,
    }  # fmt: skip


def _scrape(config: TyphonConfig, store: RunStore) -> Samples:
    return _samples(render(config, store, hardware=_host).decode())


def _ended(
    store: RunStore,
    crew: str,
    status: RunStatus,
    seconds: float | None,
    pool: str = "research",
) -> str:
    """A run that ended with ``status``; it ran ``seconds`` (None: cancelled while queued)."""
    run = store.create_run(crew=crew, input="x", pool=pool)
    if seconds is not None:
        assert store.claim(run.id) is not None
    assert store.finish(run.id, status, error=None if status is RunStatus.SUCCEEDED else "x")
    if seconds is not None:
        times = runs.update().where(runs.c.id == run.id)
        times = times.values(started_at=T0, finished_at=T0 + timedelta(seconds=seconds))
        with store.engine.begin() as conn:
            conn.execute(times)
    return run.id


# -- runs ----------------------------------------------------------------------------------------


def test_runs_outcomes_pools_and_durations(store: RunStore, config: TyphonConfig) -> None:
    for seconds in (0.5, 3, 45):
        _ended(store, "research", RunStatus.SUCCEEDED, seconds)
    _ended(store, "research", RunStatus.FAILED, 700)
    _ended(store, "research", RunStatus.CANCELLED, 4000)  # stopped while it ran
    _ended(store, "development", RunStatus.FAILED, 20, pool="development")
    _ended(store, "development", RunStatus.CANCELLED, None, pool="development")
    _ended(store, "translator", RunStatus.SUCCEEDED, 9000)  # a crew of the user's
    assert store.claim(store.create_run(crew="research", input="x", pool="research").id)
    for _ in range(2):
        store.create_run(crew="creative", input="x", pool="creative")
    waiting = store.claim(store.create_run(crew="development", input="x", pool="development").id)
    assert waiting is not None
    assert store.wait(waiting.id, reason="approval", attempt=waiting.attempts)
    store.create_run(crew="research", input="x", pool="gpu-batch")  # a pool not configured

    s = _scrape(config, store)

    completed = _series(s, "activity_completed_total")
    expected = {(crew, status): 0.0 for crew in (*BUILTIN, "translator")
                for status in ("success", "failure", "cancelled")}  # fmt: skip
    expected |= {("research", "success"): 3, ("research", "failure"): 1,
                 ("research", "cancelled"): 1, ("development", "failure"): 1,
                 ("development", "cancelled"): 1, ("translator", "success"): 1}  # fmt: skip
    assert {(dict(k)["crew"], dict(k)["status"]): v for k, v in completed.items()} == expected
    # the seed's name: the same series, the same values
    assert _series(s, "activity_completed") == completed

    pools = ("creative", "development", "gpu-batch", "monitoring", "research")
    for name, want in (
        ("typhon_runs_running", {"research": 1}),
        ("typhon_runs_waiting", {"development": 1}),
        ("typhon_queue_depth", {"creative": 2, "gpu-batch": 1}),
    ):
        assert {dict(k)["pool"]: v for k, v in _series(s, name).items()} == {
            p: want.get(p, 0) for p in pools
        }, name

    bounds = ("1.0", "5.0", "15.0", "30.0", "60.0", "120.0", "300.0", "600.0", "1800.0",
              "3600.0", "7200.0", "+Inf")  # fmt: skip
    research = [1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5]  # 0.5, 3, 45, 700, 4000 seconds
    development = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # 20 seconds; the queued one not at all
    translator = [0] * 11 + [1]  # 9000 seconds
    for crew, counts, total in (
        ("research", research, 4748.5),
        ("development", development, 20.0),
        ("translator", translator, 9000.0),
    ):
        got = [_get(s, "typhon_run_duration_seconds_bucket", crew=crew, le=b) for b in bounds]
        assert got == counts, crew
        assert _get(s, "typhon_run_duration_seconds_count", crew=crew) == counts[-1]
        assert _get(s, "typhon_run_duration_seconds_sum", crew=crew) == pytest.approx(
            total, abs=1e-3
        )
    durations = {dict(k)["crew"] for k in _series(s, "typhon_run_duration_seconds_count")}
    assert durations == {"research", "development", "translator"}  # no run of the others ended


def test_an_empty_store_shows_zeros_and_no_histogram_series(
    store: RunStore, config: TyphonConfig
) -> None:
    s = _scrape(config, store)
    assert set(_series(s, "activity_completed_total").values()) == {0.0}
    assert len(_series(s, "activity_completed_total")) == 3 * len(BUILTIN)
    assert set(_series(s, "typhon_queue_depth").values()) == {0.0}
    for name in ("typhon_run_duration_seconds_count", "typhon_model_calls_total",
                 "typhon_cache_hits_total", "typhon_qa_score_count",
                 "typhon_feedback_total"):  # fmt: skip
        assert _series(s, name) == {}, name
    assert _series(s, "typhon_alerts_open") == {
        frozenset({("kind", k)}): 0.0
        for k in ("agent_failure_rate", "gpu_temp_high", "storage_full", "vram_critical")
    }
    assert _get(s, "typhon_pool_cap", pool="research") == 4
    assert _get(s, "typhon_cluster_slots", kind="sustained") == 12
    assert _get(s, "typhon_cluster_slots", kind="burst") == 20
    assert not any(name.startswith("typhon_broker") for name, _ in s)  # no Redis broker


def test_outcome_series_for_configured_crews_not_for_what_a_process_registered(
    store: RunStore, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process that answers a scrape shows the same crews: built in, configured, seen in
    the store; a crew registered only in this process (as test modules do) adds nothing."""
    from typhon.crews import crew, default_registry

    registry = default_registry()
    monkeypatch.setattr(registry, "_crews", dict(registry._crews))  # undone after the test
    name = f"only_here_{uuid.uuid4().hex[:6]}"
    crew(name)(lambda ctx: "x")
    assert name in default_registry().names()
    config = TyphonConfig(home=home, crews={"translator": {"timeout_s": 60}})
    crews = {dict(k)["crew"] for k in _series(_scrape(config, store), "activity_completed_total")}
    assert crews == {*BUILTIN, "translator"}


# -- model calls, cache, reviews, feedback, alerts ------------------------------------------------


def _call(store: RunStore, alias: str, prompt: int, completion: int, latency: float,
          gpu_s: float, ok: bool = True) -> None:  # fmt: skip
    usage = Usage(prompt, completion, 1, latency, latency)
    store.add_model_call(alias=alias, requested=alias, url="http://127.0.0.1:1/v1", usage=usage,
                         gpu_s=gpu_s, ok=ok, error=None if ok else "timed out")  # fmt: skip


def test_models_cache_reviews_feedback_and_alerts(store: RunStore, config: TyphonConfig) -> None:
    _call(store, "local", 10, 5, 0.05, 0.1)
    _call(store, "local", 20, 7, 0.3, 0.2)
    _call(store, "local", 30, 9, 2.0, 0.3)
    _call(store, "llama-70b", 0, 0, 40.0, 0.0, ok=False)
    _call(store, "llama-70b", 1000, 800, 400.0, 350.0)
    for hit in (True, True, False, True, False):
        store.add_to_totals(
            cache_counts, {"alias": "local"}, {"hits": int(hit), "misses": int(not hit)}
        )
    store.add_to_totals(cache_counts, {"alias": "llama-70b"}, {"hits": 0, "misses": 4})

    reviews = [("research", "ok", 0.05), ("research", "ok", 0.45), ("research", "ok", 0.95),
               ("research", "ok", 1.0), ("research", "pending", None),
               ("research", "failed", None), ("development", "ok", 0.65)]  # fmt: skip
    votes = [("research", "up"), ("research", "up"), ("research", "down"), ("creative", "down")]
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        for crew, status, score in reviews:
            conn.execute(run_reviews.insert().values(
                run_id=str(uuid.uuid4()), crew=crew, reviewer="qa", status=status, score=score,
                issues=[], created_at=now))  # fmt: skip
        for crew, vote in votes:
            conn.execute(run_feedback.insert().values(
                run_id=str(uuid.uuid4()), crew=crew, vote=vote, created_at=now))  # fmt: skip

    def finding(kind: str, subject: str, firing: bool) -> Finding:
        return Finding(kind, subject, 97.0, 95.0, firing, f"{kind} on {subject}")

    apply_findings(store, [finding("vram_critical", "gpu-a/gpu0", True),
                           finding("vram_critical", "gpu-a/gpu1", True),
                           finding("storage_full", "gpu-a:/", True)], now=T0)  # fmt: skip
    apply_findings(store, [finding("storage_full", "gpu-a:/", False)], now=T0)  # resolved

    s = _scrape(config, store)

    assert _series(s, "typhon_model_calls_total") == {
        frozenset({("alias", a), ("status", st)}): n
        for a, st, n in [("local", "ok", 3), ("local", "error", 0),
                         ("llama-70b", "ok", 1), ("llama-70b", "error", 1)]
    }  # fmt: skip
    assert _series(s, "typhon_model_tokens_total") == {
        frozenset({("alias", a), ("kind", k)}): n
        for a, k, n in [("local", "prompt", 60), ("local", "completion", 21),
                        ("llama-70b", "prompt", 1000), ("llama-70b", "completion", 800)]
    }  # fmt: skip
    assert _get(s, "typhon_model_gpu_seconds_total", alias="local") == pytest.approx(0.6)
    assert _get(s, "typhon_model_gpu_seconds_total", alias="llama-70b") == pytest.approx(350)
    bounds = ("0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "120.0",
              "300.0", "+Inf")  # fmt: skip
    for alias, counts, total in (
        ("local", [1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3], 2.35),
        ("llama-70b", [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2], 440.0),
    ):
        got = [_get(s, "typhon_model_latency_seconds_bucket", alias=alias, le=b) for b in bounds]
        assert got == counts, alias
        assert _get(s, "typhon_model_latency_seconds_count", alias=alias) == counts[-1]
        assert _get(s, "typhon_model_latency_seconds_sum", alias=alias) == pytest.approx(total)

    assert _series(s, "typhon_cache_hits_total") == {
        frozenset({("alias", "local")}): 3,
        frozenset({("alias", "llama-70b")}): 0,
    }
    assert _series(s, "typhon_cache_misses_total") == {
        frozenset({("alias", "local")}): 2,
        frozenset({("alias", "llama-70b")}): 4,
    }

    qa = ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0", "+Inf")
    for crew, counts, total in (
        ("research", [1, 1, 1, 1, 2, 2, 2, 2, 2, 4, 4], 2.45),  # pending and failed not counted
        ("development", [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 0.65),
    ):
        assert [_get(s, "typhon_qa_score_bucket", crew=crew, le=b) for b in qa] == counts
        assert _get(s, "typhon_qa_score_count", crew=crew) == counts[-1]
        assert _get(s, "typhon_qa_score_sum", crew=crew) == pytest.approx(total)
    assert _series(s, "typhon_feedback_total") == {
        frozenset({("crew", c), ("vote", v)}): n
        for c, v, n in [("research", "up", 2), ("research", "down", 1), ("creative", "down", 1)]
    }
    assert {dict(k)["kind"]: v for k, v in _series(s, "typhon_alerts_open").items()} == {
        "vram_critical": 2,
        "storage_full": 0,
        "gpu_temp_high": 0,
        "agent_failure_rate": 0,
    }


# -- this host -----------------------------------------------------------------------------------


def test_gpus_and_disks_of_this_host(store: RunStore, config: TyphonConfig) -> None:
    s = _scrape(config, store)
    gpu0 = {"host": "gpu-a", "gpu": "0", "uuid": "GPU-0", "name": "NVIDIA GeForce RTX 5090"}
    gpu1 = {"host": "gpu-a", "gpu": "1", "uuid": "GPU-1", "name": "NVIDIA GeForce RTX 4090"}
    assert _get(s, "typhon_gpu_memory_used_bytes", **gpu0) == 31 * GIB
    assert _get(s, "typhon_gpu_memory_total_bytes", **gpu0) == 32 * GIB
    assert _get(s, "typhon_gpu_memory_used_bytes", **gpu1) == 2 * GIB
    assert _get(s, "typhon_gpu_temperature_celsius", **gpu0) == 84
    assert _get(s, "typhon_gpu_utilization_percent", **gpu0) == 97
    # a GPU that cannot tell its temperature has no temperature series (not a 0)
    assert len(_series(s, "typhon_gpu_temperature_celsius")) == 1
    assert len(_series(s, "typhon_gpu_utilization_percent")) == 1
    assert _series(s, "typhon_disk_used_percent") == {
        frozenset({("host", "gpu-a"), ("mount", "/"), ("device", "/dev/md0")}): 41.0,
        frozenset({("host", "gpu-a"), ("mount", "/mnt/user"), ("device", "/dev/md1")}): 97.0,
    }


def test_without_a_summary_given_the_real_host_is_read(
    store: RunStore, config: TyphonConfig
) -> None:
    s = _samples(render(config, store).decode())
    real = local_summary()
    assert {dict(k)["mount"] for k in _series(s, "typhon_disk_used_percent")} == {
        d["mount"] for d in real["disks"]
    }
    assert len(_series(s, "typhon_gpu_memory_total_bytes")) == len(
        [g for g in real["gpus"] if g["vram_total_bytes"] is not None]
    )
    for labels, value in _series(s, "typhon_disk_used_percent").items():
        assert dict(labels)["host"] == real["host"]
        assert 0 <= value <= 100
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


# -- broker --------------------------------------------------------------------------------------


@pytest.fixture
def redis_config(home: Path, redis_url: str) -> Iterator[TyphonConfig]:
    """A config on the test Redis with queues and a cluster name of its own; its keys are
    deleted afterwards."""
    import redis

    tag = uuid.uuid4().hex[:8]
    config = TyphonConfig(
        home=home,
        broker_url=redis_url,
        pools=[{"name": "research", "queue": f"research-{tag}", "cap": 2},
               {"name": "creative", "queue": f"creative-{tag}", "cap": 1}],
        cluster={"name": f"m{tag}"},
    )  # fmt: skip
    yield config
    client = redis.Redis.from_url(redis_url)
    keys = [*client.scan_iter(match=f"*{tag}*")]
    if keys:
        client.delete(*keys)
    client.close()


def test_queue_lengths_and_slots_on_the_redis_broker(
    redis_config: TyphonConfig, redis_url: str, tmp_path: Path
) -> None:
    import redis

    tag = redis_config.cluster.name[1:]
    client = redis.Redis.from_url(redis_url)
    client.rpush(f"research-{tag}", *["m"] * 3)
    client.rpush(f"research-{tag}\x06\x163", *["m"] * 2)  # kombu's list for priority 3
    client.rpush(f"typhon-control-m{tag}", "m")
    for key in (f"typhon:m{tag}:slot:research:0", f"typhon:m{tag}:slot:research:1",
                f"typhon:m{tag}:slot:_cluster:0", f"typhon:m{tag}:slot:_cluster:1"):  # fmt: skip
        client.set(key, "run", px=60_000)
    client.close()
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.create_run(crew="research", input="x", pool="research")
    try:
        s = _scrape(redis_config, store)
    finally:
        store.close()

    assert _get(s, "typhon_broker_up") == 1
    assert _series(s, "typhon_broker_queue_length") == {
        frozenset({("queue", f"research-{tag}")}): 5,
        frozenset({("queue", f"creative-{tag}")}): 0,
        frozenset({("queue", f"typhon-control-m{tag}")}): 1,
        frozenset({("queue", f"typhon-improve-m{tag}")}): 0,
    }
    assert _get(s, "typhon_queue_depth", pool="research") == 1  # the store's count, beside it
    assert _series(s, "typhon_slots_in_use") == {
        frozenset({("pool", "research")}): 2,
        frozenset({("pool", "creative")}): 0,
    }
    assert _get(s, "typhon_cluster_slots_in_use") == 2


def test_a_broker_that_does_not_answer_is_down_and_the_rest_still_scraped(
    home: Path, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = TyphonConfig(home=home, broker_url=f"redis://127.0.0.1:{port}/0")
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    _ended(store, "research", RunStatus.SUCCEEDED, 2)
    try:
        s = _scrape(config, store)
    finally:
        store.close()
    assert _get(s, "typhon_broker_up") == 0
    assert _series(s, "typhon_broker_queue_length") == {}
    assert _series(s, "typhon_slots_in_use") == {}
    assert _get(s, "activity_completed_total", crew="research", status="success") == 1


def test_every_typhon_metric_the_rules_and_dashboards_name_is_exposed(
    redis_config: TyphonConfig, tmp_path: Path
) -> None:
    """Names in alerts.yml and the dashboards that are Typhon's are names the collector writes
    (with data in every table, a Redis broker and GPUs)."""
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    _ended(store, "research", RunStatus.SUCCEEDED, 2)
    _call(store, "local", 1, 1, 0.1, 0.1)
    store.add_to_totals(cache_counts, {"alias": "local"}, {"hits": 1, "misses": 1})
    with store.engine.begin() as conn:
        conn.execute(run_reviews.insert().values(
            run_id="r", crew="research", reviewer="qa", status="ok", score=0.5, issues=[],
            created_at=T0))  # fmt: skip
        conn.execute(run_feedback.insert().values(run_id="r", crew="research", vote="up",
                                                  created_at=T0))  # fmt: skip
    try:
        exposed = {name for name, _ in _scrape(redis_config, store)}
    finally:
        store.close()
    texts = [(PROMETHEUS / "alerts.yml").read_text()]
    texts += [p.read_text() for p in sorted(DASHBOARDS.glob("*.json"))]
    named = {
        m
        for text in texts
        for m in re.findall(r"\b(typhon_\w+|activity_completed\w*)(?![\w*])", text)
    }
    assert len(named) > 20
    assert named - exposed == set()


# -- the rules on what the collector exposes -----------------------------------------------------


def _input_series(before: Samples, after: Samples, names: tuple[str, ...]) -> list[dict[str, str]]:
    """promtool input series: each sample's value in ``before`` at 0m, then ``after`` from 1m
    to 70m (a scrape a minute)."""
    out = []
    for (name, labels), value in sorted(after.items(), key=lambda kv: (kv[0][0], sorted(kv[0][1]))):
        if name in names:
            selector = ", ".join(f'{k}="{v}"' for k, v in sorted(labels))
            first = before.get((name, labels), 0.0)
            out.append({"series": f"{name}{{{selector}}}", "values": f"{first} {value}x69"})
    return out


def test_the_alert_rules_and_the_seeds_query_on_real_scrapes(
    store: RunStore, config: TyphonConfig, tmp_path: Path
) -> None:
    """Two scrapes of the store, a minute apart for Prometheus: in between, 4 runs succeeded and
    2 failed (and the Monitoring crew failed twice, and one run was cancelled). promtool runs the
    shipped alert rules and the seed's query over them."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: scripts/test installs it (Debian's prometheus)")
    _ended(store, "research", RunStatus.SUCCEEDED, 5)
    before = _scrape(config, store)
    for _ in range(3):
        _ended(store, "research", RunStatus.SUCCEEDED, 5)
    _ended(store, "development", RunStatus.SUCCEEDED, 5, pool="development")
    _ended(store, "research", RunStatus.FAILED, 5)
    _ended(store, "development", RunStatus.FAILED, 5, pool="development")
    _ended(store, "monitoring", RunStatus.FAILED, 1, pool="monitoring")
    _ended(store, "monitoring", RunStatus.FAILED, 1, pool="monitoring")
    _ended(store, "research", RunStatus.CANCELLED, None)
    after = _scrape(config, store)

    seed = SEED_SUCCESS_RATE
    tests = {
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": _input_series(
                before, after, ("activity_completed_total", "activity_completed")),
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "AgentFailureRateHigh", "exp_alerts": []},
                {"eval_time": "60m", "alertname": "AgentFailureRateHigh", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "kind": "agent_failure_rate",
                                   "source": "typhon"},
                    "exp_annotations": {
                        "summary": "Agent failure rate 33.33% over the last hour",
                        "description": "More than 20% of the agent runs that ended in the last"
                                       " hour failed (typhon runs --json, typhon alerts).",
                        "action": "Review logs, check model health",
                    },
                }]},
            ],
            "promql_expr_test": [
                # the seed's query: 4 successes of 9 completions (cancelled, monitoring included)
                {"expr": f"round({seed}, 0.01)", "eval_time": "60m",
                 "exp_samples": [{"labels": "{}", "value": 44.44}]},
                {"expr": 'sum(increase(activity_completed_total{crew!="monitoring"}[1h]))',
                 "eval_time": "60m", "exp_samples": [{"labels": "{}", "value": 7}]},
            ],
        }],
    }  # fmt: skip
    # At 60m the hour's window holds the first scrape (0m) and the last (60m): rate() and
    # increase() need no extrapolation, so the ratios are the runs' own.
    path = tmp_path / "scrapes.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- typhon metrics ------------------------------------------------------------------------------


def test_typhon_metrics_prints_the_exposition(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    config_path = tmp_path / "typhon.yaml"
    config_path.write_text(f"database_url: sqlite:///{db}\n")
    store = RunStore(f"sqlite:///{db}")
    try:
        _ended(store, "research", RunStatus.SUCCEEDED, 12)
        _ended(store, "research", RunStatus.FAILED, 30)
        store.create_run(crew="creative", input="x", pool="creative")
    finally:
        store.close()
    done = subprocess.run(
        [TYPHON_BIN, "--config", str(config_path), "metrics"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    s = _samples(done.stdout)
    assert _get(s, "activity_completed_total", crew="research", status="success") == 1
    assert _get(s, "activity_completed_total", crew="research", status="failure") == 1
    assert _get(s, "activity_completed", crew="research", status="failure") == 1
    assert _get(s, "typhon_queue_depth", pool="creative") == 1
    assert _get(s, "typhon_run_duration_seconds_sum", crew="research") == pytest.approx(42)
    assert _series(s, "typhon_disk_used_percent")  # this host's disks
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: scripts/test installs it (Debian's prometheus)")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=done.stdout, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
