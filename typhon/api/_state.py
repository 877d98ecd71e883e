"""What the routes share: the Typhon they submit through, the settings, the hooks, the token
store, the callback sender, and admission (the backlog limit)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from typhon.api._callbacks import Callbacks
from typhon.api._errors import ApiError
from typhon.api._settings import ApiConfig, HookConfig
from typhon.api._tokens import TokenInfo, TokenStore
from typhon.orchestrator import RunHandle, Typhon

__all__ = ["RUN_ID", "AppState", "check_run_id", "state_of", "token_of"]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def check_run_id(run_id: str) -> str:
    """A run id is 32 hex characters; anything else is no run, without asking the store."""
    if not RUN_ID.match(run_id):
        raise ApiError(404, "run_not_found", "no run with that id (run ids are 32 hex characters)")
    return run_id


@dataclass
class AppState:
    typhon: Typhon
    settings: ApiConfig
    hooks: dict[str, HookConfig]
    tokens: TokenStore
    callbacks: Callbacks
    admit_lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, crew: str, input: str, options: dict[str, Any]) -> RunHandle:
        """Submit a run, unless its pool's backlog (queued + running) is at ``max_backlog``:
        then 429 with Retry-After. One submission at a time per process while a limit is set,
        so that concurrent requests cannot pass it together."""
        limit = self.settings.max_backlog
        if limit is None:
            return self.typhon.submit(crew, input, **options)
        typhon = self.typhon
        cls = typhon.crews.get(crew)  # UnknownCrewError before any counting
        pool = typhon.config.pool(typhon.config.crew_settings(crew).pool or cls.pool).name
        with self.admit_lock:
            counts = typhon.store.counts().get(pool, {})
            backlog = counts.get("queued", 0) + counts.get("running", 0)
            if backlog >= limit:
                retry = str(self.settings.retry_after_s)
                raise ApiError(
                    429, "backlog_full",
                    f"pool {pool} has {backlog} runs queued or running, at its limit of {limit};"
                    f" try again in {retry}s", headers={"Retry-After": retry},
                )  # fmt: skip
            return typhon.submit(crew, input, **options)


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.typhon_api
    return state


def token_of(request: Request) -> TokenInfo | None:
    """The token the request came with (None on routes that need none)."""
    token: TokenInfo | None = getattr(request.state, "token", None)
    return token
