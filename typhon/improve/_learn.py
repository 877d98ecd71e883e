"""Learning extraction: what a judged run teaches.

After every review and every piece of feedback, for that run:

- **Examples.** A succeeded run scored at least ``improve.example_min_score`` (a person's thumbs
  up, else the QA score: see ``_scores.run_score``) becomes a candidate few-shot example
  ``(input, output)`` with source ``human`` or ``qa``; a later verdict that scores it lower takes
  it back. A correction (``typhon feedback --correction FILE``) becomes an example of its own:
  the run's input with the corrected text, source ``correction``, score 1.0.
- **Diagnoses.** A failure (the run failed, a person voted it down, or, with no vote, the QA
  verdict was fail) gets one diagnosis row, re-derived on each new verdict, with a category from
  the rules below over the run's error, the QA issues and critique, and the person's note.
- **Preferences.** A note that states a preference ("I prefer", "always", "never", "please use",
  "don't", ...) goes to semantic memory as kind ``preference`` for the crew. Memory is an aid:
  a failure to store it is logged, never raised.

Diagnosis categories, first match wins:

========================  ====================================================================
``model_unavailable``     the model server could not be reached or kept failing
``timeout``               the run passed its time limit
``sandbox``               the sandbox refused or stopped something (network, writes, limits)
``format``                not in the form asked for (JSON, schema, Markdown, length, language)
``off_topic``             about something other than what was asked
``incomplete``            cut off, or parts of what was asked are missing
``wrong``                 incorrect, inaccurate or invented content
``other``                 none of the above
========================  ====================================================================
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from typhon._types import RunRecord, RunStatus
from typhon.config import TyphonConfig
from typhon.improve._scores import run_score
from typhon.store import RunStore, improve_diagnoses, improve_examples, run_feedback, run_reviews

if TYPE_CHECKING:
    from typhon.memory import Memory

__all__ = [
    "DIAGNOSIS_CATEGORIES",
    "after_judgement",
    "diagnose",
    "examples",
    "extract",
    "is_preference",
]

log = structlog.get_logger("typhon.improve")

_ERROR_RULES: list[tuple[str, str]] = [
    ("model_unavailable", r"every replica is down|cannot reach|could not reach|unreachable|"
                          r"connection (?:refused|reset)|model registry is closed|not started|"
                          r"model_unavailable|answered 5\d\d|answered 429"),
    ("timeout", r"time limit|timed? ?out|deadline"),
    ("sandbox", r"sandbox|permission denied|not permitted|outside the workspace|no network"),
]  # fmt: skip
_TEXT_RULES: list[tuple[str, str]] = [
    ("format", r"\bjson\b|schema|format|markdown|malformed|not parse|unparsable|too long|"
               r"too short|wrong language|heading"),
    ("off_topic", r"off[- ]topic|irrelevant|unrelated|not about|another (?:topic|subject)|"
                  r"does not answer|doesn't answer|ignores the"),
    ("incomplete", r"incomplete|missing|truncat|cut off|cut short|partial|unfinished|"
                   r"lacks|omit|does not cover|doesn't cover|no sources"),
    ("wrong", r"wrong|incorrect|inaccura|false|mistake|error|hallucinat|invent|fabricat|"
              r"made up|not true|untrue"),
]  # fmt: skip
DIAGNOSIS_CATEGORIES = (*(c for c, _ in _ERROR_RULES), *(c for c, _ in _TEXT_RULES), "other")

_PREFERENCE = re.compile(
    r"\b(?:i(?:'d| would)? prefer|prefer(?:ably)?|always|never|please (?:use|do|don't|avoid)|"
    r"don't|do not|avoid|i (?:like|want)|instead of)\b",
    re.IGNORECASE,
)


def is_preference(note: str | None) -> bool:
    """Whether a note states a preference worth remembering."""
    return bool(note and _PREFERENCE.search(note))


def diagnose(error: str | None, issues: list[str], critique: str | None, note: str | None) -> str:
    """The failure's category (see the module's docstring)."""
    err = (error or "").lower()
    for category, pattern in _ERROR_RULES:
        if err and re.search(pattern, err):
            return category
    text = "\n".join([err, *issues, critique or "", note or ""]).lower()
    for category, pattern in _TEXT_RULES:
        if re.search(pattern, text):
            return category
    return "other"


# -- reading what was said about a run ---------------------------------------------------------
def _latest(store: RunStore, table: sa.Table, run_id: str, **where: Any) -> dict[str, Any] | None:
    query = sa.select(table).where(table.c.run_id == run_id)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with store.engine.connect() as conn:
        row = conn.execute(query.order_by(table.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row is not None else None


def _failure_detail(
    record: RunRecord, vote: dict[str, Any] | None, review: dict[str, Any] | None
) -> tuple[str, str] | None:
    """(category, detail) when the run counts as a failure, else None."""
    failed = record.status is RunStatus.FAILED
    down = vote is not None and vote["vote"] == "down"
    qa_fail = vote is None and review is not None and review["verdict"] == "fail"
    if not (failed or down or qa_fail):
        return None
    issues = [str(i) for i in (review["issues"] if review else []) or []]
    critique = review["critique"] if review else None
    note = vote["note"] if vote else None
    category = diagnose(record.error if failed else None, issues, critique, note)
    parts = []
    if failed:
        parts.append(f"run failed: {(record.error or 'no error recorded')[:500]}")
    if down:
        parts.append("voted down" + (f" by {vote['by']}" if vote and vote["by"] else ""))
    if review is not None and (review["verdict"] == "fail" or issues):
        parts.append(f"QA {review['verdict']} ({review['score']:.2f}): {critique or ''}".strip())
        parts += [f"issue: {i}" for i in issues]
    if note:
        parts.append(f"note: {note}")
    return category, "\n".join(parts)


# -- extraction --------------------------------------------------------------------------------
def extract(
    config: TyphonConfig,
    store: RunStore,
    run_id: str,
    *,
    memory: Memory | None = None,
    note: str | None = None,
    correction: str | None = None,
    by: str = "",
) -> dict[str, Any]:
    """Derive the run's example, diagnosis and (from ``note``) preference; ``correction`` adds
    a correction example. Returns what was derived."""
    record = store.get(run_id)
    score, source = run_score(store, run_id)
    vote = _latest(store, run_feedback, run_id)
    review = _latest(store, run_reviews, run_id, status="ok")
    now = datetime.now(UTC)
    ex, dg = improve_examples.c, improve_diagnoses.c
    example = (
        score is not None
        and score >= config.improve.example_min_score
        and record.status is RunStatus.SUCCEEDED
        and bool((record.output or "").strip())
    )
    diagnosis = _failure_detail(record, vote, review)
    with store.engine.begin() as conn:
        conn.execute(
            improve_examples.delete().where(ex.run_id == run_id, ex.source.in_(("qa", "human")))
        )
        if example:
            conn.execute(improve_examples.insert().values(
                crew=record.crew, run_id=run_id, input=record.input, output=record.output,
                score=score, source=source, created_at=now,
            ))  # fmt: skip
        if correction and correction.strip():
            conn.execute(improve_examples.insert().values(
                crew=record.crew, run_id=run_id, input=record.input, output=correction.strip(),
                score=1.0, source="correction", created_at=now,
            ))  # fmt: skip
        conn.execute(improve_diagnoses.delete().where(dg.run_id == run_id))
        if diagnosis is not None:
            conn.execute(improve_diagnoses.insert().values(
                run_id=run_id, crew=record.crew, category=diagnosis[0], detail=diagnosis[1],
                created_at=now,
            ))  # fmt: skip
    preference = _remember_preference(memory, record, note, vote, by)
    return {
        "run_id": run_id, "score": score, "source": source, "example": example,
        "correction": bool(correction and correction.strip()),
        "diagnosis": diagnosis[0] if diagnosis else None, "preference": preference,
    }  # fmt: skip


def _remember_preference(
    memory: Memory | None,
    record: RunRecord,
    note: str | None,
    vote: dict[str, Any] | None,
    by: str,
) -> str | None:
    """The preference's memory id, or None when the note states none (or memory failed)."""
    if memory is None or not is_preference(note):
        return None
    assert note is not None
    try:
        rec = memory.backend.semantic.add(
            note.strip(), crew=record.crew, run_id=record.id, kind="preference",
            tags=("feedback", vote["vote"] if vote else "note"),
            meta={"by": by, "source": "feedback"},
        )  # fmt: skip
    except Exception as exc:  # memory is an aid: feedback is stored whatever happens here
        log.warning("could not remember the preference", run_id=record.id, error=str(exc))
        return None
    return rec.id


def after_judgement(
    config: TyphonConfig,
    store: RunStore,
    run_id: str,
    *,
    memory: Memory | None = None,
    note: str | None = None,
    correction: str | None = None,
    by: str = "",
) -> dict[str, Any]:
    """After a review or feedback: learning extraction, then the crew's canary check."""
    learned = extract(config, store, run_id, memory=memory, note=note, correction=correction, by=by)
    crew = store.get(run_id).crew
    try:
        from typhon.improve._canary import check_canary  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return learned
    try:
        check_canary(store, config, crew)
    except Exception as exc:  # the judgement is stored; the canary is checked again next time
        log.warning("canary check failed", crew=crew, error=str(exc))
    return learned


def examples(
    store: RunStore, crew: str, *, min_score: float = 0.0, limit: int = 50
) -> list[dict[str, Any]]:
    """The crew's candidate examples scored at least ``min_score``, best first (corrections
    before equal scores, then the newest): ``[{input, output, score, source, run_id}]``."""
    store.migrate_once()
    ex = improve_examples.c
    query = (
        sa.select(ex.input, ex.output, ex.score, ex.source, ex.run_id)
        .where(ex.crew == crew, ex.score >= min_score)
        .order_by(ex.score.desc(), (ex.source == "correction").desc(), ex.id.desc())
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
