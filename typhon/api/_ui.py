"""The Command UI: the page at ``/``, its files under ``/ui/``, and the two read-only routes it
needs beside the API's own.

Routes:

    GET /                 none      the page (static/index.html)
    GET /ui/{file}        none      its script, style sheet and icon
    GET /v1/crews         read      {crews: [{name, description, pool, category, model, ...}]}
    GET /v1/cluster       read      pools with their workers, queued and running runs, alerts

The page holds no data: it asks for an API token, keeps it in the browser (localStorage) and
sends it as ``Authorization: Bearer`` to the API's routes, events included (read with
``fetch``, not ``EventSource``, which cannot send the header). Everything it loads comes from
this package: no build step, no CDN, no external font; the Content-Security-Policy allows
nothing else.

Workers per pool: with a broker, the Celery workers that answer ``inspect active_queues``
within a second, counted by the pool queues they consume (cached a few seconds per app); in
embedded mode runs execute in the API's own process and ``workers`` is None.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import Response

from typhon._types import RunStatus
from typhon.api._errors import ApiError
from typhon.api._state import state_of
from typhon.orchestrator import CeleryDispatcher, Typhon
from typhon.store import runs

__all__ = ["CSP", "STATIC_FILES", "Workers", "ask_workers", "router"]

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none';"
    " frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
INSPECT_TIMEOUT_S = 1.0
WORKERS_TTL_S = 5.0
ALERTS_SHOWN = 20
_LIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value, RunStatus.WAITING.value)

router = APIRouter()


def _static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"the Command UI has no file '{name[:64]}'")
    content = resources.files("typhon.api").joinpath("static", name).read_bytes()
    return Response(content, media_type=media_type, headers=_HEADERS)


@router.get("/", include_in_schema=False)
def page() -> Response:
    """The Command UI (no token needed: the page asks for one)."""
    return _static("index.html")


@router.get("/ui/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    """The page's script, style sheet and icon."""
    return _static(name)


@router.get("/v1/crews", tags=["cluster"])
def list_crews(request: Request) -> dict[str, Any]:
    """Every registered crew: its name, description, pool, routing category and fixed model
    (``available: false`` with the error when its module cannot be imported)."""
    typhon = state_of(request).typhon
    return {"crews": [_crew(typhon, name) for name in typhon.crews.names()]}


def _crew(typhon: Typhon, name: str) -> dict[str, Any]:
    settings = typhon.config.crew_settings(name)
    try:
        cls = typhon.crews.get(name)
    except ImportError as exc:  # a built-in crew whose optional extra is missing
        return {"name": name, "description": "", "pool": settings.pool, "category": None,
                "model": settings.model, "available": False, "error": str(exc)}  # fmt: skip
    return {
        "name": name,
        "description": cls.description.strip().splitlines()[0] if cls.description.strip() else "",
        "pool": settings.pool or cls.pool,
        "category": settings.category or cls.category,
        "model": settings.model or cls.model,
        "available": True,
        "error": None,
    }


@router.get("/v1/cluster", tags=["cluster"])
def cluster(request: Request) -> dict[str, Any]:
    """The status bar's numbers: the mode, each pool with its workers (None in embedded mode),
    queued and running runs, the cluster's totals, live runs per crew, and the open alerts."""
    from typhon.crews.monitoring import list_alerts

    typhon = state_of(request).typhon
    pools = typhon.pools()["pools"]
    workers = _workers_of(request).get(typhon)
    for pool in pools:
        names = workers.by_queue.get(pool["queue"], []) if workers.answered else []
        pool["workers"] = len(names) if workers.answered else None
        pool["worker_names"] = names
    alerts = list_alerts(typhon.store)
    return {
        "mode": "embedded" if typhon.embedded else "cluster",
        "store": typhon.store.dialect,
        "pools": pools,
        "queued": sum(p["queued"] for p in pools),
        "running": sum(p["running"] for p in pools),
        "workers": {"answered": workers.answered, "note": workers.note},
        "crews": _live_by_crew(typhon),
        "alerts": {"open": len(alerts), "items": [a.to_json() for a in alerts[:ALERTS_SHOWN]]},
    }


def _live_by_crew(typhon: Typhon) -> dict[str, dict[str, int]]:
    """Queued, running and waiting runs per crew (the tabs' badges)."""
    query = (
        sa.select(runs.c.crew, runs.c.status, sa.func.count())
        .where(runs.c.status.in_(_LIVE))
        .group_by(runs.c.crew, runs.c.status)
    )
    typhon.store.migrate_once()
    with typhon.store.engine.connect() as conn:
        rows = list(conn.execute(query))
    out: dict[str, dict[str, int]] = {}
    for crew, status, n in rows:
        out.setdefault(crew, {s: 0 for s in _LIVE})[status] = int(n)
    return out


# -- workers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    """Who consumes which queue: worker names per queue; ``answered`` False when nobody could
    be asked (embedded mode, or the broker did not answer), with a ``note`` saying why."""

    answered: bool
    by_queue: dict[str, list[str]] = field(default_factory=dict)
    note: str | None = None


@dataclass
class _WorkersCache:
    """The last answer, for ``WORKERS_TTL_S``: asking costs the whole inspect timeout."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    at: float = float("-inf")
    value: Workers | None = None

    def get(self, typhon: Typhon) -> Workers:
        with self.lock:
            if self.value is None or time.monotonic() - self.at > WORKERS_TTL_S:
                self.value = ask_workers(typhon)
                self.at = time.monotonic()
            return self.value


def _workers_of(request: Request) -> _WorkersCache:
    state = request.app.state
    cache: _WorkersCache | None = getattr(state, "typhon_ui_workers", None)
    if cache is None:
        cache = state.typhon_ui_workers = _WorkersCache()
    return cache


def ask_workers(typhon: Typhon, timeout: float = INSPECT_TIMEOUT_S) -> Workers:
    """The Celery workers that answer within ``timeout``, by the queues they consume."""
    dispatcher = typhon.dispatcher
    if not isinstance(dispatcher, CeleryDispatcher):
        return Workers(False, note="embedded: runs execute in the API's own process")
    app = dispatcher.app
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)  # one try: a down broker is news
            replies = app.control.inspect(timeout=timeout, connection=conn).active_queues() or {}
    except Exception as exc:  # kombu wraps the broker's errors in several types
        return Workers(False, note=f"the broker did not answer: {str(exc) or type(exc).__name__}")
    by_queue: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for queue in queues or []:
            name = queue.get("name") if isinstance(queue, dict) else None
            if isinstance(name, str):
                by_queue.setdefault(name, []).append(worker)
    note = None if replies else "no worker answered"
    return Workers(True, by_queue, note)
