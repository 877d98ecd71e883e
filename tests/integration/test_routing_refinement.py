"""Routing refinement over a real run store (SQLite and PostgreSQL): judged runs per model and
category move a category to the model that does better, under the gate, as a new rules version
that the router then uses and that can be rolled back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from typhon._types import RunStatus, Usage
from typhon.config import TyphonConfig
from typhon.improve._routing import bootstrap_interval, propose, refine_routing
from typhon.models import ModelRegistry, Router
from typhon.store import RunStore, run_feedback, run_reviews

pytestmark = pytest.mark.integration

TYPHON = str(Path(sys.executable).parent / "typhon")
MODELS = [
    {"model_name": "fast", "litellm_params": {"model": "ollama/qwen2.5:7b", "api_base": "http://127.0.0.1:9"}},
    {"model_name": "big", "litellm_params": {"model": "openai/default", "api_base": "http://127.0.0.1:9/v1"}},
]  # fmt: skip
ROUTING = {"simple": "fast", "complex": "big", "code": "fast", "creative": "big"}


def _config(home: Path) -> TyphonConfig:
    return TyphonConfig.model_validate({"home": home, "model_list": MODELS, "routing": ROUTING})


def _judged(
    store: RunStore, model: str, category: str, scores: list[float], *, human: bool = False
) -> None:
    for i, score in enumerate(scores):
        run = store.create_run(
            crew="development", input=f"task {i}", pool="development", model=model,
            backend="x", category=category, rules_version=1,
        )  # fmt: skip
        store.claim(run.id)
        store.finish(run.id, RunStatus.SUCCEEDED, output="done")
        store.add_model_call(
            alias=model, requested=model, url="http://127.0.0.1:9", usage=Usage(1, 1, 1, 0.1),
            gpu_s=0.0, run_id=run.id, category=category,
        )  # fmt: skip
        with store.engine.begin() as conn:
            now = datetime.now(UTC)
            if human:
                conn.execute(
                    run_feedback.insert().values(
                        run_id=run.id, crew="development", vote="up" if score >= 0.5 else "down",
                        note="", by="alice", created_at=now,
                    )
                )  # fmt: skip
            else:
                conn.execute(
                    run_reviews.insert().values(
                        run_id=run.id, crew="development", reviewer="big", status="ok",
                        score=score, verdict="pass" if score >= 0.5 else "fail", critique="",
                        issues=[], raw="", created_at=now,
                    )
                )  # fmt: skip


def _router(config: TyphonConfig, store: RunStore) -> Router:
    return Router(config, store, ModelRegistry(config), ttl_s=0)


def test_a_better_model_takes_the_category_as_a_new_rules_version(
    home: Path, store: RunStore
) -> None:
    config = _config(home)
    router = _router(config, store)
    assert router.rules().models["code"] == "fast"  # version 1, from the configuration
    _judged(store, "fast", "code", [0.2, 0.3, 0.4, 0.3, 0.2, 0.4, 0.3, 0.2, 0.3, 0.4])
    _judged(store, "big", "code", [0.9, 0.8, 0.9, 0.7, 0.8, 0.9, 0.8, 0.9, 0.8, 0.7])
    _judged(store, "big", "simple", [0.1] * 10)  # worse than nothing known for fast: no move
    [proposal] = propose(config, store)
    assert (proposal.category, proposal.current, proposal.proposed) == ("code", "fast", "big")
    assert proposal.interval[0] > 0 and proposal.gain >= config.improve.gain_margin
    result = refine_routing(config, store, apply=True)
    assert result["version"] == 2
    rules = router.rules(fresh=True)
    assert rules.version == 2 and rules.models["code"] == "big" and rules.models["simple"] == "fast"
    assert rules.source == "improve"
    assert "code: fast -> big" in store.active_rules()["note"]  # type: ignore[index]
    store.activate_rules(1)  # rolled back by hand
    assert router.rules(fresh=True).models["code"] == "fast"


def test_no_move_without_enough_runs_or_when_the_interval_includes_zero(
    home: Path, store: RunStore
) -> None:
    config = _config(home)
    _router(config, store).rules()
    _judged(store, "fast", "code", [0.5] * 9)
    _judged(store, "big", "code", [0.9] * 12)
    assert propose(config, store) == []  # fast has 9 judged runs, under min_runs
    _judged(store, "fast", "code", [0.9, 0.1, 0.9])  # now 12 runs, noisy
    _judged(store, "big", "code", [0.1, 0.1, 0.1, 0.1])
    assert propose(config, store) == []
    assert refine_routing(config, store, apply=True)["version"] is None


def test_a_person_s_verdict_counts_before_the_qa_score(home: Path, store: RunStore) -> None:
    config = _config(home)
    _router(config, store).rules()
    _judged(store, "fast", "code", [0.9] * 10)  # QA likes fast...
    _judged(store, "big", "code", [0.92] * 10)
    assert propose(config, store) == []  # a gain of 0.02: under the margin
    # ...people do not: every fast run gets a thumbs down
    with store.engine.begin() as conn:
        ids = [
            r[0]
            for r in conn.execute(
                run_reviews.select()
                .with_only_columns(run_reviews.c.run_id)
                .where(run_reviews.c.score == 0.9)
            )
        ]
        for run_id in ids:
            conn.execute(
                run_feedback.insert().values(
                    run_id=run_id, crew="development", vote="down", note="wrong", by="bob",
                    created_at=datetime.now(UTC),
                )
            )  # fmt: skip
    [proposal] = propose(config, store)
    assert proposal.current_score == 0.0 and proposal.proposed == "big"


def test_bootstrap_interval_is_reproducible() -> None:
    a, b = [0.1, 0.2, 0.3, 0.2], [0.6, 0.7, 0.8, 0.7]
    first = bootstrap_interval(a, b, samples=500, confidence=0.95)
    assert first == bootstrap_interval(a, b, samples=500, confidence=0.95)
    assert 0 < first[0] <= 0.5 <= first[1]


def test_typhon_improve_routing_command(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "typhon.yaml"
    path.write_text(json.dumps({"model_list": MODELS, "routing": ROUTING}))
    env = {**os.environ, "TYPHON_HOME": str(home), "TYPHON_CONFIG": str(path)}
    config = _config(home)
    store = RunStore(config.effective_database_url)
    try:
        _router(config, store).rules()
        _judged(store, "fast", "code", [0.2, 0.3, 0.4] * 4)
        _judged(store, "big", "code", [0.9, 0.8, 0.7] * 4)
    finally:
        store.close()
    shown = subprocess.run(
        [TYPHON, "improve", "routing", "--json"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out["version"] is None and out["proposals"][0]["proposed"] == "big"
    applied = subprocess.run(
        [TYPHON, "improve", "routing", "--apply"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert "code: fast -> big" in applied.stdout and "rules version 2 is active" in applied.stdout
