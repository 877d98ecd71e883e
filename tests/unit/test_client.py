"""Model clients: OpenAICompatibleClient over a mocked HTTP transport, RecordingClient, and the
ScriptedModel test helper."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest

from typhon.errors import ModelResponseError, ModelUnavailableError
from typhon.models import (
    ChatResult,
    ChatStream,
    Message,
    ModelClient,
    OpenAICompatibleClient,
    RecordingClient,
    json_schema_format,
)
from typhon.testing import ScriptedModel

BASE = "http://127.0.0.1:9/v1"
MESSAGES: list[Message] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """An httpx handler that answers from a list of responses (the last one repeats) and keeps
    every request it saw."""

    def __init__(self, *answers: httpx.Response | Exception | Handler):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    def body(self, i: int = -1) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.requests[i].content)
        return data


def completion(
    content: str | None = "Hi!",
    *,
    usage: dict[str, int] | None = None,
    finish_reason: str = "stop",
    tool_calls: list[dict[str, Any]] | None = None,
    model: str = "served-model",
) -> httpx.Response:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage if usage is not None else {"prompt_tokens": 12, "completion_tokens": 3},
        },
    )


def make_client(recorder: Recorder, **kwargs: Any) -> OpenAICompatibleClient:
    kwargs.setdefault("backoff_s", 0)
    return OpenAICompatibleClient(
        "big", BASE, "llama-70b", transport=httpx.MockTransport(recorder), **kwargs
    )


@pytest.fixture
def clients() -> Iterator[list[OpenAICompatibleClient]]:
    made: list[OpenAICompatibleClient] = []
    yield made
    for client in made:
        client.close()


def client_for(
    clients: list[OpenAICompatibleClient], recorder: Recorder, **kwargs: Any
) -> OpenAICompatibleClient:
    client = make_client(recorder, **kwargs)
    clients.append(client)
    return client


# -- chat ------------------------------------------------------------------------------------------


def test_chat_parses_the_completion_and_sends_the_parameters(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(completion('{"greeting": "Hello, world."}', finish_reason="length"))
    client = client_for(clients, rec, api_key="sk-test")
    fmt = json_schema_format("answer", {"type": "object"})

    result = client.chat(MESSAGES, max_tokens=64, temperature=0.3, response_format=fmt)

    assert isinstance(result, ChatResult)
    assert result.content == '{"greeting": "Hello, world."}'
    assert result.finish_reason == "length"
    assert result.model == "served-model"
    assert result.tool_calls == []
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (12, 3)
    assert result.usage.calls == 1
    assert result.usage.total_tokens == 15
    assert result.usage.latency_s >= 0

    assert len(rec.requests) == 1
    request = rec.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert rec.body() == {
        "model": "llama-70b",
        "messages": MESSAGES,
        "max_tokens": 64,
        "temperature": 0.3,
        "response_format": fmt,
    }


def test_chat_leaves_unset_parameters_out(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(completion())
    client = client_for(clients, rec)
    client.chat(MESSAGES, tools=[], stop=[])
    assert rec.body() == {"model": "llama-70b", "messages": MESSAGES}
    assert "authorization" not in rec.requests[0].headers


def test_trailing_slash_of_base_url_is_dropped(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(completion())
    client = OpenAICompatibleClient(
        "big", BASE + "/", "m", transport=httpx.MockTransport(rec), backoff_s=0
    )
    clients.append(client)
    client.chat(MESSAGES)
    assert client.url == BASE
    assert str(rec.requests[0].url) == f"{BASE}/chat/completions"


def test_missing_usage_and_model_fall_back(clients: list[OpenAICompatibleClient]) -> None:
    response = httpx.Response(
        200, json={"choices": [{"message": {"role": "assistant", "content": None}}]}
    )
    client = client_for(clients, Recorder(response))
    result = client.chat(MESSAGES)
    assert result.content == ""
    assert result.model == "llama-70b"
    assert result.finish_reason is None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (0, 0)
    assert result.usage.calls == 1


def test_json_schema_format_shape() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    assert json_schema_format("point", schema) == {
        "type": "json_schema",
        "json_schema": {"name": "point", "schema": schema, "strict": True},
    }


def test_tools_are_sent_and_tool_calls_come_back(clients: list[OpenAICompatibleClient]) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "search",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "search", "arguments": '{"q": "typhon"}'},
        }
    ]
    rec = Recorder(completion(None, tool_calls=calls, finish_reason="tool_calls"))
    client = client_for(clients, rec)

    result = client.chat(MESSAGES, tools=tools, stop=["\n\n"])

    assert result.tool_calls == calls
    assert result.content == ""
    assert result.finish_reason == "tool_calls"
    assert rec.body()["tools"] == tools
    assert rec.body()["stop"] == ["\n\n"]


# -- retries and errors ----------------------------------------------------------------------------


def test_503_twice_then_success(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(httpx.Response(503), httpx.Response(503), completion("finally"))
    client = client_for(clients, rec, max_retries=3)
    assert client.chat(MESSAGES).content == "finally"
    assert len(rec.requests) == 3
    assert rec.body(0) == rec.body(2)  # the same request each time


def test_429_with_retry_after_is_retried(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(httpx.Response(429, headers={"Retry-After": "0"}), completion("ok"))
    client = client_for(clients, rec)
    assert client.chat(MESSAGES).content == "ok"
    assert len(rec.requests) == 2


@pytest.mark.parametrize("max_retries", [0, 2])
def test_persistent_500_is_unavailable_after_all_tries(
    clients: list[OpenAICompatibleClient], max_retries: int
) -> None:
    rec = Recorder(httpx.Response(500, text="boom"))
    client = client_for(clients, rec, max_retries=max_retries)
    with pytest.raises(ModelUnavailableError) as info:
        client.chat(MESSAGES)
    err = info.value
    assert len(rec.requests) == max_retries + 1
    assert "'big'" in str(err)
    assert BASE in str(err)
    assert "500" in str(err)
    assert (err.alias, err.url) == ("big", BASE)
    assert err.code == "model_unavailable"


def test_connection_error_is_unavailable(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(httpx.ConnectError("connection refused"))
    client = client_for(clients, rec, max_retries=2)
    with pytest.raises(ModelUnavailableError) as info:
        client.chat(MESSAGES)
    assert len(rec.requests) == 3
    assert (info.value.alias, info.value.url) == ("big", BASE)
    assert "ConnectError" in str(info.value)


def test_connection_error_then_success(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), completion("up"))
    client = client_for(clients, rec, max_retries=3)
    assert client.chat(MESSAGES).content == "up"
    assert len(rec.requests) == 3


def test_400_is_a_response_error_and_not_retried(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(httpx.Response(400, json={"error": "context too long"}))
    client = client_for(clients, rec, max_retries=3)
    with pytest.raises(ModelResponseError) as info:
        client.chat(MESSAGES)
    assert len(rec.requests) == 1
    assert not isinstance(info.value, ModelUnavailableError)
    assert "400" in str(info.value)
    assert "context too long" in str(info.value)
    assert (info.value.alias, info.value.url) == ("big", BASE)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>not json</html>"),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json={"result": "x"}),
        httpx.Response(200, json=["a"]),
    ],
    ids=["html", "no-choices", "no-choices-key", "list"],
)
def test_200_without_a_completion_is_a_response_error(
    clients: list[OpenAICompatibleClient], response: httpx.Response
) -> None:
    rec = Recorder(response)
    client = client_for(clients, rec)
    with pytest.raises(ModelResponseError, match=r"not JSON|without a chat completion"):
        client.chat(MESSAGES)
    assert len(rec.requests) == 2  # a garbled answer is asked for once more


# -- streaming -------------------------------------------------------------------------------------


def sse(*events: dict[str, Any] | str) -> bytes:
    lines = []
    for event in events:
        payload = event if isinstance(event, str) else json.dumps(event)
        lines.append(f"data: {payload}\n\n")
    return "".join(lines).encode()


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "model": "served-model",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


def test_stream_yields_deltas_and_the_result(clients: list[OpenAICompatibleClient]) -> None:
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        delta("Hel"),
        delta("lo"),
        delta(", world", finish="stop"),
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}},
        "[DONE]",
        delta("after done"),
    )
    body = b": keep-alive comment\n\n" + body
    rec = Recorder(httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body))
    client = client_for(clients, rec)

    stream = client.stream(MESSAGES, max_tokens=32, temperature=0.0)
    assert isinstance(stream, ChatStream)
    assert stream.result is None
    assert rec.requests == []  # nothing is sent until the stream is read

    assert list(stream) == ["Hel", "lo", ", world"]

    assert stream.result is not None
    assert stream.result.content == "Hello, world"
    assert stream.result.finish_reason == "stop"
    assert stream.result.model == "served-model"
    assert (stream.result.usage.prompt_tokens, stream.result.usage.completion_tokens) == (7, 4)
    assert stream.result.usage.calls == 1
    sent = rec.body()
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["temperature"]) == (32, 0.0)
    assert sent["messages"] == MESSAGES


def test_stream_retries_a_503_first(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(httpx.Response(503), httpx.Response(200, content=sse(delta("ok"), "[DONE]")))
    client = client_for(clients, rec)
    stream = client.stream(MESSAGES)
    assert list(stream) == ["ok"]
    assert len(rec.requests) == 2
    assert stream.result is not None
    assert stream.result.content == "ok"


def test_stream_with_a_bad_event_is_a_response_error(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(httpx.Response(200, content=sse(delta("a"), "{not json")))
    client = client_for(clients, rec)
    stream = client.stream(MESSAGES)
    with pytest.raises(ModelResponseError):
        list(stream)


def test_stream_against_a_dead_server_is_unavailable(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(httpx.ConnectError("refused"))
    client = client_for(clients, rec, max_retries=1)
    with pytest.raises(ModelUnavailableError):
        list(client.stream(MESSAGES))
    assert len(rec.requests) == 2


# -- RecordingClient -------------------------------------------------------------------------------


class Spy:
    def __init__(self, inner: ModelClient):
        self.inner = inner
        self.resolved = 0
        self.before_calls = 0
        self.recorded: list[ChatResult] = []
        self.fail_before: BaseException | None = None

    def resolve(self) -> ModelClient:
        self.resolved += 1
        return self.inner

    def before(self) -> None:
        self.before_calls += 1
        if self.fail_before is not None:
            raise self.fail_before

    def wrap(self) -> RecordingClient:
        return RecordingClient(
            "big", "pending://", self.resolve, record=self.recorded.append, before=self.before
        )


def test_recording_client_resolves_lazily_once_and_records_usage() -> None:
    inner = ScriptedModel("one two", "three", url="http://127.0.0.1:1234/v1")
    spy = Spy(inner)
    client = spy.wrap()
    assert spy.resolved == 0
    assert client.url == "pending://"

    first = client.chat(MESSAGES, max_tokens=20)
    second = client.chat(MESSAGES)

    assert (first.content, second.content) == ("one two", "three")
    assert spy.resolved == 1
    assert spy.before_calls == 2
    assert client.url == "http://127.0.0.1:1234/v1"
    assert spy.recorded == [first, second]
    assert inner.calls[0]["max_tokens"] == 20


def test_recording_client_before_can_stop_the_call() -> None:
    inner = ScriptedModel("never")
    spy = Spy(inner)
    spy.fail_before = RuntimeError("cancelled")
    client = spy.wrap()
    with pytest.raises(RuntimeError, match="cancelled"):
        client.chat(MESSAGES)
    with pytest.raises(RuntimeError, match="cancelled"):
        client.stream(MESSAGES)
    assert inner.calls == []
    assert spy.recorded == []
    assert spy.resolved == 0


def test_recording_client_does_not_record_a_failed_call() -> None:
    spy = Spy(ScriptedModel(ValueError("model broke")))
    with pytest.raises(ValueError, match="model broke"):
        spy.wrap().chat(MESSAGES)
    assert spy.recorded == []


def test_recording_client_records_a_stream_after_iteration(
    clients: list[OpenAICompatibleClient],
) -> None:
    body = sse(
        delta("a"),
        delta("b", "stop"),
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
        "[DONE]",
    )
    http = client_for(clients, Recorder(httpx.Response(200, content=body)))
    spy = Spy(http)
    client = spy.wrap()

    stream = client.stream(MESSAGES, max_tokens=8)
    assert spy.before_calls == 1
    assert spy.recorded == []  # nothing yet: the stream has not been read

    assert list(stream) == ["a", "b"]
    assert stream.result is not None
    assert stream.result.content == "ab"
    assert len(spy.recorded) == 1
    usage = spy.recorded[0].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.calls) == (5, 2, 1)


def test_recording_client_passes_chat_parameters_through(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(completion("{}"))
    spy = Spy(client_for(clients, rec))
    fmt = json_schema_format("x", {"type": "object"})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    spy.wrap().chat(
        MESSAGES, max_tokens=9, temperature=1.0, response_format=fmt, tools=tools, stop=["x"]
    )
    body = rec.body()
    assert (body["max_tokens"], body["temperature"]) == (9, 1.0)
    assert (body["response_format"], body["tools"], body["stop"]) == (fmt, tools, ["x"])
    assert len(spy.recorded) == 1
    assert spy.recorded[0].usage.prompt_tokens == 12


# -- ScriptedModel ---------------------------------------------------------------------------------


def test_scripted_model_replies_in_order_and_repeats_the_last() -> None:
    model = ScriptedModel("first", "second")
    replies = [model.chat(MESSAGES).content for _ in range(4)]
    assert replies == ["first", "second", "second", "second"]
    assert len(model.calls) == 4
    assert model.calls[0]["messages"] == MESSAGES


def test_scripted_model_callable_reply_gets_the_messages() -> None:
    seen: list[Sequence[Message]] = []

    def reply(messages: Sequence[Message]) -> str:
        seen.append(messages)
        return f"you said: {messages[-1]['content']}"

    model = ScriptedModel(reply)
    result = model.chat(MESSAGES)
    assert result.content == "you said: hello there"
    assert list(seen[0]) == MESSAGES
    assert result.finish_reason == "stop"
    assert result.usage.calls == 1
    assert result.usage.prompt_tokens == 4  # words in the messages
    assert result.usage.completion_tokens == 4


def test_scripted_model_raises_an_exception_reply() -> None:
    model = ScriptedModel("ok", ModelUnavailableError("down", alias="a", url="u"), "back")
    assert model.chat(MESSAGES).content == "ok"
    with pytest.raises(ModelUnavailableError, match="down"):
        model.chat(MESSAGES)
    assert model.chat(MESSAGES).content == "back"


def test_scripted_model_needs_a_reply_and_streams() -> None:
    with pytest.raises(ValueError):
        ScriptedModel()
    model = ScriptedModel("a b c", alias="tiny")
    assert model.alias == "tiny"
    stream = model.stream(MESSAGES)
    assert "".join(stream).split() == ["a", "b", "c"]
    assert stream.result is not None
    assert stream.result.content == "a b c"
    assert stream.result.model == "tiny"


# -- garbled answers: asked once more, then a typed error naming the backend ----------------


def test_a_non_json_body_is_asked_once_more(clients: list[OpenAICompatibleClient]) -> None:
    rec = Recorder(httpx.Response(200, content=b"<html>proxy error</html>"), completion("fine"))
    assert client_for(clients, rec).chat(MESSAGES).content == "fine"
    assert len(rec.requests) == 2


def test_a_non_json_body_twice_is_a_response_error_naming_the_backend(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(httpx.Response(200, content=b"<html>proxy error</html>"))
    with pytest.raises(ModelResponseError, match=r"'big' at http://127.0.0.1:9/v1 .*not JSON"):
        client_for(clients, rec).chat(MESSAGES)
    assert len(rec.requests) == 2


SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["score"],
}


def test_json_that_breaks_the_schema_is_asked_once_more(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(completion('{"score": 7}'), completion('{"score": 0.7}'))
    result = client_for(clients, rec).chat(
        MESSAGES, response_format=json_schema_format("review", SCHEMA)
    )
    assert json.loads(result.content) == {"score": 0.7}
    assert len(rec.requests) == 2


def test_json_that_breaks_the_schema_twice_is_a_response_error(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(completion('{"grade": "A"}'))
    with pytest.raises(ModelResponseError, match="does not match schema 'review'") as info:
        client_for(clients, rec).chat(
            MESSAGES, response_format=json_schema_format("review", SCHEMA)
        )
    assert info.value.content == '{"grade": "A"}'  # the whole answer, for whoever keeps it
    long = "sure! here " * 20
    with pytest.raises(ModelResponseError, match="not the JSON asked for") as info:
        client_for(clients, Recorder(completion(long))).chat(
            MESSAGES, response_format={"type": "json_object"}
        )
    assert info.value.content == long


def test_a_stream_cut_off_before_any_text_is_asked_once_more(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(
        httpx.Response(200, content=sse({"choices": [{"index": 0, "delta": {"role": "x"}}]})),
        httpx.Response(200, content=sse(delta("ok", finish="stop"), "[DONE]")),
    )
    assert list(client_for(clients, rec).stream(MESSAGES)) == ["ok"]
    assert len(rec.requests) == 2


def test_a_stream_cut_off_mid_answer_is_a_response_error(
    clients: list[OpenAICompatibleClient],
) -> None:
    rec = Recorder(httpx.Response(200, content=sse(delta("Hel"), delta("lo"))))
    stream = client_for(clients, rec).stream(MESSAGES)
    got: list[str] = []
    with pytest.raises(ModelResponseError, match="ended its stream before the answer finished"):
        got.extend(stream)
    assert got == ["Hel", "lo"] and len(rec.requests) == 1


def test_llama_server_timings_become_compute_time(clients: list[OpenAICompatibleClient]) -> None:
    response = completion("x")
    data = json.loads(response.content)
    data["timings"] = {"prompt_n": 5, "prompt_ms": 120.0, "predicted_n": 3, "predicted_ms": 80.0}
    result = client_for(clients, Recorder(httpx.Response(200, json=data))).chat(MESSAGES)
    assert result.usage.compute_s == pytest.approx(0.2)
    assert (result.alias, result.url) == ("big", BASE)


def test_a_refused_connection_is_flagged(clients: list[OpenAICompatibleClient]) -> None:
    client = client_for(clients, Recorder(httpx.ConnectError("refused")), max_retries=0)
    with pytest.raises(ModelUnavailableError) as info:
        client.chat(MESSAGES)
    assert info.value.refused is True


# -- Ollama's native API ---------------------------------------------------------------------------


def test_ollama_request_and_answer_shapes() -> None:
    from typhon.models import OllamaClient

    answer = {
        "model": "qwen2.5:7b", "created_at": "2026-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": '{"score": 0.5}'},
        "done": True, "done_reason": "stop", "total_duration": 900_000_000,
        "load_duration": 100_000_000, "prompt_eval_count": 26,
        "prompt_eval_duration": 300_000_000, "eval_count": 12, "eval_duration": 450_000_000,
    }  # fmt: skip
    rec = Recorder(httpx.Response(200, json=answer))
    client = OllamaClient(
        "fast", "http://127.0.0.1:9/v1", "qwen2.5:7b", transport=httpx.MockTransport(rec)
    )
    result = client.chat(
        MESSAGES, max_tokens=64, temperature=0, stop=["\n\n"],
        response_format=json_schema_format("review", SCHEMA),
    )  # fmt: skip
    assert client.url == "http://127.0.0.1:9"  # a /v1 base is taken to the native root
    assert str(rec.requests[0].url) == "http://127.0.0.1:9/api/chat"
    sent = rec.body()
    assert sent["stream"] is False and sent["format"] == SCHEMA
    assert sent["options"] == {"temperature": 0, "num_predict": 64, "stop": ["\n\n"]}
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (26, 12)
    assert result.usage.compute_s == pytest.approx(0.75)  # prompt + eval, not load
    assert result.finish_reason == "stop"


def test_ollama_embed_is_one_request_and_falls_back_on_an_older_server() -> None:
    from typhon.models import OllamaClient

    rec = Recorder(httpx.Response(200, json={"embeddings": [[0.1, 0.2], [0.3, 0.4]]}))
    client = OllamaClient("e", "http://127.0.0.1:9", "nomic", transport=httpx.MockTransport(rec))
    assert client.embed(["a", "b"]) == [[0.1, 0.2], [0.3, 0.4]]
    assert [r.url.path for r in rec.requests] == ["/api/embed"]

    def old_server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/embed":
            return httpx.Response(404, text="404 page not found")
        return httpx.Response(200, json={"embedding": [1.0, 0.0]})

    rec = Recorder(old_server)
    client = OllamaClient("e", "http://127.0.0.1:9", "nomic", transport=httpx.MockTransport(rec))
    assert client.embed(["a", "b"]) == [[1.0, 0.0], [1.0, 0.0]]
    assert [r.url.path for r in rec.requests] == [
        "/api/embed",
        "/api/embeddings",
        "/api/embeddings",
    ]

    missing = Recorder(httpx.Response(404, json={"error": 'model "nomic" not found'}))
    client = OllamaClient(
        "e", "http://127.0.0.1:9", "nomic", transport=httpx.MockTransport(missing)
    )
    with pytest.raises(ModelResponseError, match="not found"):
        client.embed(["a"])
    assert len(missing.requests) == 1
