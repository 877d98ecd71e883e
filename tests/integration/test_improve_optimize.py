"""Evaluation, the optimizer's gate and the canary over a real run store (SQLite and PostgreSQL).

The crew is real and runs through an embedded Typhon; its model is scripted, so that what a
candidate changes (instructions, demonstrations) decides each answer."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from typhon.config import TyphonConfig
from typhon.context import RunContext
from typhon.crews import CrewRegistry, crew
from typhon.improve._canary import canary_state, check_canary
from typhon.improve._eval import Evaluator
from typhon.improve._optimize import optimize, try_candidate, weekly_pass
from typhon.improve._prompts import PromptVersions
from typhon.improve._suite import Check, SuiteItem
from typhon.models import Message
from typhon.orchestrator import Typhon
from typhon.store import RunStore
from typhon.testing import ScriptedModel, ScriptedModels

pytestmark = pytest.mark.integration

# The crew's code prompts (version 1): read by code_prompts() from this module.
PROMPTS = {"solver": {"role": "Solver", "system": "Answer about {topic} in one word."}}
ANSWERS = {f"q{i}": f"a{i}" for i in range(12)}

REGISTRY = CrewRegistry(builtins={})


@crew("quiz", category="simple", registry=REGISTRY)
def quiz(ctx: RunContext) -> str:
    system = ctx.prompt("solver", "system").format(topic="quizzes")
    messages = [{"role": "system", "content": system}, *ctx.demo_messages()]
    messages.append({"role": "user", "content": ctx.input})
    return ctx.model.chat(messages, max_tokens=16).content


def _question(messages: Sequence[Message]) -> str:
    return str(messages[-1].get("content") or "")


def _system(messages: Sequence[Message]) -> str:
    return str(messages[0].get("content") or "")


def knows_with_demos(messages: Sequence[Message]) -> str:
    """Right with at least one demonstration in front (or with 'Carefully' in the system text),
    else right on the first four questions only."""
    if _system(messages).startswith("You improve the instruction"):
        return json.dumps({"instruction": "Carefully answer about {topic} in one word."})
    q = _question(messages)
    demos = any(m.get("role") == "assistant" for m in messages)
    if demos or "Carefully" in _system(messages) or q in {"q0", "q1", "q2", "q3"}:
        return ANSWERS.get(q, "?")
    return "I do not know"


def wrong_when_bad(messages: Sequence[Message]) -> str:
    """Right on every question unless the system text says BAD, then right on none."""
    if "BAD" in _system(messages):
        return "no idea"
    return ANSWERS.get(_question(messages), "?")


def items(n: int = 12, kind: str = "equals") -> list[SuiteItem]:
    return [SuiteItem(f"q{i}", f"q{i}", Check(kind, f"a{i}"), "train") for i in range(n)]


@pytest.fixture
def config(home: Path) -> TyphonConfig:
    return TyphonConfig.model_validate(
        {
            "home": home,
            "improve": {"rounds": 2, "demos": 2, "bootstrap_samples": 500, "canary_min_runs": 3},
        }
    )


@pytest.fixture
def evaluator_for(config: TyphonConfig, store: RunStore) -> Iterator[Callable[..., Evaluator]]:
    made: list[Evaluator] = []

    def make(
        reply: Callable[[Sequence[Message]], str], cfg: TyphonConfig | None = None
    ) -> Evaluator:
        cfg = cfg or config
        evaluator = Evaluator(
            cfg, store, registry=REGISTRY, models=ScriptedModels(cfg, ScriptedModel(reply))
        )
        made.append(evaluator)
        return evaluator

    yield make
    for evaluator in made:
        evaluator.close()


def test_eval_runs_each_item_on_a_throwaway_store(
    config: TyphonConfig, store: RunStore, evaluator_for: Callable[..., Evaluator]
) -> None:
    evaluator = evaluator_for(knows_with_demos)
    version = PromptVersions(store).ensure("quiz", REGISTRY.get("quiz"))
    result = evaluator.evaluate("quiz", items(6), version=version).to_json()
    assert {k: result[k] for k in ("crew", "prompt_version", "n", "passed", "pass_rate")} == {
        "crew": "quiz",
        "prompt_version": 1,
        "n": 6,
        "passed": 4,
        "pass_rate": round(4 / 6, 4),
    }
    first, last = result["items"][0], result["items"][-1]
    assert first == {"id": "q0", "input": "q0", "passed": True, "output": "a0",
                     "status": "succeeded", "detail": "", "model": "local",
                     "model_calls": 1}  # fmt: skip
    assert (last["passed"], last["output"], last["detail"]) == (
        False,
        "I do not know",
        "is not 'a5'",
    )
    # nothing of the evaluation reached the user's store: no runs, no reviews
    assert store.list_runs() == []
    eval_db = evaluator.typhon.store
    runs = eval_db.list_runs(limit=10)
    assert len(runs) == 6
    assert all(r.options["eval"] and r.options["no_cache"] and r.options["no_memory"] for r in runs)
    assert {r.options["prompt_version"] for r in runs} == {1}


def test_a_worse_candidate_is_rejected_with_its_numbers(
    config: TyphonConfig, store: RunStore, evaluator_for: Callable[..., Evaluator]
) -> None:
    evaluator = evaluator_for(wrong_when_bad)
    bad = {"solver": {"role": "Solver", "system": "BAD: answer about {topic}."}}
    out = try_candidate(config, store, "quiz", items(), bad, evaluator=evaluator, source="manual")
    assert out["promoted"] is False and out["baseline"]["pass_rate"] == 1.0
    cand = out["candidate"]
    assert (cand["pass_rate"], cand["gain"], cand["accepted"], cand["n"]) == (0.0, -1.0, False, 12)
    versions = PromptVersions(store)
    assert versions.get("quiz", out["version"]).status == "retired"
    assert versions.active("quiz").version == 1  # type: ignore[union-attr]
    event = versions.events("quiz")[0]
    assert (event["kind"], event["to_version"]) == ("rejected", out["version"])
    assert "below the margin" in event["reason"] and event["data"]["gain"] == -1.0


def test_an_equal_candidate_is_rejected_because_the_interval_includes_zero(
    home: Path, store: RunStore, evaluator_for: Callable[..., Evaluator]
) -> None:
    cfg = TyphonConfig.model_validate({"home": home, "improve": {"gain_margin": 0.0}})
    evaluator = evaluator_for(wrong_when_bad, cfg)
    same = {"solver": {"role": "Solver", "system": "Answer about {topic}, one word only."}}
    out = try_candidate(cfg, store, "quiz", items(), same, evaluator=evaluator)
    cand = out["candidate"]
    assert (cand["gain"], cand["interval"], cand["accepted"]) == (0.0, [0.0, 0.0], False)
    assert "includes 0" in cand["note"]
    assert PromptVersions(store).get("quiz", out["version"]).status == "retired"


def test_a_better_candidate_goes_to_the_canary(
    config: TyphonConfig, store: RunStore, evaluator_for: Callable[..., Evaluator]
) -> None:
    evaluator = evaluator_for(knows_with_demos)
    better = {"solver": {"role": "Solver", "system": "Carefully answer about {topic}."}}
    out = try_candidate(config, store, "quiz", items(), better, evaluator=evaluator)
    cand = out["candidate"]
    assert out["baseline"]["pass_rate"] == round(4 / 12, 4)
    assert (cand["pass_rate"], cand["accepted"], out["promoted"], out["status"]) == (
        1.0, True, True, "canary")  # fmt: skip
    assert cand["gain"] == round(8 / 12, 4) and cand["interval"][0] > 0
    versions = PromptVersions(store)
    canary = versions.canary("quiz")
    assert canary is not None and canary.version == out["version"]
    assert canary.canary_share == config.improve.canary_share
    assert versions.active("quiz").version == 1  # type: ignore[union-attr]
    assert versions.events("quiz")[0]["kind"] == "canary"


def test_optimize_promotes_demonstrations_and_keeps_placeholders(
    config: TyphonConfig, store: RunStore, evaluator_for: Callable[..., Evaluator]
) -> None:
    evaluator = evaluator_for(knows_with_demos)
    out = optimize(config, store, "quiz", items(), evaluator=evaluator)
    assert out["baseline"] == {"version": 1, "pass_rate": round(4 / 12, 4)}
    first = out["rounds"][0]
    assert (first["kind"], first["accepted"], first["pass_rate"]) == ("demos", True, 1.0)
    assert first["n"] == 10  # the two demonstrations' own items are left out of the comparison
    assert out["promoted"] is True and out["status"] == "canary"
    best = PromptVersions(store).get("quiz", out["best"]["version"])
    assert len(best.demos) == 2 and all(d["output"] == ANSWERS[d["input"]] for d in best.demos)
    assert all(b.get("input") in ANSWERS for b in best.demos)
    # round 2 rewrote the instruction of the winner; placeholders kept, and no better than it
    second = out["rounds"][1]
    assert second["kind"] == "rewrite" and second["accepted"] is False
    rewrite = PromptVersions(store).get("quiz", second["version"])
    assert rewrite.prompts["solver"] == {
        "role": "Solver",
        "system": "Carefully answer about {topic} in one word.",
    }
    assert rewrite.parent == best.version and rewrite.status == "retired"
    assert out["model_calls"] >= 12 + 10 + 11


def test_a_rewrite_that_drops_a_placeholder_is_discarded(
    home: Path, store: RunStore, evaluator_for: Callable[..., Evaluator]
) -> None:
    cfg = TyphonConfig.model_validate({"home": home, "improve": {"demos": 0, "rounds": 1}})

    def drops(messages: Sequence[Message]) -> str:
        if _system(messages).startswith("You improve the instruction"):
            return json.dumps({"instruction": "Carefully answer in one word."})
        return knows_with_demos(messages)

    out = optimize(cfg, store, "quiz", items(), evaluator=evaluator_for(drops, cfg))
    assert out["rounds"] == [] and out["promoted"] is False
    assert [v.version for v in PromptVersions(store).history("quiz")] == [1]


def _live(typhon: Typhon, n: int) -> list[str]:
    random.seed(7)  # which runs the canary takes: the same draws every time
    handles = [typhon.submit("quiz", f"q{i % 12}", no_cache=True, no_review=True) for i in range(n)]
    return [h.wait(30).id for h in handles]


def _vote(config: TyphonConfig, store: RunStore, run_id: str) -> None:
    from typhon.improve._feedback import record_feedback

    record = store.get(run_id)
    vote = "up" if record.output == ANSWERS.get(record.input) else "down"
    record_feedback(config, store, run_id, vote, by="tester")


def _with_canary(config: TyphonConfig, store: RunStore, system: str) -> int:
    versions = PromptVersions(store)
    versions.ensure("quiz", REGISTRY.get("quiz"))
    added = versions.add("quiz", {"solver": {"role": "Solver", "system": system}},
                         parent=1, source="manual")  # fmt: skip
    versions.promote("quiz", added.version, canary_share=0.5)
    return added.version


@pytest.mark.parametrize(("system", "expected"), [("BAD {topic}", "rolled_back"),
                                                  ("Fine {topic}", "promoted")])  # fmt: skip
def test_the_canary_is_decided_by_live_feedback(
    config: TyphonConfig, store: RunStore, system: str, expected: str
) -> None:
    version = _with_canary(config, store, system)
    typhon = Typhon(config, registry=REGISTRY, store=store,
                    models=ScriptedModels(config, ScriptedModel(wrong_when_bad)))  # fmt: skip
    try:
        runs = _live(typhon, 24)
        assert check_canary(store, config, "quiz") is None  # judged by nobody yet
        used = [store.get(r).prompt_version for r in runs]
        assert used.count(version) >= 3 and used.count(1) >= 3
        for run_id in runs:
            _vote(config, store, run_id)  # the feedback checks the canary by itself
    finally:
        typhon.close()
    versions = PromptVersions(store)
    event = next(e for e in versions.events("quiz") if e["kind"] in ("rolled_back", "promoted"))
    assert versions.canary("quiz") is None
    metrics = versions.get("quiz", version).metrics["live"]
    assert metrics["canary_runs"] >= 3 and metrics["active_runs"] >= 3
    if expected == "rolled_back":
        assert versions.get("quiz", version).status == "retired"
        assert versions.active("quiz").version == 1  # type: ignore[union-attr]
        assert event["kind"] == "rolled_back" and event["from_version"] == version
        assert event["reason"].startswith(f"canary regressed: v{version} scored 0.00 over")
        assert "v1 1.00 over" in event["reason"]
        assert metrics["canary_score"] == 0.0 and metrics["active_score"] == 1.0
    else:
        assert versions.active("quiz").version == version  # type: ignore[union-attr]
        assert event["kind"] == "promoted" and event["reason"].startswith("canary held")
    assert check_canary(store, config, "quiz") is None  # decided once


def test_canary_waits_for_enough_judged_runs_on_both_sides(
    config: TyphonConfig, store: RunStore
) -> None:
    version = _with_canary(config, store, "BAD {topic}")
    from typhon._types import RunStatus

    def judged(v: int, vote: str, n: int) -> None:
        for _ in range(n):
            run = store.create_run(crew="quiz", input="q0", pool="research", model="local")
            store.claim(run.id)
            store.set_prompt_version(run.id, v)
            store.finish(run.id, RunStatus.SUCCEEDED, output="x")
            from typhon.improve._feedback import record_feedback

            record_feedback(config, store, run.id, vote)

    judged(version, "down", 5)
    judged(1, "up", 2)  # the active version has too few judged runs yet
    state = canary_state(store, config, "quiz")
    assert state is not None and state["ready"] is False
    assert (state["canary_runs"], state["active_runs"]) == (5, 2)
    assert PromptVersions(store).canary("quiz") is not None
    judged(1, "up", 1)
    assert PromptVersions(store).canary("quiz") is None
    assert PromptVersions(store).get("quiz", version).status == "retired"


def test_the_weekly_pass_optimizes_each_crew_with_a_suite(
    home: Path, tmp_path: Path, store: RunStore
) -> None:
    suite = tmp_path / "quiz.jsonl"
    suite.write_text("\n".join(json.dumps(i.to_json()) for i in items()) + "\n")
    cfg = TyphonConfig.model_validate({"home": home, "improve": {
        "rounds": 1, "demos": 2, "bootstrap_samples": 500,
        "suites": {"quiz": str(suite), "ghost": str(tmp_path / "missing.jsonl")}}})  # fmt: skip
    models = ScriptedModels(cfg, ScriptedModel(knows_with_demos))
    out = weekly_pass(cfg, store, registry=REGISTRY, models=models)
    assert [r["crew"] for r in out] == ["quiz", "ghost"]
    assert out[0]["promoted"] is True and out[0]["status"] == "canary"
    assert out[1] == {
        "crew": "ghost",
        "error": f"suite file {tmp_path / 'missing.jsonl'} does not exist",
    }
    assert PromptVersions(store).canary("quiz") is not None
    assert weekly_pass(TyphonConfig(home=home), store) == []
