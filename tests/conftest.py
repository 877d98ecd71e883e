"""Shared fixtures. Services (Redis, PostgreSQL) are started by scripts/test, which exports
TYPHON_TEST_REDIS_URL and TYPHON_TEST_POSTGRES_URL; a test that needs one fails (never skips)
when it is missing."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

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
