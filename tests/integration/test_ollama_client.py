"""Typhon's Ollama path, end to end over HTTP: ``ollama/...`` entries through the registry's
balanced client to ``OllamaClient``, against Ollama's native API as served by the shim in front
of a real llama-server (no Ollama can run here; the shim translates /api/chat, /api/embed and
/api/tags to llama-server's OpenAI API). Also ``typhon models check`` on the same endpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from support.llama import LlamaProcess, start_llama_server
from support.ollama_shim import OllamaShim

from typhon.config import TyphonConfig
from typhon.errors import ModelResponseError, ModelUnavailableError
from typhon.models import ModelRegistry, OllamaClient, free_port, json_schema_format

pytestmark = pytest.mark.integration

TYPHON = str(Path(sys.executable).parent / "typhon")
MODEL = "qwen2.5:7b"
ASK = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def servers(
    shared_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LlamaProcess, LlamaProcess]]:
    gguf = shared_models_dir / "gemma-3-270m-q4_k_m.gguf"
    logs = tmp_path_factory.mktemp("llama")
    with (
        start_llama_server(gguf, parallel=2, log_path=logs / "chat.log") as chat,
        start_llama_server(gguf, embeddings=True, parallel=1, log_path=logs / "embed.log") as emb,
    ):
        yield chat, emb


@pytest.fixture
def shim(servers: tuple[LlamaProcess, LlamaProcess]) -> Iterator[OllamaShim]:
    chat, emb = servers
    with OllamaShim(chat.url, [MODEL, "nomic-embed-text"], embed_upstream=emb.url) as s:
        yield s


def _entry(name: str, model: str, url: str) -> dict[str, object]:
    return {"model_name": name, "litellm_params": {"model": model, "api_base": url}}


def _config(home: Path, url: str, model: str = MODEL) -> TyphonConfig:
    return TyphonConfig.model_validate(
        {
            "home": home,
            "model_list": [_entry("fast", f"ollama/{model}", url)],
            "router_settings": {"num_retries": 2, "queue_timeout": 5},
        }
    )


@pytest.fixture
def registry(home: Path, shim: OllamaShim) -> Iterator[ModelRegistry]:
    reg = ModelRegistry(_config(home, shim.url))
    yield reg
    reg.close()


def test_chat_through_the_registry_records_tokens_and_backend_time(
    registry: ModelRegistry, shim: OllamaShim
) -> None:
    result = registry.client("fast").chat(ASK, max_tokens=8, temperature=0)
    assert result.content
    assert (result.alias, result.url) == ("fast", shim.url)
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 8
    # Ollama's own prompt + eval durations, not the wall time around the HTTP call
    assert 0 < result.usage.compute_s < result.usage.latency_s


def test_stream_yields_text_as_it_comes_and_the_stats(registry: ModelRegistry) -> None:
    stream = registry.client("fast").stream(ASK, max_tokens=12, temperature=0)
    parts = list(stream)
    assert len(parts) >= 2
    assert stream.result is not None and stream.result.content == "".join(parts)
    assert stream.result.usage.completion_tokens > 0 and stream.result.finish_reason


def test_json_schema_output_in_format(registry: ModelRegistry) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    result = registry.client("fast").chat(
        [{"role": "user", "content": "Capital of France as JSON."}],
        max_tokens=128,
        temperature=0,
        response_format=json_schema_format("city", schema),
    )
    jsonschema.validate(json.loads(result.content), schema)


def test_embeddings(shim: OllamaShim) -> None:
    client = OllamaClient("emb", shim.url, "nomic-embed-text")
    try:
        vectors = client.embed(["a cat on a mat", "quarterly revenue report"])
    finally:
        client.close()
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 100


def test_probe_sees_the_model_or_its_absence(home: Path, shim: OllamaShim) -> None:
    good = ModelRegistry(_config(home, shim.url)).probe("fast")[0]
    assert good.reachable and good.model_present is True and good.latency_s > 0
    missing = ModelRegistry(_config(home, shim.url, "llama3.2")).probe("fast")[0]
    assert missing.reachable and missing.model_present is False
    assert f"{MODEL}" in missing.models


def test_an_unknown_model_is_a_response_error_with_ollamas_words(
    home: Path, shim: OllamaShim
) -> None:
    registry = ModelRegistry(_config(home, shim.url, "llama3.2"))
    try:
        with pytest.raises(ModelResponseError) as info:
            registry.client("fast").chat(ASK, max_tokens=4)
    finally:
        registry.close()
    assert "not found" in str(info.value) and shim.url in str(info.value)
    assert "'fast'" in str(info.value)


def test_garbled_answers_are_asked_for_once_more(registry: ModelRegistry, shim: OllamaShim) -> None:
    client = registry.client("fast")
    shim.garbage_next = 1
    assert client.chat(ASK, max_tokens=4).content
    shim.truncate_next = 1  # a cut-off JSON body
    assert client.chat(ASK, max_tokens=4).content
    shim.garbage_next = 2
    with pytest.raises(ModelResponseError, match="not JSON"):
        client.chat(ASK, max_tokens=4)


def test_a_5xx_is_retried_and_a_stream_cut_mid_answer_is_a_typed_error(
    registry: ModelRegistry, shim: OllamaShim
) -> None:
    client = registry.client("fast")
    shim.fail_next = 1
    assert client.chat(ASK, max_tokens=4).content
    shim.truncate_next = 1
    stream = client.stream(ASK, max_tokens=32)
    with pytest.raises((ModelUnavailableError, ModelResponseError)) as info:
        list(stream)
    assert shim.url in str(info.value)


def test_models_check_command(tmp_path: Path, shim: OllamaShim) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "typhon.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    _entry("fast", f"ollama/{MODEL}", shim.url),
                    _entry("gone", "openai/x", f"{dead}/v1"),
                ],
                "routing": dict.fromkeys(("simple", "complex", "code", "creative"), "fast"),
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
    env = {**os.environ, "TYPHON_CONFIG": str(config)}
    ok = subprocess.run(
        [TYPHON, "models", "check", "fast", "--json"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    [probe] = json.loads(ok.stdout)
    assert probe["reachable"] and probe["model_present"] and probe["latency_ms"] > 0
    both = subprocess.run([TYPHON, "models", "check"], capture_output=True, text=True, env=env)
    assert both.returncode == 1
    lines = both.stdout.splitlines()
    assert lines[0].startswith("ok  ") and "model present" in lines[0]
    assert lines[1].startswith("FAIL") and dead in lines[1]
