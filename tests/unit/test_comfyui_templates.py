"""Workflow templates: parameters injected by node id and input name, and every refusal (before
anything is sent) naming the node, input or parameter; the art director's answer parsed.

No ComfyUI runs here (it is not on PyPI and has no model weights offline): these tests need no
server. The node classes' required inputs come from the loopback shim's copy of ComfyUI's
nodes.py (tests/support/comfyui_shim.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.comfyui_shim import NODES

from typhon.crews._comfyui import TemplateError, load_template, template_names
from typhon.crews.creative import fallback_line, parse_direction, subject_of

OBJECT_INFO = {name: {"input": spec["input"]} for name, spec in NODES.items()}
PARAMS = {"prompt", "negative_prompt", "seed", "width", "height", "steps", "checkpoint"}


def _write(folder: Path, name: str, workflow: dict[str, Any], params: dict[str, Any]) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(workflow))
    (folder / f"{name}.params.json").write_text(json.dumps({"parameters": params}))
    return folder


def _shipped_workflow() -> dict[str, Any]:
    return dict(load_template("text_to_image").workflow)


@pytest.mark.parametrize("name", ["text_to_image", "character_portrait"])
def test_shipped_templates_have_the_graph_and_the_parameters(name: str) -> None:
    template = load_template(name)
    classes = sorted(node["class_type"] for node in template.workflow.values())
    assert classes == sorted(
        ["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage",
         "KSampler", "VAEDecode", "SaveImage"]
    )  # fmt: skip
    assert set(template.params) >= PARAMS
    assert template.params["prompt"].required
    template.check_nodes(OBJECT_INFO, "http://comfy")  # every node and required input known
    assert name in template_names()


def test_parameters_land_on_their_node_and_input() -> None:
    template = load_template("text_to_image")
    workflow = template.build(
        {"prompt": "a red fox", "negative_prompt": "blur", "seed": "42", "width": 640,
         "height": 384, "steps": 9, "checkpoint": "v1-5-pruned-emaonly.safetensors"}
    )  # fmt: skip
    for name, value in {
        "prompt": "a red fox", "negative_prompt": "blur", "seed": 42, "width": 640,
        "height": 384, "steps": 9, "checkpoint": "v1-5-pruned-emaonly.safetensors",
    }.items():  # fmt: skip
        param = template.params[name]
        assert workflow[param.node]["inputs"][param.input] == value, name
    assert workflow["6"]["inputs"]["text"] == "a red fox"  # the positive CLIPTextEncode
    assert workflow["3"]["inputs"]["seed"] == 42 and workflow["5"]["inputs"]["width"] == 640
    assert workflow["3"]["inputs"]["positive"] == ["6", 0]  # links untouched
    assert template.workflow["6"]["inputs"]["text"] == ""  # the template itself unchanged


def test_defaults_and_format() -> None:
    portrait = load_template("character_portrait")
    workflow = portrait.build({"prompt": "a lighthouse keeper"})
    text = workflow["6"]["inputs"]["text"]
    assert text.startswith("character portrait, a lighthouse keeper, head and shoulders")
    assert "deformed face" in workflow["7"]["inputs"]["text"]  # the sidecar's default
    assert (workflow["5"]["inputs"]["width"], workflow["5"]["inputs"]["height"]) == (832, 1216)


def test_unknown_parameter_is_refused_naming_it() -> None:
    with pytest.raises(TemplateError, match=r"no parameter 'colour'; its parameters: checkpoint,"):
        load_template("text_to_image").build({"prompt": "x", "colour": "red"})


def test_missing_required_parameter_is_refused_naming_it() -> None:
    with pytest.raises(TemplateError, match=r"template 'text_to_image' needs .*'prompt'"):
        load_template("text_to_image").build({"seed": 1})


def test_a_value_of_the_wrong_type_is_refused_naming_the_parameter() -> None:
    with pytest.raises(TemplateError, match=r"parameter 'steps' must be a whole number"):
        load_template("text_to_image").build({"prompt": "x", "steps": "many"})


def test_mapping_to_a_node_not_in_the_workflow(tmp_path: Path) -> None:
    folder = _write(tmp_path / "t", "broken", _shipped_workflow(),
                    {"prompt": {"node": "6", "input": "text"},
                     "seed": {"node": "33", "input": "seed"}})  # fmt: skip
    with pytest.raises(TemplateError, match=r"parameter 'seed' points at node '33', which is not"):
        load_template("broken", folder)


def test_mapping_to_an_input_the_node_does_not_have(tmp_path: Path) -> None:
    folder = _write(tmp_path / "t", "broken", _shipped_workflow(),
                    {"prompt": {"node": "6", "input": "text"},
                     "seed": {"node": "3", "input": "sed"}})  # fmt: skip
    with pytest.raises(
        TemplateError, match=r"parameter 'seed' points at input 'sed' of node '3' \(KSampler\)"
    ):
        load_template("broken", folder)


def test_a_link_to_a_missing_node_is_refused(tmp_path: Path) -> None:
    workflow = _shipped_workflow()
    workflow["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["4", 2]}}
    folder = _write(tmp_path / "t", "broken", workflow, {"prompt": {"node": "6", "input": "text"}})
    with pytest.raises(TemplateError, match=r"node '8' \(VAEDecode\) links to node '30'"):
        load_template("broken", folder)


def test_a_node_class_the_server_does_not_know(tmp_path: Path) -> None:
    workflow = _shipped_workflow()
    workflow["3"] = {**workflow["3"], "class_type": "KSamplerTurbo"}
    folder = _write(tmp_path / "t", "custom", workflow, {"prompt": {"node": "6", "input": "text"}})
    template = load_template("custom", folder)  # fine on its own...
    with pytest.raises(
        TemplateError,
        match=r"node '3' uses class_type 'KSamplerTurbo', which ComfyUI at http://comfy does not",
    ):
        template.check_nodes(OBJECT_INFO, "http://comfy")  # ...but not on this server


def test_a_node_without_an_input_the_server_requires(tmp_path: Path) -> None:
    workflow = _shipped_workflow()
    workflow["3"] = {**workflow["3"], "inputs": dict(workflow["3"]["inputs"])}
    del workflow["3"]["inputs"]["cfg"]
    folder = _write(tmp_path / "t", "nocfg", workflow, {"prompt": {"node": "6", "input": "text"}})
    with pytest.raises(TemplateError, match=r"node '3' \(KSampler\) lacks the input 'cfg'"):
        load_template("nocfg", folder).check_nodes(OBJECT_INFO, "http://comfy")


def test_unknown_template_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"unknown workflow template 'anime'.*text_to_image"):
        load_template("anime", tmp_path)
    with pytest.raises(TemplateError, match=r"not a template name"):
        load_template("../etc/passwd")


def test_a_template_without_its_mapping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "lonely.json").write_text(json.dumps(_shipped_workflow()))
    with pytest.raises(TemplateError, match=r"'lonely' has no parameter mapping"):
        load_template("lonely", tmp_path)


def test_templates_dir_adds_and_overrides(tmp_path: Path) -> None:
    workflow = _shipped_workflow()
    workflow["5"] = {**workflow["5"], "inputs": {"width": 512, "height": 512, "batch_size": 1}}
    folder = _write(tmp_path / "t", "text_to_image", workflow,
                    {"prompt": {"node": "6", "input": "text", "required": True}})  # fmt: skip
    own = load_template("text_to_image", folder)
    assert own.source == str(folder / "text_to_image.json")
    assert own.build({"prompt": "x"})["5"]["inputs"]["width"] == 512
    assert set(own.params) == {"prompt"}


# -- the art director's answer ---------------------------------------------------------------


def test_a_good_answer_is_used() -> None:
    answer = (
        "PROMPT 1: a weathered lighthouse keeper in a wool coat, storm at dusk, oil painting\n"
        "NEGATIVE: blurry, extra fingers\n"
        "SPOKEN LINE: I keep the light so others find their way home.\n"
    )
    direction = parse_direction(answer, "a lighthouse keeper", count=1, speech=True)
    assert direction.from_model
    assert direction.prompts == [
        "a weathered lighthouse keeper in a wool coat, storm at dusk, oil painting"
    ]
    assert direction.negative == "blurry, extra fingers"
    assert direction.spoken_line == "I keep the light so others find their way home."


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "Request: a character portrait",  # the prompt echoed back
        "PROMPT 1: <subject, setting, style, lighting, camera>",  # the placeholder
        "PROMPT 1: an old fisherman mending nets on a pier at dawn, oil painting",  # the example
        "PROMPT 1: ok",
        "<|im_start|> {} {} {}",
    ],
)
def test_nonsense_falls_back_to_the_request(answer: str) -> None:
    request = "a character portrait of a lighthouse keeper, with a spoken line"
    direction = parse_direction(answer, request, count=2, speech=True)
    assert not direction.from_model
    assert len(direction.prompts) == 2
    assert all(
        p.startswith("a character portrait of a lighthouse keeper,") for p in direction.prompts
    )
    assert all("spoken" not in p for p in direction.prompts)
    assert direction.spoken_line == "This is a character portrait of a lighthouse keeper."


def test_missing_prompts_are_padded_and_extra_ones_dropped() -> None:
    answer = "PROMPT 1: a misty harbour at night, lanterns, watercolour\n" * 3
    assert len(parse_direction(answer, "a harbour", count=2, speech=False).prompts) == 2
    padded = parse_direction(answer[:60], "a harbour", count=3, speech=False)
    assert padded.prompts[0] == "a misty harbour at night, lanterns, watercolour"
    assert padded.prompts[1].startswith("a harbour, highly detailed")
    assert padded.spoken_line is None


def test_the_spoken_line_comes_from_quotes_in_the_request() -> None:
    assert fallback_line('a pirate saying "Hoist the colours!"') == "Hoist the colours!"
    assert subject_of("a wizard, with a voice line") == "a wizard"
    assert subject_of("a desert at noon and narration") == "a desert at noon"
