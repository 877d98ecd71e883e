"""The real API under uvicorn on 127.0.0.1 (a thread of the test process), quick crews for it,
and a loopback HTTP server that records the callbacks it receives."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uvicorn

from typhon import RunContext, Typhon
from typhon.api import ApiConfig, HookConfig, create_app
from typhon.api._tokens import TokenStore
from typhon.config import ImproveConfig, TyphonConfig
from typhon.crews import CrewRegistry, crew
from typhon.errors import RunWaiting
from typhon.store import RunStore
from typhon.testing import ScriptedModel, ScriptedModels

GATE = threading.Event()  # the `gated` crew waits for it


def quick_registry() -> CrewRegistry:
    reg = CrewRegistry(builtins={})

    @crew("steps", registry=reg)
    def steps(ctx: RunContext) -> str:
        """Three steps, then the input back."""
        for name in ("read", "think", "write"):
            ctx.check_cancelled()
            ctx.step(name)
        return f"done: {ctx.input}"

    @crew("gated", registry=reg)
    def gated(ctx: RunContext) -> str:
        """Waits for GATE (or its cancellation)."""
        while not GATE.wait(0.05):
            ctx.check_cancelled()
        return "opened"

    @crew("approval", registry=reg)
    def approval(ctx: RunContext) -> str:
        """Waits for a person's approval, then answers with the decision."""
        answer = ctx.approval()
        if answer is None:
            raise RunWaiting(ctx.run_id)
        return f"{answer['decision']}: {answer.get('note', '')}"

    return reg


def quick_config(home: Path, **overrides: Any) -> TyphonConfig:
    """Embedded, no QA reviews (no model server needed)."""
    return TyphonConfig(home=home, improve=ImproveConfig(review=False), **overrides)


def quick_typhon(config: TyphonConfig, store: RunStore | None = None) -> Typhon:
    models = ScriptedModels(config, ScriptedModel("ok"))
    return Typhon(config, registry=quick_registry(), store=store, models=models)


class Server:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: Any):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", backlog=512)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class Api:
    """A running API over an embedded Typhon, and tokens of every scope."""

    def __init__(
        self,
        typhon: Typhon,
        *,
        settings: ApiConfig | None = None,
        hooks: dict[str, HookConfig] | None = None,
    ):
        self.typhon = typhon
        self.store = typhon.store
        self.app = create_app(typhon, settings=settings or ApiConfig(), hooks=hooks or {})
        tokens = TokenStore(typhon.store)
        self.tokens = {scope: tokens.create(scope, f"test-{scope}")[1]
                       for scope in ("read", "submit", "admin")}  # fmt: skip
        self.server = Server(self.app).start()
        self.url = self.server.url

    def auth(self, scope: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}

    def close(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def running_api(typhon: Typhon, **kwargs: Any) -> Iterator[Api]:
    api = Api(typhon, **kwargs)
    try:
        yield api
    finally:
        api.close()


class CallbackSink:
    """A loopback HTTP server recording POSTs; ``statuses`` scripts its answers (the last
    repeats)."""

    def __init__(self, statuses: tuple[int, ...] = (200,)):
        self.received: list[dict[str, Any]] = []
        self.statuses = list(statuses)
        self.arrived = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.arrived:
                    status = sink.statuses.pop(0) if len(sink.statuses) > 1 else sink.statuses[0]
                    sink.received.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body,
                         "status": status}
                    )  # fmt: skip
                    sink.arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
    ) -> None:
        with self.arrived:
            if not self.arrived.wait_for(lambda: predicate(self.received), timeout):
                raise AssertionError(f"callbacks not received as expected: {self.received}")

    def json(self, i: int) -> Any:
        return json.loads(self.received[i]["body"])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_final(store: RunStore, run_ids: list[str], timeout: float = 120) -> None:
    """Until every run has finished (the test's own bound, not an assertion on time)."""
    deadline = time.monotonic() + timeout
    left = set(run_ids)
    while left:
        left = {r for r in left if not store.status(r).finished}
        if left and time.monotonic() > deadline:
            raise AssertionError(f"{len(left)} runs did not finish: {sorted(left)[:5]}")
        time.sleep(0.05)
