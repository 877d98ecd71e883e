"""``/v1/runs``: submit, list, show, follow (server-sent events), cancel, approve, reject, and
feedback on a run."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictStr

from typhon._types import RunStatus
from typhon.api._errors import ApiError, check_text
from typhon.api._state import check_run_id, state_of, token_of
from typhon.errors import InputError
from typhon.store import RunStore

__all__ = ["router"]

router = APIRouter(prefix="/v1/runs", tags=["runs"])

# Options that name a path on the server (the crew reads it): only an admin token may send them.
PATH_OPTIONS = ("docs", "repo")
POLL_S = 0.5
KEEPALIVE_S = 15.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunBody(_Body):
    crew: StrictStr = Field(min_length=1, max_length=64, examples=["research"])
    input: StrictStr = Field(examples=["What changed in PostgreSQL 17?"])
    options: dict[str, JsonValue] = Field(default_factory=dict)


class Accepted(BaseModel):
    run_id: str
    status: str


class FeedbackBody(_Body):
    vote: Literal["up", "down"]
    note: StrictStr = Field(default="", max_length=4000)
    correction: StrictStr | None = Field(default=None, max_length=100_000)


class DecisionBody(_Body):
    note: StrictStr = Field(default="", max_length=4000)


def _by(request: Request) -> str:
    token = token_of(request)
    return "" if token is None else f"token:{token.name or token.id}"


@router.post("", status_code=202, response_model=Accepted)
def submit_run(body: RunBody, request: Request) -> JSONResponse:
    """Start a run of ``crew`` on ``input``; answers at once with its id (202)."""
    check_text(body.model_dump(), "body")
    for key in body.options:
        if not key.isidentifier():
            raise ApiError(422, "invalid_request", f"options: '{key[:64]}' is not an option name")
    token = token_of(request)
    if any(k in body.options for k in PATH_OPTIONS) and (token is None or token.scope != "admin"):
        raise ApiError(
            403, "forbidden", f"options {', '.join(PATH_OPTIONS)} name server paths: admin only"
        )
    handle = state_of(request).submit(body.crew, body.input, dict(body.options))
    return JSONResponse(
        {"run_id": handle.run_id, "status": RunStatus.QUEUED.value},
        status_code=202,
        headers={"Location": f"/v1/runs/{handle.run_id}"},
    )


@router.get("")
def list_runs(
    request: Request,
    crew: Annotated[str | None, Query(max_length=64)] = None,
    status: RunStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Recent runs, newest first: ``{"runs": [run, ...]}``."""
    records = state_of(request).typhon.store.list_runs(limit=limit, crew=crew, status=status)
    return {"runs": [r.to_json() for r in records]}


@router.get("/{run_id}")
def get_run(run_id: str, request: Request) -> dict[str, Any]:
    """One run (the shape of ``typhon status --json``)."""
    return state_of(request).typhon.store.get(check_run_id(run_id)).to_json()


@router.get("/{run_id}/events", response_class=StreamingResponse)
async def run_events(
    run_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> StreamingResponse:
    """The run's events as server-sent events while it runs: one message per event (``id`` its
    sequence number, ``data`` its JSON), then an ``end`` event with the run's JSON once it has
    finished. ``Last-Event-ID`` (or ``?after=``) resumes after that event."""
    store = state_of(request).typhon.store
    check_run_id(run_id)
    await anyio.to_thread.run_sync(store.status, run_id)  # 404 for an unknown run
    start = after or 0
    if last_event_id is not None and after is None:
        if not last_event_id.strip().isdigit() or len(last_event_id) > 18:
            raise ApiError(422, "invalid_request", "Last-Event-ID must be an event number")
        start = int(last_event_id)
    return StreamingResponse(
        _stream(store, run_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(store: RunStore, run_id: str, after: int) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    quiet = 0.0
    while True:
        status = await anyio.to_thread.run_sync(store.status, run_id)
        events = await anyio.to_thread.run_sync(
            functools.partial(store.events, run_id, after=after)
        )
        for event in events:
            after = event.seq
            data = {"run_id": run_id, "seq": event.seq, "kind": event.kind,
                    "at": event.at.isoformat(), "data": event.data}  # fmt: skip
            yield f"id: {event.seq}\ndata: {json.dumps(data, default=str)}\n\n"
        if events:
            quiet = 0.0
        if status.finished:  # read before the events: its final event was among them
            record = await anyio.to_thread.run_sync(store.get, run_id)
            yield f"event: end\ndata: {json.dumps(record.to_json())}\n\n"
            return
        if quiet >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            quiet = 0.0
        await anyio.sleep(POLL_S)
        quiet += POLL_S


@router.post("/{run_id}/cancel")
def cancel_run(run_id: str, request: Request) -> dict[str, Any]:
    """Cancel a queued, running or waiting run; 409 when it had already finished."""
    typhon = state_of(request).typhon
    if typhon.cancel(check_run_id(run_id)):
        return {"run_id": run_id, "status": RunStatus.CANCELLED.value}
    status = typhon.store.status(run_id).value
    raise ApiError(409, "already_finished", f"run {run_id} already finished ({status})")


@router.post("/{run_id}/feedback", status_code=201)
def feedback(run_id: str, body: FeedbackBody, request: Request) -> JSONResponse:
    """A person's vote on a finished run (up or down), with a note or a correction."""
    from typhon.improve._feedback import record_feedback

    state = state_of(request)
    typhon = state.typhon
    check_run_id(run_id)
    check_text(body.model_dump(), "body")
    typhon.store.status(run_id)  # 404 before any learning
    result = record_feedback(
        typhon.config, typhon.store, run_id, body.vote, note=body.note,
        correction=body.correction, by=_by(request), memory=typhon.runtime.memory,
    )  # fmt: skip
    return JSONResponse(jsonable_encoder(result), status_code=201)


@router.post("/{run_id}/approve", status_code=202, response_model=Accepted)
def approve(
    run_id: str, request: Request, body: Annotated[DecisionBody | None, Body()] = None
) -> dict[str, Any]:
    """Approve a run that waits for approval (the Development crew's); it goes on."""
    return _decide(request, check_run_id(run_id), "approve", body)


@router.post("/{run_id}/reject", status_code=202, response_model=Accepted)
def reject(
    run_id: str, request: Request, body: Annotated[DecisionBody | None, Body()] = None
) -> dict[str, Any]:
    """Send a waiting run back with a note; it revises while its budget lasts."""
    return _decide(request, check_run_id(run_id), "reject", body)


def _decide(
    request: Request, run_id: str, decision: str, body: DecisionBody | None
) -> dict[str, Any]:
    typhon = state_of(request).typhon
    check_text(body.note if body else "", "note")
    answer = typhon.approve if decision == "approve" else typhon.reject
    try:
        handle = answer(run_id, note=(body.note if body else ""), by=_by(request))
    except InputError as exc:  # the run is not waiting for approval
        raise ApiError(409, "not_waiting", str(exc)) from None
    return {"run_id": handle.run_id, "status": RunStatus.QUEUED.value}
