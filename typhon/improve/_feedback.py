"""A person's verdict on a run: thumbs up or down, a note, a correction; stored with who and
when. It outranks the QA score (``_scores.run_score``); after it, the learning extraction runs
(with the note as a possible preference and the correction as an example) and the crew's canary
is checked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from typhon.config import TyphonConfig
from typhon.errors import InputError
from typhon.improve._learn import after_judgement
from typhon.store import RunStore, run_feedback

if TYPE_CHECKING:
    from typhon.memory import Memory

__all__ = ["VOTES", "feedback_for", "record_feedback"]

VOTES = ("up", "down")
MAX_NOTE_CHARS = 4000
MAX_CORRECTION_CHARS = 100_000


def record_feedback(
    config: TyphonConfig,
    store: RunStore,
    run_id: str,
    vote: str,
    *,
    note: str = "",
    correction: str | None = None,
    by: str = "",
    memory: Memory | None = None,
) -> dict[str, Any]:
    """Store a person's vote on a finished run and learn from it. RunNotFoundError for an
    unknown run; InputError for a bad vote, an unfinished run, or an oversized note or
    correction. Returns the stored feedback with what was learned."""
    if vote not in VOTES:
        raise InputError(f"vote must be up or down, not '{vote}'")
    if len(note) > MAX_NOTE_CHARS:
        raise InputError(f"the note is {len(note):,} characters; keep it under {MAX_NOTE_CHARS:,}")
    if correction is not None:
        if not correction.strip():
            raise InputError("the correction is empty; give the text the run should have given")
        if len(correction) > MAX_CORRECTION_CHARS:
            raise InputError(
                f"the correction is {len(correction):,} characters; keep it under"
                f" {MAX_CORRECTION_CHARS:,}"
            )
    record = store.get(run_id)  # RunNotFoundError
    if not record.status.finished:
        raise InputError(
            f"run {run_id} is {record.status.value}; give feedback once it has finished"
        )
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        inserted = conn.execute(
            run_feedback.insert()
            .values(
                run_id=run_id, crew=record.crew, prompt_version=record.prompt_version, vote=vote,
                note=note, correction=correction, by=by, created_at=now,
            )
            .returning(run_feedback.c.id)
        )  # fmt: skip
        feedback_id = int(inserted.scalar_one())
    learned = after_judgement(
        config, store, run_id, memory=memory, note=note, correction=correction, by=by
    )
    return {
        "id": feedback_id, "run_id": run_id, "crew": record.crew,
        "prompt_version": record.prompt_version, "vote": vote, "note": note,
        "correction": correction is not None, "by": by, "created_at": now.isoformat(),
        "score": learned["score"], "score_source": learned["source"], "learned": learned,
    }  # fmt: skip


def feedback_for(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    """Every vote on a run, oldest first."""
    store.migrate_once()
    c = run_feedback.c
    query = sa.select(run_feedback).where(c.run_id == run_id).order_by(c.id)
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
