"""Run callbacks: when a run a webhook started ends, POST its JSON to the hook's callback URL.

The API process that accepted the hook sends it, embedded or in a cluster alike: one thread
follows the runs it started in the run store (a batch status read every ``poll_s``), and a small
pool of threads posts each finished run's JSON (``RunRecord.to_json``), signed with the hook's
secret (``X-Typhon-Signature``), without following redirects. A connection error, a timeout,
408, 429 or a 5xx is tried again, ``callback_backoff_s`` doubling between tries, up to
``callback_attempts`` tries; another 4xx ends it. Each outcome is a run event (``callback`` or
``callback_failed``, with the URL's host, the status and the tries). Callbacks are held in this
process's memory: a run still going when the process stops gets none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
import structlog

from typhon._types import RunStatus
from typhon.api._settings import ApiConfig
from typhon.store import RunStore, runs

__all__ = ["Callbacks", "sign"]

log = structlog.get_logger("typhon.api")
_FINISHED = [s.value for s in RunStatus if s.finished]


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Typhon-Signature`` value for ``body``: ``t=TIMESTAMP,v1=HMAC-SHA256-HEX`` of
    ``{timestamp}.{body}`` keyed by ``secret``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


@dataclass
class _Call:
    run_id: str
    url: str
    hook: str
    secret: str
    tries: int = 0
    next_at: float = 0.0
    body: bytes | None = None


class Callbacks:
    """Follows runs and posts their JSON to a URL when they end (see the module's docstring)."""

    def __init__(
        self,
        store: RunStore,
        settings: ApiConfig,
        *,
        poll_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ):
        self.store = store
        self.settings = settings
        self.poll_s = poll_s
        self._waiting: dict[str, list[_Call]] = {}  # run id -> calls waiting for its end
        self._due: list[_Call] = []  # calls with a body, to post at their next_at
        self._posting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="typhon-callback")
        self._client = httpx.Client(
            timeout=settings.callback_timeout_s, follow_redirects=False, transport=transport,
            headers={"User-Agent": "typhon-callback"},
        )  # fmt: skip

    def add(self, run_id: str, url: str, *, hook: str, secret: str) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("callbacks are closed")
            self._waiting.setdefault(run_id, []).append(_Call(run_id, url, hook, secret))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="typhon-callbacks", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def pending(self) -> int:
        """Callbacks not yet delivered or given up."""
        with self._cond:
            return sum(map(len, self._waiting.values())) + len(self._due) + self._posting

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            left = sum(map(len, self._waiting.values())) + len(self._due)
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
        if left:
            log.warning("callbacks not sent: the API is stopping", count=left)

    # -- the follower thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(self.poll_s)
                if self._closed:
                    return
                ids = list(self._waiting)
            try:
                for run_id in self._finished(ids):
                    self._ready(run_id)
            except Exception as exc:  # the store is down for a moment: try again next time
                log.warning("callbacks: cannot read run states", error=str(exc))
                continue
            now = time.monotonic()
            with self._cond:
                ready = [c for c in self._due if c.next_at <= now]
                self._due = [c for c in self._due if c.next_at > now]
                self._posting += len(ready)
            for call in ready:
                self._pool.submit(self._post, call)

    def _finished(self, ids: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = sa.select(runs.c.id).where(runs.c.id.in_(chunk), runs.c.status.in_(_FINISHED))
            with self.store.engine.connect() as conn:
                out += [str(row[0]) for row in conn.execute(query)]
        return out

    def _ready(self, run_id: str) -> None:
        body = json.dumps(self.store.get(run_id).to_json()).encode()
        with self._cond:
            for call in self._waiting.pop(run_id, []):
                call.body = body
                self._due.append(call)

    # -- posting ------------------------------------------------------------------------------
    def _post(self, call: _Call) -> None:
        try:
            self._attempt(call)
        except Exception as exc:  # never lose the pool thread
            log.warning("callback failed", run_id=call.run_id, error=str(exc))
        finally:
            with self._cond:
                self._posting -= 1

    def _attempt(self, call: _Call) -> None:
        assert call.body is not None
        call.tries += 1
        headers = {
            "Content-Type": "application/json",
            "X-Typhon-Run-Id": call.run_id,
            "X-Typhon-Signature": sign(call.secret, call.body),
        }
        status: int | None = None
        reason = ""
        try:
            status = self._client.post(call.url, content=call.body, headers=headers).status_code
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"[:300]
        host = urlsplit(call.url).hostname or ""
        data: dict[str, Any] = {"hook": call.hook, "host": host, "status": status,
                                "tries": call.tries}  # fmt: skip
        if status is not None and 200 <= status < 300:
            self._event(call.run_id, "callback", data)
            return
        again = status is None or status in (408, 429) or status >= 500
        if again and call.tries < self.settings.callback_attempts:
            delay = self.settings.callback_backoff_s * 2 ** (call.tries - 1)
            with self._cond:
                call.next_at = time.monotonic() + delay
                self._due.append(call)
                self._cond.notify()
            return
        self._event(call.run_id, "callback_failed", {**data, "reason": reason} if reason else data)
        log.warning("callback given up", run_id=call.run_id, host=host, status=status,
                    tries=call.tries, reason=reason)  # fmt: skip

    def _event(self, run_id: str, kind: str, data: dict[str, Any]) -> None:
        try:
            self.store.add_event(run_id, kind, data)
        except Exception as exc:
            log.warning("callback event not recorded", run_id=run_id, error=str(exc))
