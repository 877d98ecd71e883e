"""typhon.resources.placement: the VRAM formula, the seed cluster's plan, errors and overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from typhon.config import ModelEntry, TyphonConfig, load_config
from typhon.errors import ConfigError, TyphonError
from typhon.resources.placement import (
    GIB,
    ModelSpec,
    PlacementError,
    Plan,
    plan,
    plan_or_raise,
    plan_to_json,
    render_text,
    spec_from_entry,
    vram_need,
)

REPO = Path(__file__).resolve().parents[2]

TABBY = "http://192.168.1.250:5000/v1"
OLLAMA_LB = "http://192.168.1.203:11400"
OLLAMA_GPU0 = "http://192.168.1.203:11434"
OLLAMA_GPU1 = "http://192.168.1.203:11435"

SEED_NODES: list[dict[str, Any]] = [
    {
        "name": "hydra-ai",
        "tensor_parallel": True,
        "roles": ["inference-70b"],
        "gpus": [
            {"name": "RTX 5090", "vram_gb": 32},
            {"name": "RTX 4090", "vram_gb": 24},
        ],
    },
    {
        "name": "hydra-compute",
        "roles": ["inference-7b"],
        "gpus": [
            {"name": "RTX 5070 Ti", "vram_gb": 16},
            {"name": "RTX 5070 Ti", "vram_gb": 16},
        ],
    },
    {"name": "hydra-storage", "roles": ["orchestration"]},
]

SEED_MODELS: list[dict[str, Any]] = [
    {
        "model_name": "gpt-4",
        "litellm_params": {"model": "openai/default", "api_base": TABBY},
        "model_info": {"parameters_b": 70, "quantization_bits": 4.0, "context_length": 32768},
    },
    {"model_name": "llama-70b", "litellm_params": {"model": "openai/default", "api_base": TABBY}},
    {
        "model_name": "gpt-3.5-turbo",
        "litellm_params": {"model": "ollama/qwen2.5:7b", "api_base": OLLAMA_LB},
        "model_info": {
            "parameters_b": 7,
            "quantization_bits": 4.5,
            "context_length": 32768,
            "layers": 28,
            "kv_heads": 4,
            "head_dim": 128,
        },
    },
    {
        "model_name": "codellama",
        "litellm_params": {"model": "ollama/qwen2.5-coder:7b", "api_base": OLLAMA_GPU0},
        "model_info": {"parameters_b": 7, "quantization_bits": 4.5, "context_length": 32768},
    },
    {
        "model_name": "text-embedding-ada-002",
        "litellm_params": {"model": "ollama/nomic-embed-text", "api_base": OLLAMA_GPU1},
        "model_info": {"parameters_b": 0.137, "mode": "embedding"},
    },
]


def _config(
    models: list[dict[str, Any]] | None = None, nodes: list[dict[str, Any]] | None = None
) -> TyphonConfig:
    models = SEED_MODELS if models is None else models
    first = models[0]["model_name"]
    return TyphonConfig.model_validate(
        {
            "model_list": models,
            "routing": dict.fromkeys(("simple", "complex", "code", "creative"), first),
            "nodes": SEED_NODES if nodes is None else nodes,
        }
    )


def _model(alias: str, model: str, **info: Any) -> dict[str, Any]:
    return {
        "model_name": alias,
        "litellm_params": {"model": model, "api_base": "http://10.0.0.9:8000/v1"},
        "model_info": info,
    }


def _entry(**info: Any) -> ModelEntry:
    return ModelEntry.model_validate(_model("m", "openai/m", **info))


def _by_alias(result: Plan) -> dict[str, Any]:
    return {alias: p for p in result.placements for alias in p.aliases}


# -- the VRAM formula ------------------------------------------------------------------------------


def test_formula_for_the_seed_70b_on_two_gpus() -> None:
    spec = ModelSpec("x", 70, 4.0, 32768, layers=80, kv_heads=8, head_dim=128)

    need = vram_need(spec, gpus=2)

    weights = 70e9 * 4.0 / 8 / GIB  # 35e9 bytes
    assert need.weights_gib == pytest.approx(weights)
    assert need.weights_gib == pytest.approx(32.596, abs=1e-3)
    # 2 * 80 * 8 * 128 * 32768 * 2 bytes = 10 GiB exactly
    assert need.kv_cache_gib == pytest.approx(10.0)
    assert need.overhead_gib == pytest.approx(2 * 0.5 + 0.05 * weights)
    assert need.total_gib == pytest.approx(weights + 10.0 + 1.0 + 0.05 * weights)
    assert need.total_gib == pytest.approx(45.226, abs=1e-3)


def test_formula_kv_cache_scales_with_sequences_cache_bits_and_context() -> None:
    spec = ModelSpec("q", 7, 4.5, 32768, layers=28, kv_heads=4, head_dim=128)
    one = vram_need(spec)

    assert one.weights_gib == pytest.approx(7e9 * 4.5 / 8 / GIB)
    assert one.kv_cache_gib == pytest.approx(2 * 28 * 4 * 128 * 32768 * 2 / GIB)  # 1.75
    assert one.kv_cache_gib == pytest.approx(1.75)
    assert one.overhead_gib == pytest.approx(0.5 + 0.05 * one.weights_gib)

    assert vram_need(spec, parallel=4).kv_cache_gib == pytest.approx(7.0)
    q8 = ModelSpec("q", 7, 4.5, 32768, layers=28, kv_heads=4, head_dim=128, kv_cache_bits=8)
    assert vram_need(q8).kv_cache_gib == pytest.approx(0.875)
    short = ModelSpec("q", 7, 4.5, 8192, layers=28, kv_heads=4, head_dim=128, parallel=2)
    assert vram_need(short).kv_cache_gib == pytest.approx(0.875)
    assert vram_need(spec, gpus=3).overhead_gib == pytest.approx(1.5 + 0.05 * one.weights_gib)
    with pytest.raises(ValueError):
        vram_need(spec, gpus=0)


# -- specs from model_info -------------------------------------------------------------------------


def test_spec_takes_model_info_and_its_extra_keys() -> None:
    spec = spec_from_entry(
        _entry(
            parameters_b=7,
            quantization_bits=4.5,
            context_length=16384,
            layers=28,
            kv_heads=4,
            head_dim=128,
            kv_cache_bits=8,
            parallel=2,
        )
    )

    assert spec == ModelSpec("m", 7, 4.5, 16384, 28, 4, 128, kv_cache_bits=8, parallel=2)
    assert spec.notes == ()


def test_spec_estimates_the_shape_by_size_and_says_so() -> None:
    spec = spec_from_entry(_entry(parameters_b=70, quantization_bits=4, context_length=32768))
    assert spec is not None
    assert (spec.layers, spec.kv_heads, spec.head_dim) == (80, 8, 128)
    assert any("estimated" in n for n in spec.notes)

    for size, shape in [(8, (32, 8, 128)), (14, (48, 8, 128)), (32, (64, 8, 128))]:
        est = spec_from_entry(_entry(parameters_b=size, quantization_bits=4, context_length=4096))
        assert est is not None
        assert (est.layers, est.kv_heads, est.head_dim) == shape

    partial = spec_from_entry(
        _entry(parameters_b=7, quantization_bits=4, context_length=4096, layers=28)
    )
    assert partial is not None
    assert (partial.layers, partial.kv_heads, partial.head_dim) == (28, 8, 128)
    assert any(n.startswith("kv_heads/head_dim estimated") for n in partial.notes)


def test_spec_assumes_missing_bits_and_context() -> None:
    chat = spec_from_entry(_entry(parameters_b=70, max_tokens=32768))
    assert chat is not None
    assert chat.quantization_bits == 16
    assert chat.context_length == 32768  # from max_tokens
    assert any("quantization_bits assumed 16" in n for n in chat.notes)

    ollama = spec_from_entry(
        ModelEntry.model_validate(
            {
                "model_name": "o",
                "litellm_params": {"model": "ollama/qwen2.5:7b", "api_base": OLLAMA_LB},
                "model_info": {"parameters_b": 7},
            }
        )
    )
    assert ollama is not None
    assert ollama.quantization_bits == pytest.approx(4.9)
    assert ollama.context_length == 8192
    assert any("context_length assumed 8192" in n for n in ollama.notes)


def test_spec_kind_from_mode_or_kind() -> None:
    embedding = spec_from_entry(_entry(parameters_b=0.137, mode="embedding"))
    assert embedding is not None
    assert embedding.kind == "embedding"
    assert embedding.quantization_bits == 16
    for info, kind in [
        ({"kind": "embedding"}, "embedding"),
        ({"mode": "chat"}, "chat"),
        ({}, "chat"),
    ]:
        spec = spec_from_entry(_entry(parameters_b=0.3, **info))
        assert spec is not None
        assert spec.kind == kind
    assert spec_from_entry(_entry(parameters_b=3, mode="image_generation")) is None


def test_spec_without_parameters_is_none() -> None:
    assert spec_from_entry(_entry(quantization_bits=4, context_length=4096)) is None
    assert spec_from_entry(_entry()) is None


@pytest.mark.parametrize(
    "info",
    [{"layers": "many"}, {"layers": 0}, {"kv_heads": True}, {"kind": "vision"}, {"parallel": 1.5}],
)
def test_spec_refuses_malformed_extra_keys(info: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        spec_from_entry(_entry(parameters_b=7, **info))
    assert err.value.key is not None
    assert err.value.key.startswith("model_list.m.model_info.")


# -- the seed cluster ------------------------------------------------------------------------------


def test_seed_cluster_plan() -> None:
    result = plan(_config())
    placed = _by_alias(result)

    assert result.complete
    assert result.unplaced == ()
    assert result.skipped == ()
    assert len(result.placements) == 4  # gpt-4 and llama-70b are one deployment

    big = placed["gpt-4"]
    assert big is placed["llama-70b"]
    assert big.aliases == ("gpt-4", "llama-70b")
    assert (big.node, big.gpus, big.tensor_parallel) == ("hydra-ai", (0, 1), True)
    assert big.need.total_gib == pytest.approx(45.226, abs=1e-3)
    assert "estimated" in big.reason

    for alias in ("gpt-3.5-turbo", "codellama", "text-embedding-ada-002"):
        assert placed[alias].node == "hydra-compute"
        assert not placed[alias].tensor_parallel
        assert len(placed[alias].gpus) == 1
    # the larger 7B (estimated Llama-3-8B shape) first on GPU 0; then the other 7B and the
    # embedding model on the 5070 Ti with more room, as the seed runs them (11434 / 11435)
    assert placed["codellama"].gpus == (0,)
    assert placed["gpt-3.5-turbo"].gpus == (1,)
    assert placed["text-embedding-ada-002"].gpus == (1,)
    assert placed["gpt-3.5-turbo"].need.total_gib == pytest.approx(
        7e9 * 4.5 / 8 / GIB * 1.05 + 1.75 + 0.5
    )


def test_seed_cluster_plan_accounts_for_every_gib() -> None:
    result = plan(_config())
    free = {(g.node, g.index): g.free_gib for g in result.gpus}

    assert free[("hydra-compute", 0)] == pytest.approx(16 - (7e9 * 4.5 / 8 / GIB * 1.05 + 4.5))
    used = sum(g.start_gib - g.free_gib for g in result.gpus)
    assert used == pytest.approx(sum(p.need.total_gib for p in result.placements))
    assert all(g.free_gib >= 0 for g in result.gpus)
    # the 70B is split in proportion to each card's room after its 0.5 GiB overhead
    big = result.placements[0]
    body = big.need.total_gib - 1.0
    assert free[("hydra-ai", 0)] == pytest.approx(32 - 0.5 - body * 31.5 / 55)
    assert free[("hydra-ai", 1)] == pytest.approx(24 - 0.5 - body * 23.5 / 55)
    assert big.free_after_gib == (free[("hydra-ai", 0)], free[("hydra-ai", 1)])


def test_aliases_are_one_deployment_only_when_model_and_api_base_match() -> None:
    models = [
        _model("a", "openai/default", parameters_b=7, quantization_bits=4, context_length=4096),
        _model("b", "openai/default"),
        {
            **_model("c", "openai/default"),
            "litellm_params": {"model": "openai/default", "api_base": "http://other:1/v1"},
        },
    ]
    models[2]["model_info"] = {"parameters_b": 7, "quantization_bits": 4, "context_length": 4096}

    result = plan(_config(models))

    assert [p.aliases for p in result.placements] == [("a", "b"), ("c",)]
    assert "one deployment for a, b" in result.placements[0].reason


def test_render_text_and_json() -> None:
    result = plan(_config())

    text = render_text(result)
    assert "gpt-4, llama-70b" in text
    assert "hydra-ai" in text and "0+1" in text and "45.2" in text
    assert "hydra-compute" in text
    data = plan_to_json(result)
    json.dumps(data)
    assert data["complete"] is True
    first = data["placements"][0]
    assert first["aliases"] == ["gpt-4", "llama-70b"]
    assert first["node"] == "hydra-ai"
    assert first["gpus"] == [0, 1]
    assert first["tensor_parallel"] is True
    assert first["need"]["kv_cache_gib"] == 10.0
    assert set(first["need"]) == {"weights_gib", "kv_cache_gib", "overhead_gib", "total_gib"}
    assert {g["node"] for g in data["gpus"]} == {"hydra-ai", "hydra-compute"}
    assert data["unplaced"] == [] and data["skipped"] == []


# -- models that fit nowhere -----------------------------------------------------------------------


def test_a_120b_fp16_model_is_unplaced_and_named_in_the_error() -> None:
    huge = _model(
        "huge", "openai/huge", parameters_b=120, quantization_bits=16, context_length=8192
    )
    cfg = _config([*SEED_MODELS, huge])

    result = plan(cfg)

    assert not result.complete
    assert [u.alias for u in result.unplaced] == ["huge"]
    assert {a for p in result.placements for a in p.aliases} == {
        "gpt-4",
        "llama-70b",
        "gpt-3.5-turbo",
        "codellama",
        "text-embedding-ada-002",
    }
    need = result.unplaced[0].need
    assert need.weights_gib == pytest.approx(240e9 / GIB)  # 223.5 GiB
    with pytest.raises(PlacementError) as err:
        plan_or_raise(cfg)
    message = str(err.value)
    assert isinstance(err.value, TyphonError)
    assert err.value.code == "no_placement" and err.value.exit_code == 2
    assert err.value.alias == "huge"
    assert f"model 'huge' needs {need.total_gib:.1f} GiB (weights 223.5 + KV" in message
    # it is the largest, so it was tried first, with every GPU still free
    assert "the largest free VRAM is 56.0 GiB on hydra-ai (tensor parallel)" in message
    assert "32.0 GiB on one GPU (hydra-ai GPU 0)" in message
    assert plan_to_json(result)["unplaced"][0]["error"] == message
    assert message in render_text(result)


def test_plan_or_raise_returns_a_complete_plan() -> None:
    assert plan_or_raise(_config()).complete


def test_no_nodes_means_nothing_is_placed() -> None:
    result = plan(_config(nodes=[]))

    assert result.placements == ()
    assert len(result.unplaced) == 4
    error = result.error()
    assert error is not None
    assert "no node has a GPU" in str(error)


# -- live free VRAM --------------------------------------------------------------------------------


def test_free_vram_override_changes_the_choice() -> None:
    seven = [SEED_MODELS[2]]
    assert _by_alias(plan(_config(seven)))["gpt-3.5-turbo"].node == "hydra-compute"

    busy = plan(_config(seven), free_vram={"hydra-compute": [1.0, 1.5]})

    placed = _by_alias(busy)["gpt-3.5-turbo"]
    # no room on the 5070 Ti node: the smaller card of hydra-ai that holds it, the 4090
    assert (placed.node, placed.gpus) == ("hydra-ai", (1,))
    starts = {(g.node, g.index): g.start_gib for g in busy.gpus}
    assert starts[("hydra-compute", 1)] == 1.5


def test_free_vram_too_small_for_the_70b_names_the_live_figures() -> None:
    result = plan(_config(), free_vram={"hydra-ai": [20.0, 18.0]})

    assert [u.alias for u in result.unplaced] == ["gpt-4"]
    assert result.unplaced[0].aliases == ("gpt-4", "llama-70b")
    message = str(result.error())
    assert "38.0 GiB on hydra-ai (tensor parallel)" in message
    assert "20.0 GiB on one GPU (hydra-ai GPU 0)" in message


def test_a_node_only_known_from_free_vram_is_used() -> None:
    result = plan(_config([SEED_MODELS[2]], nodes=[]), free_vram={"gpu-box": [12.0]})

    assert _by_alias(result)["gpt-3.5-turbo"].node == "gpu-box"


# -- sizes between the table's rows ----------------------------------------------------------------


def test_model_without_parameters_is_skipped_with_a_reason() -> None:
    unknown = _model("mystery", "openai/mystery", context_length=4096)

    result = plan(_config([*SEED_MODELS, unknown]))

    assert result.complete
    assert [(s.alias, s.aliases) for s in result.skipped] == [("mystery", ("mystery",))]
    assert "parameters_b" in result.skipped[0].reason
    assert "mystery" not in _by_alias(result)
    assert "mystery: model_info.parameters_b is not set" in render_text(result)


def test_14b_goes_to_one_5070ti_when_it_fits_else_split_over_both() -> None:
    small = _model(
        "r1-14b", "ollama/r1:14b", parameters_b=14, quantization_bits=4.5, context_length=8192
    )
    placed = _by_alias(plan(_config([SEED_MODELS[0], small])))["r1-14b"]
    assert (placed.node, len(placed.gpus), placed.tensor_parallel) == ("hydra-compute", 1, False)
    assert placed.need.total_gib < 16

    big = _model(
        "r1-14b", "ollama/r1:14b", parameters_b=14, quantization_bits=8, context_length=32768
    )
    placed = _by_alias(plan(_config([SEED_MODELS[0], big])))["r1-14b"]
    assert placed.need.total_gib > 16
    assert (placed.node, placed.gpus, placed.tensor_parallel) == ("hydra-compute", (0, 1), True)
    assert "split" in placed.reason


def test_70b_needs_a_tensor_parallel_node_even_when_another_node_has_the_room() -> None:
    nodes = [
        {"name": "wide", "gpus": [{"name": "A", "vram_gb": 40}, {"name": "B", "vram_gb": 40}]},
        {
            "name": "tp",
            "tensor_parallel": True,
            "gpus": [{"name": "C", "vram_gb": 32}, {"name": "D", "vram_gb": 24}],
        },
    ]
    placed = _by_alias(plan(_config([SEED_MODELS[0]], nodes=nodes)))["gpt-4"]
    assert (placed.node, placed.gpus) == ("tp", (0, 1))


def test_70b_uses_one_big_gpu_when_no_tensor_parallel_node_has_room() -> None:
    nodes = [{"name": "h100", "gpus": [{"name": "H100", "vram_gb": 80}]}]
    placed = _by_alias(plan(_config([SEED_MODELS[0]], nodes=nodes)))["gpt-4"]
    assert (placed.node, placed.gpus, placed.tensor_parallel) == ("h100", (0,), False)


def test_7b_prefers_the_small_cards_over_the_tensor_parallel_node() -> None:
    result = plan(_config([SEED_MODELS[3], SEED_MODELS[4]]))

    assert {p.node for p in result.placements} == {"hydra-compute"}


# -- the shipped cluster config --------------------------------------------------------------------


def test_deploy_hydra_config_has_a_complete_plan() -> None:
    cfg = load_config(REPO / "deploy" / "typhon.hydra.yaml", environ={})
    if not cfg.nodes:
        pytest.skip("deploy/typhon.hydra.yaml has no nodes yet")

    result = plan(cfg)

    assert result.complete, render_text(result)
    assert _by_alias(result)["gpt-4"].node == "hydra-ai"


def test_deploy_hydra_models_on_the_seed_nodes() -> None:
    cfg = load_config(REPO / "deploy" / "typhon.hydra.yaml", environ={})
    seeded = _config(nodes=SEED_NODES)
    cfg = cfg.model_copy(update={"nodes": seeded.nodes})

    result = plan(cfg)

    assert result.complete, render_text(result)
    placed = _by_alias(result)
    assert placed["gpt-4"].aliases == ("gpt-4", "llama-70b")
    assert placed["gpt-4"].node == "hydra-ai"
    assert placed["gpt-3.5-turbo"].node == "hydra-compute"
    assert placed["codellama"].node == "hydra-compute"


def test_aliases_with_different_model_info_use_the_larger_need() -> None:
    models = [
        _model("a", "openai/default", parameters_b=70, quantization_bits=4, context_length=8192),
        _model("b", "openai/default", parameters_b=70, quantization_bits=5, context_length=8192),
    ]

    placed = plan(_config(models)).placements

    assert len(placed) == 1
    assert placed[0].need.weights_gib == pytest.approx(70e9 * 5 / 8 / GIB)
    assert "model_info differ" in placed[0].reason
