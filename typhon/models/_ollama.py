"""Ollama's native API: ``POST /api/chat`` (NDJSON streaming), ``/api/embed`` and ``/api/tags``.

The native API reports the backend's own timings (``prompt_eval_duration`` and ``eval_duration``,
in nanoseconds), which become the call's compute time, and takes a JSON schema in ``format``.
Model names follow Ollama's rule: a name without a tag means ``:latest``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from typhon.errors import ModelResponseError
from typhon.models._client import (
    ChatResult,
    HttpModelClient,
    Message,
    _json,
    _StreamState,
    _usage,
)

__all__ = ["OllamaClient", "ollama_name"]

_NS = 1e9


def ollama_name(name: str) -> str:
    """``qwen2.5:7b`` stays, ``llama3.2`` becomes ``llama3.2:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _format(response_format: dict[str, Any] | None) -> Any:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or "json"
    if kind == "json_object":
        return "json"
    return None


def _stats(data: dict[str, Any]) -> tuple[dict[str, int], float | None]:
    usage = {
        "prompt_tokens": int(data.get("prompt_eval_count") or 0),
        "completion_tokens": int(data.get("eval_count") or 0),
    }
    compute_ns = int(data.get("prompt_eval_duration") or 0) + int(data.get("eval_duration") or 0)
    return usage, (compute_ns / _NS if compute_ns > 0 else None)


class OllamaClient(HttpModelClient):
    """Ollama's native chat API. ``base_url`` is the server root (``http://host:11434``)."""

    def __init__(self, alias: str, base_url: str, model: str, **kwargs: Any):
        base = base_url.rstrip("/")
        if base.endswith("/v1"):  # a LiteLLM-style base that points at the OpenAI shim
            base = base[:-3]
        super().__init__(alias, base, model, **kwargs)

    def _chat_request(
        self, messages: Sequence[Message], stream: bool, **params: Any
    ) -> tuple[str, dict[str, Any]]:
        options = {
            "temperature": params.get("temperature"),
            "num_predict": params.get("max_tokens"),
            "stop": params.get("stop"),
        }
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [_message(m) for m in messages],
            "stream": stream,
            "options": {k: v for k, v in options.items() if v is not None},
        }
        fmt = _format(params.get("response_format"))
        if fmt is not None:
            body["format"] = fmt
        if params.get("tools"):
            body["tools"] = params["tools"]
        return "/api/chat", body

    def _parse_chat(self, data: Any, elapsed: float) -> ChatResult:
        try:
            message = data["message"]
            content = message.get("content") or ""
        except (KeyError, TypeError, AttributeError):
            raise self._bad("answered without a chat message", retryable=True) from None
        if not data.get("done", True):
            raise self._bad("answered a chat that is not done", retryable=True)
        raw_usage, compute = _stats(data)
        return ChatResult(
            content=content,
            usage=_usage(raw_usage, elapsed, compute),
            model=str(data.get("model") or self.model),
            finish_reason=data.get("done_reason"),
            tool_calls=[_tool_call(c) for c in message.get("tool_calls") or []],
        )

    def _stream_event(self, line: str, state: _StreamState) -> str:
        try:
            event = json.loads(line)
        except ValueError:
            raise self._bad("sent a stream line that is not JSON", retryable=True) from None
        if not isinstance(event, dict):
            raise self._bad("sent a stream line that is not an object", retryable=True)
        if event.get("error"):
            raise self._bad(f"reported an error mid-stream: {str(event['error'])[:160]}")
        state.model = event.get("model") or state.model
        if event.get("done"):
            state.done = True
            state.finish = event.get("done_reason") or "stop"
            state.usage, state.compute_s = _stats(event)
        return str((event.get("message") or {}).get("content") or "")

    def _models_path(self) -> str:
        return "/api/tags"

    def _parse_models(self, data: Any) -> list[str]:
        return [str(m.get("name") or m.get("model")) for m in data.get("models") or []]

    def _present(self, models: list[str]) -> bool:
        return ollama_name(self.model) in {ollama_name(m) for m in models}

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """``/api/embed`` (one request for all texts); ``/api/embeddings`` on older servers."""
        body = {"model": self.model, "input": list(texts)}
        try:
            response = self._send(lambda: self._http.post("/api/embed", json=body))
        except ModelResponseError as exc:
            # a server without the route answers a plain "404 page not found"; an unknown
            # model is a JSON error and is passed on
            if exc.status == 404 and "page not found" in str(exc):
                return [self._embed_one(text) for text in texts]
            raise
        data = _json(response, self)
        try:
            return [[float(x) for x in row] for row in data["embeddings"]]
        except (KeyError, TypeError, ValueError):
            raise self._bad("answered without embeddings", retryable=True) from None

    def _embed_one(self, text: str) -> list[float]:
        body = {"model": self.model, "prompt": text}
        data = _json(self._send(lambda: self._http.post("/api/embeddings", json=body)), self)
        try:
            return [float(x) for x in data["embedding"]]
        except (KeyError, TypeError, ValueError):
            raise self._bad("answered without an embedding", retryable=True) from None


def _message(message: Message) -> Message:
    """OpenAI-style messages to Ollama's: tool-call arguments are objects, not JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return dict(message)
    converted = []
    for call in calls:
        function = dict(call.get("function") or {})
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                function["arguments"] = json.loads(args)
            except ValueError:
                function["arguments"] = {}
        converted.append({"function": function})
    return {**message, "tool_calls": converted}


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """Ollama's tool call to OpenAI's shape (arguments as JSON text), as crews expect."""
    function = dict(call.get("function") or {})
    args = function.get("arguments")
    if not isinstance(args, str):
        function["arguments"] = json.dumps(args or {})
    return {
        "type": "function",
        "id": call.get("id") or function.get("name", ""),
        "function": function,
    }
