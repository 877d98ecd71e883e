"""Activity: every run's outcome, queryable, and external agents' activity recorded as runs.

``activity()`` lists runs newest first with what the learning loop needs to read them: crew,
status, input, output (its first 2000 characters), model and backend, routing category and
rules version, prompt version, tokens, model latency, duration, and the verdicts (latest QA
review, latest vote). ``ingest()`` records the seed's ``POST /activity`` payload, an external
agent's finished task, as a finished run of crew ``agent`` in pool ``external``; such runs get
no automatic QA review (``typhon improve review RUN_ID`` reviews one on demand).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from typhon._types import MAX_INPUT_CHARS, RunStatus, Usage
from typhon.errors import InputError
from typhon.improve._scores import latest_by_run
from typhon.store import RunStore, run_feedback, run_reviews, runs

__all__ = ["EXTERNAL_POOL", "OUTPUT_CHARS", "activity", "ingest", "render_activity"]

OUTPUT_CHARS = 2000
EXTERNAL_POOL = "external"
_STATUSES = {"success": RunStatus.SUCCEEDED, "succeeded": RunStatus.SUCCEEDED,
             "failure": RunStatus.FAILED, "failed": RunStatus.FAILED}  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _verdicts(
    store: RunStore, ids: list[str]
) -> tuple[dict[str, Mapping[str, Any]], dict[str, Mapping[str, Any]], dict[str, str]]:
    """Per run: the latest ok review, the latest vote, the latest review's status."""
    reviews: list[Mapping[str, Any]] = []
    votes: list[Mapping[str, Any]] = []
    r, f = run_reviews.c, run_feedback.c
    with store.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = sa.select(r.id, r.run_id, r.status, r.score, r.verdict).where(
                r.run_id.in_(chunk)
            )
            reviews += [dict(x) for x in conn.execute(query).mappings()]
            query = sa.select(f.id, f.run_id, f.vote).where(f.run_id.in_(chunk))
            votes += [dict(x) for x in conn.execute(query).mappings()]
    ok = latest_by_run([x for x in reviews if x["status"] == "ok"])
    state = {k: str(v["status"]) for k, v in latest_by_run(reviews).items()}
    return ok, latest_by_run(votes), state


def activity(
    store: RunStore,
    *,
    crew: str | None = None,
    status: str | None = None,
    model: str | None = None,
    hours: float | None = None,
    limit: int = 50,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Runs newest first, filtered; see the module's docstring for the fields."""
    if status is not None and status not in {s.value for s in RunStatus}:
        known = ", ".join(s.value for s in RunStatus)
        raise InputError(f"unknown status '{status}'; use one of {known}")
    store.migrate_once()
    c = runs.c
    query = sa.select(runs).order_by(c.created_at.desc(), c.id).limit(limit)
    if run_id is not None:
        query = query.where(c.id == run_id)
    if crew:
        query = query.where(c.crew == crew)
    if status:
        query = query.where(c.status == status)
    if model:
        query = query.where(c.model == model)
    if hours is not None:
        query = query.where(c.created_at >= datetime.now(UTC) - timedelta(hours=hours))
    with store.engine.connect() as conn:
        found = [dict(row) for row in conn.execute(query).mappings()]
    reviews, votes, review_state = _verdicts(store, [row["id"] for row in found])
    return [_row(row, reviews, votes, review_state) for row in found]


def _row(
    row: dict[str, Any],
    reviews: dict[str, Mapping[str, Any]],
    votes: dict[str, Mapping[str, Any]],
    review_state: dict[str, str],
) -> dict[str, Any]:
    started, finished = row["started_at"], row["finished_at"]
    duration = (finished - started).total_seconds() if started and finished else None
    review, vote = reviews.get(row["id"]), votes.get(row["id"])
    qa = float(review["score"]) if review is not None else None
    human = str(vote["vote"]) if vote is not None else None
    score = (1.0 if human == "up" else 0.0) if human else qa
    output = row["output"]
    return {
        "run_id": row["id"], "crew": row["crew"], "status": row["status"],
        "input": row["input"], "output": output[:OUTPUT_CHARS] if output else output,
        "error": (row["error"] or "")[:1000] or None,
        "model": row["model"], "backend": row["backend"], "category": row["category"],
        "prompt_version": row["prompt_version"], "rules_version": row["rules_version"],
        "degraded": bool(row["degraded"]), "pool": row["pool"],
        "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
        "model_calls": row["model_calls"], "model_latency_s": round(row["model_latency_s"], 3),
        "duration_s": round(duration, 3) if duration is not None else None,
        "created_at": _iso(row["created_at"]), "started_at": _iso(started),
        "finished_at": _iso(finished),
        "review": review_state.get(row["id"]), "qa_score": qa,
        "qa_verdict": review["verdict"] if review is not None else None,
        "human_vote": human, "score": score,
    }  # fmt: skip


def render_activity(rows: list[dict[str, Any]]) -> str:
    """A plain table, newest first."""
    lines = [
        f"{'created':<19}  {'run_id':<32}  {'crew':<12} {'status':<9} {'model':<12}"
        f" {'qa':>4} {'vote':<4} {'secs':>6}  input"
    ]
    for r in rows:
        qa = f"{r['qa_score']:.2f}" if r["qa_score"] is not None else "-"
        secs = f"{r['duration_s']:.1f}" if r["duration_s"] is not None else "-"
        created = (r["created_at"] or "")[:19].replace("T", " ")
        lines.append(
            f"{created:<19}  {r['run_id']:<32}  {r['crew'][:12]:<12} {r['status']:<9}"
            f" {(r['model'] or '-')[:12]:<12} {qa:>4} {r['human_vote'] or '-':<4} {secs:>6}"
            f"  {r['input'][:40].replace(chr(10), ' ')}"
        )
    return "\n".join(lines)


# -- POST /activity ----------------------------------------------------------------------------
def _text(payload: Mapping[str, Any], key: str, *, required: bool, limit: int) -> str | None:
    value = payload.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise InputError(f"activity field '{key}' must be a non-empty string")
    if len(value) > limit:
        raise InputError(f"activity field '{key}' is {len(value):,} characters; limit {limit:,}")
    return value


def _number(payload: Mapping[str, Any], key: str, *, integer: bool = False) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < 0:
        kind = "a whole number" if integer else "a number"
        raise InputError(f"activity field '{key}' must be {kind} of 0 or more")
    return float(value)


def _validated(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise InputError("activity must be a JSON object")
    agent_key = "agent" if "agent" in payload else "crew"
    agent = _text(payload, agent_key, required=True, limit=64)
    raw_status = payload.get("status")
    if raw_status not in _STATUSES:
        raise InputError("activity field 'status' must be success or failure")
    metadata = payload.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise InputError("activity field 'metadata' must be a JSON object")
    duration = _number(payload, "duration_s")
    if duration is None:
        duration = _number(payload, "duration")
    if duration is None and (ms := _number(payload, "duration_ms")) is not None:
        duration = ms / 1000
    return {
        "agent": agent.strip() if agent else "",
        "status": _STATUSES[raw_status],
        "input": _text(payload, "input", required=True, limit=MAX_INPUT_CHARS),
        "output": _text(payload, "output", required=False, limit=1_000_000),
        "error": _text(payload, "error", required=False, limit=100_000),
        "model": _text(payload, "model", required=False, limit=128),
        "backend": _text(payload, "backend", required=False, limit=512),
        "duration": duration,
        "prompt_tokens": int(_number(payload, "prompt_tokens", integer=True) or 0),
        "completion_tokens": int(_number(payload, "completion_tokens", integer=True) or 0),
        "metadata": dict(metadata),
    }


def ingest(store: RunStore, payload: Any) -> dict[str, Any]:
    """Record an external agent's finished task as a finished run and return its activity row.

    ``payload``: ``agent`` (or ``crew``), ``status`` (success | failure), ``input``; optional
    ``output``, ``error``, ``model``, ``backend``, ``duration_s`` (or ``duration``, seconds, or
    ``duration_ms``), ``prompt_tokens``, ``completion_tokens``, ``metadata`` (an object).
    InputError naming the field when one is wrong; nothing is stored then."""
    data = _validated(payload)
    record = store.create_run(
        crew=data["agent"], input=data["input"], pool=EXTERNAL_POOL, model=data["model"],
        backend=data["backend"],
        options={"source": "activity", "no_review": True, "metadata": data["metadata"]},
    )  # fmt: skip
    store.claim(record.id, worker=f"{EXTERNAL_POOL}:{data['agent']}")
    if data["prompt_tokens"] or data["completion_tokens"]:
        store.add_usage(record.id, Usage(data["prompt_tokens"], data["completion_tokens"]))
    error = data["error"]
    if data["status"] is RunStatus.FAILED and not error:
        error = "the agent reported a failure"
    store.finish(record.id, data["status"], output=data["output"], error=error)
    if data["duration"] is not None:
        finished = store.get(record.id).finished_at or datetime.now(UTC)
        with store.engine.begin() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id == record.id)
                .values(started_at=finished - timedelta(seconds=data["duration"]))
            )
    return activity(store, run_id=record.id)[0]
