"""The gate every request passes before any route sees it (a plain ASGI middleware).

In order: ``/healthz`` goes straight through; a declared body over the limit is refused (413)
and a body that grows past it while read stops with 413 too, before anything parses it; past
``max_in_flight`` requests at once (event streams aside) the answer is 429; then the bearer
token: none or a wrong one 401, one without the scope 403. Webhooks carry their own secret and
skip the token. Scopes by route: GET and HEAD need ``read``; approving or rejecting a run
``admin``; any other POST ``submit``.
"""

from __future__ import annotations

import json

import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from typhon.api._errors import error_body
from typhon.api._settings import ApiConfig
from typhon.api._tokens import Scope as TokenScope
from typhon.api._tokens import TokenStore, allows

__all__ = ["BodyTooLarge", "Guard", "scope_needed"]

PUBLIC = "/healthz"
HOOKS = "/v1/hooks/"
# The Command UI's page and its files (GET): no data; the page asks for a token for the rest.
UI_PAGE = "/"
UI_FILES = "/ui/"
DOCS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")


class BodyTooLarge(HTTPException):
    """The body grew past the limit while it was read."""

    def __init__(self, limit: int):
        super().__init__(413, f"the body is over the limit of {limit:,} bytes")


def scope_needed(method: str, path: str, *, public_docs: bool = False) -> TokenScope | None:
    """The token scope a request needs; None when it needs no token."""
    if path == PUBLIC or path.startswith(HOOKS) or (public_docs and path in DOCS):
        return None
    if method in ("GET", "HEAD") and (path == UI_PAGE or path.startswith(UI_FILES)):
        return None
    if method in ("GET", "HEAD"):
        return "read"
    if method == "POST" and path.rstrip("/").endswith(("/approve", "/reject")):
        return "admin"
    return "submit"


async def _refuse(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(code, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class Guard:
    def __init__(self, app: ASGIApp, *, settings: ApiConfig, tokens: TokenStore):
        self.app = app
        self.settings = settings
        self.tokens = tokens
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == PUBLIC:
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _refuse(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(declared) > limit:
                await _refuse(send, 413, "body_too_large",
                              f"the body is {int(declared):,} bytes, over the limit of"
                              f" {limit:,}")  # fmt: skip
                return
        if b"%00" in scope.get("query_string", b""):
            await _refuse(send, 400, "bad_request", "the query string holds a NUL character")
            return
        streaming = scope["path"].endswith("/events")
        if not streaming and self.in_flight >= self.settings.max_in_flight:
            retry = str(self.settings.retry_after_s)
            await _refuse(send, 429, "too_many_requests",
                          f"{self.in_flight} requests in progress; try again in {retry}s",
                          {"Retry-After": retry})  # fmt: skip
            return
        if not streaming:
            self.in_flight += 1
        try:
            if await self._authorized(scope, send):
                await self.app(scope, _limited(receive, limit), send)
        finally:
            if not streaming:
                self.in_flight -= 1

    async def _authorized(self, scope: Scope, send: Send) -> bool:
        need = scope_needed(scope["method"], scope["path"], public_docs=self.settings.public_docs)
        if need is None:
            return True
        header = _header(scope, b"authorization") or ""
        kind, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if kind.lower() != "bearer" or not token.strip():
            await _refuse(send, 401, "unauthorized",
                          "this route needs an API token: send `Authorization: Bearer TOKEN`"
                          " (create one with `typhon tokens create`)", challenge)  # fmt: skip
            return False
        info = await anyio.to_thread.run_sync(self.tokens.check, token.strip())
        if info is None:
            await _refuse(send, 401, "unauthorized", "the API token is unknown or revoked",
                          challenge)  # fmt: skip
            return False
        if not allows(info.scope, need):
            await _refuse(send, 403, "forbidden",
                          f"this route needs a token with scope {need}; this one has"
                          f" {info.scope}")  # fmt: skip
            return False
        scope.setdefault("state", {})["token"] = info
        return True


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited
