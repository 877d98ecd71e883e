"""Model clients: one small contract, HTTP implementations for OpenAI-compatible servers and
Ollama's native API, and wrappers.

``ModelClient.chat()`` is the whole contract; ``stream()`` yields text as it arrives. Wrappers
(usage recording, cancellation checks, replica balancing) are clients that hold other clients.

Every failure is a typed error naming the alias and the URL: ``ModelUnavailableError`` when the
server cannot be reached or keeps answering 429/5xx (retried with backoff first), and
``ModelResponseError`` when it answers something unusable. A garbled answer (not JSON, a stream
cut off before its end, JSON that does not match the requested schema) is asked for once more
before it becomes an error.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import httpx

from typhon._types import Usage
from typhon.errors import ModelResponseError, ModelUnavailableError

__all__ = [
    "ChatResult",
    "ChatStream",
    "HttpModelClient",
    "Message",
    "ModelClient",
    "OpenAICompatibleClient",
    "Probe",
    "RecordingClient",
    "json_schema_format",
]

Message = dict[str, Any]
_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class ChatResult:
    content: str
    usage: Usage
    model: str
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    alias: str = ""  # the alias that answered: a fallback's when the requested one was down
    url: str = ""  # the endpoint (replica) that answered


@dataclass(frozen=True)
class Probe:
    """One health probe of an endpoint: reachable, which models it serves, how long it took."""

    alias: str
    url: str
    model: str
    reachable: bool
    latency_s: float
    models: list[str] = field(default_factory=list)
    model_present: bool | None = None  # None: the server answers any name with what it loaded
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "url": self.url,
            "model": self.model,
            "reachable": self.reachable,
            "model_present": self.model_present,
            "latency_ms": round(self.latency_s * 1000, 1),
            "models": self.models,
            "error": self.error,
        }


class ChatStream:
    """Iterate for text deltas; ``result`` holds the whole answer once the iteration ends."""

    def __init__(self, chunks: Iterator[str], finish: Callable[[], ChatResult]):
        self._chunks = chunks
        self._finish = finish
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._chunks
        self.result = self._finish()


class ModelClient(Protocol):
    """What crews call. ``alias`` is the configured model name, ``url`` its endpoint."""

    alias: str
    url: str

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult: ...

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream: ...


def json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A ``response_format`` asking for JSON that matches ``schema`` (enforced by llama-server)."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _schema_of(response_format: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    if not response_format or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema") or {}
    return str(spec.get("name") or "response"), dict(spec.get("schema") or {})


@dataclass
class _StreamState:
    usage: dict[str, Any] | None = None
    finish: str | None = None
    model: str = ""
    done: bool = False
    compute_s: float | None = None


class HttpModelClient:
    """What the OpenAI-compatible and the Ollama clients share: the HTTP connection, retries with
    backoff and jitter (honouring ``Retry-After``), typed errors, JSON checks, truncated streams.
    Subclasses say how a request is written and an answer read."""

    def __init__(
        self,
        alias: str,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ):
        self.alias = alias
        self.url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    # -- what subclasses provide -----------------------------------------------------------------
    def _chat_request(
        self, messages: Sequence[Message], stream: bool, **params: Any
    ) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _parse_chat(self, data: Any, elapsed: float) -> ChatResult:
        raise NotImplementedError

    def _stream_event(self, line: str, state: _StreamState) -> str:
        raise NotImplementedError

    def _models_path(self) -> str:
        raise NotImplementedError

    def _parse_models(self, data: Any) -> list[str]:
        raise NotImplementedError

    def _present(self, models: list[str]) -> bool | None:
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise NotImplementedError

    # -- chat ------------------------------------------------------------------------------------
    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        path, body = self._chat_request(
            messages,
            False,
            max_tokens=max_tokens,
            temperature=temperature,
            response_format=response_format,
            tools=tools or None,
            stop=stop or None,
        )
        for attempt in (0, 1):
            try:
                started = time.perf_counter()
                response = self._send(lambda: self._http.post(path, json=body))
                result = self._parse_chat(_json(response, self), time.perf_counter() - started)
                _check_format(self, result.content, response_format)
                return replace(result, alias=self.alias, url=self.url)
            except ModelResponseError as exc:
                if not exc.retryable or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        path, body = self._chat_request(
            messages, True, max_tokens=max_tokens, temperature=temperature
        )
        parts: list[str] = []
        state = _StreamState(model=self.model)
        started = time.perf_counter()

        def one_try() -> Iterator[str]:
            request = self._http.build_request("POST", path, json=body)
            response = self._send(lambda: self._http.send(request, stream=True))
            try:
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    delta = self._stream_event(line, state)
                    if delta:
                        parts.append(delta)
                        yield delta
                    if state.done:
                        return
            except httpx.HTTPError as exc:
                raise self._down(f"stream broke off: {exc}") from None
            finally:
                response.close()
            raise self._bad(
                f"ended its stream before the answer finished ({len(''.join(parts))} chars in)",
                retryable=not parts,
            )

        def chunks() -> Iterator[str]:
            try:
                yield from one_try()
            except ModelResponseError as exc:
                if not exc.retryable:
                    raise
                yield from one_try()  # nothing was passed on yet: ask once more

        def finish() -> ChatResult:
            elapsed = time.perf_counter() - started
            return ChatResult(
                "".join(parts),
                _usage(state.usage, elapsed, state.compute_s),
                state.model,
                state.finish,
                alias=self.alias,
                url=self.url,
            )

        return ChatStream(chunks(), finish)

    # -- health ----------------------------------------------------------------------------------
    def probe(self, timeout: float = 3.0) -> Probe:
        """List the server's models: reachable, whether it serves this entry's model, latency."""
        started = time.perf_counter()
        try:
            response = self._http.get(self._models_path(), timeout=timeout)
            latency = time.perf_counter() - started
            if response.status_code >= 400:
                return Probe(
                    self.alias, self.url, self.model, False, latency,
                    error=f"HTTP {response.status_code}: {response.text[:120]}",
                )  # fmt: skip
            models = self._parse_models(response.json())
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return Probe(
                self.alias, self.url, self.model, False, time.perf_counter() - started,
                error=f"{type(exc).__name__}: {exc}"[:200],
            )  # fmt: skip
        return Probe(self.alias, self.url, self.model, True, latency, models, self._present(models))

    # -- transport -------------------------------------------------------------------------------
    def _send(self, do: Callable[[], httpx.Response]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = do()
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt >= self.max_retries:
                    down = self._down(f"unreachable: {type(exc).__name__}: {exc}")
                    down.refused = isinstance(exc, httpx.ConnectError)
                    raise down from None
                self._sleep(attempt, None)
                attempt += 1
                continue
            if response.status_code in _RETRY_STATUS and attempt < self.max_retries:
                retry_after = response.headers.get("retry-after")
                response.close()
                self._sleep(attempt, retry_after)
                attempt += 1
                continue
            if response.status_code in _RETRY_STATUS:
                response.read()
                raise self._down(
                    f"answered {response.status_code} after {attempt + 1} tries:"
                    f" {_error_text(response)}"
                )
            if response.status_code >= 400:
                response.read()
                refused = self._bad(
                    f"refused the request ({response.status_code}): {_error_text(response)}"
                )
                refused.status = response.status_code
                raise refused
            return response

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2**attempt) * (1 + random.random() / 4)
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
        time.sleep(delay)

    def _down(self, what: str) -> ModelUnavailableError:
        return ModelUnavailableError(
            f"model '{self.alias}' at {self.url} {what}", alias=self.alias, url=self.url
        )

    def _bad(
        self, what: str, *, retryable: bool = False, content: str | None = None
    ) -> ModelResponseError:
        error = ModelResponseError(
            f"model '{self.alias}' at {self.url} {what}",
            alias=self.alias,
            url=self.url,
            retryable=retryable,
        )
        error.content = content
        return error


def _json(response: httpx.Response, client: HttpModelClient) -> Any:
    try:
        return response.json()
    except ValueError:
        raise client._bad(
            f"answered {response.status_code} with a body that is not JSON: {response.text[:80]!r}",
            retryable=True,
        ) from None


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)[:200]
        if err:
            return str(err)[:200]
    return response.text[:200]


def _check_format(
    client: HttpModelClient, content: str, response_format: dict[str, Any] | None
) -> None:
    """An answer asked for as JSON must be JSON, and match the schema when one was given."""
    if not response_format or response_format.get("type") not in ("json_schema", "json_object"):
        return
    try:
        value = json.loads(content)
    except ValueError:
        raise client._bad(
            f"answered text that is not the JSON asked for: {content[:80]!r}",
            retryable=True,
            content=content,
        ) from None
    named = _schema_of(response_format)
    if named is None:
        return
    import jsonschema  # only answers that ask for a schema pay for the import

    name, schema = named
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise client._bad(
            f"answered JSON that does not match schema '{name}': {exc.message[:120]}",
            retryable=True,
            content=content,
        ) from None


def _usage(raw: dict[str, Any] | None, elapsed: float, compute_s: float | None = None) -> Usage:
    raw = raw or {}
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        calls=1,
        latency_s=elapsed,
        compute_s=elapsed if compute_s is None else compute_s,
    )


def _llama_timings(data: dict[str, Any]) -> float | None:
    """llama-server's ``timings``: prompt + generation milliseconds, as seconds."""
    timings = data.get("timings")
    if not isinstance(timings, dict):
        return None
    total = float(timings.get("prompt_ms") or 0) + float(timings.get("predicted_ms") or 0)
    return total / 1000 if total > 0 else None


class OpenAICompatibleClient(HttpModelClient):
    """``POST {base}/chat/completions`` on TabbyAPI, llama-server, vLLM, Ollama's /v1, LiteLLM."""

    def _chat_request(
        self, messages: Sequence[Message], stream: bool, **params: Any
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        body.update({k: v for k, v in params.items() if v is not None})
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return "/chat/completions", body

    def _parse_chat(self, data: Any, elapsed: float) -> ChatResult:
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise self._bad("answered without a chat completion", retryable=True) from None
        return ChatResult(
            content=message.get("content") or "",
            usage=_usage(data.get("usage"), elapsed, _llama_timings(data)),
            model=str(data.get("model") or self.model),
            finish_reason=choice.get("finish_reason"),
            tool_calls=list(message.get("tool_calls") or []),
        )

    def _stream_event(self, line: str, state: _StreamState) -> str:
        if not line.startswith("data:"):
            return ""
        payload = line[5:].strip()
        if payload == "[DONE]":
            state.done = True
            return ""
        try:
            event = json.loads(payload)
        except ValueError:
            raise self._bad("sent a stream event that is not JSON", retryable=True) from None
        if not isinstance(event, dict):
            raise self._bad("sent a stream event that is not an object", retryable=True)
        if event.get("error"):
            raise self._bad(f"reported an error mid-stream: {str(event['error'])[:160]}")
        if event.get("usage"):
            state.usage = event["usage"]
        state.compute_s = _llama_timings(event) or state.compute_s
        state.model = event.get("model") or state.model
        choices = event.get("choices") or []
        if not choices:
            return ""
        if choices[0].get("finish_reason"):
            state.finish = choices[0]["finish_reason"]
        return str((choices[0].get("delta") or {}).get("content") or "")

    def _models_path(self) -> str:
        return "/models"

    def _parse_models(self, data: Any) -> list[str]:
        return [str(m["id"]) for m in data.get("data") or []]

    def _present(self, models: list[str]) -> bool | None:
        if self.model in models:
            return True
        # TabbyAPI and llama-server answer any model name with the model they have loaded.
        return None if len(models) == 1 else False

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        response = self._send(
            lambda: self._http.post("/embeddings", json={"model": self.model, "input": list(texts)})
        )
        data = _json(response, self)
        try:
            rows = sorted(data["data"], key=lambda row: row.get("index", 0))
            return [[float(x) for x in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError):
            raise self._bad("answered without embeddings", retryable=True) from None


class RecordingClient:
    """Wraps a client: calls ``before()`` ahead of every call (cancellation checks) and hands each
    call's result to ``record`` (or the error to ``failed``). ``resolve`` builds the inner client
    on the first call, so a crew that never calls its model never starts a server."""

    def __init__(
        self,
        alias: str,
        url: str,
        resolve: Callable[[], ModelClient],
        *,
        record: Callable[[ChatResult], None],
        before: Callable[[], None],
        failed: Callable[[Exception, float], None] | None = None,
        span_attributes: dict[str, Any] | None = None,
    ):
        self.alias = alias
        self.url = url
        self._span_attributes = dict(span_attributes or {})
        self._resolve = resolve
        self._inner: ModelClient | None = None
        self._record = record
        self._before = before
        self._failed = failed

    @property
    def inner(self) -> ModelClient:
        if self._inner is None:
            self._inner = self._resolve()
            self.url = self._inner.url
        return self._inner

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        self._before()
        started = time.perf_counter()
        with self._span() as span:
            try:
                result = self.inner.chat(
                    messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    response_format=response_format,
                    tools=tools,
                    stop=stop,
                )
            except Exception as exc:
                if self._failed is not None:
                    self._failed(exc, time.perf_counter() - started)
                raise
            _span_result(span, result)
        self._record(result)
        return result

    def _span(self) -> Any:
        from typhon import telemetry

        return telemetry.span(
            f"chat {self.alias}",
            kind=telemetry.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": self.alias,
                "server.address": self.url, **self._span_attributes,
            },
        )  # fmt: skip

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        self._before()
        inner = self.inner.stream(messages, max_tokens=max_tokens, temperature=temperature)

        def chunks() -> Iterator[str]:
            yield from inner

        def finish() -> ChatResult:
            assert inner.result is not None
            with self._span() as span:  # the stream's totals, once they are known
                _span_result(span, inner.result)
            self._record(inner.result)
            return inner.result

        return ChatStream(chunks(), finish)


def _span_result(span: Any, result: ChatResult) -> None:
    span.set_attribute("gen_ai.response.model", result.model or "")
    span.set_attribute("gen_ai.usage.input_tokens", result.usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", result.usage.completion_tokens)
    if result.alias:
        span.set_attribute("typhon.model.alias", result.alias)
