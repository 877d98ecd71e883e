"""The HTTP API (runs, webhooks, activity, hardware, metrics): ``typhon serve``.

Nothing heavy at import: ``create_app`` (FastAPI) loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typhon.api._settings import ApiConfig, HookConfig

if TYPE_CHECKING:
    from typhon.api._app import create_app

__all__ = ["ApiConfig", "HookConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from typhon.api._app import create_app

        return create_app
    raise AttributeError(f"module 'typhon.api' has no attribute {name!r}")
