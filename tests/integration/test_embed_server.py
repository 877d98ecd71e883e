"""The OpenAI-compatible embeddings server over the real MiniLM model, and EndpointEmbedder
reading it back through the model registry."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from typhon.config import TyphonConfig
from typhon.errors import ModelResponseError, ModelUnavailableError
from typhon.memory._embed import EndpointEmbedder, MiniLMEmbedder
from typhon.memory._embed_server import EmbeddingServer
from typhon.models import ModelRegistry

pytestmark = pytest.mark.integration

TEXTS = [
    "How do I reset my password?",
    "I forgot my password, how can I change it?",
    "The weather in Lisbon is sunny",
]


class TinyEmbedder:
    """Three dimensions, whatever the text: an embedder that disagrees with MiniLM's size."""

    model = "tiny-3d"
    dim = 3

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        return [[0.6, 0.8, 0.0] for _ in texts]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def server(minilm: MiniLMEmbedder) -> Iterator[str]:
    with EmbeddingServer(minilm) as srv:
        yield srv.url


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def _registry(home: Path, *entries: tuple[str, str, str]) -> ModelRegistry:
    model_list = [
        {"model_name": alias, "litellm_params": {"model": model, "api_base": base}}
        for alias, model, base in entries
    ]
    return ModelRegistry(TyphonConfig.model_validate({"home": home, "model_list": model_list}))


def test_float_and_base64_answers_are_the_same(http: httpx.Client, minilm: MiniLMEmbedder) -> None:
    as_float = http.post("/embeddings", json={"model": "x", "input": TEXTS})
    as_b64 = http.post(
        "/embeddings", json={"model": "x", "input": TEXTS, "encoding_format": "base64"}
    )
    assert as_float.status_code == as_b64.status_code == 200
    body = as_float.json()
    assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2-int8"
    assert [row["index"] for row in body["data"]] == [0, 1, 2]
    assert all(row["object"] == "embedding" for row in body["data"])
    floats = np.array([row["embedding"] for row in body["data"]], dtype=np.float32)
    decoded = np.array(
        [
            np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
            for row in as_b64.json()["data"]
        ]
    )
    assert floats.shape == decoded.shape == (3, 384)
    assert np.array_equal(floats, decoded)
    assert np.allclose(floats, minilm.embed(TEXTS), atol=1e-6)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == minilm.count_tokens(TEXTS) > 0


def test_a_single_string_input(http: httpx.Client, minilm: MiniLMEmbedder) -> None:
    response = http.post("/embeddings", json={"model": "x", "input": TEXTS[2]})
    assert response.status_code == 200
    (row,) = response.json()["data"]
    assert np.allclose(row["embedding"], minilm.embed([TEXTS[2]])[0], atol=1e-6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "x"}', "'input' is required"),
        (b'{"input": []}', "'input' is empty"),
        (b'{"input": ""}', "empty string"),
        (b'{"input": ["a", 3]}', "list of strings"),
        (b'{"input": [[101, 102]]}', "list of strings"),
        (b'{"input": "a", "encoding_format": "int8"}', "encoding_format"),
        (b'{"input": "a", "dimensions": 128}', "dimensions"),
    ],
)
def test_a_bad_request_is_a_400(http: httpx.Client, body: bytes, message: str) -> None:
    response = http.post("/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_the_openai_client_reads_it(server: str, minilm: MiniLMEmbedder) -> None:
    """The official client, as Letta uses it: base64 by default, decoded with numpy."""
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    try:
        answer = client.embeddings.create(model="all-minilm", input=TEXTS)
        assert [len(row.embedding) for row in answer.data] == [384] * 3
        assert np.allclose([row.embedding for row in answer.data], minilm.embed(TEXTS), atol=1e-6)
        assert answer.usage.prompt_tokens == minilm.count_tokens(TEXTS)
        assert [m.id for m in client.models.list()] == ["all-MiniLM-L6-v2-int8"]
        with pytest.raises(openai.BadRequestError, match="'input' is empty"):
            client.embeddings.create(model="all-minilm", input=[])
    finally:
        client.close()


def test_models_and_unknown_routes(http: httpx.Client) -> None:
    models = http.get("/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["all-MiniLM-L6-v2-int8"]
    assert http.get("/nothing").status_code == 404
    assert http.post("/chat/completions", json={"input": "a"}).status_code == 404


def test_a_remote_host_is_refused_unless_allowed() -> None:
    with pytest.raises(ValueError, match="allow_remote"):
        EmbeddingServer(TinyEmbedder(), host="0.0.0.0")
    EmbeddingServer(TinyEmbedder(), host="0.0.0.0", allow_remote=True)  # not started
    EmbeddingServer(TinyEmbedder(), host="localhost")
    EmbeddingServer(TinyEmbedder(), host="::1")


def test_stop_frees_the_port() -> None:
    srv = EmbeddingServer(TinyEmbedder())
    url = srv.start()
    assert srv.start() == url  # idempotent
    assert httpx.get(f"{url}/models").status_code == 200
    srv.stop()
    srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models", timeout=2)


def test_endpoint_embedder_gives_the_local_vectors(
    server: str, minilm: MiniLMEmbedder, tmp_path: Path
) -> None:
    registry = _registry(tmp_path, ("minilm", "openai/all-minilm", server))
    try:
        with EndpointEmbedder(registry, "minilm", batch_size=2) as remote:
            assert remote.model == "minilm:openai/all-minilm"
            vectors = remote.embed(TEXTS)
            assert remote.dim == 384
            assert np.allclose(vectors, minilm.embed(TEXTS), atol=1e-5)
            assert remote.embed([]) == []
    finally:
        registry.close()


def test_endpoint_dim_is_learnt_from_the_first_answer(server: str, tmp_path: Path) -> None:
    registry = _registry(tmp_path, ("minilm", "openai/all-minilm", server))
    try:
        with EndpointEmbedder(registry, "minilm") as remote:
            assert remote.dim == 384  # one probe request
    finally:
        registry.close()


def test_a_wrong_dimension_is_a_response_error(minilm: MiniLMEmbedder, tmp_path: Path) -> None:
    """A replica group whose replicas serve different models: once the 384-dim one is gone,
    the 3-dim one's answer is refused, naming the alias, its URL and both dimensions."""
    with EmbeddingServer(TinyEmbedder()) as tiny:
        tiny_url = tiny.url
        first = EmbeddingServer(minilm)
        first_url = first.start()
        registry = _registry(
            tmp_path,
            ("mixed", "openai/all-minilm", first_url),
            ("mixed", "openai/all-minilm", tiny_url),
        )
        try:
            with EndpointEmbedder(registry, "mixed") as remote:
                assert len(remote.embed(TEXTS)[0]) == remote.dim == 384
                first.stop()  # the next call fails over to the 3-dim replica
                with pytest.raises(ModelResponseError) as info:
                    remote.embed(TEXTS)
        finally:
            first.stop()
            registry.close()
    message = str(info.value)
    assert "returned 3-dim vectors, expected 384" in message
    assert "model 'mixed'" in message and tiny_url in message and first_url in message
    assert info.value.alias == "mixed" and info.value.url == tiny_url


def test_a_down_replica_is_skipped(server: str, tmp_path: Path) -> None:
    registry = _registry(
        tmp_path,
        ("minilm", "openai/all-minilm", "http://127.0.0.1:9/v1"),
        ("minilm", "openai/all-minilm", server),
    )
    try:
        with EndpointEmbedder(registry, "minilm") as remote:
            assert len(remote.embed(TEXTS[:1])[0]) == 384
    finally:
        registry.close()
    dead = _registry(tmp_path, ("dead", "openai/all-minilm", "http://127.0.0.1:9/v1"))
    try:
        with EndpointEmbedder(dead, "dead") as remote, pytest.raises(ModelUnavailableError):
            remote.embed(TEXTS[:1])
    finally:
        dead.close()


def test_an_ollama_alias_posts_api_embed(server: str, tmp_path: Path) -> None:
    """An ``ollama/`` alias goes through the Ollama client (``/api/embed``): here a server that
    is not Ollama answers 404, a response error naming the alias."""
    registry = _registry(tmp_path, ("olla", "ollama/all-minilm", server.removesuffix("/v1")))
    try:
        with EndpointEmbedder(registry, "olla") as remote:
            assert remote.model == "olla:ollama/all-minilm"
            with pytest.raises(ModelResponseError, match="olla"):
                remote.embed(TEXTS[:1])
    finally:
        registry.close()
