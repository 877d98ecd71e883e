"""Activity, external agents' activity, the report, on SQLite and PostgreSQL; and `typhon
activity`, `typhon feedback`, `typhon improve review` and `typhon improve report` as people type
them (exit 2 with one line for what is wrong)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import TYPHON_BIN

from typhon._types import RunStatus, Usage
from typhon.config import TyphonConfig
from typhon.errors import InputError
from typhon.improve._activity import OUTPUT_CHARS, activity, ingest
from typhon.improve._feedback import record_feedback
from typhon.improve._learn import examples
from typhon.improve._report import build_report, write_report
from typhon.improve._review import review_run
from typhon.store import RunStore, improve_diagnoses, runs
from typhon.testing import ScriptedModel, ScriptedModels

pytestmark = pytest.mark.integration


def _review(score: float, verdict: str) -> str:
    return json.dumps({"score": score, "verdict": verdict, "critique": "", "issues": []})


def _run(
    store: RunStore,
    crew: str,
    status: RunStatus,
    *,
    model: str = "local",
    output: str | None = "out",
    error: str | None = None,
    input: str = "in",
    options: dict[str, Any] | None = None,
) -> str:
    run = store.create_run(
        crew=crew, input=input, pool="research", model=model, options=options,
        backend="http://127.0.0.1:1", category="simple", rules_version=1,
    )  # fmt: skip
    if status is not RunStatus.CANCELLED:
        assert store.claim(run.id) is not None
        store.add_usage(run.id, Usage(10, 5, 1, 0.25))
    assert store.finish(run.id, status, output=output, error=error)
    return run.id


def _age(store: RunStore, run_id: str, hours: float) -> None:
    """Move a run back in time (created, started and finished ``hours`` earlier)."""
    record = store.get(run_id)
    shift = timedelta(hours=hours)
    with store.engine.begin() as conn:
        conn.execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(
                created_at=record.created_at - shift,
                started_at=record.started_at - shift if record.started_at else None,
                finished_at=record.finished_at - shift if record.finished_at else None,
            )
        )


def test_activity_lists_every_outcome_with_filters(store: RunStore, config: TyphonConfig) -> None:
    ok = _run(store, "research", RunStatus.SUCCEEDED, output="x" * (OUTPUT_CHARS + 500))
    failed = _run(store, "research", RunStatus.FAILED, model="big", output=None, error="boom")
    other = _run(store, "creative", RunStatus.SUCCEEDED)
    old = _run(store, "creative", RunStatus.CANCELLED, output=None)
    _age(store, old, 48)
    store.set_prompt_version(ok, 4)
    review_run(config, store, ScriptedModels(config, ScriptedModel(_review(0.7, "pass"))), ok)
    record_feedback(config, store, other, "down", note="too long")

    rows = activity(store)
    assert [r["run_id"] for r in rows] == [other, failed, ok, old]  # newest first
    row = next(r for r in rows if r["run_id"] == ok)
    assert len(row["output"]) == OUTPUT_CHARS
    assert {k: row[k] for k in ("crew", "status", "model", "backend", "category",
                                "prompt_version", "rules_version", "prompt_tokens",
                                "completion_tokens", "model_calls", "model_latency_s",
                                "review", "qa_score", "qa_verdict", "human_vote", "score")} == {
        "crew": "research", "status": "succeeded", "model": "local",
        "backend": "http://127.0.0.1:1", "category": "simple", "prompt_version": 4,
        "rules_version": 1, "prompt_tokens": 10, "completion_tokens": 5, "model_calls": 1,
        "model_latency_s": 0.25, "review": "ok", "qa_score": 0.7, "qa_verdict": "pass",
        "human_vote": None, "score": 0.7,
    }  # fmt: skip
    assert row["duration_s"] is not None and row["duration_s"] >= 0
    assert row["created_at"].endswith("+00:00") and row["finished_at"] is not None
    voted = next(r for r in rows if r["run_id"] == other)
    assert (voted["human_vote"], voted["score"], voted["qa_score"]) == ("down", 0.0, None)
    assert next(r for r in rows if r["run_id"] == failed)["error"] == "boom"
    json.dumps(rows)  # JSON as it is

    assert [r["run_id"] for r in activity(store, crew="creative")] == [other, old]
    assert [r["run_id"] for r in activity(store, status="failed")] == [failed]
    assert [r["run_id"] for r in activity(store, model="big")] == [failed]
    assert [r["run_id"] for r in activity(store, hours=24)] == [other, failed, ok]
    assert [r["run_id"] for r in activity(store, limit=2)] == [other, failed]
    with pytest.raises(InputError, match="unknown status 'done'"):
        activity(store, status="done")


def test_ingest_records_an_external_agents_task(store: RunStore) -> None:
    row = ingest(
        store,
        {"agent": "n8n-mailer", "status": "success", "input": "send the digest",
         "output": "sent 12 mails", "model": "qwen-7b", "duration_ms": 1500,
         "prompt_tokens": 40, "completion_tokens": 8, "metadata": {"workflow": "digest"}},
    )  # fmt: skip
    assert (row["crew"], row["status"], row["pool"], row["model"]) == (
        "n8n-mailer", "succeeded", "external", "qwen-7b",
    )  # fmt: skip
    assert (row["output"], row["duration_s"]) == ("sent 12 mails", 1.5)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (40, 8)
    record = store.get(row["run_id"])
    assert record.options["metadata"] == {"workflow": "digest"} and record.options["no_review"]
    failed = ingest(store, {"crew": "scraper", "status": "failure", "input": "fetch x",
                            "error": "HTTP 503", "duration": 2})  # fmt: skip
    assert (failed["status"], failed["error"], failed["duration_s"]) == ("failed", "HTTP 503", 2.0)
    assert [r["crew"] for r in activity(store)] == ["scraper", "n8n-mailer"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"status": "success", "input": "x"}, "'crew'"),
        ({"agent": "  ", "status": "success", "input": "x"}, "'agent'"),
        ({"agent": "a", "status": "done", "input": "x"}, "'status'"),
        ({"agent": "a", "status": "success"}, "'input'"),
        ({"agent": "a", "status": "success", "input": "x", "output": 3}, "'output'"),
        ({"agent": "a", "status": "success", "input": "x", "metadata": []}, "'metadata'"),
        ({"agent": "a", "status": "success", "input": "x", "duration_ms": -1}, "'duration_ms'"),
        ({"agent": "a", "status": "success", "input": "x", "prompt_tokens": 1.5},
         "'prompt_tokens'"),
        ({"agent": "a" * 65, "status": "success", "input": "x"}, "'agent'"),
        (["not", "an", "object"], "JSON object"),
    ],
)  # fmt: skip
def test_ingest_refuses_bad_activity_naming_the_field(
    store: RunStore, payload: Any, field: str
) -> None:
    with pytest.raises(InputError) as err:
        ingest(store, payload)
    assert field in str(err.value)
    assert activity(store) == []  # nothing stored


# -- the report ----------------------------------------------------------------------------------
def test_the_report_compares_this_period_with_the_previous(
    store: RunStore, config: TyphonConfig
) -> None:
    def reviewed(crew: str, status: RunStatus, score: float, model: str = "local") -> str:
        run_id = _run(store, crew, status, model=model)
        verdict = "pass" if score >= 0.5 else "fail"
        review_run(
            config, store, ScriptedModels(config, ScriptedModel(_review(score, verdict))), run_id
        )
        return run_id

    # the previous day: research 1 of 2 succeeded, QA 0.4 on average
    for run_id in (
        reviewed("research", RunStatus.SUCCEEDED, 0.6),
        reviewed("research", RunStatus.FAILED, 0.2),
    ):
        _age(store, run_id, 30)
    # today: research 2 of 2, QA 0.8 and 1.0; creative on the big model fails; an eval run
    reviewed("research", RunStatus.SUCCEEDED, 0.8)
    voted = reviewed("research", RunStatus.SUCCEEDED, 1.0)
    record_feedback(config, store, voted, "up")
    _run(store, "creative", RunStatus.FAILED, model="big", output=None,
         error="model 'big': every replica is down")  # fmt: skip
    _run(store, "research", RunStatus.FAILED, options={"eval": True}, output=None)
    with store.engine.begin() as conn:  # a diagnosis for the creative failure
        creative = activity(store, crew="creative")[0]["run_id"]
        conn.execute(improve_diagnoses.insert().values(
            run_id=creative, crew="creative", category="model_unavailable", detail="down",
            created_at=datetime.now(UTC),
        ))  # fmt: skip

    report = build_report(store, days=1)
    overall = report["overall"]
    assert (overall["runs"], overall["succeeded"], overall["failed"]) == (3, 2, 1)
    assert overall["success_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert overall["qa_mean"] == pytest.approx(0.9) and overall["qa_reviews"] == 2
    assert (overall["human_up"], overall["human_down"], overall["human_up_share"]) == (1, 0, 1.0)
    assert overall["previous"]["runs"] == 2 and overall["previous"]["success_rate"] == 0.5
    research = next(c for c in report["crews"] if c["crew"] == "research")
    assert research["success_rate"] == 1.0 and research["previous"]["success_rate"] == 0.5
    assert research["trend"]["success_rate"] == 0.5
    assert research["trend"]["qa_mean"] == pytest.approx(0.5)  # 0.9 now, 0.4 before
    big = next(m for m in report["models"] if m["model"] == "big")
    assert (big["runs"], big["success_rate"], big["trend"]["success_rate"]) == (1, 0.0, None)
    assert report["failure_categories"] == [{"category": "model_unavailable", "runs": 1}]
    # the creative failure was not reviewed
    assert report["reviews"] == {"ok": 2, "failed": 0, "pending": 0, "none": 1}

    written = write_report(config, store, days=1)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    md, js = Path(written["markdown"]), Path(written["json"])
    assert md == config.home / "reports" / f"report-{day}.md"
    assert js == config.home / "reports" / f"report-{day}.json"
    assert json.loads(js.read_text())["overall"]["runs"] == 3
    text = md.read_text()
    for heading in ("## Overall", "## Per crew", "## Per model", "## Top failure categories"):
        assert heading in text
    assert "| success rate | 67% | 50% | +17 pts |" in text
    assert "- model_unavailable: 1" in text
    assert examples(store, "research", min_score=0.8)[0]["score"] == 1.0


# -- the commands --------------------------------------------------------------------------------
def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TYPHON_HOME": str(home)}
    return subprocess.run([TYPHON_BIN, *args], env=env, capture_output=True, text=True, timeout=120)


def _one_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_commands(home: Path, tmp_path: Path) -> None:
    config = TyphonConfig(home=home)
    home.mkdir(parents=True)
    store = RunStore(config.effective_database_url)
    try:
        done = _run(store, "research", RunStatus.SUCCEEDED, output="RVV is RISC-V's vectors.")
        queued = store.create_run(crew="research", input="later", pool="research").id
    finally:
        store.close()

    result = _cli(home, "feedback", "nosuch", "up")
    assert result.returncode == 2
    assert "no run with id 'nosuch'" in _one_error(result)
    result = _cli(home, "feedback", done, "sideways")
    assert result.returncode == 2 and "up or down" in _one_error(result)
    result = _cli(home, "feedback", done, "up", "--correction", str(tmp_path / "missing.md"))
    assert result.returncode == 2 and "cannot read --correction" in _one_error(result)
    result = _cli(home, "feedback", queued, "up")
    assert result.returncode == 2 and "once it has finished" in _one_error(result)

    fixed = tmp_path / "fixed.md"
    fixed.write_text("RVV is the RISC-V vector extension.")
    result = _cli(home, "feedback", done, "up", "--correction", str(fixed), "--by", "carol",
                  "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads(result.stdout)
    assert (saved["vote"], saved["by"], saved["score"], saved["score_source"]) == (
        "up", "carol", 1.0, "human",
    )  # fmt: skip
    assert saved["learned"]["correction"] and saved["learned"]["example"]
    result = _cli(home, "feedback", done, "down", "--note", "too terse")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"down on run {done} recorded; score 0.00 (human)")

    result = _cli(home, "activity", "--json", "--status", "succeeded")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert (row["run_id"], row["human_vote"], row["score"]) == (done, "down", 0.0)
    result = _cli(home, "activity")
    assert result.returncode == 0 and done in result.stdout and queued in result.stdout
    result = _cli(home, "activity", "--status", "finished")
    assert result.returncode == 2 and "unknown status 'finished'" in _one_error(result)

    result = _cli(home, "improve", "review")
    assert result.returncode == 2 and "RUN_ID or --pending" in _one_error(result)
    result = _cli(home, "improve", "review", "nosuch")
    assert result.returncode == 2 and "no run with id 'nosuch'" in _one_error(result)
    result = _cli(home, "improve", "review", queued)
    assert result.returncode == 2 and "review it once it has finished" in _one_error(result)
    result = _cli(home, "improve", "review", "--pending", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == []

    result = _cli(home, "improve", "report", "--days", "7", "--json")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert Path(written["markdown"]).parent == home / "reports"
    assert written["report"]["overall"]["runs"] == 1
    assert json.loads(Path(written["json"]).read_text())["period"]["days"] == 7
    result = _cli(home, "improve", "report")
    assert result.returncode == 0 and result.stdout.split() == [
        written["markdown"], written["json"],
    ]  # fmt: skip


def test_an_unjudged_run_has_no_scores(store: RunStore) -> None:
    run_id = _run(store, "research", RunStatus.SUCCEEDED)
    [row] = activity(store)
    assert (row["run_id"], row["review"], row["qa_score"], row["human_vote"], row["score"]) == (
        run_id, None, None, None, None,
    )  # fmt: skip
