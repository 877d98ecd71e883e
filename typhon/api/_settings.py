"""Settings of the HTTP API (``api:``) and of its webhooks (``hooks:``) in typhon.yaml.

Kept apart from :mod:`typhon.config`, which holds them as ``TyphonConfig.api`` and
``TyphonConfig.hooks``; this module imports nothing of Typhon, so that the configuration can
import it. :func:`api_settings` and :func:`hook_settings` read them from a configuration that
may not carry them yet (defaults: the API's, and no hooks).
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["HOOK_NAME", "ApiConfig", "HookConfig", "api_settings", "hook_settings"]

HOOK_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PATH = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{value}' is not an http(s) URL with a host")
    return value


class ApiConfig(_Strict):
    """``typhon serve``: where it listens and what it accepts.

    ``max_body_bytes``: larger request bodies are refused (413) before they are read.
    ``max_in_flight``: requests handled at once (event streams aside); more are refused (429).
    ``max_backlog``: runs queued or running per pool; a submission beyond it is refused (429,
    ``Retry-After: retry_after_s``); None: no limit. Webhook signatures are accepted within
    ``signature_window_s`` of their timestamp, once. Run callbacks are tried ``callback_attempts``
    times, ``callback_backoff_s`` doubling between tries. ``public_docs``: /docs and
    /openapi.json without a token (they hold the API's shape, no data)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=1, le=65535)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_in_flight: int = Field(default=64, ge=1)
    max_backlog: int | None = Field(default=1000, ge=1)
    retry_after_s: int = Field(default=2, ge=1, le=3600)
    signature_window_s: int = Field(default=300, ge=10, le=3600)
    callback_attempts: int = Field(default=6, ge=1, le=20)
    callback_backoff_s: float = Field(default=2.0, gt=0, le=600)
    callback_timeout_s: float = Field(default=10.0, gt=0, le=300)
    public_docs: bool = False


class HookConfig(_Strict):
    """One webhook, ``POST /v1/hooks/{name}``: starts a run of ``crew`` (default: the hook's
    name) and answers 202 with its id at once.

    Authenticated by ``secret``: sent as it is in ``X-Typhon-Hook-Token`` (``auth: token``), or
    used as the key of an HMAC-SHA256 of ``{timestamp}.{body}`` sent as
    ``X-Typhon-Signature: t=TIMESTAMP,v1=HEX`` (``auth: signature``); ``either`` (the default)
    takes both. The run's input: the value at ``input_field``, a dotted path into the JSON body
    (``body.topic``, ``items.0.text``); or ``input_template`` with ``{{dotted.path}}``
    placeholders filled from the body. ``options`` are the runs' crew options.

    When the run ends its JSON is POSTed to ``callback_url``, or, with
    ``allow_payload_callback``, to the URL at ``callback_field`` of the body (n8n's
    ``$execution.resumeUrl``), whose host must then be one of ``callback_hosts`` when that list
    is given."""

    crew: str | None = None
    secret: str = Field(min_length=16)
    auth: Literal["token", "signature", "either"] = "either"
    input_field: str = "input"
    input_template: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = None
    allow_payload_callback: bool = False
    callback_field: str = "callback_url"
    callback_hosts: list[str] = Field(default_factory=list)

    @field_validator("input_field", "callback_field")
    @classmethod
    def _dotted(cls, v: str) -> str:
        if not _PATH.match(v):
            raise ValueError(f"'{v}' is not a dotted path such as body.topic")
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, v: str | None) -> str | None:
        return _http_url(v)

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not key.isidentifier():
                raise ValueError(f"option '{key}' is not a name such as no_cache")
        return v

    @model_validator(mode="after")
    def _template(self) -> HookConfig:
        if self.input_template is not None and not self.input_template.strip():
            raise ValueError("input_template is empty; leave it out to use input_field")
        return self


def api_settings(config: object) -> ApiConfig:
    """The configuration's ``api`` section, or the defaults."""
    value = getattr(config, "api", None)
    return value if isinstance(value, ApiConfig) else ApiConfig()


def hook_settings(config: object) -> dict[str, HookConfig]:
    """The configuration's ``hooks``; ValueError for a name that cannot be a URL segment."""
    hooks = getattr(config, "hooks", None) or {}
    for name in hooks:
        if not HOOK_NAME.match(name):
            raise ValueError(f"hook name '{name}' must be letters, digits, _ or - (at most 64)")
    return dict(hooks)
