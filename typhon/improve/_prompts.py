"""Versioned prompt templates per crew, with lineage and a status.

A crew's prompts are data: ``{part: {field: text}}`` — each agent's role/goal/backstory/task, each
graph node's system/user text — plus few-shot ``demos`` (``[{"input", "output"}]``). Version 1 of a
crew is what its code ships (``Crew.prompts``, else the crew module's ``PROMPTS``); when the code's
prompts change, a new ``builtin`` version is added and made active, as a deploy would expect.

Statuses: one ``active`` version per crew; ``candidate`` versions waiting for evaluation; at most
one ``canary`` that takes ``canary_share`` of live runs until it is promoted or rolled back;
``retired`` ones are kept for history (and their cache entries are dropped). Every change is an
``improve_events`` row saying what happened and why.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from typhon.errors import InputError
from typhon.store import RunStore, improve_events, prompt_versions

__all__ = [
    "PromptVersion",
    "PromptVersions",
    "Prompts",
    "code_prompts",
    "demo_messages",
]

Prompts = dict[str, dict[str, str]]
STATUSES = ("active", "candidate", "canary", "retired")


@dataclass(frozen=True)
class PromptVersion:
    crew: str
    version: int
    status: str
    source: str
    prompts: Prompts
    demos: list[dict[str, str]] = field(default_factory=list)
    parent: int | None = None
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    canary_share: float | None = None
    created_at: datetime | None = None

    @property
    def tag(self) -> str:
        """How runs and the semantic cache name it: ``research:v3``."""
        return f"{self.crew}:v{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "crew": self.crew, "version": self.version, "status": self.status,
            "source": self.source, "parent": self.parent, "note": self.note,
            "metrics": self.metrics, "canary_share": self.canary_share,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "prompts": self.prompts, "demos": self.demos,
        }  # fmt: skip


def code_prompts(crew_cls: type) -> Prompts:
    """The prompts a crew's code ships: ``Crew.prompts``, else its module's ``PROMPTS``."""
    prompts = getattr(crew_cls, "prompts", None)
    if prompts is None:
        prompts = getattr(sys.modules.get(crew_cls.__module__), "PROMPTS", None)
    if not isinstance(prompts, Mapping):
        return {}
    return {str(k): {str(f): str(t) for f, t in dict(v).items()} for k, v in prompts.items()}


def _hash(prompts: Prompts) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16]


def demo_messages(demos: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Demonstrations as chat turns to put before the real request."""
    out: list[dict[str, str]] = []
    for demo in demos:
        out.append({"role": "user", "content": str(demo.get("input", ""))})
        out.append({"role": "assistant", "content": str(demo.get("output", ""))})
    return out


def _row(row: Any) -> PromptVersion:
    created = row["created_at"]
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return PromptVersion(
        crew=row["crew"], version=row["version"], status=row["status"], source=row["source"],
        prompts=row["prompts"] or {}, demos=list(row["demos"] or []), parent=row["parent"],
        note=row["note"] or "", metrics=dict(row["metrics"] or {}),
        canary_share=row["canary_share"], created_at=created,
    )  # fmt: skip


class PromptVersions:
    """Prompt versions in the run store (see the module's docstring)."""

    def __init__(self, store: RunStore):
        self.store = store

    # -- reading ---------------------------------------------------------------------------------
    def history(self, crew: str) -> list[PromptVersion]:
        self.store.migrate_once()
        t = prompt_versions.c
        query = sa.select(prompt_versions).where(t.crew == crew).order_by(t.version)
        with self.store.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def get(self, crew: str, version: int) -> PromptVersion:
        self.store.migrate_once()
        t = prompt_versions.c
        query = sa.select(prompt_versions).where(t.crew == crew, t.version == version)
        with self.store.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            known = ", ".join(str(v.version) for v in self.history(crew)) or "none yet"
            raise InputError(f"crew '{crew}' has no prompt version {version} (versions: {known})")
        return _row(row)

    def active(self, crew: str) -> PromptVersion | None:
        return next((v for v in self.history(crew) if v.status == "active"), None)

    def canary(self, crew: str) -> PromptVersion | None:
        return next((v for v in self.history(crew) if v.status == "canary"), None)

    # -- seeding from code -----------------------------------------------------------------------
    def ensure(self, crew: str, crew_cls: type) -> PromptVersion:
        """The active version, after adding the code's prompts as a new active ``builtin``
        version when they are new (first use, or the code changed)."""
        prompts = code_prompts(crew_cls)
        digest = _hash(prompts)
        current = self.active(crew)
        if current is not None:
            builtin = [v for v in self.history(crew) if v.source == "builtin"]
            if builtin and self._code_hash(crew, builtin[-1].version) == digest:
                return current

        def seed(conn: Connection) -> None:
            rows = self._rows(conn, crew)
            builtin = [r for r in rows if r["source"] == "builtin"]
            if builtin and max(builtin, key=lambda r: r["version"])["code_hash"] == digest:
                return  # another process seeded it meanwhile
            active = next((r for r in rows if r["status"] == "active"), None)
            self._insert(
                conn, rows, crew, prompts, [], source="builtin", status="active",
                parent=active["version"] if active else None, code_hash=digest,
                note="the crew's code" if not rows else "the crew's code changed",
            )  # fmt: skip

        self._locked(seed)
        active = self.active(crew)
        assert active is not None
        return active

    def _code_hash(self, crew: str, version: int) -> str | None:
        t = prompt_versions.c
        query = sa.select(t.code_hash).where(t.crew == crew, t.version == version)
        with self.store.engine.connect() as conn:
            return conn.execute(query).scalar()

    # -- writing ---------------------------------------------------------------------------------
    def add(
        self,
        crew: str,
        prompts: Prompts,
        demos: Sequence[Mapping[str, str]] = (),
        *,
        parent: int | None,
        source: str,
        note: str = "",
        metrics: dict[str, Any] | None = None,
    ) -> PromptVersion:
        """A new candidate version."""

        def add(conn: Connection) -> int:
            rows = self._rows(conn, crew)
            return self._insert(
                conn, rows, crew, prompts, [dict(d) for d in demos], source=source,
                status="candidate", parent=parent, note=note, metrics=metrics or {},
            )  # fmt: skip

        return self.get(crew, self._locked(add))

    def set_metrics(self, crew: str, version: int, metrics: dict[str, Any]) -> None:
        t = prompt_versions.c
        merged = {**self.get(crew, version).metrics, **metrics}
        with self.store.engine.begin() as conn:
            conn.execute(
                prompt_versions.update()
                .where(t.crew == crew, t.version == version)
                .values(metrics=merged, updated_at=datetime.now(UTC))
            )

    def promote(
        self, crew: str, version: int, *, canary_share: float | None = None, reason: str = ""
    ) -> PromptVersion:
        """Make ``version`` active (the old active one retires), or, with ``canary_share``, the
        canary that takes that share of live runs while the active one stays."""
        target = self.get(crew, version)
        if target.status == "retired" and canary_share is not None:
            raise InputError(f"{target.tag} is retired; promote it fully or add a new version")

        def promote(conn: Connection) -> None:
            rows = self._rows(conn, crew)
            active = next((r for r in rows if r["status"] == "active"), None)
            was = int(active["version"]) if active else None
            t = prompt_versions.c
            now = datetime.now(UTC)
            if canary_share is not None:
                conn.execute(
                    prompt_versions.update()
                    .where(t.crew == crew, t.status == "canary", t.version != version)
                    .values(status="retired", updated_at=now)
                )
                self._set(conn, crew, version, status="canary", canary_share=canary_share)
                self._event(conn, crew, "canary", was, version,
                            reason or f"canary on {canary_share:.0%} of live runs")  # fmt: skip
                return
            if active is not None and active["version"] != version:
                self._set(conn, crew, active["version"], status="retired")
            self._set(conn, crew, version, status="active", canary_share=None)
            self._event(conn, crew, "promoted", was, version,
                        reason or "promoted by hand")  # fmt: skip

        self._locked(promote)
        self._retire_cache(crew)
        return self.get(crew, version)

    def rollback(self, crew: str, *, reason: str = "rolled back by hand") -> PromptVersion:
        """Undo the last change: a canary is retired; otherwise the active version retires and
        its parent (or the previous active one) is active again."""

        def rollback(conn: Connection) -> int:
            rows = self._rows(conn, crew)
            canary = next((r for r in rows if r["status"] == "canary"), None)
            active = next((r for r in rows if r["status"] == "active"), None)
            if canary is not None:
                self._set(conn, crew, canary["version"], status="retired", canary_share=None)
                back_to = int(active["version"]) if active else None
                self._event(conn, crew, "rolled_back", canary["version"], back_to, reason)
                return int(active["version"]) if active else int(canary["version"])
            if active is None or active["parent"] is None:
                raise InputError(f"crew '{crew}' has nothing to roll back to")
            back = active["parent"]
            self._set(conn, crew, active["version"], status="retired")
            self._set(conn, crew, back, status="active", canary_share=None)
            self._event(conn, crew, "rolled_back", active["version"], back, reason)
            return int(back)

        version = self._locked(rollback)
        self._retire_cache(crew)
        return self.get(crew, version)

    def reject(self, crew: str, version: int, reason: str, data: dict[str, Any]) -> None:
        """A candidate the gate refused: retired, with why."""
        with self.store.engine.begin() as conn:
            self._set(conn, crew, version, status="retired")
            self._event(conn, crew, "rejected", None, version, reason, data)

    def events(self, crew: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        self.store.migrate_once()
        t = improve_events.c
        query = sa.select(improve_events).order_by(t.id.desc()).limit(limit)
        if crew is not None:
            query = query.where(t.crew == crew)
        with self.store.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def record_event(
        self,
        crew: str,
        kind: str,
        from_version: int | None,
        to_version: int | None,
        reason: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.store.engine.begin() as conn:
            self._event(conn, crew, kind, from_version, to_version, reason, data)

    # -- live runs -------------------------------------------------------------------------------
    def choose(self, crew: str, crew_cls: type, rng: random.Random | None = None) -> PromptVersion:
        """The version a live run uses: the canary for its share of runs, else the active one."""
        active = self.ensure(crew, crew_cls)
        canary = self.canary(crew)
        if canary is not None and (rng or random).random() < (canary.canary_share or 0.0):
            return canary
        return active

    # -- internals -------------------------------------------------------------------------------
    def _locked(self, fn: Any) -> Any:
        self.store.migrate_once()
        with self.store.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7301003)"))
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            return fn(conn)

    @staticmethod
    def _rows(conn: Connection, crew: str) -> list[dict[str, Any]]:
        query = sa.select(prompt_versions).where(prompt_versions.c.crew == crew)
        return [dict(r) for r in conn.execute(query).mappings()]

    @staticmethod
    def _insert(
        conn: Connection,
        rows: list[dict[str, Any]],
        crew: str,
        prompts: Prompts,
        demos: list[dict[str, str]],
        *,
        source: str,
        status: str,
        parent: int | None,
        note: str = "",
        code_hash: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> int:
        version = max((r["version"] for r in rows), default=0) + 1
        now = datetime.now(UTC)
        if status == "active":
            conn.execute(
                prompt_versions.update()
                .where(prompt_versions.c.crew == crew, prompt_versions.c.status == "active")
                .values(status="retired", updated_at=now)
            )
        conn.execute(
            prompt_versions.insert().values(
                crew=crew, version=version, parent=parent, status=status, source=source,
                prompts=prompts, demos=demos, code_hash=code_hash, note=note,
                metrics=metrics or {}, created_at=now, updated_at=now,
            )
        )  # fmt: skip
        if status == "active":
            PromptVersions._event(conn, crew, "promoted", parent, version, note or source)
        return version

    @staticmethod
    def _set(conn: Connection, crew: str, version: int, **values: Any) -> None:
        t = prompt_versions.c
        conn.execute(
            prompt_versions.update()
            .where(t.crew == crew, t.version == version)
            .values(updated_at=datetime.now(UTC), **values)
        )

    @staticmethod
    def _event(
        conn: Connection,
        crew: str,
        kind: str,
        from_version: int | None,
        to_version: int | None,
        reason: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        conn.execute(
            improve_events.insert().values(
                crew=crew, kind=kind, from_version=from_version, to_version=to_version,
                reason=reason, data=data or {}, created_at=datetime.now(UTC),
            )
        )  # fmt: skip

    def _retire_cache(self, crew: str) -> None:
        """Cache entries (and their vectors) of versions no longer served are dropped."""
        from typhon.memory._cache import drop_prompt_versions

        retired = [v.tag for v in self.history(crew) if v.status == "retired"]
        drop_prompt_versions(self.store, retired)
