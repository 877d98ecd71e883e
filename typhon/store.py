"""The run store: runs and their events in SQLite or PostgreSQL (SQLAlchemy 2 Core).

A run's lifecycle is a state machine::

    queued ──▶ running ──▶ succeeded | failed | cancelled
       └──────────────────▶ failed | cancelled

Every transition is one conditional ``UPDATE ... WHERE status IN (...)``, so two workers (or a
redelivered task) racing on the same run cannot both record an outcome: the loser's update
matches no row, changes nothing, and is reported as such (``False``).

The schema is created and migrated on first use; ``typhon_schema`` holds the applied version.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from typhon._types import TERMINAL, RunEvent, RunRecord, RunStatus, Usage
from typhon.errors import RunNotFoundError

__all__ = ["RunStore", "new_run_id", "normalize_database_url"]

metadata = sa.MetaData()

schema_table = sa.Table(
    "typhon_schema",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("crew", sa.String(64), nullable=False, index=True),
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("pool", sa.String(64), nullable=False),
    sa.Column("model", sa.String(128)),
    sa.Column("backend", sa.String(512)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("model_calls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("model_latency_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("artifacts", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
)

run_events = sa.Table(
    "run_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.id"), nullable=False, index=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
)


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[runs, run_events])


# (version, step): append only; never edit a step that has shipped.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [(1, _migration_1)]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_ACTIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)


def new_run_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def normalize_database_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL whichever spelling the user chose."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _make_engine(url: str) -> Engine:
    url = normalize_database_url(url)
    if url.startswith("sqlite"):
        db_path = sa.engine.make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


class RunStore:
    """Runs and run events. Thread-safe; one instance per process is enough."""

    def __init__(self, url: str, *, engine: Engine | None = None):
        self.url = normalize_database_url(url)
        self.engine = engine or _make_engine(self.url)
        self._migrated = False

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ----------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations; return the schema version. Safe from many processes."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7301001)"))
            elif self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # one migrator at a time
            schema_table.create(conn, checkfirst=True)
            row = conn.execute(sa.select(schema_table.c.version)).first()
            current = row[0] if row else 0
            for version, step in MIGRATIONS:
                if version > current:
                    step(conn)
            if row is None:
                conn.execute(schema_table.insert().values(id=1, version=SCHEMA_VERSION))
            elif current < SCHEMA_VERSION:
                conn.execute(schema_table.update().values(version=SCHEMA_VERSION))
        self._migrated = True
        return SCHEMA_VERSION

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        if not self._migrated:
            self.migrate()
        with self.engine.begin() as conn:
            yield conn

    # -- runs ------------------------------------------------------------------------------------
    def create_run(
        self,
        *,
        crew: str,
        input: str,
        pool: str,
        options: dict[str, Any] | None = None,
        model: str | None = None,
        backend: str | None = None,
        run_id: str | None = None,
    ) -> RunRecord:
        run_id = run_id or new_run_id()
        now = _now()
        with self._tx() as conn:
            conn.execute(
                runs.insert().values(
                    id=run_id,
                    crew=crew,
                    input=input,
                    options=options or {},
                    status=RunStatus.QUEUED.value,
                    pool=pool,
                    model=model,
                    backend=backend,
                    created_at=now,
                    artifacts=[],
                )
            )
            self._event(conn, run_id, "queued", {"pool": pool, "model": model})
        return self.get(run_id)

    def get(self, run_id: str) -> RunRecord:
        with self._tx() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise RunNotFoundError(run_id)
        return _record(row)

    def list_runs(
        self, *, limit: int = 50, crew: str | None = None, status: RunStatus | None = None
    ) -> list[RunRecord]:
        query = sa.select(runs).order_by(runs.c.created_at.desc(), runs.c.id).limit(limit)
        if crew:
            query = query.where(runs.c.crew == crew)
        if status:
            query = query.where(runs.c.status == status.value)
        with self._tx() as conn:
            return [_record(r) for r in conn.execute(query).mappings()]

    def status(self, run_id: str) -> RunStatus:
        with self._tx() as conn:
            value = conn.execute(sa.select(runs.c.status).where(runs.c.id == run_id)).scalar()
        if value is None:
            raise RunNotFoundError(run_id)
        return RunStatus(value)

    # -- transitions -----------------------------------------------------------------------------
    def mark_running(self, run_id: str) -> bool:
        """queued -> running. False when the run is not queued (cancelled, or taken already)."""
        with self._tx() as conn:
            changed = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status == RunStatus.QUEUED.value)
                .values(
                    status=RunStatus.RUNNING.value,
                    started_at=_now(),
                    attempts=runs.c.attempts + 1,
                )
            ).rowcount
            if changed:
                self._event(conn, run_id, "running", {})
        return bool(changed)

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        *,
        output: str | None = None,
        error: str | None = None,
        artifacts: Sequence[str] = (),
    ) -> bool:
        """Record the outcome once. False (and nothing changed) when the run already finished."""
        if status not in TERMINAL:
            raise ValueError(f"{status.value} is not an outcome")
        allowed = _ACTIVE if status is not RunStatus.SUCCEEDED else (RunStatus.RUNNING.value,)
        values: dict[str, Any] = {"status": status.value, "finished_at": _now()}
        if output is not None:
            values["output"] = output
        if error is not None:
            values["error"] = error
        if artifacts:
            values["artifacts"] = list(artifacts)
        with self._tx() as conn:
            changed = conn.execute(
                runs.update().where(runs.c.id == run_id, runs.c.status.in_(allowed)).values(values)
            ).rowcount
            if changed:
                self._event(conn, run_id, status.value, {"error": error} if error else {})
            elif conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() is None:
                raise RunNotFoundError(run_id)
        return bool(changed)

    def cancel(self, run_id: str) -> bool:
        """queued|running -> cancelled. A running crew notices at its next step."""
        return self.finish(run_id, RunStatus.CANCELLED, error="cancelled")

    def set_route(self, run_id: str, *, model: str, backend: str) -> None:
        with self._tx() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(model=model, backend=backend)
            )

    def add_usage(self, run_id: str, usage: Usage) -> None:
        """Add one model call's usage to the run's totals (atomic increment)."""
        with self._tx() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(
                    prompt_tokens=runs.c.prompt_tokens + usage.prompt_tokens,
                    completion_tokens=runs.c.completion_tokens + usage.completion_tokens,
                    model_calls=runs.c.model_calls + usage.calls,
                    model_latency_s=runs.c.model_latency_s + usage.latency_s,
                )
            )

    # -- events ----------------------------------------------------------------------------------
    def add_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        with self._tx() as conn:
            self._event(conn, run_id, kind, data or {})

    def events(self, run_id: str, *, after: int = 0) -> list[RunEvent]:
        query = (
            sa.select(run_events)
            .where(run_events.c.run_id == run_id, run_events.c.id > after)
            .order_by(run_events.c.id)
        )
        with self._tx() as conn:
            return [
                RunEvent(r["run_id"], r["id"], _utc(r["at"]) or _now(), r["kind"], r["data"])
                for r in conn.execute(query).mappings()
            ]

    @staticmethod
    def _event(conn: Connection, run_id: str, kind: str, data: dict[str, Any]) -> None:
        conn.execute(run_events.insert().values(run_id=run_id, at=_now(), kind=kind, data=data))


def _record(row: Any) -> RunRecord:
    return RunRecord(
        id=row["id"],
        crew=row["crew"],
        input=row["input"],
        status=RunStatus(row["status"]),
        options=row["options"] or {},
        pool=row["pool"],
        model=row["model"],
        backend=row["backend"],
        created_at=_utc(row["created_at"]) or _now(),
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]),
        output=row["output"],
        error=row["error"],
        usage=Usage(
            row["prompt_tokens"],
            row["completion_tokens"],
            row["model_calls"],
            row["model_latency_s"],
        ),
        artifacts=list(row["artifacts"] or []),
        attempts=row["attempts"],
    )
