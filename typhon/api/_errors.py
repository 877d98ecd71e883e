"""Every error the API answers has one shape: ``{"error": {"code", "message"}}``.

Bad input is always a 4xx: malformed JSON 400, a body that does not fit the route's schema 422,
no or a wrong token 401, a token without the scope 403, an unknown run or hook 404, an unknown
crew 422 (it is a field of the request), a run in the wrong state 409, a body over the limit
413, too much at once 429. A 5xx means the server could not do its part (the store or the
broker down, a bug).
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from typhon.errors import (
    BrokerUnavailableError,
    DispatchError,
    InputError,
    RunNotFoundError,
    TyphonError,
    UnknownCrewError,
)

__all__ = ["ApiError", "check_text", "error_body", "error_response", "install_handlers"]

log = structlog.get_logger("typhon.api")

_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media",
    422: "invalid_request", 429: "too_many_requests", 500: "internal_error",
    503: "unavailable",
}  # fmt: skip


class ApiError(Exception):
    """An error answered as it is: ``status``, ``code``, ``message`` and extra headers."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ):
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        super().__init__(message)


def check_text(value: Any, where: str) -> None:
    """ApiError 422 when a string in ``value`` (a JSON value) holds a NUL or a lone surrogate:
    text that no store keeps (PostgreSQL refuses both, UTF-8 the second)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ApiError(422, "invalid_input", f"{where}: text holds a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                422, "invalid_input", f"{where}: text is not valid Unicode (a lone surrogate)"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, where)
    elif isinstance(value, list):
        for item in value:
            check_text(item, where)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _status_of(exc: TyphonError) -> int:
    if isinstance(exc, RunNotFoundError):
        return 404
    if isinstance(exc, UnknownCrewError | InputError):
        return 422
    if isinstance(exc, BrokerUnavailableError | DispatchError):
        return 503
    return 500


def _where(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if parts[0] == "body" else parts
    return ".".join(parts) or "body"


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "invalid_json", "the body is not valid JSON")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    message = f"{_where(tuple(first.get('loc', ())))}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_response(422, "invalid_request", message[:500])


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path[:200]}"
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def _api(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _typhon(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TyphonError)
    status = _status_of(exc)
    if status >= 500:
        log.warning("request failed", path=request.url.path, error=str(exc))
    return error_response(status, exc.code, str(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request failed unexpectedly", path=request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "the server failed; see its log")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ApiError, _api)
    app.add_exception_handler(TyphonError, _typhon)
    app.add_exception_handler(Exception, _unexpected)
