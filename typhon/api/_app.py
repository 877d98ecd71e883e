"""The FastAPI application: :func:`create_app` over a :class:`~typhon.Typhon`.

Routes (OpenAPI at ``/openapi.json``, browsable at ``/docs``):

    POST /v1/runs                    submit          202 {run_id, status}
    GET  /v1/runs                    read            {runs: [...]} (crew, status, limit)
    GET  /v1/runs/{id}               read            the run
    GET  /v1/runs/{id}/events        read            server-sent events until it ends
    POST /v1/runs/{id}/cancel        submit
    POST /v1/runs/{id}/feedback      submit          {vote: up|down, note?, correction?}
    POST /v1/runs/{id}/approve       admin           (and /reject) a run waiting for approval
    POST /v1/hooks/{name}            hook secret     202 {run_id, status}
    GET  /hardware/summary           read            this host and every configured node
    GET  /activity                   read            runs with their verdicts (crew, status, ...)
    POST /activity                   submit          an external agent's finished task
    GET  /metrics                    read            Prometheus text
    GET  /healthz                    none            200 while the store answers

The runs a request starts go through the Typhon given: embedded (no broker) they run in this
process; with a broker they go to the workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import sqlalchemy as sa
import structlog
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel

from typhon.api._callbacks import Callbacks
from typhon.api._errors import ApiError, check_text, error_response, install_handlers
from typhon.api._guard import Guard
from typhon.api._settings import ApiConfig, HookConfig, api_settings, hook_settings
from typhon.api._state import AppState, state_of
from typhon.api._tokens import TokenStore
from typhon.errors import ConfigError, UnknownCrewError
from typhon.orchestrator import Typhon

__all__ = ["create_app"]

log = structlog.get_logger("typhon.api")


class _Error(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: _Error


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "Malformed JSON"), (401, "No token, or a wrong one"),
        (403, "The token lacks the scope"), (404, "No such run or hook"),
        (413, "The body is over the limit"), (422, "The request does not fit"),
        (429, "Too much at once; see Retry-After"),
    )
}  # fmt: skip

misc = APIRouter()
health = APIRouter()


@health.get("/healthz", tags=["health"])
def healthz(request: Request) -> JSONResponse:
    """200 while the run store answers (no token needed)."""
    typhon = state_of(request).typhon
    try:
        typhon.store.migrate_once()
        with typhon.store.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        message = f"the run store does not answer ({type(exc).__name__}); see the server's log"
        log.warning("health check: the run store does not answer", error=str(exc))
        return error_response(503, "store_unavailable", message)
    mode = "embedded" if typhon.embedded else "cluster"
    return JSONResponse({"status": "ok", "store": typhon.store.dialect, "mode": mode})


@misc.get("/hardware/summary", tags=["cluster"])
def hardware_summary(request: Request) -> dict[str, Any]:
    """This host's CPUs, memory, disks and GPUs, and every configured node's."""
    from typhon.resources.hardware import cluster_summary

    return cluster_summary(state_of(request).typhon.config)


@misc.get("/activity", tags=["activity"])
def list_activity(
    request: Request,
    crew: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    hours: Annotated[float | None, Query(gt=0, le=24 * 366)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Runs newest first with their verdicts: ``{"activity": [...]}``."""
    from typhon.improve._activity import activity

    store = state_of(request).typhon.store
    rows = activity(store, crew=crew, status=status, model=model, hours=hours, limit=limit)
    return {"activity": rows}


@misc.post("/activity", status_code=201, tags=["activity"])
def post_activity(request: Request, payload: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Record an external agent's finished task (agent, status success|failure, input, ...)."""
    from typhon.improve._activity import ingest

    check_text(payload, "body")
    return ingest(state_of(request).typhon.store, payload)


@misc.get("/metrics", tags=["metrics"], response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    try:
        from typhon.api._metrics import CONTENT_TYPE, render
    except ImportError:
        raise ApiError(
            503, "metrics_unavailable", "metrics are not built in this version"
        ) from None
    typhon = state_of(request).typhon
    return Response(render(typhon.config, typhon.store), media_type=CONTENT_TYPE)


def create_app(
    typhon: Typhon,
    *,
    settings: ApiConfig | None = None,
    hooks: dict[str, HookConfig] | None = None,
    callbacks: Callbacks | None = None,
) -> FastAPI:
    """The API over ``typhon``. ``settings`` and ``hooks`` default to the configuration's
    ``api`` and ``hooks``. The caller closes ``typhon``; the app closes its callbacks."""
    from typhon import __version__
    from typhon.api._hooks import router as hooks_router
    from typhon.api._runs import router as runs_router
    from typhon.api._ui import router as ui_router

    settings = settings or api_settings(typhon.config)
    try:
        hooks = hook_settings(typhon.config) if hooks is None else hooks
    except ValueError as exc:
        raise ConfigError(str(exc), key="hooks") from None
    for name, hook in hooks.items():
        try:
            typhon.crews.get(hook.crew or name)
        except UnknownCrewError as exc:
            raise ConfigError(str(exc), key=f"hooks.{name}.crew") from None
    state = AppState(
        typhon=typhon,
        settings=settings,
        hooks=hooks,
        tokens=TokenStore(typhon.store),
        callbacks=callbacks or Callbacks(typhon.store, settings),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.callbacks.close()

    app = FastAPI(
        title="Typhon",
        version=__version__,
        description="Runs, webhooks, activity, hardware and metrics of a Typhon cluster.",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.typhon_api = state
    install_handlers(app)
    bearer = [Depends(HTTPBearer(auto_error=False, description="An API token"))]
    app.include_router(runs_router, dependencies=bearer)
    app.include_router(hooks_router)
    app.include_router(misc, dependencies=bearer)
    app.include_router(health)
    app.include_router(ui_router, dependencies=bearer)
    app.add_middleware(Guard, settings=settings, tokens=state.tokens)
    return app
