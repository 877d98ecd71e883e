"""LangGraph checkpoints on the run store's database: SQLite or PostgreSQL.

A graph's thread is its run id, so a run that is taken back from a dead worker and started again
finds the checkpoint of its last finished node and resumes from there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import make_url

from typhon.store import RunStore

__all__ = ["checkpointer"]

_setup_done: set[str] = set()
_setup_lock = threading.Lock()


@contextlib.contextmanager
def checkpointer(store: RunStore) -> Iterator[Any]:
    """A LangGraph saver on the store's database, its tables created on first use."""
    url = make_url(store.url)
    if store.dialect == "sqlite":
        import sqlite3

        from langgraph.checkpoint.sqlite import SqliteSaver

        lite = sqlite3.connect(url.database or ":memory:", check_same_thread=False, timeout=30)
        try:
            lite_saver = SqliteSaver(lite)
            _setup(store.url, lite_saver)
            yield lite_saver
        finally:
            lite.close()
        return
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row

    # a libpq URL: query parameters such as options=-csearch_path=... carry over as they are
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True, row_factory=dict_row) as conn:
        saver = PostgresSaver(conn)
        _setup(store.url, saver)
        yield saver


def _setup(key: str, saver: Any) -> None:
    with _setup_lock:
        if key not in _setup_done:
            saver.setup()
            _setup_done.add(key)
