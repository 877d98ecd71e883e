"""The learning loop on the real local llama-server, as people type it: `typhon run research`
in-process, then `typhon improve review --pending` leaves the run reviewed (a review, or a failed
one with the raw reply: the tiny model is weak) without touching the run; `typhon activity` shows
it and `typhon feedback` outranks it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import sqlalchemy as sa
from conftest import TYPHON_BIN

from typhon.store import RunStore, run_reviews

# the embedded default has one model: it reviews its own runs only when asked to
FAST = {"TYPHON_CREWS__RESEARCH__MAX_TOKENS": "48", "TYPHON_IMPROVE__SELF_REVIEW": "true"}


def _cli(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TYPHON_HOME": str(home), **FAST}
    return subprocess.run(
        [TYPHON_BIN, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_a_research_run_is_reviewed_by_the_real_model(home: Path) -> None:
    result = _cli(home, "run", "research", "RISC-V vector extension", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert (run["status"], run["model"]) == ("succeeded", "local")

    result = _cli(home, "improve", "review", "--pending", "--json")
    assert result.returncode == 0, result.stderr
    assert all(r["run_id"] == run["run_id"] for r in json.loads(result.stdout))

    store = RunStore(f"sqlite:///{home / 'typhon.db'}")
    try:
        c = run_reviews.c
        with store.engine.connect() as conn:
            query = sa.select(run_reviews).where(c.run_id == run["run_id"])
            [review] = [dict(r) for r in conn.execute(query).mappings()]
        record = store.get(run["run_id"])
    finally:
        store.close()
    assert review["status"] in ("ok", "failed") and review["reviewer"] == "local"
    assert review["raw"] and review["prompt_version"] == record.prompt_version == 1
    if review["status"] == "ok":
        assert 0 <= review["score"] <= 1 and review["verdict"] in ("pass", "fail")
    assert (record.status.value, record.output) == ("succeeded", run["output"])  # untouched

    result = _cli(home, "activity", "--json")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert (row["run_id"], row["review"]) == (run["run_id"], review["status"])
    assert row["qa_score"] == (review["score"] if review["status"] == "ok" else None)

    result = _cli(home, "feedback", run["run_id"], "up", "--note", "good brief", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["score_source"] == "human"
    assert not list((home / "run").glob("llama-*.json")), "llama-server state left behind"
