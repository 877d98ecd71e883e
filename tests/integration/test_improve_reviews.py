"""QA reviews, feedback and learning extraction on SQLite and PostgreSQL: the reviewer of the
other tier, the crew's rubric, a reply that never validates kept as a failed review with its raw
text (the run untouched), a reviewer that cannot be reached leaving the review pending, a
person's vote outranking the QA score, and the examples, diagnoses and preferences learned.
The reviewer's answers are scripted (the tiny real model is reviewed in tests/e2e)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from typhon._types import RunStatus, Usage
from typhon.config import ImproveConfig, TyphonConfig
from typhon.context import RunContext
from typhon.crews import Crew, CrewRegistry, crew
from typhon.errors import InputError, ModelResponseError, ModelUnavailableError, RunNotFoundError
from typhon.improve._feedback import record_feedback
from typhon.improve._learn import DIAGNOSIS_CATEGORIES, diagnose, examples, is_preference
from typhon.improve._review import (
    GENERIC_RUBRIC,
    REVIEW_SCHEMA,
    _cache_hit,
    judge,
    review_pending,
    review_run,
    reviewer_for,
    wants_review,
)
from typhon.improve._scores import run_score
from typhon.memory import Memory, open_memory
from typhon.orchestrator import Typhon
from typhon.store import RunStore, improve_diagnoses, improve_examples, run_reviews
from typhon.testing import ScriptedModel, ScriptedModels

pytestmark = pytest.mark.integration


def _reply(score: float, verdict: str, critique: str = "", issues: tuple[str, ...] = ()) -> str:
    return json.dumps(
        {"score": score, "verdict": verdict, "critique": critique, "issues": list(issues)}
    )


GOOD = _reply(0.9, "pass", "Complete and on topic.")
BAD = _reply(0.2, "fail", "It answers another question.", ("off topic: talks about cats",))


def _finished(
    store: RunStore,
    crew: str = "echo",
    *,
    status: RunStatus = RunStatus.SUCCEEDED,
    input: str = "What is RVV?",
    output: str | None = "RVV is the RISC-V vector extension.",
    error: str | None = None,
    model: str = "local",
    options: dict[str, Any] | None = None,
    prompt_version: int | None = None,
    calls: int = 1,
) -> str:
    run = store.create_run(
        crew=crew, input=input, pool="research", model=model, options=options, category="simple"
    )
    assert store.claim(run.id) is not None
    if calls:
        store.add_usage(run.id, Usage(20, 10, calls, 0.5))
    if prompt_version is not None:
        store.set_prompt_version(run.id, prompt_version)
    assert store.finish(run.id, status, output=output, error=error)
    return run.id


def _reviews(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    c = run_reviews.c
    with store.engine.connect() as conn:
        query = sa.select(run_reviews).where(c.run_id == run_id).order_by(c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def _examples(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    c = improve_examples.c
    with store.engine.connect() as conn:
        query = sa.select(improve_examples).where(c.run_id == run_id).order_by(c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def _diagnoses(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    c = improve_diagnoses.c
    with store.engine.connect() as conn:
        query = sa.select(improve_diagnoses).where(c.run_id == run_id)
        return [dict(r) for r in conn.execute(query).mappings()]


@pytest.fixture
def config(home: Path) -> TyphonConfig:
    """The embedded default's one model reviews its own runs here (``self_review``)."""
    return TyphonConfig(home=home, improve=ImproveConfig(self_review=True))


@pytest.fixture
def memory(config: TyphonConfig, store: RunStore) -> Iterator[Memory]:
    mem = open_memory(config, store)
    yield mem
    mem.close()


# -- who reviews ---------------------------------------------------------------------------------
def _tiers(**improve: Any) -> TyphonConfig:
    def entry(name: str, size: float | None, mode: str = "chat") -> dict[str, Any]:
        info: dict[str, Any] = {"mode": mode}
        if size is not None:
            info["parameters_b"] = size
        return {
            "model_name": name,
            "litellm_params": {"model": f"openai/{name}", "api_base": "http://127.0.0.1:1/v1"},
            "model_info": info,
        }

    return TyphonConfig.model_validate(
        {
            "model_list": [
                entry("qwen-7b", 7), entry("qwen-7b", 7), entry("mid-14b", 14),
                entry("llama-70b", 70), entry("embed", 0.1, mode="embedding"),
                entry("mystery", None),
            ],
            "improve": improve,
        }
    )  # fmt: skip


def test_the_reviewer_is_the_model_of_the_other_tier() -> None:
    config = _tiers()
    assert reviewer_for(config, "qwen-7b") == "llama-70b"  # 7B output, reviewed by the 70B
    assert reviewer_for(config, "llama-70b") == "qwen-7b"  # and the other way round
    assert reviewer_for(config, "mid-14b") == "llama-70b"  # the biggest gap; embeddings never
    assert reviewer_for(config, "mystery") == "mystery"  # size unknown: itself
    named = _tiers(reviewers={"qwen-7b": "mid-14b"})
    assert reviewer_for(named, "qwen-7b") == "mid-14b"  # the configuration wins
    assert reviewer_for(named, "llama-70b") == "qwen-7b"
    # the embedded default has one model: it reviews itself
    assert reviewer_for(TyphonConfig(), "local") == "local"
    assert reviewer_for(TyphonConfig(), None) == "local"


def test_which_runs_get_a_review(store: RunStore, config: TyphonConfig) -> None:
    def wants(**kwargs: Any) -> bool:
        return wants_review(config, store.get(_finished(store, **kwargs)))

    assert wants() and wants(status=RunStatus.FAILED, output=None, error="boom")
    assert wants(status=RunStatus.FAILED, output=None, error="model down", calls=0)
    # a run that used no model has nothing the loop tunes; an answer from the cache counts
    assert not wants(calls=0)
    cached = _finished(store, calls=0)
    assert not _cache_hit(store, store.get(cached))
    store.add_event(cached, "cache_hit", {"model": "local"})
    assert _cache_hit(store, store.get(cached))
    assert wants_review(config, store.get(cached), cache_hit=True)
    assert not wants(status=RunStatus.CANCELLED, output=None)
    assert not wants(options={"eval": True}) and not wants(options={"no_review": True})
    assert not wants(crew="monitoring")
    off = TyphonConfig(home=config.home, improve=ImproveConfig(review=False))
    assert not wants_review(off, store.get(_finished(store)))
    # by default only another tier reviews: one model alone does not review itself
    assert not wants_review(TyphonConfig(), store.get(_finished(store)))
    tiers = _tiers()
    assert wants_review(tiers, store.get(_finished(store, model="qwen-7b")))
    assert not wants_review(tiers, store.get(_finished(store, model="mystery")))


# -- reviews -------------------------------------------------------------------------------------
class Careful(Crew):
    name = "careful"
    rubric: ClassVar[list[str]] = ["Cites the vector length register.", "Under 50 words."]

    def run(self, ctx: RunContext) -> str:
        return "unused"


def test_a_review_is_stored_with_the_prompt_version_and_the_rubric_asked(
    store: RunStore, config: TyphonConfig, memory: Memory
) -> None:
    registry = CrewRegistry(builtins={})
    registry.register(Careful)
    model = ScriptedModel(GOOD)
    models = ScriptedModels(config, model)
    run_id = _finished(store, "careful", prompt_version=3)

    review = review_run(config, store, models, run_id, registry=registry, memory=memory)

    assert review is not None
    assert (review["status"], review["score"], review["verdict"]) == ("ok", 0.9, "pass")
    assert (review["prompt_version"], review["reviewer"], review["crew"]) == (3, "local", "careful")
    assert models.asked == ["local"]
    [call] = model.calls
    prompt = json.dumps(call["messages"])
    assert "Cites the vector length register." in prompt and "Under 50 words." in prompt
    assert "What is RVV?" in prompt and "RVV is the RISC-V vector extension." in prompt
    assert [r["status"] for r in _reviews(store, run_id)] == ["ok"]
    assert run_score(store, run_id) == (0.9, "qa")
    # learned: a candidate example, the QA score in the producer's model performance
    assert examples(store, "careful") == [
        {"input": "What is RVV?", "output": "RVV is the RISC-V vector extension.", "score": 0.9,
         "source": "qa", "run_id": run_id},
    ]  # fmt: skip
    [perf] = memory.backend.performance.stats("local", "simple")
    assert (perf["qa_score"], perf["qa_reviews"]) == (0.9, 1)
    # a crew without a rubric is judged against the generic one
    other = ScriptedModel(GOOD)
    judge(config, ScriptedModels(config, other), "echo", "q", "a", "local")
    assert GENERIC_RUBRIC in other.calls[0]["messages"][0]["content"]


def test_a_reply_that_never_validates_is_a_failed_review_and_the_run_is_untouched(
    store: RunStore, config: TyphonConfig
) -> None:
    run_id = _finished(store)
    model = ScriptedModel("the answer is fine, 10/10")
    review = review_run(config, store, ScriptedModels(config, model), run_id)
    assert review is not None
    assert (review["status"], review["score"], review["verdict"]) == ("failed", None, None)
    assert review["raw"] == "the answer is fine, 10/10"
    assert len(model.calls) == 2  # asked once more
    record = store.get(run_id)
    assert record.status is RunStatus.SUCCEEDED and record.output is not None
    assert run_score(store, run_id) == (None, None) and _examples(store, run_id) == []

    # JSON off the schema (a score above 1) is no better
    off = ScriptedModel(_reply(7, "pass"))
    off_review = review_run(config, store, ScriptedModels(config, off), run_id)
    assert off_review is not None and off_review["status"] == "failed"

    # the HTTP client gives up after its own retry: the error's text is kept as the raw reply
    refused = ModelResponseError(
        "model 'local' at http://127.0.0.1:1 answered text that is not the JSON asked for: 'meh'",
        alias="local", url="http://127.0.0.1:1",
    )  # fmt: skip
    failing = ScriptedModel(refused)
    failed = review_run(config, store, ScriptedModels(config, failing), run_id)
    assert failed is not None and failed["status"] == "failed" and "'meh'" in failed["raw"]
    assert len(failing.calls) == 1
    assert [r["status"] for r in _reviews(store, run_id)] == ["failed"] * 3
    assert store.get(run_id).status is RunStatus.SUCCEEDED


def test_a_failed_run_without_output_is_judged_without_a_model(
    store: RunStore, config: TyphonConfig
) -> None:
    run_id = _finished(
        store, status=RunStatus.FAILED, output=None,
        error="run abc ran past its time limit of 30s and was stopped",
    )  # fmt: skip
    model = ScriptedModel(GOOD)
    review = review_run(config, store, ScriptedModels(config, model), run_id)
    assert review is not None and model.calls == []
    assert (review["status"], review["score"], review["verdict"], review["reviewer"]) == (
        "ok", 0.0, "fail", "rules",
    )  # fmt: skip
    [diagnosis] = _diagnoses(store, run_id)
    assert diagnosis["category"] == "timeout" and "time limit" in diagnosis["detail"]
    assert store.get(run_id).status is RunStatus.FAILED


def test_a_reviewer_that_cannot_be_reached_leaves_the_review_pending(
    store: RunStore, config: TyphonConfig
) -> None:
    run_id = _finished(store)
    down = ModelUnavailableError(
        "model 'local': every replica is down", alias="local", url="local:llama-server"
    )
    with pytest.raises(ModelUnavailableError):
        review_run(config, store, ScriptedModels(config, ScriptedModel(down)), run_id)
    assert [r["status"] for r in _reviews(store, run_id)] == ["pending"]
    assert review_pending(config, store, ScriptedModels(config, ScriptedModel(down))) == [
        {"run_id": run_id, "status": "pending", "error": str(down)}
    ]
    # later the model is back: the sweep completes the same review
    done = review_pending(config, store, ScriptedModels(config, ScriptedModel(BAD)))
    assert [(r["run_id"], r["status"], r["verdict"]) for r in done] == [(run_id, "ok", "fail")]
    assert [r["status"] for r in _reviews(store, run_id)] == ["ok"]
    assert review_pending(config, store, ScriptedModels(config, ScriptedModel(GOOD))) == []
    assert review_run(
        config, store, ScriptedModels(config, ScriptedModel(GOOD)), run_id, pending_only=True
    ) is None  # fmt: skip
    [diagnosis] = _diagnoses(store, run_id)
    assert diagnosis["category"] == "off_topic" and "talks about cats" in diagnosis["detail"]


def test_only_finished_runs_are_reviewed(store: RunStore, config: TyphonConfig) -> None:
    run = store.create_run(crew="echo", input="x", pool="research")
    models = ScriptedModels(config, ScriptedModel(GOOD))
    with pytest.raises(InputError, match="queued"):
        review_run(config, store, models, run.id)
    with pytest.raises(RunNotFoundError):
        review_run(config, store, models, "nosuch")


# -- feedback ------------------------------------------------------------------------------------
def test_a_persons_vote_outranks_qa_and_teaches(
    store: RunStore, config: TyphonConfig, memory: Memory, tmp_path: Path
) -> None:
    run_id = _finished(store, prompt_version=2)
    review_run(config, store, ScriptedModels(config, ScriptedModel(GOOD)), run_id)
    assert [e["source"] for e in _examples(store, run_id)] == ["qa"]
    assert _diagnoses(store, run_id) == []

    note = "Wrong: it invents the 2019 date. I prefer sources from the spec, never blogs."
    down = record_feedback(config, store, run_id, "down", note=note, by="alice", memory=memory)
    assert (down["vote"], down["by"], down["prompt_version"]) == ("down", "alice", 2)
    assert (down["score"], down["score_source"]) == (0.0, "human")  # outranks the QA 0.9
    assert run_score(store, run_id) == (0.0, "human")
    assert _examples(store, run_id) == []  # no longer an example
    [diagnosis] = _diagnoses(store, run_id)
    assert diagnosis["category"] == "wrong" and "voted down by alice" in diagnosis["detail"]
    [pref] = memory.backend.semantic.list(crew="echo", kind="preference")
    assert pref.text == note and pref.run_id == run_id and down["learned"]["preference"] == pref.id

    correction = "RVV is the RISC-V vector extension, ratified in 2021."
    up = record_feedback(config, store, run_id, "up", correction=correction, by="bob")
    assert (up["score"], up["score_source"]) == (1.0, "human")
    assert _diagnoses(store, run_id) == []  # the latest verdict is a thumbs up
    got = [(e["source"], e["output"], e["score"]) for e in examples(store, "echo")]
    assert got == [
        ("correction", correction, 1.0),
        ("human", "RVV is the RISC-V vector extension.", 1.0),
    ]
    assert examples(store, "echo", limit=1)[0]["source"] == "correction"
    assert examples(store, "other") == []

    with pytest.raises(InputError, match="up or down"):
        record_feedback(config, store, run_id, "meh")
    with pytest.raises(RunNotFoundError):
        record_feedback(config, store, "nosuch", "up")
    queued = store.create_run(crew="echo", input="x", pool="research")
    with pytest.raises(InputError, match="once it has finished"):
        record_feedback(config, store, queued.id, "up")


def test_a_qa_fail_without_a_vote_is_diagnosed(store: RunStore, config: TyphonConfig) -> None:
    run_id = _finished(store)
    reply = _reply(0.3, "fail", "Half the answer.", ("missing the second part",))
    review_run(config, store, ScriptedModels(config, ScriptedModel(reply)), run_id)
    [diagnosis] = _diagnoses(store, run_id)
    assert diagnosis["category"] == "incomplete"
    assert "QA fail (0.30): Half the answer." in diagnosis["detail"]
    assert _examples(store, run_id) == []


def test_diagnosis_rules_and_preferences() -> None:
    assert diagnose("model 'x': every replica is down", [], None, None) == "model_unavailable"
    assert diagnose("run x ran past its time limit of 5s", [], None, None) == "timeout"
    assert diagnose("stopped by the sandbox (network)", [], None, None) == "sandbox"
    assert diagnose(None, ["not valid JSON"], None, None) == "format"
    assert diagnose(None, [], "Off-topic.", None) == "off_topic"
    assert diagnose(None, [], None, "it stops halfway, truncated") == "incomplete"
    assert diagnose(None, [], "The year is incorrect.", None) == "wrong"
    assert diagnose(None, [], None, "meh") == "other"
    assert DIAGNOSIS_CATEGORIES[-1] == "other" and len(set(DIAGNOSIS_CATEGORIES)) == 8
    for note in ("I prefer tables", "always cite the spec", "Never use emoji",
                 "please use metric units", "don't summarise"):  # fmt: skip
        assert is_preference(note), note
    assert not is_preference("good answer") and not is_preference("")


def test_review_schema_is_bounded() -> None:
    """Grammar-enforced strings must be bounded, or a small model can loop to max_tokens."""
    props = REVIEW_SCHEMA["properties"]
    assert props["critique"]["maxLength"] and props["issues"]["items"]["maxLength"]
    assert props["issues"]["maxItems"] and props["verdict"]["enum"] == ["pass", "fail"]


# -- in-process runs -----------------------------------------------------------------------------
def test_an_embedded_run_is_reviewed_right_after_its_outcome(
    home: Path, config: TyphonConfig
) -> None:
    registry = CrewRegistry(builtins={})

    @crew("echo", registry=registry, category="simple")
    def echo(ctx: RunContext) -> str:
        return "echo: " + ctx.model.chat([{"role": "user", "content": ctx.input}]).content

    model = ScriptedModel(lambda m: GOOD if "QA reviewer" in str(m) else "hello")
    with Typhon(config, registry=registry, models=ScriptedModels(config, model)) as typhon:
        reviewed = typhon.submit("echo", "say hello").wait(60)
        skipped = typhon.submit("echo", "say hello again", no_review=True).wait(60)
    # closing waited for the runner threads: what they did after the outcome is done
    assert reviewed.status is RunStatus.SUCCEEDED and reviewed.output == "echo: hello"
    store = RunStore(config.effective_database_url)
    try:
        [review] = _reviews(store, reviewed.id)
        assert (review["status"], review["score"], review["prompt_version"]) == ("ok", 0.9, 1)
        assert _reviews(store, skipped.id) == []
        assert store.get(reviewed.id).status is RunStatus.SUCCEEDED
    finally:
        store.close()

    off = TyphonConfig(home=home, improve=ImproveConfig(review=False))
    with Typhon(off, registry=registry, models=ScriptedModels(off, model)) as typhon:
        record = typhon.submit("echo", "no reviews here").wait(60)
    store = RunStore(config.effective_database_url)
    try:
        assert _reviews(store, record.id) == []
    finally:
        store.close()


def test_the_hook_leaves_a_review_pending_while_the_reviewer_is_down(
    store: RunStore, config: TyphonConfig
) -> None:
    from typhon._runtime import Runtime
    from typhon.improve._review import queue_review, review_in

    down = ModelUnavailableError(
        "model 'local': every replica is down", alias="local", url="local:llama-server"
    )
    run_id = _finished(store)
    runtime = Runtime(config, store=store, models=ScriptedModels(config, ScriptedModel(down)))
    try:
        queue_review(runtime, run_id)  # never raises: the run's outcome stands
        assert [r["status"] for r in _reviews(store, run_id)] == ["pending"]
        assert review_in(runtime, run_id) == {
            "run_id": run_id, "status": "pending", "error": str(down),
        }  # fmt: skip
    finally:
        runtime.models.close()
    back = Runtime(config, store=store, models=ScriptedModels(config, ScriptedModel(GOOD)))
    try:
        review = review_in(back, run_id)
        assert review is not None and (review["status"], review["score"]) == ("ok", 0.9)
        assert review_in(back, run_id) is None  # nothing pending any more
        queue_review(back, _finished(store, crew="monitoring"))  # not reviewed: no row
    finally:
        back.models.close()
    assert store.get(run_id).status is RunStatus.SUCCEEDED
