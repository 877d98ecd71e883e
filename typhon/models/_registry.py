"""The model registry: aliases from the LiteLLM-style model list, turned into clients.

Every alias is a replica group (usually of one) behind a ``BalancedClient``; ``local`` entries
start their llama-server on first use and stop it on ``close()``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from typhon.config import OLLAMA_PROVIDERS, Category, ModelEntry, TyphonConfig
from typhon.errors import ModelUnavailableError
from typhon.models._balance import BalancedClient, HealthChecker, Replica, ReplicaGroup
from typhon.models._client import HttpModelClient, ModelClient, OpenAICompatibleClient, Probe
from typhon.models._local import LocalServer
from typhon.models._ollama import OllamaClient

__all__ = ["ModelRegistry", "Route", "endpoint_of"]


@dataclass(frozen=True)
class Route:
    """Where a request goes: the category, the model alias, its backend URL(s), the routing-rules
    version that decided (0: none, the model was fixed) and why."""

    category: Category
    model: str
    backend: str
    reason: str
    rules_version: int = 0
    backends: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "category": self.category,
            "model": self.model,
            "backend": self.backend,
            "backends": list(self.backends or (self.backend,)),
            "rules_version": self.rules_version,
            "reason": self.reason,
        }


def endpoint_of(entry: ModelEntry) -> str:
    """The backend URL of one deployment. ``local`` entries record ``local:llama-server``."""
    params = entry.litellm_params
    if params.provider == "local":
        return "local:llama-server"
    assert params.api_base is not None
    base = params.api_base.rstrip("/")
    if params.provider in OLLAMA_PROVIDERS and base.endswith("/v1"):
        base = base[:-3]  # the native API lives at the root
    return base


class ModelRegistry:
    """Clients by alias. Starts ``local`` servers on first use and stops them on ``close()``."""

    def __init__(self, config: TyphonConfig, home: Path | None = None):
        self.config = config
        self.home = home or config.home
        self._local: dict[str, LocalServer] = {}
        self._groups: dict[str, ReplicaGroup] = {}
        self._clients: dict[str, BalancedClient] = {}
        self._lock = threading.RLock()
        self._health = HealthChecker(self.groups, config.router_settings)
        self._health_pid: int | None = None
        self._closed = False

    def aliases(self) -> list[str]:
        return self.config.aliases()

    def endpoints(self, alias: str) -> list[str]:
        return [endpoint_of(e) for e in self.config.deployments(alias)]

    def endpoint(self, alias: str) -> str:
        return ",".join(self.endpoints(alias))

    def group(self, alias: str) -> ReplicaGroup:
        with self._lock:
            group = self._groups.get(alias)
            if group is None:
                entries = self.config.deployments(alias)
                replicas = [
                    Replica(alias, i, entry, endpoint_of(entry), self._factory(alias, entry))
                    for i, entry in enumerate(entries)
                ]
                group = ReplicaGroup(alias, replicas, self.config.router_settings)
                self._groups[alias] = group
            return group

    def groups(self) -> list[ReplicaGroup]:
        with self._lock:
            return list(self._groups.values())

    def client(self, alias: str) -> ModelClient:
        with self._lock:
            if alias not in self._clients:
                self.group(alias)  # unknown alias: ConfigError now, not at the first call
                self._clients[alias] = BalancedClient(
                    alias, self.group, self.config.router_settings
                )
            if self._health_pid != os.getpid():  # per process (a forked worker starts its own)
                self._health_pid = os.getpid()
                self._health.start()
            return self._clients[alias]

    def replica_client(self, alias: str, entry: ModelEntry) -> HttpModelClient:
        """A plain client for one deployment (no balancing), e.g. to probe it."""
        return self._factory(alias, entry)()

    def probe(self, alias: str) -> list[Probe]:
        """Probe every deployment of ``alias`` (a ``local`` one is started first)."""
        results = []
        for entry in self.config.deployments(alias):
            client = self.replica_client(alias, entry)
            try:
                results.append(
                    client.probe(timeout=self.config.router_settings.health_check_timeout)
                )
            finally:
                client.close()
        return results

    def _factory(self, alias: str, entry: ModelEntry) -> _Factory:
        return _Factory(self, alias, entry)

    def _local_base(self, alias: str, entry: ModelEntry) -> str:
        # Under the lock for the whole start, so close() waits for a start in progress and
        # stops what it started instead of leaving it behind.
        with self._lock:
            if self._closed:
                raise ModelUnavailableError(
                    f"model '{alias}': not started, the model registry is closed",
                    alias=alias,
                    url="local:llama-server",
                )
            server = self._local.setdefault(alias, LocalServer(entry, self.home))
            return server.ensure()

    def close(self) -> None:
        """Stop health checks, close clients, stop the local servers this process started. A
        client still in use by another thread (a run being cancelled) must not keep the servers
        from stopping."""
        self._health.stop()
        self._health_pid = None
        with self._lock:
            self._closed = True  # a run still finishing on another thread starts nothing new
            groups = list(self._groups.values())
            servers = list(self._local.values())
        try:
            for group in groups:
                group.close()
                for replica in group.replicas:
                    close = getattr(replica._client, "close", None)
                    if close is not None:
                        with contextlib.suppress(Exception):
                            close()
        finally:
            for server in servers:
                server.stop()


class _Factory:
    """Builds the plain client of one deployment: balancing retries across replicas, so the
    client itself does not retry a server that is down."""

    def __init__(self, registry: ModelRegistry, alias: str, entry: ModelEntry):
        self.registry = registry
        self.alias = alias
        self.entry = entry

    def __call__(self) -> HttpModelClient:
        params = self.entry.litellm_params
        settings = self.registry.config.router_settings
        timeout = params.timeout or settings.timeout or 300.0
        retries = 0 if params.max_retries is None else params.max_retries
        if params.provider == "local":
            base = self.registry._local_base(self.alias, self.entry)
            return OpenAICompatibleClient(
                self.alias, base, params.model_id, timeout=timeout, max_retries=retries
            )
        base = endpoint_of(self.entry)
        cls: type[HttpModelClient] = (
            OllamaClient if params.provider in OLLAMA_PROVIDERS else OpenAICompatibleClient
        )
        return cls(
            self.alias,
            base,
            params.model_id,
            api_key=params.api_key,
            timeout=timeout,
            max_retries=retries,
        )
