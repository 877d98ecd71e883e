"""Webhooks (`POST /v1/hooks/{name}`) on the real API over a real store (SQLite and PostgreSQL):
header tokens and replay-protected signatures, the input mapping, callbacks to a loopback server
(retried, refused, unreachable), the shipped n8n workflow's exact request, and a hook whose run
goes to a real worker while the API process sends the callback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
from conftest import Cluster
from support.api import (
    Api,
    CallbackSink,
    quick_config,
    quick_typhon,
    running_api,
    wait_final,
)

from typhon import Typhon
from typhon.api import ApiConfig, HookConfig
from typhon.api._callbacks import sign
from typhon.config import load_config
from typhon.store import RunStore, hook_signatures

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "deploy" / "n8n" / "research-and-wait.json"
CREDENTIAL = ROOT / "deploy" / "n8n" / "typhon-hook-credential.json"
TOKEN = "research-hook-secret-0123456789"
SIGNED = "signed-hook-secret-0123456789ab"
EITHER = "either-hook-secret-0123456789ab"
NO_MEMORY = {"no_memory": True}
LIMIT = 32 * 1024


def _hooks(sink_url: str) -> dict[str, HookConfig]:
    return {
        "research": HookConfig(
            crew="steps", secret=TOKEN, auth="token", input_field="topic",
            allow_payload_callback=True, callback_hosts=["127.0.0.1"], options=NO_MEMORY,
        ),
        "signed": HookConfig(
            crew="steps", secret=SIGNED, auth="signature",
            input_template="Summarise {{ body.topic }} for {{body.who.0}}",
            callback_url=f"{sink_url}/fixed", options=NO_MEMORY,
        ),
        "steps": HookConfig(secret=EITHER, options=NO_MEMORY),  # crew: the hook's name
    }  # fmt: skip


@pytest.fixture
def sink() -> Iterator[CallbackSink]:
    sink = CallbackSink()
    yield sink
    sink.close()


@pytest.fixture
def api(store: RunStore, home: Path, sink: CallbackSink) -> Iterator[Api]:
    settings = ApiConfig(max_body_bytes=LIMIT, callback_backoff_s=0.05, callback_attempts=4)
    with (
        quick_typhon(quick_config(home), store) as typhon,
        running_api(typhon, settings=settings, hooks=_hooks(sink.url)) as api,
    ):
        yield api


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=60) as client:
        yield client


def _post(client: httpx.Client, hook: str, body: bytes | dict[str, Any],
          **headers: str) -> httpx.Response:  # fmt: skip
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(f"/v1/hooks/{hook}", content=content,
                       headers={"Content-Type": "application/json", **headers})  # fmt: skip


def _token(secret: str = TOKEN) -> dict[str, str]:
    return {"X-Typhon-Hook-Token": secret}


def _signed(secret: str, body: bytes, t: int | None = None) -> dict[str, str]:
    return {"X-Typhon-Signature": sign(secret, body, t)}


def _event(store: RunStore, run_id: str, kind: str) -> dict[str, Any]:
    """The run's event ``kind``, once it is there (callback events follow the delivery)."""
    deadline = time.monotonic() + 60
    while True:
        found = [e.data for e in store.events(run_id) if e.kind == kind]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, [e.kind for e in store.events(run_id)]
        time.sleep(0.02)


def _verify_callback(received: dict[str, Any], secret: str) -> None:
    header = received["headers"]["X-Typhon-Signature"]
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    mac = hmac.new(secret.encode(), f"{t}.".encode() + received["body"], hashlib.sha256)
    assert hmac.compare_digest(mac.hexdigest(), v1)


# -- runs from hooks ----------------------------------------------------------------------------


def test_a_token_hook_starts_a_run_and_calls_back_with_its_json(
    api: Api, client: httpx.Client, sink: CallbackSink
) -> None:
    r = _post(client, "research", {"topic": "tides", "callback_url": f"{sink.url}/resume/41"},
              **_token())  # fmt: skip
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    assert r.json() == {"run_id": run_id, "status": "queued"}
    sink.wait_for(lambda got: len(got) == 1)
    got = sink.received[0]
    assert got["path"] == "/resume/41"
    assert got["headers"]["X-Typhon-Run-Id"] == run_id
    assert got["headers"]["Content-Type"] == "application/json"
    _verify_callback(got, TOKEN)
    body = sink.json(0)
    run = client.get(f"/v1/runs/{run_id}", headers=api.auth("read")).json()
    assert body == run
    assert (body["status"], body["output"], body["input"]) == ("succeeded", "done: tides", "tides")
    assert _event(api.store, run_id, "callback") == {
        "hook": "research", "host": "127.0.0.1", "status": 200, "tries": 1,
    }  # fmt: skip
    record = api.store.get(run_id)
    assert record.options == {**NO_MEMORY, "source": "hook", "hook": "research"}


def test_a_signed_hook_with_a_template_and_its_configured_callback(
    api: Api, client: httpx.Client, sink: CallbackSink
) -> None:
    body = json.dumps({"body": {"topic": "tides", "who": ["ops", "dev"]}}).encode()
    headers = _signed(SIGNED, body)
    r = _post(client, "signed", body, **headers)
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    sink.wait_for(lambda got: len(got) == 1)
    assert sink.received[0]["path"] == "/fixed"
    _verify_callback(sink.received[0], SIGNED)
    assert sink.json(0)["output"] == "done: Summarise tides for ops"

    replay = _post(client, "signed", body, **headers)
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "replayed_signature"
    assert [r.id for r in api.store.list_runs()] == [run_id]
    with api.store.engine.connect() as conn:
        rows = conn.execute(sa.select(hook_signatures.c.hook)).scalars().all()
    assert rows == ["signed"]


def test_a_signature_sent_many_times_at_once_starts_one_run(api: Api) -> None:
    body = json.dumps({"body": {"topic": "race", "who": ["ops"]}}).encode()
    headers = {"Content-Type": "application/json", **_signed(SIGNED, body)}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
            posts = [client.post("/v1/hooks/signed", content=body, headers=headers)
                     for _ in range(12)]  # fmt: skip
            return [r.status_code for r in await asyncio.gather(*posts)]

    assert sorted(asyncio.run(burst())) == [202] + [401] * 11
    assert len(api.store.list_runs()) == 1


def test_either_takes_a_token_or_a_signature(api: Api, client: httpx.Client) -> None:
    by_token = _post(client, "steps", {"input": "one"}, **_token(EITHER))
    body = json.dumps({"input": {"nested": 2}}).encode()
    by_signature = _post(client, "steps", body, **_signed(EITHER, body))
    assert (by_token.status_code, by_signature.status_code) == (202, 202)
    ids = [by_token.json()["run_id"], by_signature.json()["run_id"]]
    wait_final(api.store, ids)
    assert [api.store.get(i).output for i in ids] == ["done: one", 'done: {"nested": 2}']


def test_a_hook_for_an_unknown_crew_is_a_configuration_error(store: RunStore, home: Path) -> None:
    from typhon.api import create_app
    from typhon.errors import ConfigError

    with (
        quick_typhon(quick_config(home), store) as typhon,
        pytest.raises(ConfigError, match=r"hooks\.research\.crew.*unknown crew 'research'"),
    ):
        create_app(typhon, hooks={"research": HookConfig(secret=TOKEN)})


# -- callbacks ----------------------------------------------------------------------------------


def test_a_failing_callback_is_retried_until_it_is_taken(api: Api, client: httpx.Client) -> None:
    flaky = CallbackSink(statuses=(503, 500, 429, 200))
    try:
        r = _post(client, "research", {"topic": "x", "callback_url": f"{flaky.url}/r"},
                  **_token())  # fmt: skip
        run_id = r.json()["run_id"]
        assert _event(api.store, run_id, "callback") == {
            "hook": "research", "host": "127.0.0.1", "status": 200, "tries": 4,
        }  # fmt: skip
        assert [got["status"] for got in flaky.received] == [503, 500, 429, 200]
        assert len({got["body"] for got in flaky.received}) == 1
    finally:
        flaky.close()


def test_a_refused_callback_is_not_retried(api: Api, client: httpx.Client) -> None:
    refusing = CallbackSink(statuses=(404,))
    try:
        r = _post(client, "research", {"topic": "x", "callback_url": f"{refusing.url}/gone"},
                  **_token())  # fmt: skip
        failed = _event(api.store, r.json()["run_id"], "callback_failed")
        assert (failed["status"], failed["tries"]) == (404, 1)
        assert len(refusing.received) == 1
    finally:
        refusing.close()


def test_an_unreachable_callback_is_tried_then_given_up(api: Api, client: httpx.Client) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    r = _post(client, "research", {"topic": "x", "callback_url": f"http://127.0.0.1:{port}/"},
              **_token())  # fmt: skip
    failed = _event(api.store, r.json()["run_id"], "callback_failed")
    assert (failed["status"], failed["tries"]) == (None, 4)
    assert "ConnectError" in failed["reason"]


# -- the battery --------------------------------------------------------------------------------


def _cases(sink_url: str) -> list[tuple[str, str, bytes, Callable[[bytes], dict[str, str]], int]]:
    now = int(time.time())
    ok = json.dumps({"topic": "tides"}).encode()
    signed_ok = json.dumps({"body": {"topic": "t", "who": ["a"]}}).encode()

    def tok(secret: str = TOKEN) -> Callable[[bytes], dict[str, str]]:
        return lambda body: _token(secret)

    def sig(secret: str, t: int | None = None) -> Callable[[bytes], dict[str, str]]:
        return lambda body: _signed(secret, body, t)

    def raw(value: str) -> Callable[[bytes], dict[str, str]]:
        return lambda body: {"X-Typhon-Signature": value}

    none: Callable[[bytes], dict[str, str]] = lambda body: {}  # noqa: E731
    return [
        ("no secret", "research", ok, none, 401),
        ("wrong token", "research", ok, tok("x" * 30), 401),
        ("another hook's token", "research", ok, tok(EITHER), 401),
        ("signature on a token hook", "research", ok, sig(TOKEN), 401),
        ("token on a signed hook", "signed", signed_ok, tok(SIGNED), 401),
        ("wrong key", "signed", signed_ok, sig(TOKEN), 401),
        ("stale", "signed", signed_ok, sig(SIGNED, now - 310), 401),
        ("from the future", "signed", signed_ok, sig(SIGNED, now + 310), 401),
        ("tampered body", "signed", signed_ok,
         lambda body: _signed(SIGNED, body.replace(b'"t"', b'"u"')), 401),
        ("no timestamp", "signed", signed_ok, raw("v1=" + "0" * 64), 401),
        ("text timestamp", "signed", signed_ok, raw("t=soon,v1=" + "0" * 64), 401),
        ("no v1", "signed", signed_ok, raw(f"t={now}"), 401),
        ("huge timestamp", "signed", signed_ok, raw("t=" + "9" * 40 + ",v1=00"), 401),
        ("unknown hook", "nope", ok, tok(), 404),
        ("dot-dot hook", "..%2F..%2Fv1%2Fruns", ok, tok(), 404),
        ("long hook name", "h" * 3000, ok, tok(), 404),
        ("NUL in hook name", "research%00", ok, tok(), 404),
        ("malformed JSON", "research", b'{"topic": ', tok(), 400),
        ("deep JSON", "research", b"[" * 10_000 + b"]" * 10_000, tok(), 400),
        ("no input field", "research", b'{"subject": "tides"}', tok(), 422),
        ("null input", "research", b'{"topic": null}', tok(), 422),
        ("empty input", "research", b'{"topic": "  "}', tok(), 422),
        ("huge input", "research", json.dumps({"topic": "x" * 20_001}).encode(), tok(), 422),
        ("NUL input", "research", json.dumps({"topic": "a\x00"}).encode(), tok(), 422),
        ("surrogate input", "research", b'{"topic": "\\udc00"}', tok(), 422),
        ("template path missing", "signed", b'{"body": {"topic": "t"}}', sig(SIGNED), 422),
        ("callback not http", "research",
         json.dumps({"topic": "t", "callback_url": "file:///etc/passwd"}).encode(), tok(), 422),
        ("callback host not allowed", "research",
         json.dumps({"topic": "t", "callback_url": "http://169.254.169.254/x"}).encode(), tok(),
         422),
        ("callback not a string", "research",
         json.dumps({"topic": "t", "callback_url": ["x"]}).encode(), tok(), 422),
        ("over the limit", "research",
         json.dumps({"topic": "x" * (LIMIT + 1)}).encode(), tok(), 413),
    ]  # fmt: skip


def test_bad_hook_requests_are_4xx_with_the_error_shape_and_create_nothing(
    api: Api, client: httpx.Client, sink: CallbackSink
) -> None:
    wrong: list[str] = []
    for name, hook, body, headers, status in _cases(sink.url):
        r = _post(client, hook, body, **headers(body))
        try:
            error = r.json()["error"]
            shaped = set(r.json()) == {"error"} and all(
                isinstance(error[k], str) and error[k] for k in ("code", "message")
            )
        except (ValueError, KeyError, TypeError):
            shaped = False
        if r.status_code != status or not shaped:
            wrong.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert wrong == []
    assert api.store.list_runs() == []
    assert sink.received == []
    # a request's Authorization header is not a hook's secret
    r = _post(client, "research", {"topic": "t"}, Authorization=f"Bearer {api.tokens['admin']}")
    assert r.status_code == 401


# -- the n8n workflow ---------------------------------------------------------------------------


def _n8n_expression(template: str, values: dict[str, str]) -> str:
    """n8n's ``={{ expr }}`` templating, for the expressions the workflow uses."""
    assert template.startswith("=")

    def value(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        assert expr in values, f"the workflow uses an expression this test does not know: {expr}"
        return values[expr]

    return re.sub(r"\{\{(.*?)\}\}", value, template[1:])


def test_the_n8n_workflow_is_valid_and_its_request_is_what_the_api_takes(
    api: Api, client: httpx.Client, sink: CallbackSink
) -> None:
    workflow = json.loads(WORKFLOW.read_text())
    credential = json.loads(CREDENTIAL.read_text())[0]
    nodes = {n["name"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"])
    for node in workflow["nodes"]:
        assert node["type"].startswith("n8n-nodes-base.")
        assert isinstance(node["typeVersion"], int | float)
        assert isinstance(node["parameters"], dict) and len(node["position"]) == 2
        assert node["id"]
    chain = []
    current = next(n for n in nodes.values() if n["type"] == "n8n-nodes-base.manualTrigger")
    while True:
        chain.append(current["type"].removeprefix("n8n-nodes-base."))
        out = workflow["connections"].get(current["name"], {}).get("main", [[]])
        if not out[0]:
            break
        assert [link["type"] for link in out[0]] == ["main"]
        current = nodes[out[0][0]["node"]]
    assert chain == ["manualTrigger", "set", "httpRequest", "wait", "set"]
    assert set(workflow["connections"]) <= set(nodes)

    http = next(n for n in nodes.values() if n["type"] == "n8n-nodes-base.httpRequest")
    params = http["parameters"]
    assert (params["method"], params["sendBody"], params["specifyBody"]) == ("POST", True, "json")
    assert (params["authentication"], params["genericAuthType"]) == (
        "genericCredentialType", "httpHeaderAuth",
    )  # fmt: skip
    assert http["credentials"]["httpHeaderAuth"] == {
        "id": credential["id"], "name": credential["name"],
    }  # fmt: skip
    assert credential["type"] == "httpHeaderAuth"
    url = urlsplit(params["url"])
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", 8700, "/v1/hooks/research")
    wait = next(n for n in nodes.values() if n["type"] == "n8n-nodes-base.wait")
    assert (wait["parameters"]["resume"], wait["parameters"]["httpMethod"]) == ("webhook", "POST")
    assert wait["webhookId"]
    before = next(
        nodes[source] for source, out in workflow["connections"].items()
        if out["main"][0][0]["node"] == http["name"]
    )  # fmt: skip
    topic = before["parameters"]["assignments"]["assignments"][0]
    assert topic["name"] == "topic"

    # exactly the request n8n sends (header auth, its JSON body) to the real API
    resume = f"{sink.url}/webhook-waiting/1234"
    body = _n8n_expression(params["jsonBody"], {
        "JSON.stringify($json.topic)": json.dumps(topic["value"]),
        "JSON.stringify($execution.resumeUrl)": json.dumps(resume),
    })  # fmt: skip
    headers = {"Content-Type": "application/json", credential["data"]["name"]: TOKEN}
    r = client.request(params["method"], url.path, content=body.encode(), headers=headers)
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]

    # the callback resumes the Wait node; the Result node reads the run's fields from its body
    sink.wait_for(lambda got: len(got) == 1)
    assert sink.received[0]["path"] == "/webhook-waiting/1234"
    resumed = {"body": sink.json(0)}
    result = nodes[workflow["connections"][wait["name"]]["main"][0][0]["node"]]
    fields = {}
    for assignment in result["parameters"]["assignments"]["assignments"]:
        match = re.fullmatch(r"=\{\{ \$json\.body\.(\w+) \}\}", assignment["value"])
        assert match, assignment["value"]
        fields[assignment["name"]] = resumed["body"][match.group(1)]
    assert fields == {"run_id": run_id, "status": "succeeded",
                      "result": f"done: {topic['value']}", "error": None}  # fmt: skip


# -- in a cluster -------------------------------------------------------------------------------

CREWS = """
from typhon import crew

@crew("steps")
def steps(ctx):
    for name in ("read", "think", "write"):
        ctx.step(name)
    return "done: " + ctx.input
"""


def test_in_a_cluster_the_api_process_sends_the_callback(
    make_cluster: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch, sink: CallbackSink
) -> None:
    cluster = make_cluster(CREWS, extra_yaml="improve: {review: false}\n")
    cluster.start_worker()
    monkeypatch.syspath_prepend(str(cluster.dir))
    with (
        Typhon(load_config(cluster.config_path, environ={})) as typhon,
        running_api(typhon, hooks=_hooks(sink.url)) as api,
        httpx.Client(base_url=api.url, timeout=60) as client,
    ):
        assert not typhon.embedded
        r = _post(client, "research", {"topic": "tides", "callback_url": f"{sink.url}/c"},
                  **_token())  # fmt: skip
        assert r.status_code == 202, r.text
        sink.wait_for(lambda got: len(got) == 1, timeout=120)
        body = sink.json(0)
        assert (body["run_id"], body["status"], body["output"]) == (
            r.json()["run_id"], "succeeded", "done: tides",
        ), cluster.worker_log()  # fmt: skip
        assert body["worker"] and body["worker"] != typhon.runtime.worker_name
