"""A small server that speaks Ollama's native API in front of a real llama-server.

Requests to ``/api/chat``, ``/api/embed`` and ``/api/embeddings`` are translated to the
llama-server's OpenAI-compatible ``/v1/chat/completions`` and ``/v1/embeddings`` and the
answers are translated back, with Ollama's shapes (durations in nanoseconds). Streams are
translated chunk by chunk as they arrive and sent as chunked ``application/x-ndjson``.

Fault hooks, settable at any time: ``fail_next`` (next N chats get HTTP 500), ``garbage_next``
(next N chats get a 200 ``<html>oops</html>``), ``truncate_next`` (next N chats are cut: a
stream sends at most two delta lines, then the connection closes without the final chunk; a
non-stream answer is a complete 200 response whose JSON body is cut in half) and ``delay_s``
(every request sleeps that long before it is answered). ``requests`` counts the requests seen.
Embeddings go to ``embed_upstream`` when given (a llama-server started with ``--embeddings``
serves embeddings only), else to ``upstream``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Generator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

__all__ = ["OllamaShim", "normalize_model_name"]

# Ollama options that the llama-server takes under the same name (num_predict is mapped)
_OPTIONS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "repeat_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip


def normalize_model_name(name: str) -> str:
    """Ollama's rule: a name without a tag means ``:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(ms: float | int | None) -> int:
    return int((ms or 0) * 1_000_000)


class _Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _upstream_error(resp: httpx.Response) -> _Error:
    text = resp.read().decode(errors="replace")
    try:
        error = json.loads(text)["error"]
        text = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        pass
    return _Error(resp.status_code, text)


def _openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for msg in messages:
        item = {k: v for k, v in msg.items() if k in ("role", "content", "tool_call_id", "name")}
        if msg.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "id": call.get("id", f"call_{i}"),
                    "type": "function",
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": json.dumps(call["function"].get("arguments", {})),
                    },
                }
                for i, call in enumerate(msg["tool_calls"])
            ]
        out.append(item)
    return out


def _ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    result = []
    for call in calls:
        raw = call["function"].get("arguments") or "{}"
        try:
            args = json.loads(raw)
        except ValueError:
            args = raw
        result.append({"function": {"name": call["function"]["name"], "arguments": args}})
    return result


def _stats(started: float, usage: dict[str, Any], timings: dict[str, Any]) -> dict[str, Any]:
    return {
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": usage.get("prompt_tokens", timings.get("prompt_n", 0)),
        "prompt_eval_duration": _ns(timings.get("prompt_ms")),
        "eval_count": usage.get("completion_tokens", timings.get("predicted_n", 0)),
        "eval_duration": _ns(timings.get("predicted_ms")),
    }


def _done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


class OllamaShim:
    """Ollama's native API over HTTP, backed by a llama-server (``upstream`` has no ``/v1``)."""

    def __init__(
        self,
        upstream: str,
        models: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        embed_upstream: str | None = None,
    ):
        self.upstream = upstream.rstrip("/")
        self.embed_upstream = (embed_upstream or upstream).rstrip("/")
        self.models = [normalize_model_name(m) for m in models]
        self.host, self.port = host, port
        self.fail_next = 0
        self.garbage_next = 0
        self.truncate_next = 0
        self.delay_s = 0.0
        self.requests = 0
        self._lock = threading.Lock()
        self._http = httpx.Client()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the shim is not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> str:
        shim = self

        class Handler(_Handler):
            pass

        Handler.shim = shim
        self._http = httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0))
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ollama-shim", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http.close()

    def __enter__(self) -> OllamaShim:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def take(self, hook: str) -> bool:
        """Consume one unit of a ``*_next`` fault hook; whether it fired."""
        with self._lock:
            left = int(getattr(self, hook))
            if left > 0:
                setattr(self, hook, left - 1)
            return left > 0

    def check_model(self, body: dict[str, Any]) -> str:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _Error(400, "model is required")
        if normalize_model_name(name) not in self.models:
            raise _Error(404, f'model "{name}" not found, try pulling it first')
        return name

    def chat_request(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        opts: dict[str, Any] = body.get("options") or {}
        req: dict[str, Any] = {
            "model": body["model"],
            "messages": _openai_messages(body.get("messages") or []),
            "stream": stream,
        }
        req.update({k: opts[k] for k in _OPTIONS if opts.get(k) is not None})
        if isinstance(opts.get("num_predict"), int) and opts["num_predict"] >= 0:
            req["max_tokens"] = opts["num_predict"]
        fmt = body.get("format")
        if fmt == "json":
            req["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, dict):
            req["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "format", "schema": fmt},
            }
        if body.get("tools"):
            req["tools"] = body["tools"]
        if stream:
            req["stream_options"] = {"include_usage": True}
        return req

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        resp = self._http.post(
            f"{self.upstream}/v1/chat/completions", json=self.chat_request(body, False)
        )
        if resp.status_code >= 400:
            raise _upstream_error(resp)
        data = resp.json()
        choice = data["choices"][0]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": choice["message"].get("content") or "",
        }
        if choice["message"].get("tool_calls"):
            message["tool_calls"] = _ollama_tool_calls(choice["message"]["tool_calls"])
        return {
            "model": body["model"],
            "created_at": _now(),
            "message": message,
            "done_reason": _done_reason(choice.get("finish_reason")),
            "done": True,
            **_stats(started, data.get("usage") or {}, data.get("timings") or {}),
        }

    def chat_stream(self, body: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        """Ollama's stream lines, translated from upstream's SSE chunks as they arrive."""
        started = time.monotonic()
        req = self.chat_request(body, True)
        with self._http.stream("POST", f"{self.upstream}/v1/chat/completions", json=req) as resp:
            if resp.status_code >= 400:
                raise _upstream_error(resp)
            finish: str | None = None
            usage: dict[str, Any] = {}
            timings: dict[str, Any] = {}
            calls: dict[int, dict[str, Any]] = {}
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    delta = choice.get("delta") or {}
                    for call in delta.get("tool_calls") or []:
                        slot = calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
                        fn = call.get("function") or {}
                        slot["name"] += fn.get("name") or ""
                        slot["arguments"] += fn.get("arguments") or ""
                    if delta.get("content"):
                        yield self._line(body, {"role": "assistant", "content": delta["content"]})
            if calls:
                tool_calls = _ollama_tool_calls([{"function": c} for c in calls.values()])
                yield self._line(
                    body, {"role": "assistant", "content": "", "tool_calls": tool_calls}
                )
        final = self._line(body, {"role": "assistant", "content": ""}, done=True)
        yield {**final, "done_reason": _done_reason(finish), **_stats(started, usage, timings)}

    @staticmethod
    def _line(body: dict[str, Any], message: dict[str, Any], done: bool = False) -> dict[str, Any]:
        return {"model": body["model"], "created_at": _now(), "message": message, "done": done}

    def embed(self, body: dict[str, Any], inputs: list[str]) -> tuple[list[list[float]], int]:
        if not inputs:
            return [], 0
        req = {"model": body["model"], "input": inputs}
        resp = self._http.post(f"{self.embed_upstream}/v1/embeddings", json=req)
        if resp.status_code >= 400:
            raise _upstream_error(resp)
        data = resp.json()
        rows = sorted(data["data"], key=lambda row: row.get("index", 0))
        return [row["embedding"] for row in rows], (data.get("usage") or {}).get("prompt_tokens", 0)


class _Handler(BaseHTTPRequestHandler):
    shim: OllamaShim
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _arrived(self) -> None:
        self.path = self.path.split("?", 1)[0]
        with self.shim._lock:
            self.shim.requests += 1
        time.sleep(self.shim.delay_s)

    def do_HEAD(self) -> None:
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._arrived()
        if self.path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif self.path == "/api/version":
            self._json(200, {"version": "0.0.0-shim"})
        elif self.path == "/api/tags":
            self._json(200, {"models": [_tag(name) for name in self.shim.models]})
        else:
            self._send(404, b"404 page not found", "text/plain")

    def do_POST(self) -> None:
        self._arrived()
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/api/chat":
                self._chat(raw)
            elif self.path in ("/api/embed", "/api/embeddings"):
                self._embed(self._body(raw))
            else:
                self._send(404, b"404 page not found", "text/plain")
        except _Error as exc:
            self._json(exc.status, {"error": str(exc)})
        except httpx.TransportError as exc:
            self._json(502, {"error": f"upstream unreachable: {exc!r}"})
        except OSError:  # the client went away mid-answer
            self.close_connection = True

    def _body(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _Error(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise _Error(400, "the body must be a JSON object")
        self.shim.check_model(body)
        return body

    def _chat(self, raw: bytes) -> None:
        shim = self.shim
        if shim.take("fail_next"):
            return self._json(500, {"error": "injected"})
        if shim.take("garbage_next"):
            return self._send(200, b"<html>oops</html>", "text/html")
        body = self._body(raw)
        if not isinstance(body.get("messages", []), list):
            raise _Error(400, "messages must be a list")
        truncate = shim.take("truncate_next")
        if not body.get("messages"):  # Ollama loads the model and says so
            line = shim._line(body, {"role": "assistant", "content": ""}, done=True)
            return self._json(200, {**line, "done_reason": "load"})
        if body.get("stream", True) is False:
            reply = shim.chat(body)
            if not truncate:
                return self._json(200, reply)
            self.close_connection = True
            cut = json.dumps(reply).encode()
            return self._send(200, cut[: len(cut) // 2])
        lines = shim.chat_stream(body)
        sent = 0
        try:
            for item in lines:
                if sent == 0:  # headers go once upstream produced something: errors stay HTTP
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                if truncate and (sent == 2 or item["done"] or "tool_calls" in item["message"]):
                    self.close_connection = True  # no final chunk: the client sees a cut body
                    return None
                self._chunk(json.dumps(item).encode() + b"\n")
                sent += 1
        except (_Error, httpx.TransportError) as exc:
            if sent == 0:
                raise
            self._chunk(json.dumps({"error": str(exc)}).encode() + b"\n")
        finally:
            lines.close()
        self._chunk(b"")
        return None

    def _embed(self, body: dict[str, Any]) -> None:
        started = time.monotonic()
        if self.path == "/api/embeddings":
            prompt = body.get("prompt") or ""
            vectors, _ = self.shim.embed(body, [prompt] if prompt else [])
            return self._json(200, {"embedding": vectors[0] if vectors else []})
        given = body.get("input", [])
        inputs = [given] if isinstance(given, str) else given
        if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
            raise _Error(400, "input must be a string or a list of strings")
        vectors, count = self.shim.embed(body, inputs)
        return self._json(
            200,
            {
                "model": body["model"],
                "embeddings": vectors,
                "total_duration": int((time.monotonic() - started) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": count,
            },
        )


def _tag(name: str) -> dict[str, Any]:
    family = name.split(":", 1)[0].rsplit("/", 1)[-1]
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "",
            "quantization_level": "",
        },
    }
