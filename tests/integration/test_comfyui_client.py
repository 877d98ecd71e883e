"""The ComfyUI and speech clients, and the Creative crew, against loopback servers that keep the
real servers' shapes.

No real ComfyUI can run here: it is not on PyPI, and rendering needs model weights (an SDXL
checkpoint) that cannot be had offline. No real Kokoro either: it needs a model download. So the
servers are tests/support/comfyui_shim.py (its shapes checked against ComfyUI's server.py,
execution.py, main.py and nodes.py) and tests/support/speech_shim.py (Kokoro-FastAPI's
openai_compatible.py). The crew's model is a ScriptedModel here; tests/e2e/test_creative_e2e.py
runs it against the real local llama-server.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from support.comfyui_shim import ComfyUIShim, closed_port_url, png_size
from support.speech_shim import SpeechShim

from typhon import RunStatus, Typhon
from typhon.config import TyphonConfig
from typhon.crews._comfyui import ComfyUIClient, ComfyUIError, Progress, load_template
from typhon.crews._speech import SpeechError, speech_endpoint, synthesize
from typhon.testing import ScriptedModel, ScriptedModels

PORTRAIT = "a character portrait of a lighthouse keeper, with a spoken line"
DIRECTOR = (
    "PROMPT 1: a weathered lighthouse keeper in a yellow oilskin, stormy sea behind, oil "
    "painting, warm lamp light\n"
    "NEGATIVE: blurry, extra fingers\n"
    "SPOKEN LINE: Every night I keep the lamp burning for the boats.\n"
)


@pytest.fixture(params=["websocket", "polling"])
def comfy(request: pytest.FixtureRequest) -> Iterator[ComfyUIShim]:
    """ComfyUI's API on loopback; "polling": its /ws is not there, so clients poll history."""
    with ComfyUIShim(websocket=request.param == "websocket") as shim:
        yield shim


@pytest.fixture
def tts() -> Iterator[SpeechShim]:
    with SpeechShim() as shim:
        yield shim


def _workflow(**values: Any) -> dict[str, Any]:
    base = {"prompt": "a red fox in snow", "width": 64, "height": 48, "steps": 4, "seed": 7}
    return load_template("text_to_image").build({**base, **values})


def _client(url: str, **kwargs: Any) -> ComfyUIClient:
    return ComfyUIClient(url, poll_interval_s=0.05, **kwargs)


# -- the ComfyUI client ---------------------------------------------------------------------------


def test_render_follows_progress_and_downloads_the_image(comfy: ComfyUIShim) -> None:
    events: list[Progress] = []
    with _client(comfy.url) as client:
        (image,) = client.render(_workflow(), on_progress=events.append)
        followed = client.followed_by
    assert png_size(image.data) == (64, 48)  # a real PNG of the latent's size, via GET /view
    assert (image.node, image.type, image.filename) == ("9", "output", "typhon_00001_.png")
    (body,) = comfy.prompts
    assert body["prompt"]["6"]["inputs"]["text"] == "a red fox in snow"
    assert isinstance(body["client_id"], str) and body["client_id"]
    if comfy.websocket:
        assert followed == "websocket"
        started = [(e.node, e.node_type) for e in events if e.kind == "executing"]
        assert started == [("4", "CheckpointLoaderSimple"), ("6", "CLIPTextEncode"),
                           ("7", "CLIPTextEncode"), ("5", "EmptyLatentImage"),
                           ("3", "KSampler"), ("8", "VAEDecode"), ("9", "SaveImage")]  # fmt: skip
        ticks = [(e.node, e.node_type, e.value, e.max) for e in events if e.kind == "progress"]
        assert ticks == [("3", "KSampler", n, 4) for n in range(1, 5)]
        assert events[-1] == Progress("executed", "9", "SaveImage")
    else:
        assert followed == "polling" and events == []
        assert any(r.startswith("GET /history/") for r in comfy.requests)


def test_a_client_told_not_to_use_the_websocket_polls(tmp_path: Path) -> None:
    with ComfyUIShim() as shim, _client(shim.url, websocket=False) as client:
        (image,) = client.render(_workflow())
        assert client.followed_by == "polling"
    assert "GET /ws" not in shim.requests
    assert png_size(image.data) == (64, 48)


def test_node_errors_name_the_node(comfy: ComfyUIShim) -> None:
    workflow = _workflow()
    del workflow["3"]["inputs"]["cfg"]
    with _client(comfy.url) as client, pytest.raises(ComfyUIError) as caught:
        client.render(workflow)
    error = caught.value
    assert (error.node_id, error.node_type) == ("3", "KSampler")
    assert error.error_type == "prompt_outputs_failed_validation"
    assert str(error) == (
        f"ComfyUI at {comfy.url} refused the workflow (prompt_outputs_failed_validation): "
        "node 3 (KSampler): Required input is missing: cfg; fix the workflow template or its "
        "parameters"
    )
    assert comfy.prompts == []  # nothing was queued


def test_a_checkpoint_the_server_lacks_names_node_and_file(comfy: ComfyUIShim) -> None:
    with _client(comfy.url) as client, pytest.raises(ComfyUIError) as caught:
        client.render(_workflow(checkpoint="dreamshaper_8.safetensors"))
    assert caught.value.node_id == "4"
    assert "node 4 (CheckpointLoaderSimple): Value not in list: ckpt_name: " in str(caught.value)
    assert "'dreamshaper_8.safetensors' not in" in str(caught.value)


@pytest.mark.parametrize("style", ["invalid_prompt", "missing_node_type"])
def test_an_unknown_node_class_names_the_node(style: str) -> None:
    workflow = _workflow()
    workflow["3"]["class_type"] = "KSamplerTurbo"
    shim = ComfyUIShim(validation=style)
    with shim, _client(shim.url) as client, pytest.raises(ComfyUIError) as caught:
        client.render(workflow)
    assert (caught.value.node_id, caught.value.node_type) == ("3", "KSamplerTurbo")
    assert f"refused the workflow ({style}): node 3 (KSamplerTurbo): " in str(caught.value)


def test_a_failure_while_running_names_the_node(comfy: ComfyUIShim) -> None:
    comfy.fail_node = "KSampler"
    with _client(comfy.url) as client, pytest.raises(ComfyUIError) as caught:
        client.render(_workflow())
    assert (caught.value.node_id, caught.value.node_type) == ("3", "KSampler")
    assert caught.value.error_type == "execution_error"
    assert str(caught.value).startswith(
        f"ComfyUI at {comfy.url} failed at node 3 (KSampler): torch.OutOfMemoryError: "
        "Allocation on device; see the ComfyUI log"
    )
    (entry,) = comfy.history.values()  # the shape polling reads it from
    assert entry["status"]["status_str"] == "error"


def test_a_comfyui_that_is_down_is_named_by_url() -> None:
    url = closed_port_url()
    with _client(url) as client:
        for call in (client.object_info, lambda: client.render(_workflow())):
            with pytest.raises(ComfyUIError, match=rf"cannot reach ComfyUI at {url} \("):
                call()


def test_stopping_a_render_abandons_the_prompt() -> None:
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt

    with ComfyUIShim(step_delay_s=0.2) as shim, _client(shim.url) as client:
        with pytest.raises(KeyboardInterrupt):
            client.render(_workflow(steps=50), check=check)
        (body,) = shim.prompts
    paths = [path for path, _ in shim.interrupts]
    assert paths == ["/queue", "/interrupt"]
    prompt_id = shim.interrupts[1][1]["prompt_id"]
    assert shim.interrupts[0][1] == {"delete": [prompt_id]}
    assert body["client_id"]


def test_a_render_past_its_time_limit_fails_clearly() -> None:
    late = pytest.raises(ComfyUIError, match=r"did not finish prompt .* within 0\.3s")
    with ComfyUIShim(step_delay_s=0.2) as shim, _client(shim.url, timeout_s=0.3) as client, late:
        client.render(_workflow(steps=50))


def test_a_missing_image_names_the_file(comfy: ComfyUIShim) -> None:
    with _client(comfy.url) as client, pytest.raises(ComfyUIError, match=r"404 to GET /view"):
        client.view("missing.png")


def test_object_info_lists_the_template_nodes(comfy: ComfyUIShim) -> None:
    with _client(comfy.url) as client:
        info = client.object_info()
    assert info is not None
    load_template("character_portrait").check_nodes(info, comfy.url)
    assert info["KSampler"]["input"]["required"]["steps"][0] == "INT"


# -- speech ---------------------------------------------------------------------------------------


def test_speech_returns_audio(tts: SpeechShim) -> None:
    audio = synthesize(tts.url, "Keep the lamp lit.", model="kokoro", voice="af_bella",
                       response_format="wav")  # fmt: skip
    with wave.open(BytesIO(audio)) as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (1, 24000)
        assert wav.getnframes() > 0
    mp3 = synthesize(tts.url + "/v1", "Hello.", model="kokoro", voice="af_bella")
    assert mp3 == b"shim-mp3:Hello."
    assert tts.requests == [
        {"model": "kokoro", "input": "Keep the lamp lit.", "voice": "af_bella",
         "response_format": "wav"},
        {"model": "kokoro", "input": "Hello.", "voice": "af_bella", "response_format": "mp3"},
    ]  # fmt: skip


def test_speech_errors_name_url_and_status(tts: SpeechShim) -> None:
    endpoint = speech_endpoint(tts.url)
    assert endpoint == f"{tts.url}/v1/audio/speech"
    with pytest.raises(SpeechError) as caught:
        synthesize(tts.url, "Hi there.", model="kokoro", voice="zz_nobody")
    assert caught.value.status == 400
    assert str(caught.value).startswith(
        f"speech server at {endpoint} answered HTTP 400: Voice 'zz_nobody' not found."
    )
    tts.fail_status = 500
    with pytest.raises(SpeechError, match=rf"{endpoint} answered HTTP 500: model crashed"):
        synthesize(tts.url, "Hi there.", model="kokoro", voice="af_bella")
    down = closed_port_url()
    with pytest.raises(SpeechError, match=rf"cannot reach the speech server at {down}/v1/audio"):
        synthesize(down, "Hi there.", model="kokoro", voice="af_bella")


# -- the crew, with a scripted model --------------------------------------------------------------


def _config(home: Path, comfy: ComfyUIShim | None, tts: SpeechShim | None) -> TyphonConfig:
    creative: dict[str, Any] = {"tts_format": "wav", "poll_interval_s": 0.05}
    if comfy is not None:
        creative["comfyui_url"] = comfy.url
    if tts is not None:
        creative["tts_url"] = tts.url
    return TyphonConfig(home=home, creative=creative)


def _run(config: TyphonConfig, model: ScriptedModel, text: str, **options: Any) -> Any:
    with Typhon(config, models=ScriptedModels(config, model)) as typhon:
        handle = typhon.submit("creative", text, **options)
        record = handle.wait(180)
        events = [e.data for e in typhon.store.events(handle.run_id) if e.kind == "step"]
    return record, events


def test_the_crew_renders_and_speaks(home: Path, comfy: ComfyUIShim, tts: SpeechShim) -> None:
    record, steps = _run(_config(home, comfy, tts), ScriptedModel(DIRECTOR), PORTRAIT)
    assert record.status is RunStatus.SUCCEEDED, record.error
    folder = home / "artifacts" / record.id
    assert record.artifacts == [str(folder / "image-1.png"), str(folder / "speech.wav")]
    assert png_size((folder / "image-1.png").read_bytes()) == (832, 1216)  # the portrait frame
    with wave.open(str(folder / "speech.wav")) as wav:
        assert wav.getnframes() > 0
    (body,) = comfy.prompts
    text = body["prompt"]["6"]["inputs"]["text"]
    assert text.startswith("character portrait, a weathered lighthouse keeper in a yellow oilskin")
    assert body["prompt"]["7"]["inputs"]["text"] == "blurry, extra fingers"
    assert body["prompt"]["4"]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert tts.requests[0]["input"] == "Every night I keep the lamp burning for the boats."
    names = list(dict.fromkeys(s["name"] for s in steps))
    assert names == ["art direction", "rendering image 1/1", "speech"]
    if comfy.websocket:
        ticks = [(s.get("node_type"), s.get("value")) for s in steps if "value" in s]
        assert ticks[0] == ("KSampler", 1) and ticks[-1] == ("KSampler", 30)
        assert len(ticks) == 11  # at each tenth of the sampler's 30 steps, not every tick
    out = record.output
    assert "Template: `character_portrait`" in out
    assert "1. a weathered lighthouse keeper in a yellow oilskin" in out
    assert "> Every night I keep the lamp burning for the boats." in out
    seed = body["prompt"]["3"]["inputs"]["seed"]
    assert f"- `image-1.png`: prompt 1, seed {seed}" in out and "- `speech.wav`" in out


def test_nonsense_from_the_model_still_makes_images(home: Path) -> None:
    with ComfyUIShim() as comfy:
        config = _config(home, comfy, None)
        record, _ = _run(config, ScriptedModel("<<<>>> ??"), "a misty harbour", images=2,
                         template="text_to_image", seed=100)  # fmt: skip
        texts = [body["prompt"]["6"]["inputs"]["text"] for body in comfy.prompts]
        seeds = [body["prompt"]["3"]["inputs"]["seed"] for body in comfy.prompts]
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert [Path(p).name for p in record.artifacts] == ["image-1.png", "image-2.png"]
    assert texts[0].startswith("a misty harbour, highly detailed") and texts[0] != texts[1]
    assert seeds == [100, 101]
    assert "## Prompts (built from the request)" in record.output


def test_the_crew_without_comfyui_url_says_what_to_set(home: Path) -> None:
    record, _ = _run(_config(home, None, None), ScriptedModel(DIRECTOR), "a misty harbour")
    assert record.status is RunStatus.FAILED
    assert record.error == (
        "the creative crew renders through ComfyUI: set creative.comfyui_url "
        "(env TYPHON_CREATIVE__COMFYUI_URL), e.g. http://127.0.0.1:8188"
    )


def test_speech_without_tts_url_says_what_to_set(home: Path) -> None:
    with ComfyUIShim() as comfy:
        record, _ = _run(_config(home, comfy, None), ScriptedModel(DIRECTOR), PORTRAIT)
        assert comfy.prompts == []  # refused before anything was rendered
    assert record.status is RunStatus.FAILED
    assert "set creative.tts_url (env TYPHON_CREATIVE__TTS_URL)" in (record.error or "")


def test_the_crew_refuses_a_template_with_an_unknown_node(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    workflow = dict(load_template("text_to_image").workflow)
    workflow["3"] = {**workflow["3"], "class_type": "KSamplerTurbo"}
    (folder / "turbo.json").write_text(json.dumps(workflow))
    (folder / "turbo.params.json").write_text(
        json.dumps({"parameters": {"prompt": {"node": "6", "input": "text", "required": True}}})
    )
    with ComfyUIShim() as comfy:
        config = TyphonConfig(
            home=home, creative={"comfyui_url": comfy.url, "templates_dir": str(folder)}
        )
        model = ScriptedModel(DIRECTOR)
        record, _ = _run(config, model, "a harbour", template="turbo")
        assert comfy.prompts == [] and model.calls == []  # refused before model and ComfyUI
    assert record.status is RunStatus.FAILED
    assert "node '3' uses class_type 'KSamplerTurbo', which ComfyUI at" in (record.error or "")


def test_a_comfyui_failure_fails_the_run_naming_the_node(home: Path) -> None:
    with ComfyUIShim(fail_node="VAEDecode") as comfy:
        record, _ = _run(_config(home, comfy, None), ScriptedModel(DIRECTOR), "a harbour")
    assert record.status is RunStatus.FAILED
    assert f"ComfyUI at {comfy.url} failed at node 8 (VAEDecode)" in (record.error or "")
    assert record.artifacts == []
