"""200 concurrent `POST /v1/runs` on loopback: each accepted (202) or refused with 429 and the
error shape, none lost (every accepted id reaches a final state, and the store holds exactly
the accepted runs). Embedded over SQLite and PostgreSQL, and in a cluster of real workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Cluster
from support.api import GATE, Api, quick_config, quick_typhon, running_api, wait_final

from typhon import Typhon
from typhon.api import ApiConfig
from typhon.config import load_config
from typhon.store import RunStore

N = 200


async def _burst(api: Api, crew: str, n: int = N) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=api.url, limits=limits, timeout=120) as client:
        posts = [
            client.post("/v1/runs", headers=api.auth("submit"),
                        json={"crew": crew, "input": f"request {i}",
                              "options": {"no_memory": True}})
            for i in range(n)
        ]  # fmt: skip
        return list(await asyncio.gather(*posts))


def _split(responses: list[httpx.Response]) -> list[str]:
    """The accepted run ids; every other answer must be a well-formed 429."""
    accepted: list[str] = []
    for r in responses:
        if r.status_code == 202:
            accepted.append(r.json()["run_id"])
            continue
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert set(r.json()["error"]) == {"code", "message"}
        assert r.json()["error"]["code"] in ("too_many_requests", "backlog_full")
    assert len(set(accepted)) == len(accepted)
    return accepted


def _none_lost(store: RunStore, accepted: list[str], status: str = "succeeded") -> None:
    wait_final(store, accepted, timeout=600)
    assert sorted(r.id for r in store.list_runs(limit=1000)) == sorted(accepted)
    assert {store.get(i).status.value for i in accepted} == {status}


def test_200_concurrent_submissions_embedded(store: RunStore, home: Path) -> None:
    with quick_typhon(quick_config(home), store) as typhon, running_api(typhon) as api:
        accepted = _split(asyncio.run(_burst(api, "steps")))
        assert accepted
        _none_lost(store, accepted)


def test_200_concurrent_submissions_against_a_full_backlog(store: RunStore, home: Path) -> None:
    """Runs that wait hold the backlog: exactly max_backlog are accepted, the rest get 429."""
    GATE.clear()
    settings = ApiConfig(max_backlog=50)
    with (
        quick_typhon(quick_config(home), store) as typhon,
        running_api(typhon, settings=settings) as api,
    ):
        try:
            responses = asyncio.run(_burst(api, "gated"))
        finally:
            GATE.set()
        accepted = _split(responses)
        assert len(accepted) == 50
        assert any(r.json()["error"]["code"] == "backlog_full" for r in responses
                   if r.status_code == 429)  # fmt: skip
        _none_lost(store, accepted)


CREWS = """
from typhon import crew

@crew("steps")
def steps(ctx):
    for name in ("read", "think", "write"):
        ctx.step(name)
    return "done: " + ctx.input
"""


def test_200_concurrent_submissions_to_a_cluster(
    make_cluster: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = make_cluster(CREWS, pools={"research": "cap: 4"},
                           extra_yaml="improve: {review: false}\n")  # fmt: skip
    cluster.start_worker()
    monkeypatch.syspath_prepend(str(cluster.dir))
    with (
        Typhon(load_config(cluster.config_path, environ={})) as typhon,
        running_api(typhon) as api,
    ):
        assert not typhon.embedded
        accepted = _split(asyncio.run(_burst(api, "steps")))
        assert accepted
        try:
            _none_lost(typhon.store, accepted)
        except AssertionError:
            print(cluster.worker_log()[-5000:])
            raise
