"""`typhon run creative` end to end: CrewAI against the real local llama-server (the embedded
default model), rendering through ComfyUI's API and speaking through an OpenAI-style TTS API.

No real ComfyUI can run here: it is not on PyPI, and rendering needs model weights (an SDXL
checkpoint) that are not available offline. No real Kokoro either: it needs a model download.
So ComfyUI and the speech server are the loopback shims in tests/support (comfyui_shim.py keeps
the shapes of ComfyUI's server.py, execution.py, main.py and nodes.py; speech_shim.py those of
Kokoro-FastAPI's openai_compatible.py); the model, CrewAI and the CLI are the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TYPHON_BIN
from support.comfyui_shim import ComfyUIShim, closed_port_url, png_size
from support.speech_shim import SpeechShim

REQUEST = "a character portrait of a lighthouse keeper, with a spoken line"
# Short answers keep the suite quick on two cores; the crew and the server are the real ones.
FAST = {"TYPHON_CREWS__CREATIVE__MAX_TOKENS": "64", "TYPHON_CREATIVE__TTS_FORMAT": "wav"}


@pytest.fixture
def comfy() -> Iterator[ComfyUIShim]:
    with ComfyUIShim() as shim:
        yield shim


@pytest.fixture
def tts() -> Iterator[SpeechShim]:
    with SpeechShim() as shim:
        yield shim


def _run(home: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    result = subprocess.run(
        [TYPHON_BIN, "run", "creative", REQUEST, "--json", *args],
        env={**os.environ, "TYPHON_HOME": str(home), **FAST, **env},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def _server_gone(home: Path) -> None:
    assert not list((home / "run").glob("llama-*.json")), "llama-server state left behind"


def test_portrait_with_a_spoken_line(home: Path, comfy: ComfyUIShim, tts: SpeechShim) -> None:
    result, out = _run(
        home, TYPHON_CREATIVE__COMFYUI_URL=comfy.url, TYPHON_CREATIVE__TTS_URL=tts.url
    )
    assert result.returncode == 0, result.stderr
    assert (out["crew"], out["status"], out["model"]) == ("creative", "succeeded", "local")
    assert out["usage"]["calls"] >= 1 and out["usage"]["completion_tokens"] > 0
    folder = home / "artifacts" / out["run_id"]
    assert out["artifacts"] == [str(folder / "image-1.png"), str(folder / "speech.wav")]
    assert png_size((folder / "image-1.png").read_bytes()) == (832, 1216)
    with wave.open(str(folder / "speech.wav")) as audio:
        assert audio.getnframes() > 0
    (body,) = comfy.prompts  # one render, of the character portrait template
    assert body["prompt"]["6"]["inputs"]["text"].startswith("character portrait, ")
    assert body["prompt"]["4"]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    (spoken,) = tts.requests
    assert (spoken["model"], spoken["voice"], spoken["response_format"]) == (
        "kokoro", "af_bella", "wav",
    )  # fmt: skip
    assert spoken["input"].strip()
    output = out["output"]
    assert output.startswith(f"# Creative: {REQUEST}\n")
    assert "Template: `character_portrait`" in output
    assert "- `image-1.png`: prompt 1, seed " in output and "- `speech.wav`" in output
    assert f"> {spoken['input']}" in output
    _server_gone(home)


def test_a_comfyui_failure_fails_the_run_naming_the_node(
    home: Path, comfy: ComfyUIShim, tts: SpeechShim
) -> None:
    comfy.fail_node = "KSampler"
    result, out = _run(
        home, TYPHON_CREATIVE__COMFYUI_URL=comfy.url, TYPHON_CREATIVE__TTS_URL=tts.url
    )
    assert result.returncode == 1
    assert out["status"] == "failed" and out["artifacts"] == []
    assert out["error"].startswith(
        f"ComfyUI at {comfy.url} failed at node 3 (KSampler): torch.OutOfMemoryError"
    )
    assert tts.requests == []  # nothing spoken for a failed render
    _server_gone(home)


def test_comfyui_down_fails_the_run_naming_the_url(home: Path, tts: SpeechShim) -> None:
    down = closed_port_url()
    result, out = _run(home, TYPHON_CREATIVE__COMFYUI_URL=down, TYPHON_CREATIVE__TTS_URL=tts.url)
    assert result.returncode == 1
    assert out["status"] == "failed"
    assert out["error"].startswith(f"cannot reach ComfyUI at {down} (GET /object_info: ")
    assert out["usage"]["calls"] == 0  # found before any model time was spent
    _server_gone(home)


def test_no_comfyui_url_is_one_line_saying_what_to_set(home: Path) -> None:
    result, out = _run(home)
    assert result.returncode == 1 and out["status"] == "failed"
    assert "set creative.comfyui_url (env TYPHON_CREATIVE__COMFYUI_URL)" in out["error"]
    plain = subprocess.run(
        [TYPHON_BIN, "run", "creative", REQUEST],
        env={**os.environ, "TYPHON_HOME": str(home), **FAST},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert plain.returncode == 1
    (line,) = plain.stderr.strip().splitlines()
    assert line.startswith("error: run ") and "TYPHON_CREATIVE__COMFYUI_URL" in line
