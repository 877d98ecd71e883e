"""The OpenAI-compatible client and the local server manager against a real llama-server."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from typhon.config import LitellmParams, ModelEntry
from typhon.errors import ModelUnavailableError
from typhon.models import LocalServer, OpenAICompatibleClient, json_schema_format

FEW_SHOT = [
    {"role": "user", "content": "Capital of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "Capital of France?"},
]


def _entry(**params: object) -> ModelEntry:
    return ModelEntry(
        model_name="local",
        litellm_params=LitellmParams(
            model="local/gemma-3-270m", ctx_size=4096, parallel=2, **params
        ),
    )


@pytest.fixture(scope="module")
def server_home(tmp_path_factory: pytest.TempPathFactory, shared_models_dir: Path) -> Path:
    home = tmp_path_factory.mktemp("llama-home")
    shutil.copytree(shared_models_dir, home / "models")
    return home


@pytest.fixture(scope="module")
def server(server_home: Path) -> Iterator[LocalServer]:
    local = LocalServer(_entry(), server_home)
    local.ensure()
    yield local
    local.stop()


@pytest.fixture
def client(server: LocalServer) -> Iterator[OpenAICompatibleClient]:
    assert server.url is not None
    http = OpenAICompatibleClient("local", f"{server.url}/v1", "gemma-3-270m", timeout=120)
    yield http
    http.close()


def test_server_started_on_loopback_with_logs(server: LocalServer, server_home: Path) -> None:
    assert server.started_here
    assert server.url is not None and server.url.startswith("http://127.0.0.1:")
    assert (server_home / "logs" / "llama-server-local.log").stat().st_size > 0
    state = json.loads((server_home / "run" / "llama-local.json").read_text())
    assert server.url.endswith(f":{state['port']}")


def test_second_manager_reuses_and_does_not_stop(server: LocalServer, server_home: Path) -> None:
    other = LocalServer(_entry(), server_home)
    assert other.ensure() == f"{server.url}/v1"
    assert not other.started_here
    other.stop()
    assert other.url == server.url  # nothing stopped: it was not ours


def test_chat_records_usage(client: OpenAICompatibleClient) -> None:
    result = client.chat(FEW_SHOT, max_tokens=8, temperature=0)
    assert isinstance(result.content, str)
    assert result.usage.prompt_tokens > 10
    assert 0 < result.usage.completion_tokens <= 8
    assert result.usage.calls == 1 and result.usage.latency_s > 0
    assert result.finish_reason in {"stop", "length"}


def test_streaming_yields_deltas_and_usage(client: OpenAICompatibleClient) -> None:
    stream = client.stream(FEW_SHOT, max_tokens=8, temperature=0)
    parts = list(stream)
    assert stream.result is not None
    assert "".join(parts) == stream.result.content
    assert len(parts) >= 1
    assert stream.result.usage.completion_tokens > 0


def test_json_schema_output_is_enforced(client: OpenAICompatibleClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 10},
        },
        "required": ["city", "confidence"],
        "additionalProperties": False,
    }
    result = client.chat(
        [{"role": "user", "content": "Capital of France as JSON."}],
        max_tokens=200,  # the grammar allows whitespace; leave room for a chatty model
        temperature=0,
        response_format=json_schema_format("answer", schema),
    )
    data = json.loads(result.content)
    assert set(data) == {"city", "confidence"}
    assert isinstance(data["city"], str) and len(data["city"]) <= 20
    assert 0 <= data["confidence"] <= 10


def test_parallel_requests_are_served(client: OpenAICompatibleClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: client.chat(FEW_SHOT, max_tokens=4), range(2)))
    assert all(r.usage.completion_tokens > 0 for r in results)


def test_stop_ends_the_process(server_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "own"
    shutil.copytree(server_home / "models", home / "models")
    local = LocalServer(_entry(), home)
    local.ensure()
    pid = json.loads((home / "run" / "llama-local.json").read_text())["pid"]
    local.stop()
    assert not (home / "run" / "llama-local.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    local = LocalServer(_entry(model_path=str(tmp_path / "nope.gguf")), tmp_path)
    with pytest.raises(ModelUnavailableError, match="did not become ready"):
        local.ensure()
