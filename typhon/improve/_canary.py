"""The canary's verdict: promote it fully, or roll it back by itself, from live scores.

A canary version serves ``improve.canary_share`` of a crew's live runs. Once the canary and the
active version each have at least ``improve.canary_min_runs`` judged runs since the canary
started (a person's vote first, else the QA score: :func:`typhon.improve._scores.judged_runs`),
the canary is rolled back when its mean live score trails the active one's by more than
``improve.canary_margin``, and promoted to active otherwise. The reason, with the numbers, is
recorded as the improve event and in the canary's metrics (``live``).

Reviews and feedback call :func:`check_canary` after each judgement, from any process: one
decision at a time per crew (a PostgreSQL advisory lock; on SQLite a file lock under
``$TYPHON_HOME/run``), and a canary that is no longer the canary is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog

from typhon.config import TyphonConfig
from typhon.improve._prompts import PromptVersion, PromptVersions
from typhon.improve._scores import Judged, judged_runs
from typhon.store import RunStore

__all__ = ["canary_state", "check_canary"]

log = structlog.get_logger("typhon.improve")

_local_lock = threading.Lock()


def _started(versions: PromptVersions, canary: PromptVersion) -> datetime | None:
    """When the canary started: its latest ``canary`` event, else when it was added."""
    for event in versions.events(canary.crew, limit=500):  # newest first
        if event["kind"] == "canary" and event["to_version"] == canary.version:
            at: datetime = event["created_at"]
            return at.replace(tzinfo=UTC) if at.tzinfo is None else at
    return canary.created_at


def _mean(runs: list[Judged]) -> float:
    return sum(r.score for r in runs) / len(runs) if runs else 0.0


def canary_state(store: RunStore, config: TyphonConfig, crew: str) -> dict[str, Any] | None:
    """The canary's live numbers against the active version's, or None without a canary."""
    versions = PromptVersions(store)
    canary, active = versions.canary(crew), versions.active(crew)
    if canary is None or active is None:
        return None
    since = _started(versions, canary)
    mine = judged_runs(store, crew=crew, prompt_version=canary.version, since=since)
    theirs = judged_runs(store, crew=crew, prompt_version=active.version, since=since)
    need = config.improve.canary_min_runs
    return {
        "canary": canary.version, "active": active.version,
        "since": since.isoformat() if since else None,
        "canary_runs": len(mine), "active_runs": len(theirs),
        "canary_score": round(_mean(mine), 4), "active_score": round(_mean(theirs), 4),
        "canary_human": sum(1 for r in mine if r.source == "human"),
        "active_human": sum(1 for r in theirs if r.source == "human"),
        "min_runs": need, "margin": config.improve.canary_margin,
        "ready": len(mine) >= need and len(theirs) >= need,
    }  # fmt: skip


@contextlib.contextmanager
def _decision_lock(store: RunStore, config: TyphonConfig, crew: str) -> Iterator[None]:
    """One canary decision at a time per crew, across processes."""
    with _local_lock:
        if store.engine.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(f"canary:{crew}".encode()).digest()[:8], "big")
            key -= 1 << 63 if key >= 1 << 63 else 0
            with store.engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            return
        folder = config.home / "run"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"canary-{crew}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def check_canary(store: RunStore, config: TyphonConfig, crew: str) -> str | None:
    """Decide the crew's canary when both versions have enough judged runs: ``"rolled_back"``,
    ``"promoted"``, or None (no canary, or not enough runs yet)."""
    versions = PromptVersions(store)
    if versions.canary(crew) is None:
        return None
    with _decision_lock(store, config, crew):
        state = canary_state(store, config, crew)  # again, under the lock
        if state is None or not state["ready"]:
            return None
        canary, active = state["canary"], state["active"]
        numbers = (
            f"v{canary} scored {state['canary_score']:.2f} over {state['canary_runs']} judged runs,"
            f" v{active} {state['active_score']:.2f} over {state['active_runs']}"
        )
        versions.set_metrics(crew, canary, {"live": state})
        if state["canary_score"] < state["active_score"] - config.improve.canary_margin:
            reason = (f"canary regressed: {numbers} (more than the margin"
                      f" {config.improve.canary_margin:.2f} below)")  # fmt: skip
            versions.rollback(crew, reason=reason)
            log.warning("canary rolled back", crew=crew, version=canary, reason=reason)
            return "rolled_back"
        reason = f"canary held: {numbers} (within the margin {config.improve.canary_margin:.2f})"
        versions.promote(crew, canary, reason=reason)
        log.info("canary promoted", crew=crew, version=canary, reason=reason)
        return "promoted"
