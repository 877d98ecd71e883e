"""What the worker benchmarks share: a Typhon worker and a raw Celery worker started side by side.

:func:`start_pair` makes a temporary folder, a run store (a fresh PostgreSQL schema, or a SQLite
file), a ``typhon.yaml`` with one pool ``bench`` (queue and cluster name unique to this run) and
starts ``typhon --config FILE worker --pool bench`` and ``celery -A _raw_celery worker`` with the
same argv (``workers.celery_app.worker_argv``: late acks, prefetch 1, no gossip/mingle, INFO logs
to a file), each in a session of its own. Every step registers its undo with a :class:`Cleanup`:
workers stopped, schema dropped, Redis queue keys and the cluster's slot keys deleted, folder
removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # _noop_crew, _raw_celery

DEFAULT_REDIS = "redis://127.0.0.1:6390/0"
POOL = "bench"
READY_TIMEOUT_S = 90.0


# -- process and resource clean-up --------------------------------------------------------------
class Cleanup:
    """Stops what the benchmark started, in reverse order, once (finally + atexit + signals)."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []
        self._done = False

    def add(self, what: str, step: Callable[[], None]) -> None:
        self._steps.append((what, step))

    def run(self) -> None:
        if self._done:
            return
        self._done = True
        for what, step in reversed(self._steps):
            try:
                step()
            except Exception as exc:  # keep cleaning up
                print(f"cleanup: {what}: {exc!r}", file=sys.stderr)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL to the process group it leads."""
    if proc.poll() is None:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only its prefork children
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def raise_exit(signum: int, _frame: Any) -> None:
    """SIGTERM handler: unwind (and so clean up) like Ctrl-C does."""
    raise SystemExit(128 + signum)


# -- set-up ---------------------------------------------------------------------------------------
def run_with_cleanup(run: Callable[[Any, Cleanup], None], args: Any) -> int:
    """A benchmark's main: ``run(args, cleanup)`` with everything registered on ``cleanup``
    undone at the end, on an exception, on SIGTERM and at interpreter exit."""
    import atexit

    cleanup = Cleanup()
    atexit.register(cleanup.run)
    signal.signal(signal.SIGTERM, raise_exit)
    try:
        run(args, cleanup)
    finally:
        cleanup.run()
    return 0


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without the caller's TYPHON_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TYPHON_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def prepare_database(url: str | None, tmp: Path, cleanup: Cleanup) -> tuple[str, str]:
    """The run store URL to use and a description. PostgreSQL: a fresh schema, dropped at exit."""
    if not url:
        url = os.environ.get("TYPHON_TEST_POSTGRES_URL") or ""
    if not url:
        path = tmp / "runs.db"
        return f"sqlite:///{path}", f"sqlite file {path}"
    if url.startswith("sqlite"):
        return url, url
    import sqlalchemy as sa

    from typhon.store import normalize_database_url

    base = normalize_database_url(url)
    if "?" in base:
        return base, f"{base} (as given)"
    schema = f"typhon_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()

    cleanup.add(f"drop schema {schema}", drop)
    return f"{base}?options=-csearch_path%3D{schema}", f"{base} (schema {schema})"


def write_config(
    tmp: Path,
    broker: str,
    database: str,
    queue: str,
    *,
    cap: int = 1,
    cluster: dict[str, Any] | None = None,
) -> Path:
    import yaml

    config: dict[str, Any] = {
        "home": str(tmp / "home"),
        "broker_url": broker,
        "database_url": database,
        "pools": [{"name": POOL, "queue": queue, "cap": cap}],
        "crews": {"noop": {"pool": POOL}},
        "crew_modules": ["_noop_crew"],
    }
    if cluster:
        config["cluster"] = cluster
    path = tmp / "typhon.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def console_script(name: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def start_worker(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path, cleanup: Cleanup
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    cleanup.add(f"stop {' '.join(argv[:3])}", lambda: stop_process(proc))
    return proc


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cleanup_redis(url: str, queues: list[str], patterns: tuple[str, ...] = ()) -> None:
    """Delete the queues' kombu keys, and every key matching ``patterns`` (e.g. slot leases)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        prefixes = ("", "_kombu.binding.", "_kombu.binding_permanent.")  # kombu's keys per queue
        client.delete(*(prefix + q for q in queues for prefix in prefixes))
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=500))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
    finally:
        client.close()


# -- the two workers ------------------------------------------------------------------------------
@dataclass
class Pair:
    """A Typhon worker and a raw Celery worker on the same broker, and what they run against."""

    tmp: Path
    tag: str
    broker: str
    t_queue: str
    r_queue: str
    cluster: str
    db_desc: str
    config_path: Path
    config: Any  # TyphonConfig
    t_argv: list[str]
    r_argv: list[str]
    t_proc: subprocess.Popen[bytes]
    r_proc: subprocess.Popen[bytes]

    @property
    def t_log(self) -> Path:
        return self.tmp / "typhon-worker.log"

    @property
    def r_log(self) -> Path:
        return self.tmp / "raw-worker.log"


def start_pair(
    broker: str,
    database_url: str | None,
    cleanup: Cleanup,
    *,
    concurrency: int = 1,
    cluster: dict[str, Any] | None = None,
) -> Pair:
    """Start both workers with ``--concurrency=concurrency`` (the pool's cap).

    The temporary cluster is named ``bench-TAG`` unless ``cluster`` names one; its control queue
    and its slot keys ``typhon:NAME:slot:*`` are deleted at exit, with the two work queues."""
    tmp = Path(tempfile.mkdtemp(prefix="typhon-bench-"))
    cleanup.add(f"remove {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    (tmp / "home").mkdir()
    tag = uuid.uuid4().hex[:8]
    t_queue, r_queue = f"typhon-bench-{tag}", f"raw-bench-{tag}"
    cluster = {"name": f"bench-{tag}", **(cluster or {})}
    name = str(cluster["name"])
    queues = [t_queue, r_queue, f"typhon-control-{name}"]
    slot_keys = f"typhon:{name}:slot:*"
    cleanup.add(
        "delete bench queues and slot keys",
        lambda: cleanup_redis(broker, queues, (slot_keys,)),
    )
    db_url, db_desc = prepare_database(database_url, tmp, cleanup)
    config_path = write_config(tmp, broker, db_url, t_queue, cap=concurrency, cluster=cluster)

    from typhon.config import load_config
    from workers.celery_app import worker_argv

    env = child_env(
        {
            "TYPHON_CONFIG": str(config_path),
            "TYPHON_HOME": str(tmp / "home"),
            "BENCH_BROKER_URL": broker,
            "BENCH_RAW_QUEUE": r_queue,
        }
    )
    config = load_config(config_path, environ={"TYPHON_HOME": str(tmp / "home")})
    # Same worker argv as `typhon worker --pool bench`, but the raw queue and node name.
    raw_argv = [
        a.replace(f"--queues={t_queue}", f"--queues={r_queue}").replace(
            f"--hostname={POOL}@", "--hostname=rawbench@"
        )
        for a in worker_argv(config, POOL)
    ]
    t_argv = [*console_script("typhon"), "--config", str(config_path), "worker", "--pool", POOL]
    r_argv = [*console_script("celery"), "-A", "_raw_celery", *raw_argv]
    t_proc = start_worker(t_argv, env, tmp / "typhon-worker.log", tmp, cleanup)
    r_proc = start_worker(r_argv, env, tmp / "raw-worker.log", tmp, cleanup)
    return Pair(
        tmp, tag, broker, t_queue, r_queue, name, db_desc, config_path, config, t_argv, r_argv,
        t_proc, r_proc,
    )  # fmt: skip
