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

import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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
    # v2: liveness of running runs, and when a queued run was last handed to the broker
    sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.Column("worker", sa.String(255)),
    sa.Column("enqueued_at", sa.DateTime(timezone=True)),
    # v3: how the run was routed, and whether a fallback model answered for the routed one
    sa.Column("category", sa.String(16)),
    sa.Column("rules_version", sa.Integer),
    sa.Column("degraded", sa.Boolean, nullable=False, server_default=sa.false()),
    # v8: the crew's prompt version the run used
    sa.Column("prompt_version", sa.Integer),
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


# v3: versioned routing rules (one active), and every model call's tokens, time and GPU-seconds.
routing_rules = sa.Table(
    "routing_rules",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("parent", sa.Integer),
    sa.Column("body", sa.JSON, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.false()),
)

model_calls = sa.Table(
    "model_calls",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), index=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("alias", sa.String(128), nullable=False),
    sa.Column("requested", sa.String(128), nullable=False),
    sa.Column("url", sa.String(512), nullable=False),
    sa.Column("category", sa.String(16)),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("latency_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("compute_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("gpu_s", sa.Float, nullable=False, server_default="0"),
)


# v4: memory. Episodic and semantic records (their vectors live in the vector index, keyed by
# the same id), the working scratch pad per run, and model-performance totals.
memory_records = sa.Table(
    "memory_records",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("tier", sa.String(16), nullable=False, index=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("crew", sa.String(64), index=True),
    sa.Column("run_id", sa.String(36), index=True),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("embed_model", sa.String(128), nullable=False),
)

memory_working = sa.Table(
    "memory_working",
    metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.JSON),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

memory_performance = sa.Table(
    "memory_performance",
    metadata,
    sa.Column("alias", sa.String(128), primary_key=True),
    sa.Column("category", sa.String(16), primary_key=True),  # "" when unknown
    sa.Column("calls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("latency_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("gpu_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("runs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("runs_ok", sa.Integer, nullable=False, server_default="0"),
    sa.Column("qa_sum", sa.Float, nullable=False, server_default="0"),
    sa.Column("qa_n", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


# v5: the semantic cache: answers by request (their vectors live in the vector index, keyed by
# the same id) and hit/miss counts per model alias.
cache_entries = sa.Table(
    "memory_cache",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("alias", sa.String(128), nullable=False, index=True),
    sa.Column("prompt_version", sa.String(128), nullable=False, index=True),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("hits", sa.Integer, nullable=False, server_default="0"),
)

cache_counts = sa.Table(
    "memory_cache_counts",
    metadata,
    sa.Column("alias", sa.String(128), primary_key=True),
    sa.Column("hits", sa.Integer, nullable=False, server_default="0"),
    sa.Column("misses", sa.Integer, nullable=False, server_default="0"),
)

# Every vector of memory and the cache, with the payload searches filter on; removals leave a
# tombstone row (op 'del') so that other processes' in-memory indexes learn of them.
memory_vectors = sa.Table(
    "memory_vectors",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("collection", sa.String(128), nullable=False),
    sa.Column("point_id", sa.String(36), nullable=False),
    sa.Column("op", sa.String(3), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("vector", sa.LargeBinary),
    sa.Column("payload", sa.JSON),
    sa.Index("ix_memory_vectors_collection_point", "collection", "point_id"),
    sqlite_autoincrement=True,
)

# v7: the Monitoring crew's alerts. One row per episode: opened when a condition starts, its
# value and last_seen_at updated while it lasts, resolved_at set when it clears. At most one open
# alert per (kind, subject): the partial unique index holds that against concurrent checks.
alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("subject", sa.String(255), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("resolved_at", sa.DateTime(timezone=True), index=True),
    sa.Index(
        "ux_alerts_open",
        "kind",
        "subject",
        unique=True,
        sqlite_where=sa.text("resolved_at IS NULL"),
        postgresql_where=sa.text("resolved_at IS NULL"),
    ),
)

# v8: the learning loop. Prompt versions per crew (one active; candidates; a canary with a share
# of live runs; retired), reviews (QA) and feedback (people) per run, examples and diagnoses
# learned from them, and what the loop did (promotions, rejections, rollbacks) with its reasons.
prompt_versions = sa.Table(
    "prompt_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("crew", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("parent", sa.Integer),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("prompts", sa.JSON, nullable=False),
    sa.Column("demos", sa.JSON, nullable=False),
    sa.Column("code_hash", sa.String(64)),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("canary_share", sa.Float),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("crew", "version", name="uq_prompt_versions_crew_version"),
)

run_reviews = sa.Table(
    "run_reviews",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False, index=True),
    sa.Column("crew", sa.String(64), nullable=False, index=True),
    sa.Column("prompt_version", sa.Integer),
    sa.Column("reviewer", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | ok | failed
    sa.Column("score", sa.Float),
    sa.Column("verdict", sa.String(16)),
    sa.Column("critique", sa.Text),
    sa.Column("issues", sa.JSON, nullable=False),
    sa.Column("raw", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

run_feedback = sa.Table(
    "run_feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False, index=True),
    sa.Column("crew", sa.String(64), nullable=False, index=True),
    sa.Column("prompt_version", sa.Integer),
    sa.Column("vote", sa.String(8), nullable=False),  # up | down
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("correction", sa.Text),
    sa.Column("by", sa.String(128), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

improve_examples = sa.Table(
    "improve_examples",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("crew", sa.String(64), nullable=False, index=True),
    sa.Column("run_id", sa.String(36)),
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # qa | human | correction
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

improve_diagnoses = sa.Table(
    "improve_diagnoses",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False, index=True),
    sa.Column("crew", sa.String(64), nullable=False, index=True),
    sa.Column("category", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

improve_events = sa.Table(
    "improve_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("crew", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("from_version", sa.Integer),
    sa.Column("to_version", sa.Integer),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)


# v9: the HTTP API. Tokens (the sha256 of each token's random secret; the token itself is shown
# once), and the webhook signatures seen within their time window, so that none is accepted twice.
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, server_default=""),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

hook_signatures = sa.Table(
    "hook_signatures",
    metadata,
    sa.Column("signature", sa.String(128), primary_key=True),
    sa.Column("hook", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[runs, run_events])


def _migration_2(conn: Connection) -> None:
    """Heartbeats, worker names and enqueue times (a v1 database lacks the columns)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    timestamp = "TIMESTAMP WITH TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    for name, kind in (("heartbeat_at", timestamp), ("worker", "VARCHAR(255)"),
                       ("enqueued_at", timestamp)):  # fmt: skip
        if name not in have:
            conn.exec_driver_sql(f"ALTER TABLE runs ADD COLUMN {name} {kind}")


def _migration_3(conn: Connection) -> None:
    """Routing columns on runs; the routing-rules and model-call tables."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    false = "FALSE" if conn.dialect.name == "postgresql" else "0"
    for name, kind in (("category", "VARCHAR(16)"), ("rules_version", "INTEGER"),
                       ("degraded", f"BOOLEAN NOT NULL DEFAULT {false}")):  # fmt: skip
        if name not in have:
            conn.exec_driver_sql(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
    metadata.create_all(conn, tables=[routing_rules, model_calls])


def _migration_4(conn: Connection) -> None:
    metadata.create_all(conn, tables=[memory_records, memory_working, memory_performance])


def _migration_5(conn: Connection) -> None:
    metadata.create_all(conn, tables=[cache_entries, cache_counts])


def _migration_6(conn: Connection) -> None:
    """Vectors move into the database: records written before are re-embedded on first use
    (their model is unknown to the new table) and the cache starts empty."""
    metadata.create_all(conn, tables=[memory_vectors])
    conn.execute(memory_records.update().values(embed_model=""))
    conn.execute(cache_entries.delete())


def _migration_7(conn: Connection) -> None:
    """Alerts; and an index on when runs finished, which the failure-rate check reads."""
    metadata.create_all(conn, tables=[alerts])
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_runs_finished_at ON runs (finished_at)")


def _migration_8(conn: Connection) -> None:
    """The learning loop's tables, and the prompt version on runs."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    if "prompt_version" not in have:
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN prompt_version INTEGER")
    metadata.create_all(
        conn,
        tables=[prompt_versions, run_reviews, run_feedback, improve_examples, improve_diagnoses,
                improve_events],
    )  # fmt: skip


def _migration_9(conn: Connection) -> None:
    """The HTTP API's tokens and the webhook signatures seen (replay protection)."""
    metadata.create_all(conn, tables=[api_tokens, hook_signatures])


# (version, step): append only; never edit a step that has shipped.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _migration_1),
    (2, _migration_2),
    (3, _migration_3),
    (4, _migration_4),
    (5, _migration_5),
    (6, _migration_6),
    (7, _migration_7),
    (8, _migration_8),
    (9, _migration_9),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

T = TypeVar("T")
_ACTIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
# runs that can still fail or be cancelled: a waiting run too
_OPEN = (*_ACTIVE, RunStatus.WAITING.value)


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


def _wal(cur: Any) -> None:
    """Switch a SQLite file to WAL once. The switch needs the file to itself and ignores the
    busy timeout, so processes opening a new file at the same moment wait their turn here."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


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
            cur.execute("PRAGMA busy_timeout=30000")
            _wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # No pre-ping: RunStore._run replaces a dead connection and retries once instead.
    return sa.create_engine(url, pool_size=5, max_overflow=5, pool_recycle=1800)


class RunStore:
    """Runs and run events. Thread-safe; one instance per process is enough."""

    def __init__(self, url: str, *, engine: Engine | None = None):
        self.url = normalize_database_url(url)
        self.engine = engine or _make_engine(self.url)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
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

    def add_to_totals(
        self,
        table: sa.Table,
        key: dict[str, Any],
        amounts: dict[str, Any],
        **values: Any,
    ) -> None:
        """Add ``amounts`` to the row of ``table`` named by ``key`` (its primary key), creating
        it when missing, in one atomic statement; ``values`` are set as given."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        stmt = insert(table).values(**key, **amounts, **values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c[k] for k in key],
            set_={
                **{k: stmt.excluded[k] for k in values},
                **{k: table.c[k] + stmt.excluded[k] for k in amounts},
            },
        )
        self._run(lambda conn: conn.execute(stmt))

    def migrate_once(self) -> None:
        """Migrate unless this object already has (for code that uses ``engine`` directly)."""
        if not self._migrated:
            self.migrate()

    def _run(self, fn: Callable[[Connection], T], *, tx: bool = False) -> T:
        """Run ``fn`` on a connection: in a transaction (``tx``) or in autocommit for a single
        statement (no BEGIN/COMMIT round trips). A connection found dead (a restarted server) is
        replaced and ``fn`` tried once more, instead of pinging before every use."""
        if not self._migrated:
            self.migrate()
        for attempt in (1, 2):
            try:
                if tx:
                    with self.engine.begin() as conn:
                        return fn(conn)
                with self._autocommit.connect() as conn:
                    return fn(conn)
            except sa.exc.DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    def _change(self, stmt: Any, kind: str, data: dict[str, Any]) -> Any:
        """Run an INSERT/UPDATE ... RETURNING and, when it touched a row, record event ``kind``,
        in one transaction. (PostgreSQL takes the single-statement path in :data:`_PG`.)"""

        def in_tx(conn: Connection) -> Any:
            row = conn.execute(stmt).mappings().first()
            if row is not None:
                self._event(conn, row["id"], kind, data)
            return row

        return self._run(in_tx, tx=True)

    def _pg(self, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """One of the hot-path statements on PostgreSQL, in autocommit: sent as it is on the
        pooled psycopg connection (one round trip, and no SQLAlchemy connection, statement or
        result objects around it), its first row as a dict. As in :meth:`_run`, a connection
        found dead is replaced and the statement tried once more; errors are raised as
        SQLAlchemy's ``DBAPIError`` subclasses, like those of every other statement."""
        from psycopg import Error
        from psycopg.rows import dict_row

        if not self._migrated:
            self.migrate()
        for attempt in (1, 2):
            pooled = self.engine.raw_connection()
            conn: Any = pooled.driver_connection
            switch = not conn.autocommit
            try:
                if switch:
                    conn.autocommit = True
                with conn.cursor(row_factory=dict_row) as cur:
                    cur.execute(sql, params)
                    row: dict[str, Any] | None = cur.fetchone()  # each of them returns rows
                    return row
            except Error as exc:
                dead = self.engine.dialect.is_disconnect(exc, conn, None)  # type: ignore[arg-type]
                if dead:
                    pooled.invalidate(exc)
                if attempt == 2 or not dead:
                    raise sa.exc.DBAPIError.instance(
                        sql, params, exc, Error, connection_invalidated=dead,
                        dialect=self.engine.dialect,
                    ) from exc  # fmt: skip
            finally:
                if switch and pooled.is_valid:
                    try:
                        conn.autocommit = False  # back as SQLAlchemy's transactions expect it
                    except Error:
                        pooled.invalidate()
                pooled.close()
        raise AssertionError("unreachable")

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
        category: str | None = None,
        rules_version: int | None = None,
    ) -> RunRecord:
        record = RunRecord(
            id=run_id or new_run_id(),
            crew=crew,
            input=input,
            status=RunStatus.QUEUED,
            options=dict(options or {}),
            pool=pool,
            model=model,
            backend=backend,
            created_at=(now := _now()),
            enqueued_at=now,
            category=category,
            rules_version=rules_version,
        )
        event = {"pool": pool, "model": model, "category": category, "rules_version": rules_version}
        if self.dialect == "postgresql":
            from psycopg.types.json import Json

            params = {**_pg_values(record), "options": Json(record.options), "data": Json(event)}
            self._pg(_PG["create"], params)
            return record
        insert = runs.insert().values(
            id=record.id,
            crew=crew,
            input=input,
            options=record.options,
            status=RunStatus.QUEUED.value,
            pool=pool,
            model=model,
            backend=backend,
            created_at=record.created_at,
            enqueued_at=record.created_at,
            artifacts=[],
            category=category,
            rules_version=rules_version,
        )
        self._change(insert.returning(runs.c.id), "queued", event)
        return record

    def get(self, run_id: str) -> RunRecord:
        row: Any
        if self.dialect == "postgresql":
            row = self._pg("SELECT * FROM runs WHERE id = %(id)s", {"id": run_id})
        else:
            query = sa.select(runs).where(runs.c.id == run_id)
            row = self._run(lambda conn: conn.execute(query).mappings().first())
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
        return self._run(lambda conn: [_record(r) for r in conn.execute(query).mappings()])

    def status(self, run_id: str) -> RunStatus:
        if self.dialect == "postgresql":
            row = self._pg("SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})
            value = row["status"] if row is not None else None
        else:
            query = sa.select(runs.c.status).where(runs.c.id == run_id)
            value = self._run(lambda conn: conn.execute(query).scalar())
        if value is None:
            raise RunNotFoundError(run_id)
        return RunStatus(value)

    # -- transitions -----------------------------------------------------------------------------
    def claim(self, run_id: str, worker: str = "") -> RunRecord | None:
        """queued -> running, returning the run; None when it is not queued (cancelled, or
        taken already). One statement: the claim and the read cannot be split by a race."""
        if self.dialect == "postgresql":
            row = self._pg(_PG["claim"], {"id": run_id, "now": _now(), "worker": worker})
            return _record(row) if row is not None else None
        update = (
            runs.update()
            .where(runs.c.id == run_id, runs.c.status == RunStatus.QUEUED.value)
            .values(
                status=RunStatus.RUNNING.value,
                started_at=(now := _now()),
                heartbeat_at=now,
                worker=worker,
                attempts=runs.c.attempts + 1,
            )
            .returning(*runs.c)
        )
        row = self._change(update, "running", {})
        return _record(row) if row is not None else None

    def mark_running(self, run_id: str) -> bool:
        """queued -> running. False when the run is not queued (cancelled, or taken already)."""
        return self.claim(run_id) is not None

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        *,
        output: str | None = None,
        error: str | None = None,
        artifacts: Sequence[str] = (),
        attempt: int | None = None,
    ) -> bool:
        """Record the outcome once. False (and nothing changed) when the run already finished,
        or, with ``attempt``, when the run has since been handed to another attempt."""
        if status not in TERMINAL:
            raise ValueError(f"{status.value} is not an outcome")
        allowed = _OPEN if status is not RunStatus.SUCCEEDED else (RunStatus.RUNNING.value,)
        values: dict[str, Any] = {"status": status.value}
        if output is not None:
            values["output"] = output
        if error is not None:
            values["error"] = error
        if artifacts:
            values["artifacts"] = list(artifacts)
        data = {"error": error} if error else {}
        if self.dialect == "postgresql":
            from psycopg.types.json import Json

            params = {
                "id": run_id, "now": _now(), "status": status.value, "allowed": list(allowed),
                "attempt": attempt,
                "output": output, "error": error, "data": Json(data),
                "artifacts": Json(list(artifacts)) if artifacts else None,
            }  # fmt: skip
            if self._pg(_PG["finish"], params) is not None:
                return True
            self.status(run_id)  # raises RunNotFoundError for an unknown id
            return False
        where = [runs.c.id == run_id, runs.c.status.in_(allowed)]
        if attempt is not None:
            where.append(runs.c.attempts == attempt)
        update = runs.update().where(*where).values(finished_at=_now(), **values)
        update = update.returning(runs.c.id)
        if self._change(update, status.value, data) is not None:
            return True
        self.status(run_id)  # raises RunNotFoundError for an unknown id
        return False

    def wait(
        self, run_id: str, *, reason: str, attempt: int, artifacts: Sequence[str] = ()
    ) -> bool:
        """running -> waiting (for a person). False when the run is no longer this attempt's."""
        values: dict[str, Any] = {"status": RunStatus.WAITING.value, "worker": None}
        if artifacts:
            values["artifacts"] = list(artifacts)
        update = (
            runs.update()
            .where(
                runs.c.id == run_id,
                runs.c.status == RunStatus.RUNNING.value,
                runs.c.attempts == attempt,
            )
            .values(**values)
            .returning(runs.c.id)
        )
        return self._change(update, "waiting", {"reason": reason}) is not None

    def resume(self, run_id: str, kind: str, data: dict[str, Any]) -> RunRecord | None:
        """waiting -> queued, with event ``kind`` (``approved``/``rejected``) carrying ``data``;
        None when the run is not waiting."""
        update = (
            runs.update()
            .where(runs.c.id == run_id, runs.c.status == RunStatus.WAITING.value)
            .values(status=RunStatus.QUEUED.value, enqueued_at=_now())
            .returning(*runs.c)
        )
        row = self._change(update, kind, data)
        return _record(row) if row is not None else None

    def cancel(self, run_id: str) -> bool:
        """queued|running|waiting -> cancelled. A running crew notices at its next step."""
        return self.finish(run_id, RunStatus.CANCELLED, error="cancelled")

    def set_prompt_version(self, run_id: str, version: int) -> None:
        """Record the crew's prompt version this run uses (first attempt: kept for retries)."""
        update = runs.update().where(runs.c.id == run_id).values(prompt_version=version)
        self._run(lambda conn: conn.execute(update))

    def set_route(self, run_id: str, *, model: str, backend: str) -> None:
        update = runs.update().where(runs.c.id == run_id).values(model=model, backend=backend)
        self._run(lambda conn: conn.execute(update))

    def mark_degraded(self, run_id: str, *, requested: str, used: str, reason: str) -> bool:
        """Record (once) that a fallback model answered for the routed one."""
        update = (
            runs.update()
            .where(runs.c.id == run_id, runs.c.degraded == sa.false())
            .values(degraded=True)
            .returning(runs.c.id)
        )
        data = {"requested": requested, "used": used, "reason": reason}
        return self._change(update, "degraded", data) is not None

    # -- model calls (local cost) ------------------------------------------------------------------
    def add_model_call(
        self,
        *,
        alias: str,
        requested: str,
        url: str,
        usage: Usage,
        gpu_s: float,
        ok: bool = True,
        error: str | None = None,
        run_id: str | None = None,
        category: str | None = None,
    ) -> None:
        insert = model_calls.insert().values(
            run_id=run_id, at=_now(), alias=alias, requested=requested, url=url,
            category=category, ok=ok, error=error, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, latency_s=usage.latency_s,
            compute_s=usage.compute_s, gpu_s=gpu_s,
        )  # fmt: skip
        self._run(lambda conn: conn.execute(insert))

    def model_stats(
        self, *, since: datetime | None = None, alias: str | None = None
    ) -> list[dict[str, Any]]:
        """Calls per model alias and category: count, failures, tokens, latency, GPU-seconds."""
        c = model_calls.c
        failed = sa.func.sum(sa.case((c.ok == sa.false(), 1), else_=0))
        query = sa.select(
            c.alias, c.category, sa.func.count().label("calls"), failed.label("failures"),
            sa.func.sum(c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(c.completion_tokens).label("completion_tokens"),
            sa.func.avg(c.latency_s).label("mean_latency_s"),
            sa.func.max(c.latency_s).label("max_latency_s"),
            sa.func.sum(c.compute_s).label("compute_s"), sa.func.sum(c.gpu_s).label("gpu_s"),
        ).group_by(c.alias, c.category).order_by(c.alias, c.category)  # fmt: skip
        if since is not None:
            query = query.where(c.at >= since)
        if alias is not None:
            query = query.where(c.alias == alias)
        rows = self._run(lambda conn: list(conn.execute(query).mappings()))
        out = []
        for r in rows:
            calls = int(r["calls"])
            out.append(
                {
                    "alias": r["alias"], "category": r["category"], "calls": calls,
                    "failures": int(r["failures"] or 0),
                    "prompt_tokens": int(r["prompt_tokens"] or 0),
                    "completion_tokens": int(r["completion_tokens"] or 0),
                    "mean_latency_s": round(float(r["mean_latency_s"] or 0), 4),
                    "max_latency_s": round(float(r["max_latency_s"] or 0), 4),
                    "compute_s": round(float(r["compute_s"] or 0), 4),
                    "gpu_s": round(float(r["gpu_s"] or 0), 4),
                }
            )  # fmt: skip
        return out

    def run_calls_by_alias(self, run_id: str) -> list[dict[str, Any]]:
        """One run's model calls summed per alias that answered (for model-performance memory)."""
        c = model_calls.c
        failed = sa.func.sum(sa.case((c.ok == sa.false(), 1), else_=0))
        query = (
            sa.select(
                c.alias, sa.func.count().label("calls"), failed.label("failures"),
                sa.func.sum(c.prompt_tokens).label("prompt_tokens"),
                sa.func.sum(c.completion_tokens).label("completion_tokens"),
                sa.func.sum(c.latency_s).label("latency_s"), sa.func.sum(c.gpu_s).label("gpu_s"),
            )
            .where(c.run_id == run_id)
            .group_by(c.alias)
        )  # fmt: skip
        rows = self._run(lambda conn: list(conn.execute(query).mappings()))
        return [
            {
                "alias": r["alias"], "calls": int(r["calls"]), "failures": int(r["failures"] or 0),
                "prompt_tokens": int(r["prompt_tokens"] or 0),
                "completion_tokens": int(r["completion_tokens"] or 0),
                "latency_s": float(r["latency_s"] or 0), "gpu_s": float(r["gpu_s"] or 0),
            }
            for r in rows
        ]  # fmt: skip

    # -- routing rules -----------------------------------------------------------------------------
    def rules_versions(self) -> list[dict[str, Any]]:
        query = sa.select(routing_rules).order_by(routing_rules.c.version)
        rows = self._run(lambda conn: list(conn.execute(query).mappings()))
        return [_rules_row(r) for r in rows]

    def active_rules(self) -> dict[str, Any] | None:
        query = sa.select(routing_rules).where(routing_rules.c.active == sa.true())
        row = self._run(lambda conn: conn.execute(query).mappings().first())
        return _rules_row(row) if row is not None else None

    def add_rules(
        self,
        body: dict[str, Any],
        *,
        source: str,
        note: str = "",
        activate: bool = True,
        unless_source_hash: str | None = None,
    ) -> dict[str, Any]:
        """Store a new rules version (the next number; the active one is its parent) and make it
        active. With ``unless_source_hash``, do nothing when the newest version from ``source``
        already carries that hash (so many processes seeding from one config add one version)."""

        def in_tx(conn: Connection) -> dict[str, Any]:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7301002)"))
            elif conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            rows = [dict(r) for r in conn.execute(sa.select(routing_rules)).mappings()]
            if unless_source_hash is not None:
                mine = [r for r in rows if r["source"] == source]
                if (
                    mine
                    and max(mine, key=lambda r: r["version"])["body"].get("source_hash")
                    == unless_source_hash
                ):
                    return _rules_row(max(rows, key=lambda r: r["version"]))
            version = max((r["version"] for r in rows), default=0) + 1
            parent = next((r["version"] for r in rows if r["active"]), None)
            if activate:
                conn.execute(routing_rules.update().values(active=False))
            values = {
                "version": version, "created_at": _now(), "source": source, "note": note,
                "parent": parent, "body": body, "active": activate,
            }  # fmt: skip
            conn.execute(routing_rules.insert().values(**values))
            return _rules_row(values)

        return self._run(in_tx, tx=True)

    def activate_rules(self, version: int) -> dict[str, Any]:
        """Make ``version`` the active rules (promotion or rollback)."""

        def in_tx(conn: Connection) -> dict[str, Any]:
            query = sa.select(routing_rules).where(routing_rules.c.version == version)
            row = conn.execute(query).mappings().first()
            if row is None:
                raise KeyError(version)
            conn.execute(routing_rules.update().values(active=False))
            conn.execute(
                routing_rules.update().where(routing_rules.c.version == version).values(active=True)
            )
            return _rules_row({**row, "active": True})

        return self._run(in_tx, tx=True)

    def add_usage(self, run_id: str, usage: Usage) -> None:
        """Add one model call's usage to the run's totals (atomic increment)."""
        update = (
            runs.update()
            .where(runs.c.id == run_id)
            .values(
                prompt_tokens=runs.c.prompt_tokens + usage.prompt_tokens,
                completion_tokens=runs.c.completion_tokens + usage.completion_tokens,
                model_calls=runs.c.model_calls + usage.calls,
                model_latency_s=runs.c.model_latency_s + usage.latency_s,
            )
        )
        self._run(lambda conn: conn.execute(update))

    # -- liveness and recovery -------------------------------------------------------------------
    def heartbeat(self, run_id: str) -> bool:
        """Mark a running run alive; False when it is no longer running (cancelled, finished,
        or taken back by the reaper)."""
        update = (
            runs.update()
            .where(runs.c.id == run_id, runs.c.status == RunStatus.RUNNING.value)
            .values(heartbeat_at=_now())
        )
        return bool(self._run(lambda conn: conn.execute(update).rowcount))

    def stale_running(self, before: datetime) -> list[RunRecord]:
        """Running runs whose last heartbeat is older than ``before``: their worker died."""
        query = sa.select(runs).where(
            runs.c.status == RunStatus.RUNNING.value,
            sa.func.coalesce(runs.c.heartbeat_at, runs.c.started_at) < before,
        )
        return self._run(lambda conn: [_record(r) for r in conn.execute(query).mappings()])

    def running_since(self, before: datetime) -> list[RunRecord]:
        """Running runs started before ``before`` (for time limits)."""
        query = sa.select(runs).where(
            runs.c.status == RunStatus.RUNNING.value, runs.c.started_at < before
        )
        return self._run(lambda conn: [_record(r) for r in conn.execute(query).mappings()])

    def requeue(self, run_id: str, stale_before: datetime) -> bool:
        """running -> queued, only while its heartbeat is still older than ``stale_before``
        (so a worker that came back to life and a second reaper cannot both win)."""
        update = (
            runs.update()
            .where(
                runs.c.id == run_id,
                runs.c.status == RunStatus.RUNNING.value,
                sa.func.coalesce(runs.c.heartbeat_at, runs.c.started_at) < stale_before,
            )
            .values(status=RunStatus.QUEUED.value, enqueued_at=_now(), worker=None)
            .returning(runs.c.id)
        )
        return (
            self._change(update, "requeued", {"reason": "worker stopped heartbeating"}) is not None
        )

    def stale_queued(self, before: datetime) -> list[RunRecord]:
        """Queued runs last handed to the broker before ``before`` (the message may be lost)."""
        query = sa.select(runs).where(
            runs.c.status == RunStatus.QUEUED.value,
            sa.func.coalesce(runs.c.enqueued_at, runs.c.created_at) < before,
        )
        return self._run(lambda conn: [_record(r) for r in conn.execute(query).mappings()])

    def mark_enqueued(self, run_id: str) -> bool:
        update = (
            runs.update()
            .where(runs.c.id == run_id, runs.c.status == RunStatus.QUEUED.value)
            .values(enqueued_at=_now())
        )
        return bool(self._run(lambda conn: conn.execute(update).rowcount))

    def counts(self) -> dict[str, dict[str, int]]:
        """Runs per pool and status, for queued and running runs."""
        query = (
            sa.select(runs.c.pool, runs.c.status, sa.func.count())
            .where(runs.c.status.in_(_ACTIVE))
            .group_by(runs.c.pool, runs.c.status)
        )
        rows = self._run(lambda conn: list(conn.execute(query)))
        out: dict[str, dict[str, int]] = {}
        for pool, status, n in rows:
            out.setdefault(pool, {})[status] = int(n)
        return out

    # -- events ----------------------------------------------------------------------------------
    def add_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        self._run(lambda conn: self._event(conn, run_id, kind, data or {}))

    def events(self, run_id: str, *, after: int = 0) -> list[RunEvent]:
        query = (
            sa.select(run_events)
            .where(run_events.c.run_id == run_id, run_events.c.id > after)
            .order_by(run_events.c.id)
        )
        rows = self._run(lambda conn: list(conn.execute(query).mappings()))
        return [
            RunEvent(r["run_id"], r["id"], _utc(r["at"]) or _now(), r["kind"], r["data"])
            for r in rows
        ]

    @staticmethod
    def _event(conn: Connection, run_id: str, kind: str, data: dict[str, Any]) -> None:
        conn.execute(run_events.insert().values(run_id=run_id, at=_now(), kind=kind, data=data))


# The three transitions on the hot path, for PostgreSQL: the change and its event in one
# statement (a data-modifying CTE), sent without SQLAlchemy's statement building, one round trip.
_PG = {
    "create": """
        WITH changed AS (
            INSERT INTO runs (id, crew, input, options, status, pool, model, backend, created_at,
                              enqueued_at, artifacts, category, rules_version)
            VALUES (%(id)s, %(crew)s, %(input)s, %(options)s, 'queued', %(pool)s, %(model)s,
                    %(backend)s, %(created_at)s, %(created_at)s, '[]', %(category)s,
                    %(rules_version)s)
            RETURNING id)
        INSERT INTO run_events (run_id, at, kind, data)
        SELECT id, %(created_at)s, 'queued', %(data)s FROM changed RETURNING run_id""",
    "claim": """
        WITH changed AS (
            UPDATE runs SET status = 'running', started_at = %(now)s, attempts = attempts + 1,
                heartbeat_at = %(now)s, worker = %(worker)s
            WHERE id = %(id)s AND status = 'queued' RETURNING *),
        event AS (
            INSERT INTO run_events (run_id, at, kind, data)
            SELECT id, %(now)s, 'running', '{}' FROM changed)
        SELECT * FROM changed""",
    "finish": """
        WITH changed AS (
            UPDATE runs SET status = %(status)s, finished_at = %(now)s,
                output = COALESCE(%(output)s::text, output),
                error = COALESCE(%(error)s::text, error),
                artifacts = COALESCE(%(artifacts)s::json, artifacts)
            WHERE id = %(id)s AND status = ANY(%(allowed)s)
                AND (%(attempt)s::int IS NULL OR attempts = %(attempt)s::int) RETURNING id),
        event AS (
            INSERT INTO run_events (run_id, at, kind, data)
            SELECT id, %(now)s, %(status)s, %(data)s FROM changed)
        SELECT id FROM changed""",
}


def _pg_values(record: RunRecord) -> dict[str, Any]:
    return {
        "id": record.id, "crew": record.crew, "input": record.input, "pool": record.pool,
        "model": record.model, "backend": record.backend, "created_at": record.created_at,
        "category": record.category, "rules_version": record.rules_version,
    }  # fmt: skip


def _rules_row(row: Any) -> dict[str, Any]:
    return {
        "version": int(row["version"]),
        "created_at": _utc(row["created_at"]),
        "source": row["source"],
        "note": row["note"] or "",
        "parent": row["parent"],
        "active": bool(row["active"]),
        "body": dict(row["body"] or {}),
    }


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
        category=row.get("category"),
        rules_version=row.get("rules_version"),
        degraded=bool(row.get("degraded")),
        prompt_version=row.get("prompt_version"),
        artifacts=list(row["artifacts"] or []),
        attempts=row["attempts"],
        heartbeat_at=_utc(row.get("heartbeat_at")),
        worker=row.get("worker"),
        enqueued_at=_utc(row.get("enqueued_at")),
    )
