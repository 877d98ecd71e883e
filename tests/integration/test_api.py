"""The HTTP API, served by uvicorn on 127.0.0.1 over a real run store (SQLite and PostgreSQL):
runs and their server-sent events, cancel, approval, feedback, activity, hardware, metrics,
tokens and scopes, the limits, and a battery of bad requests that must each be a 4xx with the
error shape, create no run and never a 5xx. `typhon serve` and `typhon tokens` as commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TYPHON_BIN
from support.api import GATE, Api, quick_config, quick_typhon, running_api, wait_final

from typhon.api import ApiConfig
from typhon.api._tokens import TokenStore
from typhon.store import RunStore

NO_MEMORY = {"no_memory": True}
LIMIT = 64 * 1024


@pytest.fixture
def api(store: RunStore, home: Path) -> Iterator[Api]:
    GATE.clear()
    settings = ApiConfig(max_body_bytes=LIMIT)
    with (
        quick_typhon(quick_config(home), store) as typhon,
        running_api(typhon, settings=settings) as api,
    ):
        try:
            yield api
        finally:
            GATE.set()  # runs still waiting end before the store closes


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=60) as client:
        yield client


def _submit(api: Api, client: httpx.Client, crew: str = "steps", text: str = "a topic") -> str:
    r = client.post("/v1/runs", json={"crew": crew, "input": text, "options": NO_MEMORY},
                    headers=api.auth("submit"))  # fmt: skip
    assert r.status_code == 202, r.text
    run_id: str = r.json()["run_id"]
    return run_id


def _sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events from a stream of lines: each a dict of its fields."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            event[key] = value.removeprefix(" ")


def _wait_status(store: RunStore, run_id: str, status: str) -> None:
    deadline = time.monotonic() + 60
    while store.status(run_id).value != status:
        assert time.monotonic() < deadline, f"{run_id} never became {status}"
        time.sleep(0.02)


# -- runs ---------------------------------------------------------------------------------------


def test_submit_follow_and_read_a_run(api: Api, client: httpx.Client) -> None:
    r = client.post("/v1/runs", json={"crew": "steps", "input": "tides", "options": NO_MEMORY},
                    headers=api.auth("submit"))  # fmt: skip
    assert r.status_code == 202
    run_id = r.json()["run_id"]
    assert r.json() == {"run_id": run_id, "status": "queued"}
    assert r.headers["location"] == f"/v1/runs/{run_id}"
    with client.stream("GET", f"/v1/runs/{run_id}/events", headers=api.auth("read")) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(_sse(stream.iter_lines()))
    messages = [e for e in events if "id" in e]
    data = [json.loads(e["data"]) for e in messages]
    assert [d["kind"] for d in data] == ["queued", "running", "step", "step", "step", "succeeded"]
    assert [d["data"].get("name") for d in data if d["kind"] == "step"] == [
        "read",
        "think",
        "write",
    ]
    assert [int(e["id"]) for e in messages] == [d["seq"] for d in data]
    assert [d["seq"] for d in data] == sorted({d["seq"] for d in data})
    assert events[-1]["event"] == "end"
    end = json.loads(events[-1]["data"])
    assert (end["run_id"], end["status"], end["output"]) == (run_id, "succeeded", "done: tides")

    run = client.get(f"/v1/runs/{run_id}", headers=api.auth("read")).json()
    assert run == end
    listed = client.get("/v1/runs", params={"crew": "steps", "status": "succeeded"},
                        headers=api.auth("read")).json()["runs"]  # fmt: skip
    assert [x["run_id"] for x in listed] == [run_id]
    assert client.get("/v1/runs", params={"crew": "gated"}, headers=api.auth()).json() == {
        "runs": []
    }


def test_events_stream_while_the_run_goes_and_resume_after_last_event_id(
    api: Api, client: httpx.Client
) -> None:
    run_id = _submit(api, client, "gated")
    seen: list[dict[str, Any]] = []
    with client.stream("GET", f"/v1/runs/{run_id}/events", headers=api.auth("read")) as stream:
        for event in _sse(stream.iter_lines()):
            if "retry" in event:
                continue
            if "id" not in event:
                assert event.get("event") == "end"
                break
            seen.append(json.loads(event["data"]))
            if seen[-1]["kind"] == "running":
                GATE.set()  # the run goes on only once its stream has shown it running
    assert [d["kind"] for d in seen] == ["queued", "running", "succeeded"]

    resume = {**api.auth("read"), "Last-Event-ID": str(seen[0]["seq"])}
    with client.stream("GET", f"/v1/runs/{run_id}/events", headers=resume) as stream:
        again = [json.loads(e["data"]) for e in _sse(stream.iter_lines()) if "id" in e]
    assert [d["seq"] for d in again] == [d["seq"] for d in seen[1:]]
    after = client.get(f"/v1/runs/{run_id}/events", params={"after": seen[1]["seq"]},
                       headers=api.auth("read"))  # fmt: skip
    kinds = [
        json.loads(e["data"])["kind"] for e in _sse(iter(after.text.splitlines())) if "id" in e
    ]
    assert kinds == ["succeeded"]
    bad = client.get(f"/v1/runs/{run_id}/events", headers={**api.auth("read"),
                                                            "Last-Event-ID": "../1"})  # fmt: skip
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_cancel_a_running_run_then_409(api: Api, client: httpx.Client) -> None:
    run_id = _submit(api, client, "gated")
    _wait_status(api.store, run_id, "running")
    r = client.post(f"/v1/runs/{run_id}/cancel", headers=api.auth("submit"))
    assert (r.status_code, r.json()) == (200, {"run_id": run_id, "status": "cancelled"})
    wait_final(api.store, [run_id])
    again = client.post(f"/v1/runs/{run_id}/cancel", headers=api.auth("submit"))
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_finished"
    assert api.store.get(run_id).status.value == "cancelled"


def test_approve_and_reject_need_admin(api: Api, client: httpx.Client) -> None:
    run_id = _submit(api, client, "approval", "ship it?")
    _wait_status(api.store, run_id, "waiting")
    r = client.post(f"/v1/runs/{run_id}/approve", json={"note": "fine"}, headers=api.auth("submit"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.post(f"/v1/runs/{run_id}/approve", json={"note": "fine"}, headers=api.auth("admin"))
    assert (r.status_code, r.json()) == (202, {"run_id": run_id, "status": "queued"})
    wait_final(api.store, [run_id])
    record = api.store.get(run_id)
    assert (record.status.value, record.output) == ("succeeded", "approved: fine")
    approved = [e for e in api.store.events(run_id) if e.kind == "approved"]
    assert approved[0].data == {"note": "fine", "by": "token:test-admin"}
    late = client.post(f"/v1/runs/{run_id}/reject", headers=api.auth("admin"))
    assert late.status_code == 409 and late.json()["error"]["code"] == "not_waiting"


def test_feedback_on_a_finished_run(api: Api, client: httpx.Client) -> None:
    run_id = _submit(api, client)
    wait_final(api.store, [run_id])
    r = client.post(f"/v1/runs/{run_id}/feedback", json={"vote": "up", "note": "clear"},
                    headers=api.auth("submit"))  # fmt: skip
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["run_id"], body["vote"], body["note"], body["by"]) == (
        run_id, "up", "clear", "token:test-submit",
    )  # fmt: skip
    bad = client.post(f"/v1/runs/{run_id}/feedback", json={"vote": "sideways"},
                      headers=api.auth("submit"))  # fmt: skip
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    gated = _submit(api, client, "gated")
    early = client.post(f"/v1/runs/{gated}/feedback", json={"vote": "down"},
                        headers=api.auth("submit"))  # fmt: skip
    assert early.status_code == 422 and "finished" in early.json()["error"]["message"]


def test_activity_hardware_metrics_health_and_openapi(api: Api, client: httpx.Client) -> None:
    posted = client.post(
        "/activity",
        json={"agent": "n8n-summariser", "status": "success", "input": "summarise", "output": "ok",
              "duration_ms": 1200, "metadata": {"workflow": "daily"}},
        headers=api.auth("submit"),
    )  # fmt: skip
    assert posted.status_code == 201, posted.text
    assert (posted.json()["crew"], posted.json()["status"]) == ("n8n-summariser", "succeeded")
    rows = client.get("/activity", params={"crew": "n8n-summariser"}, headers=api.auth("read"))
    assert [r["run_id"] for r in rows.json()["activity"]] == [posted.json()["run_id"]]
    bad = client.post("/activity", json={"agent": "x", "status": "meh", "input": "y"},
                      headers=api.auth("submit"))  # fmt: skip
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"

    hardware = client.get("/hardware/summary", headers=api.auth("read"))
    assert hardware.status_code == 200 and hardware.json()

    metrics = client.get("/metrics", headers=api.auth("read"))
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert b"activity_completed_total" in metrics.content

    health = client.get("/healthz")  # no token
    assert health.json() == {"status": "ok", "store": api.store.dialect, "mode": "embedded"}

    assert client.get("/openapi.json").status_code == 401
    spec = client.get("/openapi.json", headers=api.auth("read")).json()
    for path in ("/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events",
                 "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/feedback",
                 "/v1/runs/{run_id}/approve", "/v1/runs/{run_id}/reject", "/v1/hooks/{name}",
                 "/hardware/summary", "/activity", "/metrics", "/healthz"):  # fmt: skip
        assert path in spec["paths"], path
    assert "202" in spec["paths"]["/v1/runs"]["post"]["responses"]
    assert client.get("/docs", headers=api.auth("read")).status_code == 200


def test_public_docs_when_asked(store: RunStore, home: Path) -> None:
    settings = ApiConfig(public_docs=True)
    with (
        quick_typhon(quick_config(home), store) as typhon,
        running_api(typhon, settings=settings) as api,
        httpx.Client(base_url=api.url, timeout=60) as client,
    ):
        spec = client.get("/openapi.json").json()
        hook = spec["paths"]["/v1/hooks/{name}"]["post"]
        assert {p["name"] for p in hook["parameters"]} >= {
            "X-Typhon-Hook-Token", "X-Typhon-Signature",
        }  # fmt: skip
        assert client.get("/docs").status_code == 200
        assert client.get("/v1/runs").status_code == 401


def test_scopes_nest(api: Api, client: httpx.Client) -> None:
    for scope in ("read", "submit", "admin"):
        assert client.get("/v1/runs", headers=api.auth(scope)).status_code == 200
    r = client.post("/v1/runs", json={"crew": "steps", "input": "x"}, headers=api.auth("read"))
    assert r.status_code == 403 and "submit" in r.json()["error"]["message"]
    assert api.store.list_runs() == []


def test_a_revoked_token_is_refused_at_once(api: Api, client: httpx.Client) -> None:
    tokens = TokenStore(api.store)
    info, token = tokens.create("read", "short-lived")
    assert client.get("/v1/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert tokens.revoke(info.id)
    r = client.get("/v1/runs", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert not tokens.revoke(info.id)
    stored = next(t for t in tokens.list() if t.id == info.id)
    assert stored.revoked_at is not None and stored.last_used_at is not None


def test_tokens_are_stored_hashed(api: Api) -> None:
    import sqlalchemy as sa

    from typhon.store import api_tokens

    info, token = TokenStore(api.store).create("read")
    with api.store.engine.connect() as conn:
        row = conn.execute(sa.select(api_tokens).where(api_tokens.c.id == info.id)).mappings().one()
    secret = token.rsplit("_", 1)[1]
    assert secret not in json.dumps(dict(row), default=str)
    assert len(row["secret_sha256"]) == 64


# -- limits -------------------------------------------------------------------------------------


def test_backlog_limit_answers_429_with_retry_after(store: RunStore, home: Path) -> None:
    GATE.clear()
    settings = ApiConfig(max_backlog=2, retry_after_s=7)
    with (
        quick_typhon(quick_config(home), store) as typhon,
        running_api(typhon, settings=settings) as api,
        httpx.Client(base_url=api.url, timeout=60) as client,
    ):
        first = [_submit(api, client, "gated") for _ in range(2)]
        r = client.post("/v1/runs", json={"crew": "gated", "input": "x"}, headers=api.auth())
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "backlog_full"
        assert len(store.list_runs()) == 2
        GATE.set()
        wait_final(store, first)
        assert _submit(api, client, "steps")


def test_in_flight_limit_answers_429(store: RunStore, home: Path) -> None:
    settings = ApiConfig(max_in_flight=1, retry_after_s=3)
    with (
        quick_typhon(quick_config(home), store) as typhon,
        running_api(typhon, settings=settings) as api,
        httpx.Client(base_url=api.url, timeout=60) as client,
    ):
        body = json.dumps({"crew": "steps", "input": "held", "options": NO_MEMORY}).encode()
        held = socket.create_connection(("127.0.0.1", api.server.port))
        held.sendall(
            b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {api.tokens['submit']}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        deadline = time.monotonic() + 30
        while True:  # the held request is in flight once a second one is refused
            r = client.get("/v1/runs", headers=api.auth("read"))
            if r.status_code == 429:
                break
            assert r.status_code == 200 and time.monotonic() < deadline
            time.sleep(0.01)
        assert r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "too_many_requests"
        assert client.get("/healthz").status_code == 200  # never limited
        held.sendall(body[10:])
        answer = held.recv(65536).decode()
        held.close()
        assert answer.startswith("HTTP/1.1 202")
        assert client.get("/v1/runs", headers=api.auth("read")).status_code == 200


# -- the battery --------------------------------------------------------------------------------

WRONG = "typhon_0123456789ab_" + "A" * 43
GOOD = {"crew": "steps", "input": "x"}


def _nested(depth: int) -> bytes:
    return (
        b'{"crew": "steps", "input": "x", "options": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    )


def _chunks(size: int) -> Iterator[bytes]:
    for _ in range(size // 4096 + 1):
        yield b"x" * 4096


# (name, method, path, token scope or a raw Authorization value, body, extra headers, status)
BATTERY: list[tuple[str, str, str, str | None, Any, dict[str, str], int]] = [
    ("no token", "POST", "/v1/runs", None, GOOD, {}, 401),
    ("not bearer", "POST", "/v1/runs", "Basic dXNlcjpwdw==", GOOD, {}, 401),
    ("wrong token", "POST", "/v1/runs", f"Bearer {WRONG}", GOOD, {}, 401),
    ("garbage token", "POST", "/v1/runs", "Bearer ../../etc/passwd", GOOD, {}, 401),
    ("empty bearer", "POST", "/v1/runs", "Bearer", GOOD, {}, 401),
    ("read scope posts", "POST", "/v1/runs", "read", GOOD, {}, 403),
    ("submit approves", "POST", f"/v1/runs/{'a' * 32}/approve", "submit", None, {}, 403),
    ("no token on a GET", "GET", "/v1/runs", None, None, {}, 401),
    ("no token, unknown path", "GET", "/v1/secrets", None, None, {}, 401),
    ("malformed JSON", "POST", "/v1/runs", "submit", b'{"crew": "steps", "input": ', {}, 400),
    ("not an object", "POST", "/v1/runs", "submit", b"[1, 2, 3]", {}, 422),
    ("deep nesting", "POST", "/v1/runs", "submit", _nested(20_000), {}, 400),
    ("over the limit", "POST", "/v1/runs", "submit", {"crew": "steps", "input": "x" * LIMIT},
     {}, 413),
    ("over the limit, chunked", "POST", "/v1/runs", "submit", "chunked", {}, 413),
    ("NUL in input", "POST", "/v1/runs", "submit", {"crew": "steps", "input": "a\x00b"}, {}, 422),
    ("lone surrogate", "POST", "/v1/runs", "submit", b'{"crew": "steps", "input": "\\ud800"}',
     {}, 422),
    ("NUL in an option", "POST", "/v1/runs", "submit", {**GOOD, "options": {"k": ["\x00"]}},
     {}, 422),
    ("NUL in a note", "POST", f"/v1/runs/{'a' * 32}/reject", "admin", {"note": "\x00"}, {}, 422),
    ("activity NUL", "POST", "/activity", "submit",
     {"agent": "a", "status": "success", "input": "x\x00"}, {}, 422),
    ("unknown crew", "POST", "/v1/runs", "submit", {"crew": "nope", "input": "x"}, {}, 422),
    ("crew a number", "POST", "/v1/runs", "submit", {"crew": 5, "input": "x"}, {}, 422),
    ("input a list", "POST", "/v1/runs", "submit", {"crew": "steps", "input": ["x"]}, {}, 422),
    ("options a list", "POST", "/v1/runs", "submit", {**GOOD, "options": [1]}, {}, 422),
    ("option name", "POST", "/v1/runs", "submit", {**GOOD, "options": {"../x": 1}}, {}, 422),
    ("model not a string", "POST", "/v1/runs", "submit", {**GOOD, "options": {"model": 7}},
     {}, 422),
    ("unknown model", "POST", "/v1/runs", "submit", {**GOOD, "options": {"model": "gpt-9"}},
     {}, 422),
    ("path option", "POST", "/v1/runs", "submit", {**GOOD, "options": {"docs": "/etc"}}, {}, 403),
    ("extra field", "POST", "/v1/runs", "submit", {**GOOD, "priority": 1}, {}, 422),
    ("missing input", "POST", "/v1/runs", "submit", {"crew": "steps"}, {}, 422),
    ("empty input", "POST", "/v1/runs", "submit", {"crew": "steps", "input": "  "}, {}, 422),
    ("huge input", "POST", "/v1/runs", "submit", {"crew": "steps", "input": "x" * 20_001},
     {}, 422),
    ("crew too long", "POST", "/v1/runs", "submit", {"crew": "c" * 65, "input": "x"}, {}, 422),
    ("text body", "POST", "/v1/runs", "submit", b"crew=steps", {"Content-Type": "text/plain"},
     422),
    ("limit 0", "GET", "/v1/runs?limit=0", "read", None, {}, 422),
    ("limit text", "GET", "/v1/runs?limit=ten", "read", None, {}, 422),
    ("bad status", "GET", "/v1/runs?status=exploded", "read", None, {}, 422),
    ("NUL in a filter", "GET", "/v1/runs?crew=%00", "read", None, {}, 400),
    ("NUL in an activity filter", "GET", "/activity?model=a%00", "read", None, {}, 400),
    ("activity bad status", "GET", "/activity?status=exploded", "read", None, {}, 422),
    ("activity hours", "GET", "/activity?hours=-1", "read", None, {}, 422),
    ("dot-dot id", "GET", "/v1/runs/..%2F..%2Fhealthz", "read", None, {}, 404),
    ("dot-dot events", "GET", "/v1/runs/..%2Fetc%2Fpasswd/events", "read", None, {}, 404),
    ("encoded dot-dot", "GET", "/v1/runs/%2e%2e", "read", None, {}, 404),
    ("long id", "GET", "/v1/runs/" + "a" * 5000, "read", None, {}, 404),
    ("non-hex id", "GET", "/v1/runs/" + "z" * 32, "read", None, {}, 404),
    ("upper-case id", "GET", "/v1/runs/" + "A" * 32, "read", None, {}, 404),
    ("nul in id", "GET", "/v1/runs/%00" + "a" * 31, "read", None, {}, 404),
    ("unknown run", "GET", "/v1/runs/" + "a" * 32, "read", None, {}, 404),
    ("cancel bad id", "POST", "/v1/runs/..%2F..%2Fv1%2Fruns/cancel", "submit", None, {}, 404),
    ("cancel unknown", "POST", f"/v1/runs/{'b' * 32}/cancel", "submit", None, {}, 404),
    ("feedback bad id", "POST", "/v1/runs/x/feedback", "submit", {"vote": "up"}, {}, 404),
    ("feedback unknown", "POST", f"/v1/runs/{'c' * 32}/feedback", "submit", {"vote": "up"},
     {}, 404),
    ("approve unknown", "POST", f"/v1/runs/{'d' * 32}/approve", "admin", None, {}, 404),
    ("bad Last-Event-ID", "GET", f"/v1/runs/{'e' * 32}/events", "read", None,
     {"Last-Event-ID": "x"}, 404),
    ("method", "DELETE", "/v1/runs", "admin", None, {}, 405),
    ("unknown route", "GET", "/v2/everything", "read", None, {}, 404),
    ("activity not an object", "POST", "/activity", "submit", b'"x"', {}, 422),
    ("activity huge input", "POST", "/activity", "submit",
     {"agent": "a", "status": "success", "input": "x" * 20_001}, {}, 422),
]  # fmt: skip


def _send(api: Api, client: httpx.Client, case: tuple[Any, ...]) -> httpx.Response:
    _, method, path, auth, body, headers, _ = case
    sent = dict(headers)
    if auth in ("read", "submit", "admin"):
        sent.update(api.auth(auth))
    elif auth is not None:
        sent["Authorization"] = auth
    content: Any = None
    if isinstance(body, bytes):
        content = body
        sent.setdefault("Content-Type", "application/json")
    elif body == "chunked":
        content = _chunks(LIMIT + 10)
        sent["Content-Type"] = "application/json"
    elif body is not None:
        content = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    return client.request(method, path, content=content, headers=sent)


def test_bad_requests_are_4xx_with_the_error_shape_and_create_nothing(
    api: Api, client: httpx.Client
) -> None:
    wrong: list[str] = []
    for case in BATTERY:
        name, status = case[0], case[-1]
        r = _send(api, client, case)
        try:
            body = r.json()
            error = body["error"]
            shaped = set(body) == {"error"} and set(error) == {"code", "message"}
            shaped = shaped and all(isinstance(error[k], str) and error[k] for k in error)
        except (ValueError, KeyError, TypeError):
            shaped = False
        if r.status_code != status or not shaped:
            wrong.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert wrong == []
    assert api.store.list_runs() == []


def test_no_5xx_under_a_stream_of_junk(api: Api, client: httpx.Client) -> None:
    """Random bytes, odd JSON and odd paths: never a 5xx, never a run."""
    import random

    rng = random.Random(7)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(30)]
    bodies += [b"null", b"{}", b'{"crew": null}', b'{"crew": "steps", "input": null}',
               b'{"crew": "steps", "input": "\\ud800"}', b'{"crew": {"$ne": 1}, "input": "x"}',
               b'{"crew": "steps", "input": "x", "options": {"model": 1}}', b"1e999"]  # fmt: skip
    for body in bodies:
        for path in ("/v1/runs", "/activity", f"/v1/runs/{'a' * 32}/feedback",
                     f"/v1/runs/{'a' * 32}/approve"):  # fmt: skip
            headers = {**api.auth("admin"), "Content-Type": "application/json"}
            r = client.post(path, content=body, headers=headers)
            assert 400 <= r.status_code < 500, (path, body, r.text)
            assert set(r.json()["error"]) == {"code", "message"}
    assert api.store.list_runs() == []


# -- the commands -------------------------------------------------------------------------------


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TYPHON_")}
    return {**env, "TYPHON_HOME": str(home), **extra}


def _typhon(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TYPHON_BIN, *args], env=env, capture_output=True, text=True, timeout=120)


def test_tokens_commands(home: Path) -> None:
    env = _env(home)
    made = _typhon(env, "tokens", "create", "--scope", "submit", "--name", "n8n", "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert (info["scope"], info["name"]) == ("submit", "n8n")
    assert info["token"].startswith(f"typhon_{info['id']}_")
    plain = _typhon(env, "tokens", "create", "--scope", "read")
    assert plain.returncode == 0 and plain.stdout.strip().startswith("typhon_")
    assert "not shown again" in plain.stderr
    listed = json.loads(_typhon(env, "tokens", "list", "--json").stdout)
    assert [t["scope"] for t in listed] == ["submit", "read"]
    assert "token" not in listed[0] and info["token"] not in json.dumps(listed)
    assert _typhon(env, "tokens", "revoke", info["id"]).returncode == 0
    again = _typhon(env, "tokens", "revoke", info["id"])
    assert again.returncode == 1 and "no active token" in again.stderr
    assert [t["id"] for t in json.loads(_typhon(env, "tokens", "list", "--json").stdout)] == [
        listed[1]["id"]
    ]
    assert len(json.loads(_typhon(env, "tokens", "list", "--all", "--json").stdout)) == 2
    bad = _typhon(env, "tokens", "create", "--scope", "root")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_serve_refuses_a_public_bind_without_tokens(home: Path) -> None:
    r = _typhon(_env(home), "serve", "--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "typhon tokens create" in r.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CREWS = """
from typhon import crew

@crew("echo")
def echo(ctx):
    ctx.step("echoing")
    return "echo: " + ctx.input
"""


def test_typhon_serve_runs_a_crew_embedded(tmp_path: Path, home: Path) -> None:
    (tmp_path / "served_crews.py").write_text(CREWS)
    config = tmp_path / "typhon.yaml"
    config.write_text("crew_modules: [served_crews]\nimprove: {review: false}\n")
    env = _env(home, TYPHON_CONFIG=str(config), PYTHONPATH=str(tmp_path))
    token = _typhon(env, "tokens", "create", "--scope", "submit").stdout.strip()
    port = _free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([TYPHON_BIN, "serve", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.log"
            ).read_text()
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{url}/v1/runs", json={"crew": "echo", "input": "hello",
                                               "options": NO_MEMORY}, headers=auth)  # fmt: skip
        assert r.status_code == 202, r.text
        with httpx.stream("GET", f"{url}/v1/runs/{r.json()['run_id']}/events", headers=auth,
                          timeout=60) as stream:  # fmt: skip
            end = [e for e in _sse(stream.iter_lines()) if e.get("event") == "end"]
        assert json.loads(end[0]["data"])["output"] == "echo: hello"
    finally:
        proc.terminate()
        proc.wait(30)
