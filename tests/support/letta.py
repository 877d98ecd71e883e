"""The real Letta server for tests: :class:`LettaBackend` objects against
``$TYPHON_TEST_LETTA_URL``.

scripts/test starts the server (``scripts/letta start``) and exports the URL; a test that needs it
fails, never skips, when the URL is missing or nothing answers there. Letta embeds passages and
queries by calling an OpenAI-compatible endpoint: :func:`embeddings_endpoint` serves one, Typhon's
own :class:`~typhon.memory._embed_server.EmbeddingServer` over the bundled MiniLM, on loopback.

:class:`LettaFactory` makes backends each in a namespace of its own (``t<hex>``: its own archives
and blocks) and deletes what they made at :meth:`LettaFactory.cleanup`. A test module wires them
as fixtures::

    @pytest.fixture(scope="module")
    def letta_embeddings() -> Iterator[EmbeddingEndpoint]:
        with embeddings_endpoint() as endpoint:
            yield endpoint

    @pytest.fixture
    def letta_factory(letta_embeddings: EmbeddingEndpoint) -> Iterator[LettaFactory]:
        with LettaFactory(letta_url(), letta_embeddings) as factory:
            yield factory
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from typhon.memory._letta import LettaBackend

__all__ = ["EmbeddingEndpoint", "LettaFactory", "embeddings_endpoint", "letta_url"]

URL_VAR = "TYPHON_TEST_LETTA_URL"


def letta_url() -> str:
    """The test server's URL; fails the test when it is not set or does not answer."""
    url = os.environ.get(URL_VAR)
    if not url:
        pytest.fail(
            f"{URL_VAR} is not set: run the suite with scripts/test, or"
            ' scripts/letta start && eval "$(scripts/letta env)"'
        )
    try:
        ok = httpx.get(f"{url.rstrip('/')}/v1/health/", timeout=5).status_code == 200
    except httpx.HTTPError as exc:
        pytest.fail(f"Letta at {url} does not answer ({exc}): scripts/letta start")
    if not ok:
        pytest.fail(f"Letta at {url} is not healthy: see .typhon-dev/letta/letta.log")
    return url


@dataclass(frozen=True)
class EmbeddingEndpoint:
    """An OpenAI-compatible embeddings endpoint (base URL ending in ``/v1``) and its model."""

    url: str
    model: str
    dim: int


@contextmanager
def embeddings_endpoint() -> Iterator[EmbeddingEndpoint]:
    """Typhon's embeddings server over MiniLM on loopback, for Letta to call."""
    from typhon.memory._embed import MiniLMEmbedder
    from typhon.memory._embed_server import EmbeddingServer

    embedder = MiniLMEmbedder()
    with EmbeddingServer(embedder) as server:
        yield EmbeddingEndpoint(server.url, embedder.model, embedder.dim)


class LettaFactory:
    """Makes :class:`LettaBackend` objects in fresh namespaces and deletes what they made."""

    def __init__(self, url: str, embeddings: EmbeddingEndpoint):
        self.url = url
        self.embeddings = embeddings
        self._made: list[tuple[str, LettaBackend]] = []

    def backend(self, namespace: str | None = None, **kwargs: Any) -> LettaBackend:
        """A backend in ``namespace`` (default: a new one); keyword arguments override the
        embedding settings and the rest of :class:`LettaBackend`'s."""
        options: dict[str, Any] = {
            "embedding_endpoint": self.embeddings.url,
            "embedding_model": self.embeddings.model,
            "embedding_dim": self.embeddings.dim,
            "timeout": 30,
            **kwargs,
        }
        ns = namespace or f"t{uuid.uuid4().hex[:12]}"
        backend = LettaBackend(self.url, namespace=ns, **options)
        self._made.append((ns, backend))
        return backend

    def cleanup(self) -> None:
        """Delete the archives and blocks of every namespace made, and close the backends."""
        from letta_client import Letta

        namespaces = {ns for ns, _ in self._made}
        for _, backend in self._made:
            backend.close()
        self._made.clear()
        if not namespaces:
            return
        with Letta(base_url=self.url, timeout=30, max_retries=1) as client:
            for ns in sorted(namespaces):
                for tier in ("episodic", "semantic"):
                    for archive in client.archives.list(name=f"{ns}-{tier}", limit=10).items:
                        client.archives.delete(archive.id)
                for block in client.blocks.list(label_search=f"{ns}-", limit=1000).items:
                    if (block.label or "").startswith(f"{ns}-"):
                        client.blocks.delete(block.id)

    def __enter__(self) -> LettaFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
