"""The HTTP API's parts that need no server: settings, scopes by route, the webhook mapping and
signature format, and that importing the package (and the CLI) loads no web framework."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from typhon.api import ApiConfig, HookConfig
from typhon.api._callbacks import sign
from typhon.api._guard import scope_needed
from typhon.api._hooks import lookup, render_input
from typhon.api._server import is_loopback
from typhon.api._settings import api_settings, hook_settings
from typhon.api._tokens import allows
from typhon.config import TyphonConfig

SECRET = "s" * 16


def test_defaults_and_the_configuration_that_does_not_carry_them_yet() -> None:
    settings = api_settings(TyphonConfig())
    assert (settings.host, settings.port, settings.max_body_bytes) == ("127.0.0.1", 8700, 262144)
    assert hook_settings(TyphonConfig()) == {}

    from types import SimpleNamespace

    with_hooks = SimpleNamespace(
        api=ApiConfig(port=9000), hooks={"research": HookConfig(secret=SECRET)}
    )
    assert api_settings(with_hooks).port == 9000
    assert list(hook_settings(with_hooks)) == ["research"]
    bad_name = SimpleNamespace(hooks={"../x": HookConfig(secret=SECRET)})
    with pytest.raises(ValueError, match="hook name"):
        hook_settings(bad_name)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"secret": "short"}, "at least 16"),
        ({"secret": SECRET, "input_field": "body..topic"}, "dotted path"),
        ({"secret": SECRET, "callback_url": "ftp://host/x"}, "http"),
        ({"secret": SECRET, "options": {"a-b": 1}}, "option"),
        ({"secret": SECRET, "input_template": "  "}, "empty"),
        ({"secret": SECRET, "auth": "none"}, "auth"),
        ({"secret": SECRET, "unknown": 1}, "unknown"),
    ],
)
def test_hook_settings_are_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HookConfig(**fields)


def test_api_settings_are_checked() -> None:
    with pytest.raises(ValidationError):
        ApiConfig(max_body_bytes=10)
    with pytest.raises(ValidationError):
        ApiConfig(port=0)


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/healthz", None),
        ("POST", "/v1/hooks/research", None),
        ("GET", "/", None),
        ("GET", "/ui/app.js", None),
        ("POST", "/", "submit"),
        ("GET", "/v1/cluster", "read"),
        ("GET", "/v1/runs", "read"),
        ("HEAD", "/v1/runs", "read"),
        ("GET", "/openapi.json", "read"),
        ("GET", "/metrics", "read"),
        ("POST", "/v1/runs", "submit"),
        ("POST", "/v1/runs/abc/cancel", "submit"),
        ("POST", "/v1/runs/abc/feedback", "submit"),
        ("POST", "/activity", "submit"),
        ("DELETE", "/v1/runs", "submit"),
        ("POST", "/v1/runs/abc/approve", "admin"),
        ("POST", "/v1/runs/abc/reject/", "admin"),
    ],
)
def test_scope_by_route(method: str, path: str, scope: str | None) -> None:
    assert scope_needed(method, path) == scope


def test_public_docs_need_no_token_when_asked() -> None:
    assert scope_needed("GET", "/openapi.json", public_docs=True) is None
    assert scope_needed("GET", "/v1/runs", public_docs=True) == "read"


def test_scopes_nest() -> None:
    assert [allows(have, "submit") for have in ("read", "submit", "admin", "root")] == [
        False, True, True, False,
    ]  # fmt: skip
    assert allows("admin", "admin") and not allows("submit", "admin") and allows("read", "read")


def test_lookup_by_dotted_path() -> None:
    payload = {"body": {"topic": "tides", "items": [{"text": "a"}, {"text": "b"}]}}
    assert lookup(payload, "body.topic") == "tides"
    assert lookup(payload, "body.items.1.text") == "b"
    for missing in ("body.nope", "body.items.2.text", "body.topic.x", "body.items.-1"):
        with pytest.raises(Exception, match="no value"):
            render_input(HookConfig(secret=SECRET, input_field=missing), "h", payload)


def test_input_from_a_field_or_a_template() -> None:
    payload = {"topic": "tides", "n": 3, "tags": ["a", "b"]}
    assert render_input(HookConfig(secret=SECRET, input_field="topic"), "h", payload) == "tides"
    assert render_input(HookConfig(secret=SECRET, input_field="n"), "h", payload) == "3"
    assert render_input(HookConfig(secret=SECRET, input_field="tags"), "h", payload) == '["a", "b"]'
    hook = HookConfig(secret=SECRET, input_template="Write {{n}} lines on {{ topic }}, {{tags.0}}")
    assert render_input(hook, "h", payload) == "Write 3 lines on tides, a"
    assert render_input(HookConfig(secret=SECRET, input_template="{x} {{topic}}"), "h",
                        payload) == "{x} tides"  # fmt: skip


def test_signature_format() -> None:
    header = sign("key", b'{"a": 1}', 1700000000)
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    expected = hmac.new(b"key", b'1700000000.{"a": 1}', hashlib.sha256).hexdigest()
    assert v1 == f"v1={expected}"


def test_loopback_hosts() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.1.2.3")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "example.lan")] == [False] * 4


def test_importing_the_package_and_the_cli_loads_no_web_framework() -> None:
    probe = (
        "import sys, json, typhon.api, typhon.cli\n"
        "print(json.dumps([m for m in ('fastapi', 'starlette', 'uvicorn', 'httpx')"
        " if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
