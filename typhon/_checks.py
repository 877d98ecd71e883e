"""``typhon config check``: is every configured service and endpoint there?"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from typhon.config import ModelEntry, TyphonConfig
from typhon.models._registry import endpoint_of

__all__ = ["run_checks"]

Check = tuple[bool, str, str]
_TIMEOUT = 3.0


def _guard(name: str, fn: Callable[[], str]) -> Check:
    try:
        return True, name, fn()
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False, name, reason


def _database(config: TyphonConfig) -> str:
    from typhon.store import RunStore

    store = RunStore(config.effective_database_url)
    try:
        version = store.migrate()
    finally:
        store.close()
    return f"{store.url.split('@')[-1]} (schema v{version})"


def _broker(url: str) -> str:
    from workers.celery_app import check_broker, create_app

    check_broker(create_app(TyphonConfig(broker_url=url)), url)
    return url.split("@")[-1]


def _model(config: TyphonConfig, entry: ModelEntry) -> str:
    from typhon.models import ModelRegistry, find_llama_server

    params = entry.litellm_params
    if params.provider == "local":
        return f"llama-server at {find_llama_server()} (started on first use)"
    client = ModelRegistry(config).replica_client(entry.model_name, entry)
    try:
        probe = client.probe(timeout=_TIMEOUT)
    finally:
        client.close()
    base = endpoint_of(entry)
    if not probe.reachable:
        raise RuntimeError(f"{base} unreachable: {probe.error}")
    if probe.model_present is False:
        raise RuntimeError(f"{base} does not serve '{params.model_id}' (it has {probe.models})")
    return f"{base} reachable, {probe.latency_s * 1000:.0f} ms"


def _search(url: str) -> str:
    response = httpx.get(
        url.rstrip("/") + "/search", params={"q": "typhon", "format": "json"}, timeout=_TIMEOUT
    )
    if response.status_code >= 400:
        raise RuntimeError(f"{url} answered {response.status_code}; enable the json format")
    return f"{url} answers JSON searches"


def run_checks(config: TyphonConfig) -> list[Check]:
    results = [_guard("database", lambda: _database(config))]
    if config.broker_url:
        broker = config.broker_url
        results.append(_guard("broker", lambda: _broker(broker)))
    else:
        results.append((True, "broker", "none: runs execute in-process"))
    for entry in config.models:
        name = f"model {entry.model_name}"
        if len(config.deployments(entry.model_name)) > 1:
            name += f" @{endpoint_of(entry)}"
        results.append(_guard(name, lambda e=entry: _model(config, e)))  # type: ignore[misc]
    if config.search_url:
        search = config.search_url
        results.append(_guard("search", lambda: _search(search)))
    return results
