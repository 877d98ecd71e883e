"""An OpenAI-compatible embeddings server over an :class:`~typhon.memory._embed.Embedder`.

For clients that take an embeddings endpoint rather than a Python object (Letta's
``embedding_endpoint``): ``POST /v1/embeddings`` and ``GET /v1/models``, on a stdlib
``ThreadingHTTPServer`` in a thread of this process.

``POST /v1/embeddings`` takes ``{"model", "input": str | [str, ...], "encoding_format": "float" |
"base64", "dimensions"}`` (``model`` is not checked: the server has one model) and answers
``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": ...}], "model",
"usage": {"prompt_tokens", "total_tokens"}}``; a base64 embedding is the little-endian float32
bytes of the vector, as the OpenAI API sends it. A bad request answers 400 with
``{"error": {"message", "type": "invalid_request_error"}}``.

The server has no authentication: it listens on loopback unless ``allow_remote=True``.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import socket
import struct
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from typhon.memory._embed import Embedder

__all__ = ["EmbeddingServer"]

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_INPUTS = 2048  # the OpenAI API's limit per request


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    """Keeps its open connections, so that stopping closes the keep-alive ones too."""

    daemon_threads = True
    embedder: Embedder

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        super().__init__(address, handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the handler thread sees EOF and closes it


class _Server6(_Server):
    address_family = socket.AF_INET6


class EmbeddingServer:
    """Serves ``embedder`` over HTTP on ``host:port`` (0: a free port) until :meth:`stop`.

    ``start()`` returns the base URL, ending in ``/v1``: give it to an OpenAI client as its
    ``base_url`` (or to Letta as its ``embedding_endpoint``). Usable as a context manager."""

    def __init__(
        self,
        embedder: Embedder,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_remote: bool = False,
    ):
        if not allow_remote and not _is_loopback(host):
            raise ValueError(
                f"refusing to serve embeddings on {host}: the server has no authentication;"
                " use a loopback address or pass allow_remote=True"
            )
        self.embedder = embedder
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedding server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._server.server_port}/v1"

    def start(self) -> str:
        if self._server is not None:
            return self.url
        cls = _Server6 if ":" in self.host else _Server
        server = cls((self.host, self.port), _Handler)
        server.embedder = self.embedder
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"typhon-embed-server:{server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(5)

    def __enter__(self) -> EmbeddingServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    server_version = "typhon-embed"
    timeout = 60  # an idle keep-alive connection is closed after this

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log on stderr

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            model = self.server.embedder.model
            self._send(200, {"object": "list", "data": [_model_card(model)]})
        elif path.startswith(("/v1/models/", "/models/")):
            name = path.rsplit("/", 1)[1]
            if name == self.server.embedder.model:
                self._send(200, _model_card(name))
            else:
                self._error(404, f"no model '{name}'", "not_found_error")
        elif path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {path}", "not_found_error")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._body()
            if path not in ("/v1/embeddings", "/embeddings"):
                self._error(404, f"no route POST {path}", "not_found_error")
                return
            texts, binary = _parse(body, self.server.embedder)
        except _BadRequest as exc:
            self._error(exc.status, str(exc), "invalid_request_error")
            return
        embedder = self.server.embedder
        try:
            vectors = embedder.embed(texts)
            tokens = _count_tokens(embedder, texts)
        except Exception as exc:  # the server answers; the error goes to the client
            self._error(500, f"embedding failed: {type(exc).__name__}: {exc}", "server_error")
            return
        data = [
            {"object": "embedding", "index": i, "embedding": _b64(v) if binary else v}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._send(200, {"object": "list", "data": data, "model": embedder.model, "usage": usage})

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _BadRequest("bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            raise _BadRequest(f"request body over {MAX_BODY_BYTES} bytes", 413)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _BadRequest(f"the request body is not valid JSON: {exc}") from None

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": None}})

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _model_card(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "typhon"}


def _parse(body: Any, embedder: Embedder) -> tuple[list[str], bool]:
    """The texts and whether to answer base64, or :class:`_BadRequest`."""
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    if "input" not in body:
        raise _BadRequest("'input' is required")
    raw = body["input"]
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _BadRequest(
            "'input' must be a string or a list of strings (token arrays are not served)"
        )
    if not texts:
        raise _BadRequest("'input' is empty")
    if any(not t for t in texts):
        raise _BadRequest("'input' holds an empty string")
    if len(texts) > MAX_INPUTS:
        raise _BadRequest(f"'input' holds {len(texts)} texts; at most {MAX_INPUTS} per request")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _BadRequest(f"'encoding_format' must be 'float' or 'base64', not {fmt!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != embedder.dim:
        raise _BadRequest(
            f"'dimensions' {dimensions!r} not served: this model gives {embedder.dim}"
        )
    return texts, fmt == "base64"


def _count_tokens(embedder: Embedder, texts: Sequence[str]) -> int:
    count = getattr(embedder, "count_tokens", None)
    if callable(count):
        return int(count(texts))
    return sum(len(t.split()) for t in texts)  # an estimate for embedders that cannot tell


def _b64(vector: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
