"""The model registry: aliases from the LiteLLM-style model list, turned into clients."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from typhon.config import Category, ModelEntry, TyphonConfig
from typhon.models._client import ModelClient, OpenAICompatibleClient
from typhon.models._local import LocalServer

__all__ = ["ModelRegistry", "Route", "endpoint_of"]


@dataclass(frozen=True)
class Route:
    """Where a request goes: the category, the model alias and its backend URL."""

    category: Category
    model: str
    backend: str
    reason: str


def endpoint_of(entry: ModelEntry) -> str:
    """The backend URL a run records. ``local`` entries record ``local:llama-server``."""
    params = entry.litellm_params
    if params.provider == "local":
        return "local:llama-server"
    assert params.api_base is not None
    base = params.api_base.rstrip("/")
    if params.provider == "ollama" and not base.endswith("/v1"):
        base += "/v1"  # Ollama's OpenAI-compatible endpoint; the native client comes later
    return base


class ModelRegistry:
    """Clients by alias. Starts ``local`` servers on first use and stops them on ``close()``."""

    def __init__(self, config: TyphonConfig, home: Path | None = None):
        self.config = config
        self.home = home or config.home
        self._local: dict[str, LocalServer] = {}
        self._clients: dict[str, OpenAICompatibleClient] = {}
        self._lock = threading.Lock()

    def aliases(self) -> list[str]:
        return [m.model_name for m in self.config.models]

    def route(self, category: Category) -> Route:
        alias = self.config.routing[category]
        return Route(category, alias, endpoint_of(self.config.model(alias)), "routing rule")

    def endpoint(self, alias: str) -> str:
        return endpoint_of(self.config.model(alias))

    def client(self, alias: str) -> ModelClient:
        with self._lock:
            if alias in self._clients:
                return self._clients[alias]
            entry = self.config.model(alias)
            params = entry.litellm_params
            if params.provider == "local":
                server = self._local.setdefault(alias, LocalServer(entry, self.home))
                base = server.ensure()
            else:
                base = endpoint_of(entry)
            client = OpenAICompatibleClient(
                alias,
                base,
                params.model_id,
                api_key=params.api_key,
                timeout=params.timeout or 300.0,
                max_retries=3 if params.max_retries is None else params.max_retries,
            )
            self._clients[alias] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            for server in self._local.values():
                server.stop()
            self._local.clear()
