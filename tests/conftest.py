"""Shared fixtures. Services (Redis, PostgreSQL) are started by scripts/test, which exports
TYPHON_TEST_REDIS_URL and TYPHON_TEST_POSTGRES_URL; a test that needs one fails (never skips)
when it is missing."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from typhon._types import RunRecord
from typhon.config import TyphonConfig
from typhon.store import RunStore

REPO = Path(__file__).resolve().parent.parent


def _service_url(var: str) -> str:
    url = os.environ.get(var)
    if not url:
        pytest.fail(f"{var} is not set: run the suite with scripts/test, which starts the services")
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _service_url("TYPHON_TEST_REDIS_URL")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return _service_url("TYPHON_TEST_POSTGRES_URL")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's typhon.yaml or TYPHON_* settings, or writes to their home."""
    for name in list(os.environ):
        if name.startswith("TYPHON_") and not name.startswith(("TYPHON_TEST_", "TYPHON_DEV_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TYPHON_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def config(home: Path) -> TyphonConfig:
    return TyphonConfig(home=home)


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the bundled GGUF assembled once for the whole session."""
    from typhon.models._local import _bundled_model

    home = tmp_path_factory.mktemp("models-home")
    return _bundled_model(home).parent


def _pg_store(url: str) -> Iterator[RunStore]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = sa.create_engine(
        admin.url, connect_args={"options": f"-csearch_path={schema}"}, pool_pre_ping=True
    )
    store = RunStore(admin.url.render_as_string(hide_password=False), engine=engine)
    try:
        yield store
    finally:
        store.close()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunStore]:
    """The same tests over every run-store backend: SQLite and a real PostgreSQL."""
    if request.param == "sqlite":
        sqlite = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
        yield sqlite
        sqlite.close()
    else:
        yield from _pg_store(request.getfixturevalue("postgres_url"))


TYPHON_BIN = str(Path(sys.executable).parent / "typhon")


@pytest.fixture
def pg_schema_url(postgres_url: str) -> Iterator[str]:
    """A database URL whose connections use a fresh schema of their own (dropped afterwards)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


class Cluster:
    """A Typhon config on real Redis + PostgreSQL, and `typhon worker` processes serving it."""

    def __init__(
        self,
        tmp_path: Path,
        redis_url: str,
        database_url: str,
        crews_module: str,
        *,
        pools: dict[str, str] | None = None,
        extra_yaml: str = "",
    ):
        """``pools`` maps pool name -> its YAML flow mapping without name/queue, e.g.
        ``{"research": "cap: 2, burst_cap: 3"}``; queues and the cluster name are unique."""
        tag = uuid.uuid4().hex[:8]
        self.dir = tmp_path / f"cluster-{tag}"
        self.dir.mkdir()
        self.home = self.dir / "home"
        self.redis_url = redis_url
        self.name = f"test{tag}"
        self.queues = {name: f"{name}-{tag}" for name in (pools or {"research": "cap: 2"})}
        self.queue = self.queues.get("research", "")
        (self.dir / "cluster_crews.py").write_text(crews_module)
        # Each cluster's crews under the same module name: a client in this process must import
        # this one, not the module an earlier test's cluster left in sys.modules.
        sys.modules.pop("cluster_crews", None)
        self.config_path = self.dir / "typhon.yaml"
        pool_lines = "".join(
            f"  - {{name: {name}, queue: {self.queues[name]}, {spec}}}\n"
            for name, spec in (pools or {"research": "cap: 2"}).items()
        )
        self.config_path.write_text(
            f"broker_url: {redis_url}\n"
            f"database_url: '{database_url}'\n"
            f"pools:\n{pool_lines}"
            "crew_modules: [cluster_crews]\n"
            f"{extra_yaml}"
        )
        if "cluster:" not in extra_yaml:
            with self.config_path.open("a") as f:
                f.write(f"cluster: {{name: {self.name}}}\n")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(self.dir),
            "TYPHON_HOME": str(self.home),
            "TYPHON_CONFIG": str(self.config_path),
        }
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self, *args: str, pool: str = "research") -> subprocess.Popen[bytes]:
        """A `typhon worker` in a session of its own (so a test can kill its whole group)."""
        return self._spawn(["worker", "--pool", pool, "--loglevel", "INFO", *args])

    def start_beat(self) -> subprocess.Popen[bytes]:
        return self._spawn(["beat", "--loglevel", "INFO"])

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.dir / f"worker-{len(self.workers)}.log", "wb") as log:
            proc = subprocess.Popen(
                [TYPHON_BIN, *argv],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """kill -9 the worker and its children, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def worker_log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.dir.glob("worker-*.log"))
        )

    def typhon(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TYPHON_BIN, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _kill_local_servers(self.home)
        self._clean_redis()

    def _clean_redis(self) -> None:
        """Drop this cluster's queues and slot keys from the shared test Redis."""
        import redis

        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(self.redis_url)
            keys = list(client.scan_iter(match=f"typhon:{self.name}:*"))
            keys += [q.encode() for q in self.queues.values()]
            if keys:
                client.delete(*keys)
            client.close()


def _kill_local_servers(home: Path) -> None:
    """Stop any llama-server a test's processes left behind (they should have stopped it)."""
    for state in (home / "run").glob("llama-*.json") if (home / "run").is_dir() else []:
        with contextlib.suppress(ValueError, OSError, ProcessLookupError):
            os.kill(int(json.loads(state.read_text())["pid"]), signal.SIGKILL)


@pytest.fixture
def make_cluster(
    tmp_path: Path, redis_url: str, pg_schema_url: str
) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(crews_module: str = "", **kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_path, redis_url, pg_schema_url, crews_module, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _loopback_only(address: object) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"a test tried to reach {host}: only loopback is allowed")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every in-process connection a test makes must go to loopback (nothing phones home)."""

    def connect(sock: socket.socket, address: Any) -> None:
        _loopback_only(address)
        _real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        _loopback_only(address)
        return _real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def peak_concurrency(records: Iterable[RunRecord], pool: str | None = None) -> int:
    """The most runs (of ``pool``, or all) that were running at once, from their recorded
    start and finish times."""
    events: list[tuple[datetime, int]] = []
    for r in records:
        if pool in (None, r.pool):
            assert r.started_at is not None and r.finished_at is not None
            events += [(r.started_at, 1), (r.finished_at, -1)]
    peak = now = 0
    for _, delta in sorted(events):
        now += delta
        peak = max(peak, now)
    return peak
