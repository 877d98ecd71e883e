"""Model clients: one small contract, an OpenAI-compatible implementation over httpx, wrappers.

``ModelClient.chat()`` is the whole contract; ``stream()`` yields text as it arrives. Wrappers
(usage recording, cancellation checks) are clients that hold another client.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from typhon._types import Usage
from typhon.errors import ModelResponseError, ModelUnavailableError

__all__ = [
    "ChatResult",
    "ChatStream",
    "Message",
    "ModelClient",
    "OpenAICompatibleClient",
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


class OpenAICompatibleClient:
    """``POST {base}/chat/completions`` on TabbyAPI, llama-server, vLLM, Ollama's /v1, LiteLLM.

    Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter
    (honouring ``Retry-After``); after the last try the call raises ModelUnavailableError naming
    the alias and URL. Other 4xx and malformed answers raise ModelResponseError.
    """

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

    def _body(self, messages: Sequence[Message], **params: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        body.update({k: v for k, v in params.items() if v is not None})
        return body

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
        body = self._body(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            response_format=response_format,
            tools=tools or None,
            stop=stop or None,
        )
        started = time.perf_counter()
        response = self._send(lambda: self._http.post("/chat/completions", json=body))
        elapsed = time.perf_counter() - started
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._bad(f"answered {response.status_code} without a chat completion") from None
        return ChatResult(
            content=message.get("content") or "",
            usage=_usage(data.get("usage"), elapsed),
            model=str(data.get("model") or self.model),
            finish_reason=choice.get("finish_reason"),
            tool_calls=list(message.get("tool_calls") or []),
        )

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        body = self._body(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        state: dict[str, Any] = {"usage": None, "finish": None, "model": self.model}
        started = time.perf_counter()

        def chunks() -> Iterator[str]:
            request = self._http.build_request("POST", "/chat/completions", json=body)
            response = self._send(lambda: self._http.send(request, stream=True))
            try:
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    delta = self._stream_event(payload, state)
                    if delta:
                        parts.append(delta)
                        yield delta
            except httpx.HTTPError as exc:
                raise self._down(f"stream broke off: {exc}") from None
            finally:
                response.close()

        def finish() -> ChatResult:
            elapsed = time.perf_counter() - started
            return ChatResult(
                "".join(parts), _usage(state["usage"], elapsed), state["model"], state["finish"]
            )

        return ChatStream(chunks(), finish)

    def _stream_event(self, payload: str, state: dict[str, Any]) -> str:
        try:
            event = json.loads(payload)
        except ValueError:
            raise self._bad("sent a stream event that is not JSON") from None
        if event.get("usage"):
            state["usage"] = event["usage"]
        state["model"] = event.get("model") or state["model"]
        choices = event.get("choices") or []
        if not choices:
            return ""
        if choices[0].get("finish_reason"):
            state["finish"] = choices[0]["finish_reason"]
        return str((choices[0].get("delta") or {}).get("content") or "")

    def _send(self, do: Callable[[], httpx.Response]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = do()
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt >= self.max_retries:
                    raise self._down(f"unreachable: {type(exc).__name__}: {exc}") from None
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
                raise self._down(f"answered {response.status_code} after {attempt + 1} tries")
            if response.status_code >= 400:
                response.read()
                raise self._bad(
                    f"refused the request ({response.status_code}): {response.text[:200]}"
                )
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

    def _bad(self, what: str) -> ModelResponseError:
        return ModelResponseError(
            f"model '{self.alias}' at {self.url} {what}", alias=self.alias, url=self.url
        )


def _usage(raw: dict[str, Any] | None, elapsed: float) -> Usage:
    raw = raw or {}
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        calls=1,
        latency_s=elapsed,
    )


class RecordingClient:
    """Wraps a client: calls ``before()`` ahead of every call (cancellation checks) and hands each
    call's usage to ``record``. ``resolve`` builds the inner client on the first call, so a crew
    that never calls its model never starts a server."""

    def __init__(
        self,
        alias: str,
        url: str,
        resolve: Callable[[], ModelClient],
        *,
        record: Callable[[Usage], None],
        before: Callable[[], None],
    ):
        self.alias = alias
        self.url = url
        self._resolve = resolve
        self._inner: ModelClient | None = None
        self._record = record
        self._before = before

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
        result = self.inner.chat(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            response_format=response_format,
            tools=tools,
            stop=stop,
        )
        self._record(result.usage)
        return result

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
            self._record(inner.result.usage)
            return inner.result

        return ChatStream(chunks(), finish)
