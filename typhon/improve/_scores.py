"""How well a run did, as the learning loop counts it: a person's verdict outranks the QA score.

``run_score`` is 1.0 for a thumbs up, 0.0 for a thumbs down (the latest one counts), else the
latest successful QA review's score, else None (not judged yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from typhon.store import RunStore, run_feedback, run_reviews, runs

__all__ = ["Judged", "judged_runs", "latest_by_run", "run_score"]


@dataclass(frozen=True)
class Judged:
    run_id: str
    crew: str
    prompt_version: int | None
    model: str | None
    category: str | None
    status: str
    score: float
    source: str  # human | qa
    finished_at: datetime | None


def _latest(rows: list[Any], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: (r["created_at"], r["id"])):
        out[row[key]] = row
    return out


def latest_by_run(rows: list[Any]) -> dict[str, Any]:
    """The row with the highest id per run (the latest written)."""
    out: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        out[row["run_id"]] = row
    return out


def run_score(store: RunStore, run_id: str) -> tuple[float | None, str | None]:
    """(score, "human" | "qa") for one run, or (None, None) when nobody judged it."""
    store.migrate_once()
    with store.engine.connect() as conn:
        votes = list(
            conn.execute(sa.select(run_feedback).where(run_feedback.c.run_id == run_id)).mappings()
        )
        reviews = list(
            conn.execute(
                sa.select(run_reviews).where(
                    run_reviews.c.run_id == run_id, run_reviews.c.status == "ok"
                )
            ).mappings()
        )
    if votes:
        vote = _latest(votes, "run_id")[run_id]
        return (1.0 if vote["vote"] == "up" else 0.0), "human"
    if reviews:
        review = _latest(reviews, "run_id")[run_id]
        return float(review["score"]), "qa"
    return None, None


def judged_runs(
    store: RunStore,
    *,
    crew: str | None = None,
    prompt_version: int | None = None,
    since: datetime | None = None,
    model: str | None = None,
) -> list[Judged]:
    """Finished runs with a score (human first, then QA), oldest first."""
    store.migrate_once()
    c = runs.c
    query = sa.select(
        c.id, c.crew, c.prompt_version, c.model, c.category, c.status, c.finished_at
    ).where(c.finished_at.is_not(None))
    if crew is not None:
        query = query.where(c.crew == crew)
    if prompt_version is not None:
        query = query.where(c.prompt_version == prompt_version)
    if since is not None:
        query = query.where(c.finished_at >= since)
    if model is not None:
        query = query.where(c.model == model)
    with store.engine.connect() as conn:
        found = list(conn.execute(query.order_by(c.finished_at)).mappings())
        ids = [r["id"] for r in found]
        votes: dict[str, Any] = {}
        reviews: dict[str, Any] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            votes.update(
                _latest(
                    list(
                        conn.execute(
                            sa.select(run_feedback).where(run_feedback.c.run_id.in_(chunk))
                        ).mappings()
                    ),
                    "run_id",
                )
            )
            reviews.update(
                _latest(
                    list(
                        conn.execute(
                            sa.select(run_reviews).where(
                                run_reviews.c.run_id.in_(chunk), run_reviews.c.status == "ok"
                            )
                        ).mappings()
                    ),
                    "run_id",
                )
            )
    out: list[Judged] = []
    for r in found:
        if r["id"] in votes:
            score, source = (1.0 if votes[r["id"]]["vote"] == "up" else 0.0), "human"
        elif r["id"] in reviews:
            score, source = float(reviews[r["id"]]["score"]), "qa"
        else:
            continue
        out.append(
            Judged(
                r["id"], r["crew"], r["prompt_version"], r["model"], r["category"],
                r["status"], score, source, r["finished_at"],
            )
        )  # fmt: skip
    return out
