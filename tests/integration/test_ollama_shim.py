"""The Ollama-API shim answers like Ollama, over HTTP, in front of a real llama-server."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.llama import LlamaProcess, start_llama_server
from support.ollama_shim import OllamaShim

pytestmark = pytest.mark.integration

MODEL = "gemma3:270m"
QUESTION = [{"role": "user", "content": "Capital of France?"}]
STATS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture(scope="module")
def model_path(shared_models_dir: Path) -> Path:
    return shared_models_dir / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def chat_server(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaProcess]:
    log = tmp_path_factory.mktemp("llama") / "chat.log"
    with start_llama_server(model_path, parallel=2, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def embed_server(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaProcess]:
    log = tmp_path_factory.mktemp("llama") / "embed.log"
    with start_llama_server(model_path, embeddings=True, parallel=1, log_path=log) as server:
        yield server


@pytest.fixture
def shim(chat_server: LlamaProcess, embed_server: LlamaProcess) -> Iterator[OllamaShim]:
    with OllamaShim(chat_server.url, [MODEL, "tiny"], embed_upstream=embed_server.url) as s:
        yield s


@pytest.fixture
def http(shim: OllamaShim) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shim.url, timeout=120) as client:
        yield client


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": QUESTION, "options": {"num_predict": 8}, **extra}


def _assert_stats_in_ns(reply: dict[str, Any], max_tokens: int) -> None:
    assert all(isinstance(reply[key], int) for key in STATS)
    assert reply["prompt_eval_count"] > 5
    assert 0 < reply["eval_count"] <= max_tokens
    # a token takes milliseconds: nanoseconds put these in the millions
    assert reply["eval_duration"] > 100_000 * reply["eval_count"]
    assert reply["total_duration"] >= reply["eval_duration"] > 0
    assert reply["done_reason"] in {"stop", "length"}


def test_root_version_and_tags(http: httpx.Client) -> None:
    root = http.get("/")
    assert root.text == "Ollama is running"
    assert root.headers["content-type"].startswith("text/plain")
    assert http.get("/api/version").json() == {"version": "0.0.0-shim"}
    models = http.get("/api/tags").json()["models"]
    assert [m["name"] for m in models] == [MODEL, "tiny:latest"]
    for m in models:
        assert m["model"] == m["name"] and len(m["digest"]) == 64
        assert {"modified_at", "size", "details"} <= set(m)
        datetime.fromisoformat(m["modified_at"])


def test_chat_without_stream(http: httpx.Client) -> None:
    reply = http.post("/api/chat", json=_chat(stream=False)).json()
    assert reply["model"] == MODEL and reply["done"] is True
    assert reply["message"]["role"] == "assistant"
    assert isinstance(reply["message"]["content"], str) and reply["message"]["content"]
    assert datetime.fromisoformat(reply["created_at"]).tzinfo is not None
    _assert_stats_in_ns(reply, 8)


def test_chat_streams_ndjson_by_default(http: httpx.Client) -> None:
    body = _chat(messages=[{"role": "user", "content": "Count from 1 to 30."}])
    body["options"] = {"num_predict": 24, "temperature": 0}
    arrived: list[float] = []
    lines: list[dict[str, Any]] = []
    with http.stream("POST", "/api/chat", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        for line in resp.iter_lines():
            arrived.append(time.monotonic())
            lines.append(json.loads(line))
    assert len(lines) >= 4
    *deltas, final = lines
    assert all(d["done"] is False and d["message"]["role"] == "assistant" for d in deltas)
    assert "".join(d["message"]["content"] for d in deltas).strip()
    assert final["done"] is True and final["message"] == {"role": "assistant", "content": ""}
    _assert_stats_in_ns(final, 24)
    # lines come as tokens are generated, not all at the end
    assert arrived[-1] - arrived[0] > 0.3 * final["eval_duration"] / 1e9


def test_json_schema_format_is_honoured(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 20}},
        "required": ["answer"],
    }
    body = _chat(
        stream=False,
        format=schema,
        messages=[{"role": "user", "content": "Capital of France as JSON."}],
        options={"temperature": 0, "num_predict": 128},  # room for the grammar's whitespace
    )
    reply = http.post("/api/chat", json=body).json()
    data = json.loads(reply["message"]["content"])
    assert isinstance(data["answer"], str) and len(data["answer"]) <= 20


def test_requests_map_to_openai_fields(shim: OllamaShim) -> None:
    body = _chat(
        format="json",
        options={"num_predict": 5, "temperature": 0.2, "top_k": 3, "seed": 7, "stop": ["\n"]},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        keep_alive="5m",
    )
    req = shim.chat_request(body, stream=True)
    assert req["max_tokens"] == 5 and req["temperature"] == 0.2 and req["top_k"] == 3
    assert req["seed"] == 7 and req["stop"] == ["\n"] and req["tools"] == body["tools"]
    assert req["response_format"] == {"type": "json_object"}
    assert req["stream_options"] == {"include_usage": True}
    assert "keep_alive" not in req and "options" not in req


def test_empty_messages_load_the_model(http: httpx.Client) -> None:
    reply = http.post("/api/chat", json={"model": MODEL, "messages": []}).json()
    assert reply["done"] is True and reply["done_reason"] == "load"


def test_unknown_model_is_404_and_a_bare_name_means_latest(http: httpx.Client) -> None:
    for path in ("/api/chat", "/api/embed"):
        resp = http.post(path, json={"model": "gemma3", "messages": QUESTION, "input": "x"})
        assert resp.status_code == 404
        assert resp.json() == {"error": 'model "gemma3" not found, try pulling it first'}
    tiny = http.post("/api/chat", json=_chat(model="tiny:latest", stream=False))
    assert tiny.status_code == 200 and tiny.json()["model"] == "tiny:latest"


def test_bad_requests_are_400(http: httpx.Client) -> None:
    bad = http.post("/api/chat", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]
    assert http.post("/api/chat", json={"messages": QUESTION}).status_code == 400
    assert http.post("/api/chat", json=["a list"]).status_code == 400


def test_embed(http: httpx.Client) -> None:
    one = http.post("/api/embed", json={"model": MODEL, "input": "hello"}).json()
    many = http.post("/api/embed", json={"model": MODEL, "input": ["hello", "a cat"]}).json()
    assert one["model"] == MODEL and len(one["embeddings"]) == 1
    assert len(many["embeddings"]) == 2 and many["prompt_eval_count"] > 0
    assert many["total_duration"] > 0 and "load_duration" in many
    dim = len(one["embeddings"][0])
    assert dim > 100 and all(len(v) == dim for v in many["embeddings"])
    assert math.isclose(math.hypot(*one["embeddings"][0]), 1.0, rel_tol=1e-3)
    assert one["embeddings"][0] == pytest.approx(many["embeddings"][0], abs=1e-4)
    assert many["embeddings"][0] != pytest.approx(many["embeddings"][1], abs=1e-3)
    legacy = http.post("/api/embeddings", json={"model": MODEL, "prompt": "hello"}).json()
    assert legacy["embedding"] == pytest.approx(one["embeddings"][0], abs=1e-4)


def test_upstream_errors_keep_their_status(chat_server: LlamaProcess) -> None:
    # the chat server was started without --embeddings: llama-server answers 501
    with OllamaShim(chat_server.url, [MODEL]) as shim:
        resp = httpx.post(f"{shim.url}/api/embed", json={"model": MODEL, "input": "x"})
    assert resp.status_code == 501 and "embeddings" in resp.json()["error"]


def test_unreachable_upstream_is_502() -> None:
    with OllamaShim("http://127.0.0.1:9", [MODEL]) as shim:
        for stream in (False, True):
            resp = httpx.post(f"{shim.url}/api/chat", json=_chat(stream=stream))
            assert resp.status_code == 502 and resp.json()["error"]


def test_fail_and_garbage_hooks(shim: OllamaShim, http: httpx.Client) -> None:
    shim.fail_next = 2
    for _ in range(2):
        resp = http.post("/api/chat", json=_chat(stream=False))
        assert resp.status_code == 500 and resp.json() == {"error": "injected"}
    shim.garbage_next = 1
    garbage = http.post("/api/chat", json=_chat(stream=False))
    assert garbage.status_code == 200 and garbage.text == "<html>oops</html>"
    assert http.post("/api/chat", json=_chat(stream=False)).json()["done"] is True
    assert shim.fail_next == shim.garbage_next == 0


def test_truncate_hook_cuts_streams_and_bodies(shim: OllamaShim, http: httpx.Client) -> None:
    shim.truncate_next = 2
    lines: list[dict[str, Any]] = []
    # each request on a connection of its own: a cut answer closes its connection, and a pooled
    # connection could otherwise be reused in the moment before the close reaches the client
    close = {"Connection": "close"}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/api/chat", json=_chat(), headers=close) as resp,
    ):
        assert resp.status_code == 200
        lines.extend(json.loads(line) for line in resp.iter_lines())
    assert 1 <= len(lines) <= 2 and not any(line["done"] for line in lines)
    cut = http.post("/api/chat", json=_chat(stream=False), headers=close)
    assert cut.status_code == 200 and cut.text.startswith('{"model"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)
    whole = http.post("/api/chat", json=_chat(stream=False), headers=close)
    assert whole.json()["done"] is True


def test_delay_hook(shim: OllamaShim, http: httpx.Client) -> None:
    shim.delay_s = 0.5
    with pytest.raises(httpx.ReadTimeout):
        http.get("/api/version", timeout=0.2)
    started = time.monotonic()
    assert http.get("/api/version").status_code == 200
    assert time.monotonic() - started >= 0.5


def test_restarted_upstream_on_the_same_port(chat_server: LlamaProcess, http: httpx.Client) -> None:
    port = chat_server.port
    chat_server.kill()
    down = http.post("/api/chat", json=_chat(stream=False))
    assert down.status_code == 502
    chat_server.restart()
    assert chat_server.port == port and chat_server.proc is not None
    assert chat_server.proc.poll() is None
    assert http.post("/api/chat", json=_chat(stream=False)).json()["done"] is True
