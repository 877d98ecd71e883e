"""``POST /v1/hooks/{name}``: webhooks (n8n's HTTP Request node, or any caller holding the
hook's secret) that start a run and answer ``202 {run_id, status}`` at once.

Authentication, before the body is parsed: the secret itself in ``X-Typhon-Hook-Token``, or an
HMAC-SHA256 of ``{timestamp}.{body}`` in ``X-Typhon-Signature: t=TIMESTAMP,v1=HEX`` accepted
within ``api.signature_window_s`` of its timestamp and only once (each signature is remembered
in the store until it expires). The run's input comes from the JSON body by the hook's mapping
(:class:`~typhon.api._settings.HookConfig`); when the run ends, its JSON is POSTed to the
callback URL, if the hook has one (see :mod:`typhon.api._callbacks`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from typhon._types import RunStatus
from typhon.api._errors import ApiError, check_text
from typhon.api._runs import Accepted
from typhon.api._settings import HOOK_NAME, HookConfig
from typhon.api._state import AppState, state_of
from typhon.api._tokens import remember_signature
from typhon.store import RunStore

__all__ = ["SIGNATURE_HEADER", "TOKEN_HEADER", "lookup", "render_input", "router", "verify"]

TOKEN_HEADER = "X-Typhon-Hook-Token"
SIGNATURE_HEADER = "X-Typhon-Signature"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
_MISSING = object()

router = APIRouter(tags=["hooks"])


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message)


def verify(
    hook: HookConfig,
    name: str,
    headers: Mapping[str, str],
    body: bytes,
    store: RunStore,
    window_s: int,
    now: float | None = None,
) -> None:
    """Check the request's secret or signature; ApiError 401 when it does not hold."""
    signature = headers.get(SIGNATURE_HEADER.lower())
    token = headers.get(TOKEN_HEADER.lower())
    if signature is not None and hook.auth != "token":
        _check_signature(hook, name, signature, body, store, window_s, now)
        return
    if token is not None and hook.auth != "signature":
        if not hmac.compare_digest(_sha256(token), _sha256(hook.secret)):  # length hidden too
            raise _unauthorized("bad_hook_token", f"the {TOKEN_HEADER} header is not this hook's")
        return
    wanted = {
        "token": TOKEN_HEADER, "signature": SIGNATURE_HEADER,
        "either": f"{TOKEN_HEADER} or {SIGNATURE_HEADER}",
    }[hook.auth]  # fmt: skip
    raise _unauthorized("hook_auth_required", f"hook '{name}' needs the {wanted} header")


def _check_signature(
    hook: HookConfig,
    name: str,
    header: str,
    body: bytes,
    store: RunStore,
    window_s: int,
    now: float | None,
) -> None:
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    stamp = (fields.get("t") or [""])[0]
    if not stamp.isdigit() or len(stamp) > 12 or not fields.get("v1"):
        raise _unauthorized("bad_signature", f"{SIGNATURE_HEADER} must read t=TIMESTAMP,v1=HEX")
    t = int(stamp)
    now = time.time() if now is None else now
    if abs(now - t) > window_s:
        raise _unauthorized(
            "stale_signature",
            f"the signature's timestamp is {int(now - t)}s from now, outside the {window_s}s"
            " window; sign each request as it is sent",
        )
    expected = hmac.new(hook.secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected.encode(), v.encode()) for v in fields["v1"]):
        raise _unauthorized("bad_signature", "the signature does not match the body")
    if not remember_signature(store, name, expected, t + window_s + 1):
        raise _unauthorized("replayed_signature", "this signature was used already")


def lookup(payload: Any, path: str) -> Any:
    """The value at a dotted path (``body.topic``, ``items.0.text``); ``_MISSING`` if none."""
    node = payload
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def render_input(hook: HookConfig, name: str, payload: Any) -> str:
    """The run's input from the webhook's JSON, by the hook's template or ``input_field``."""

    def at(path: str) -> Any:
        value = lookup(payload, path)
        if value is _MISSING or value is None:
            raise ApiError(
                422, "invalid_input", f"hook '{name}': the JSON body has no value at '{path}'"
            )
        return value

    if hook.input_template is not None:
        return _PLACEHOLDER.sub(lambda m: _text(at(m.group(1))), hook.input_template)
    return _text(at(hook.input_field))


def _callback(hook: HookConfig, name: str, payload: Any) -> str | None:
    url = lookup(payload, hook.callback_field) if hook.allow_payload_callback else _MISSING
    if url is _MISSING or url is None:
        return hook.callback_url
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(
            422, "invalid_callback", f"hook '{name}': {hook.callback_field} is not an http(s) URL"
        )
    if hook.callback_hosts and parts.hostname not in hook.callback_hosts:
        raise ApiError(
            422, "invalid_callback",
            f"hook '{name}': callback host {parts.hostname} is not one of its callback_hosts",
        )  # fmt: skip
    return str(url)


def _accept(state: AppState, hook: HookConfig, name: str, headers: Mapping[str, str],
            body: bytes) -> str:  # fmt: skip
    verify(hook, name, headers, body, state.typhon.store, state.settings.signature_window_s)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    text = render_input(hook, name, payload)
    check_text(text, f"hook '{name}' input")
    callback = _callback(hook, name, payload)
    options = {**hook.options, "source": "hook", "hook": name}
    handle = state.submit(hook.crew or name, text, options)
    if callback is not None:
        state.callbacks.add(handle.run_id, callback, hook=name, secret=hook.secret)
    return handle.run_id


_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Any JSON; the hook's mapping takes the run's input from it.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    "parameters": [
        {"name": TOKEN_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
         "description": "The hook's secret (auth: token or either)."},
        {"name": SIGNATURE_HEADER, "in": "header", "required": False,
         "schema": {"type": "string"},
         "description": "t=TIMESTAMP,v1=HMAC-SHA256 of TIMESTAMP.BODY (auth: signature)."},
    ],
}  # fmt: skip


@router.post("/v1/hooks/{name}", status_code=202, response_model=Accepted, openapi_extra=_OPENAPI)
async def run_hook(name: str, request: Request) -> JSONResponse:
    """Start a run from a webhook (see the module's docstring for the headers and the body)."""
    state = state_of(request)
    hook = state.hooks.get(name) if HOOK_NAME.match(name) else None
    if hook is None:
        raise ApiError(404, "unknown_hook", f"no hook '{name[:64]}'; hooks are set in typhon.yaml")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    run_id = await anyio.to_thread.run_sync(_accept, state, hook, name, headers, body)
    return JSONResponse(
        {"run_id": run_id, "status": RunStatus.QUEUED.value},
        status_code=202,
        headers={"Location": f"/v1/runs/{run_id}"},
    )
