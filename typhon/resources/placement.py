"""Model placement: how much VRAM each model of the catalog needs, and which node's GPUs hold it.

The VRAM a model needs
----------------------

All sizes are GiB (2**30 bytes). A GPU's ``vram_gb`` in ``nodes:`` is read as GiB too: a "32 GB"
RTX 5090 has 32 GiB of memory (nvidia-smi shows 32607 MiB of it as usable).

::

    weights  = parameters * quantization_bits / 8                              bytes
    kv_cache = 2 (K and V) * layers * kv_heads * head_dim * context_length
               * kv_cache_bits / 8 * parallel                                  bytes
    overhead = 0.5 GiB per GPU the model is loaded on (CUDA context, the engine's buffers)
               + 5 % of the weights (activations and scratch space while a batch runs)
    total    = weights + kv_cache + overhead

``parallel`` is the number of sequences that keep a full-length cache at the same time (one by
default; Ollama's ``OLLAMA_NUM_PARALLEL`` multiplies its cache that way, set it as
``model_info.parallel``). llama-server's ``--parallel`` slots share one ``ctx_size`` cache, so a
``local/...`` model's ``parallel`` does not count.

Worked example, the seed's 70B on hydra-ai (4.0 bpw, 32K context, FP16 cache, TP over 2 GPUs; a
Llama-2/3-70B shape: 80 layers, 8 KV heads of 128)::

    weights  = 70e9 * 4.0 / 8                        = 35.0e9 B  = 32.60 GiB
    kv_cache = 2 * 80 * 8 * 128 * 32768 * 16 / 8     = 10.74e9 B = 10.00 GiB
    overhead = 2 * 0.5 + 0.05 * 32.60                            =  2.63 GiB
    total                                                        = 45.23 GiB (48.6 GB)

The seed (Part 2, TabbyAPI notes) writes "70B @ 4.0bpw (~52GB) ... 32K context". That figure is a
rounded rule of thumb for the whole footprint, not a sum we can reproduce: besides the weights and
the FP16 cache it covers what ExLlamaV2 adds and this formula only approximates: EXL2's "4.0 bpw"
is the average over the quantised linear layers, while the output head is kept at 6-8 bits and the
embedding table in FP16 (0.5-2 GiB more for a 70B, depending on the vocabulary), per-GPU scratch
buffers sized by the chunk length, and the reserve ``gpu_split_auto`` leaves on each card. Our
formula gives 45.2 GiB, about 3.4 GB (7 %) under the seed's 52 GB. We keep it because every term
comes from the model's shape and can be checked, and both figures lead to the same decision: the
model fits the 56 GiB of the 5090 + 4090 pair and no single GPU. Where a node is known to be
tighter, give the live free VRAM (``free_vram``) rather than padding the formula.

Where the numbers come from
---------------------------

``model_info`` of each ``model_list`` entry: ``parameters_b``, ``quantization_bits`` and
``context_length`` (Typhon's fields), plus optional extra keys ``layers``, ``kv_heads``,
``head_dim``, ``kv_cache_bits`` (16 = FP16 cache, 8 = Q8 ...), ``parallel`` and ``kind``
(``chat`` or ``embedding``; LiteLLM's ``mode: embedding`` means the same). Missing values are
estimated, and the plan says so:

- layers / KV heads / head size: from the common architecture of that size (:data:`ARCHITECTURES`);
- quantization_bits: 16 for embedding models, 4.9 for ``ollama/...`` (its default tags are
  Q4_K_M), otherwise 16 (unquantised, the safe guess);
- context_length: ``max_input_tokens``, ``max_tokens``, a ``local/...`` model's ``ctx_size``,
  else 8192 (2048 for embedding models).

An entry without ``parameters_b`` is skipped with a reason. Several aliases that name the same
backend model (same ``litellm_params.model``, ``api_base`` and ``model_path``) are one deployment,
placed once.

Where a model goes (the seed's "Model Placement Strategy" table)
----------------------------------------------------------------

Models are placed greedily, the largest first, and what each takes is subtracted from its GPUs'
free VRAM, so several models on one node are accounted for. Within each step the smallest GPU
(by its size; for a split, the GPUs' sizes together) that holds the model wins, which keeps the big
cards free; among cards of one size the one with most room left, so equal cards share the load
(the seed runs one Ollama per 5070 Ti); remaining ties go to the node listed first.

- chat models of 60B and more: split over the GPUs of a ``tensor_parallel: true`` node (the 70B on
  the 5090 + 4090 with ExLlamaV2); only where no such node has room, one GPU that holds it whole.
- 14B up to 60B: one GPU that holds it, else a split over two or more GPUs of one node; nodes
  without tensor parallel first (the table puts 14B-32B on the 5070 Ti node, "Ollama TP=2 or
  single GPU"), which keeps the tensor-parallel node for the 70B.
- below 14B (7B-8B, 3B): one GPU, the smallest that holds it, nodes without tensor parallel
  first (the 5070 Ti node, leaving the big node to the 70B); a split only when no single GPU can.
- embedding models: any single GPU with room, nodes without tensor parallel first.

A split over k GPUs charges the 0.5 GiB overhead on each and spreads the rest in proportion to the
room each GPU has (what ``gpu_split_auto`` aims for).

:func:`plan` collects models that fit nowhere in :attr:`Plan.unplaced`; :func:`plan_or_raise` and
:meth:`Plan.error` turn the first into a :class:`PlacementError` naming its need and the largest
free VRAM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from typhon.errors import ConfigError, TyphonError

if TYPE_CHECKING:
    from typhon.config import ModelEntry, TyphonConfig

__all__ = [
    "ACTIVATION_FRACTION",
    "ARCHITECTURES",
    "GIB",
    "GPU_OVERHEAD_GIB",
    "GpuState",
    "ModelSpec",
    "Placement",
    "PlacementError",
    "Plan",
    "Skipped",
    "Unplaced",
    "VramNeed",
    "plan",
    "plan_or_raise",
    "plan_to_json",
    "render_text",
    "spec_from_entry",
    "vram_need",
]

GIB = 1024**3
GPU_OVERHEAD_GIB = 0.5
"""Fixed VRAM per GPU a model is loaded on: CUDA context and the inference engine's buffers."""
ACTIVATION_FRACTION = 0.05
"""Share of the weights' size kept for activations and scratch space."""
LARGE_B = 60.0
"""Chat models of this many billion parameters or more go on a tensor-parallel node."""
MEDIUM_B = 14.0
"""Below this, a chat model stays on one GPU unless no GPU can hold it."""
DEFAULT_CONTEXT = 8192
DEFAULT_EMBEDDING_CONTEXT = 2048
OLLAMA_DEFAULT_BITS = 4.9
_EPS = 1e-9

Kind = Literal["chat", "embedding"]

ARCHITECTURES: tuple[tuple[float, int, int, int, str], ...] = (
    # (up to parameters_b, layers, kv_heads, head_dim, typical model) for chat models
    (1.0, 24, 4, 64, "Qwen2.5-0.5B / Gemma 3 270M"),
    (2.0, 28, 4, 128, "Qwen2.5-1.5B / Llama 3.2 1B"),
    (4.5, 28, 8, 128, "Llama 3.2 3B"),
    (10.0, 32, 8, 128, "Llama 3 8B / Mistral 7B"),
    (16.0, 48, 8, 128, "Qwen2.5-14B / DeepSeek-R1-Distill-14B"),
    (26.0, 40, 8, 128, "Mistral Small 24B"),
    (40.0, 64, 8, 128, "Qwen2.5-32B"),
    (80.0, 80, 8, 128, "Llama 3 70B / Qwen2.5-72B"),
    (150.0, 88, 8, 128, "Mistral Large 123B"),
    (math.inf, 126, 8, 128, "Llama 3.1 405B"),
)
"""The shape assumed for a chat model of a given size when ``model_info`` does not give it. The
rows are the GQA models most served at that size; the 7-9B row is Llama 3 8B's, a little larger
than Qwen2.5-7B's (28 layers, 4 KV heads), so an estimate errs on the safe side."""
_EMBEDDING_ARCHITECTURE = (24, 16, 64, "BERT-large-class encoder (bge-large, mxbai-embed-large)")
_NON_LLM_MODES = ("image_generation", "audio_transcription", "audio_speech", "moderation")


# -- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What placement needs to know about one model. ``notes`` says what was estimated."""

    alias: str
    parameters_b: float
    quantization_bits: float
    context_length: int
    layers: int
    kv_heads: int
    head_dim: int
    kv_cache_bits: float = 16
    kind: Kind = "chat"
    parallel: int = 1
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class VramNeed:
    """VRAM a model needs, GiB."""

    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    total_gib: float

    def describe(self) -> str:
        return (
            f"{self.total_gib:.1f} GiB (weights {self.weights_gib:.1f} + KV {self.kv_cache_gib:.1f}"
            f" + overhead {self.overhead_gib:.1f})"
        )


@dataclass(frozen=True)
class Placement:
    """One deployment placed: ``aliases`` all name it (``alias`` is the first). ``free_after_gib``
    is the free VRAM left on each of ``gpus`` once it is loaded."""

    alias: str
    node: str
    gpus: tuple[int, ...]
    need: VramNeed
    tensor_parallel: bool
    reason: str
    aliases: tuple[str, ...] = ()
    free_after_gib: tuple[float, ...] = ()


@dataclass(frozen=True)
class Unplaced:
    """A deployment that fits nowhere. ``largest_gpu`` is (node, GPU index, free GiB) of the GPU
    with most room and ``largest_split`` (node, free GiB over its GPUs, tensor parallel) of the
    node with most room to split over, when the model was considered."""

    alias: str
    need: VramNeed
    reason: str
    aliases: tuple[str, ...] = ()
    largest_gpu: tuple[str, int, float] | None = None
    largest_split: tuple[str, float, bool] | None = None


@dataclass(frozen=True)
class Skipped:
    """A model left out of the plan because its size is unknown (or it is not a language model)."""

    alias: str
    reason: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class GpuState:
    """One GPU: free VRAM when planning started (``start_gib``) and once the plan is loaded."""

    node: str
    index: int
    name: str
    start_gib: float
    free_gib: float


@dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...] = ()
    unplaced: tuple[Unplaced, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    gpus: tuple[GpuState, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """True when every model with a known size was placed."""
        return not self.unplaced

    def error(self) -> PlacementError | None:
        """The error for the first model that fits nowhere, None when the plan is complete."""
        return PlacementError(self.unplaced[0]) if self.unplaced else None


class PlacementError(TyphonError):
    """A model fits on no GPU or node. ``unplaced`` holds its need and the largest free VRAM."""

    code = "no_placement"
    exit_code = 2

    def __init__(self, unplaced: Unplaced):
        self.unplaced = unplaced
        self.alias = unplaced.alias
        self.need = unplaced.need
        super().__init__(_error_message(unplaced))


def _error_message(item: Unplaced) -> str:
    text = f"model '{item.alias}' needs {item.need.describe()}; "
    if item.largest_gpu is None:
        return text + "no node has a GPU: list the nodes and their GPUs under `nodes:`"
    parts = []
    if item.largest_split is not None:
        node, gib, tp = item.largest_split
        parts.append(f"{gib:.1f} GiB on {node} ({'tensor parallel' if tp else 'split'})")
    node, index, gib = item.largest_gpu
    parts.append(f"{gib:.1f} GiB on one GPU ({node} GPU {index})")
    return (
        text + f"the largest free VRAM is {' / '.join(parts)}; lower its quantization_bits or"
        " context_length, or free VRAM on a node"
    )


# -- model specs -----------------------------------------------------------------------------------


def _bad(alias: str, key: str, message: str) -> ConfigError:
    return ConfigError(message, key=f"model_list.{alias}.model_info.{key}")


def _int_extra(extras: Mapping[str, Any], alias: str, key: str) -> int | None:
    value = extras.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(alias, key, f"must be a positive whole number, not {value!r}")
    return value


def _float_extra(extras: Mapping[str, Any], alias: str, key: str) -> float | None:
    value = extras.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _bad(alias, key, f"must be a positive number, not {value!r}")
    return float(value)


def _kind(entry: ModelEntry, extras: Mapping[str, Any]) -> tuple[Kind | None, str | None]:
    """(kind, note); kind None means: not a language model."""
    alias = entry.model_name
    kind = extras.get("kind")
    if kind is not None:
        if kind not in ("chat", "embedding"):
            raise _bad(alias, "kind", f"must be 'chat' or 'embedding', not {kind!r}")
        return ("embedding" if kind == "embedding" else "chat"), None
    mode = extras.get("mode")
    if mode in ("embedding", "rerank"):
        return "embedding", None
    if mode in _NON_LLM_MODES:
        return None, f"model_info.mode '{mode}' is not a language model"
    if mode is None and "embed" in entry.litellm_params.model_id.lower():
        return "embedding", "kind embedding guessed from the model name"
    return "chat", None


def _architecture(parameters_b: float, kind: Kind) -> tuple[int, int, int, str]:
    if kind == "embedding" and parameters_b <= 1.0:
        return _EMBEDDING_ARCHITECTURE
    for upto, layers, kv_heads, head_dim, example in ARCHITECTURES:
        if parameters_b <= upto:
            return layers, kv_heads, head_dim, example
    raise AssertionError("unreachable: the last row has no upper bound")  # pragma: no cover


def _spec(entry: ModelEntry) -> tuple[ModelSpec | None, str]:
    """The spec, or None and why the entry is skipped."""
    alias = entry.model_name
    info = entry.model_info
    extras: Mapping[str, Any] = info.model_extra or {}
    kind, kind_note = _kind(entry, extras)
    if kind is None:
        return None, kind_note or "not a language model"
    if info.parameters_b is None:
        return None, "model_info.parameters_b is not set, so its VRAM need is unknown"
    notes: list[str] = [kind_note] if kind_note else []
    params = info.parameters_b

    bits = info.quantization_bits
    if bits is None:
        provider = entry.litellm_params.provider
        if kind == "chat" and provider == "ollama":
            bits = OLLAMA_DEFAULT_BITS
            notes.append(f"quantization_bits assumed {bits:g} (Ollama's default tags are Q4_K_M)")
        else:
            bits = 16.0
            notes.append("quantization_bits assumed 16 (unquantised)")

    context = info.context_length
    if context is None:
        fallback = _int_extra(extras, alias, "max_input_tokens") or info.max_tokens
        if fallback is None and entry.litellm_params.provider == "local":
            fallback = entry.litellm_params.ctx_size
        default = DEFAULT_EMBEDDING_CONTEXT if kind == "embedding" else DEFAULT_CONTEXT
        context = fallback or default
        notes.append(f"context_length assumed {context}")

    layers = _int_extra(extras, alias, "layers")
    kv_heads = _int_extra(extras, alias, "kv_heads")
    head_dim = _int_extra(extras, alias, "head_dim")
    if layers is None or kv_heads is None or head_dim is None:
        est_layers, est_heads, est_dim, example = _architecture(params, kind)
        missing = [
            k
            for k, v in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim))
            if v is None
        ]
        layers = layers or est_layers
        kv_heads = kv_heads or est_heads
        head_dim = head_dim or est_dim
        shape = f"{layers}/{kv_heads}/{head_dim}"
        notes.append(f"{'/'.join(missing)} estimated as for {example} ({shape})")

    kv_bits = _float_extra(extras, alias, "kv_cache_bits") or 16.0
    parallel = _int_extra(extras, alias, "parallel") or 1
    spec = ModelSpec(
        alias=alias,
        parameters_b=params,
        quantization_bits=bits,
        context_length=context,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_cache_bits=kv_bits,
        kind=kind,
        parallel=parallel,
        notes=tuple(notes),
    )
    return spec, ""


def spec_from_entry(entry: ModelEntry) -> ModelSpec | None:
    """The placement spec of a ``model_list`` entry; None when its size (``parameters_b``) is
    unknown or it is not a language model. Raises :class:`ConfigError` for a malformed extra key
    (``layers: many``)."""
    return _spec(entry)[0]


def vram_need(spec: ModelSpec, *, gpus: int = 1, parallel: int | None = None) -> VramNeed:
    """VRAM ``spec`` needs loaded on ``gpus`` GPUs, with ``parallel`` full-length sequences
    (default ``spec.parallel``). The formula is in the module's docstring."""
    if gpus < 1:
        raise ValueError("gpus must be at least 1")
    sequences = spec.parallel if parallel is None else parallel
    weights = spec.parameters_b * 1e9 * spec.quantization_bits / 8 / GIB
    kv = (
        2
        * spec.layers
        * spec.kv_heads
        * spec.head_dim
        * spec.context_length
        * spec.kv_cache_bits
        / 8
        * sequences
        / GIB
    )
    overhead = gpus * GPU_OVERHEAD_GIB + ACTIVATION_FRACTION * weights
    return VramNeed(weights, kv, overhead, weights + kv + overhead)


# -- planning --------------------------------------------------------------------------------------


@dataclass
class _Gpu:
    node: str
    index: int
    name: str
    size: float  # the card's VRAM where configured, else its free VRAM at the start
    start: float
    free: float


@dataclass
class _Node:
    name: str
    tensor_parallel: bool
    gpus: list[_Gpu]


@dataclass
class _Deployment:
    aliases: list[str]
    spec: ModelSpec | None = None
    skip_reason: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Option:
    node: _Node
    gpus: tuple[_Gpu, ...]
    need: VramNeed
    used: tuple[float, ...]

    @property
    def leftover(self) -> float:
        return sum(g.free for g in self.gpus) - self.need.total_gib


def _nodes(config: TyphonConfig, free_vram: Mapping[str, Sequence[float]] | None) -> list[_Node]:
    free_vram = free_vram or {}
    nodes: list[_Node] = []
    for node in config.nodes:
        names = [g.name for g in node.gpus]
        sizes = [g.vram_gb for g in node.gpus]
        free: Sequence[float] = sizes
        if node.name in free_vram:
            free = [max(0.0, float(v)) for v in free_vram[node.name]]
        gpus = [
            _Gpu(
                node.name,
                i,
                names[i] if i < len(names) else f"GPU {i}",
                sizes[i] if i < len(sizes) else room,
                room,
                room,
            )
            for i, room in enumerate(free)
        ]
        nodes.append(_Node(node.name, node.tensor_parallel, gpus))
    known = {n.name for n in nodes}
    for name, rooms in free_vram.items():  # a node discovered but not configured
        if name not in known:
            gpus = [
                _Gpu(name, i, f"GPU {i}", room, room, room)
                for i, room in enumerate(max(0.0, float(v)) for v in rooms)
            ]
            nodes.append(_Node(name, False, gpus))
    return nodes


def _sizing(spec: ModelSpec) -> tuple[Any, ...]:
    return (
        spec.parameters_b,
        spec.quantization_bits,
        spec.context_length,
        spec.layers,
        spec.kv_heads,
        spec.head_dim,
        spec.kv_cache_bits,
        spec.kind,
        spec.parallel,
    )


_LOCAL_REASON = "runs on this host's CPU (a llama-server Typhon starts itself), not on a GPU node"


def _deployments(config: TyphonConfig) -> list[_Deployment]:
    groups: dict[tuple[str, str, str], _Deployment] = {}
    for entry in config.models:
        params = entry.litellm_params
        key = (params.model, params.api_base or "", params.model_path or "")
        if params.provider == "local":  # a llama-server Typhon starts on this host's CPUs
            groups[key] = _Deployment([entry.model_name], None, _LOCAL_REASON)
            continue
        spec, why = _spec(entry)
        group = groups.get(key)
        if group is None:
            groups[key] = _Deployment([entry.model_name], spec, why)
            continue
        group.aliases.append(entry.model_name)
        if spec is None:
            continue
        if group.spec is None:
            group.spec = spec
            continue
        if _sizing(spec) != _sizing(group.spec):
            if not group.notes:
                group.notes.append("the aliases' model_info differ; the larger need is used")
            if vram_need(spec).total_gib > vram_need(group.spec).total_gib:
                group.spec = spec
    return list(groups.values())


def _single_options(spec: ModelSpec, nodes: Sequence[_Node]) -> list[_Option]:
    need = vram_need(spec, gpus=1)
    return [
        _Option(node, (gpu,), need, (need.total_gib,))
        for node in nodes
        for gpu in node.gpus
        if gpu.free + _EPS >= need.total_gib
    ]


def _split_options(spec: ModelSpec, nodes: Sequence[_Node]) -> list[_Option]:
    """For each node, the fewest of its roomiest GPUs (two or more) that hold ``spec`` together."""
    options = []
    for node in nodes:
        roomiest = sorted(node.gpus, key=lambda g: (-g.free, g.index))
        for k in range(2, len(roomiest) + 1):
            chosen = sorted(roomiest[:k], key=lambda g: g.index)
            need = vram_need(spec, gpus=k)
            room = [g.free - GPU_OVERHEAD_GIB for g in chosen]
            if min(room) <= 0:
                break
            body = need.total_gib - k * GPU_OVERHEAD_GIB
            if sum(room) + _EPS >= body:
                used = tuple(GPU_OVERHEAD_GIB + body * r / sum(room) for r in room)
                options.append(_Option(node, tuple(chosen), need, used))
                break
    return options


_Step = tuple[str, Callable[[ModelSpec, Sequence[_Node]], list[_Option]], bool | None]


def _steps(spec: ModelSpec) -> tuple[str, list[_Step]]:
    """(class description, [(step description, option finder, tensor_parallel nodes or None)])."""
    single, split = _single_options, _split_options
    if spec.kind == "embedding":
        return "embedding model", [
            ("one GPU with room, on a node without tensor parallel", single, False),
            ("one GPU with room", single, True),
        ]
    if spec.parameters_b >= LARGE_B:
        return f"{LARGE_B:g}B+ chat model", [
            ("tensor parallel over the GPUs of a tensor-parallel node", split, True),
            ("no tensor-parallel node has room; one GPU holds it whole", single, None),
        ]
    if spec.parameters_b >= MEDIUM_B:
        return f"{MEDIUM_B:g}B-{LARGE_B:g}B chat model", [
            ("one GPU, on a node without tensor parallel", single, False),
            ("split over GPUs of a node without tensor parallel", split, False),
            ("one GPU, on a tensor-parallel node", single, True),
            ("split over GPUs of a tensor-parallel node", split, True),
        ]
    return f"chat model under {MEDIUM_B:g}B", [
        ("the smallest GPU that holds it, on a node without tensor parallel", single, False),
        ("the smallest GPU that holds it, on a tensor-parallel node", single, True),
        ("no single GPU has room; split over GPUs of a node without tensor parallel", split, False),
        ("no single GPU has room; split over GPUs of a tensor-parallel node", split, True),
    ]


def _choose(spec: ModelSpec, nodes: Sequence[_Node]) -> tuple[_Option, str, str] | None:
    size, steps = _steps(spec)
    order = {id(n): i for i, n in enumerate(nodes)}
    for description, finder, tp in steps:
        eligible = [n for n in nodes if tp is None or n.tensor_parallel is tp]
        options = finder(spec, eligible)
        if options:
            best = min(
                options,
                key=lambda o: (
                    sum(g.size for g in o.gpus),
                    -o.leftover,
                    order[id(o.node)],
                    [g.index for g in o.gpus],
                ),
            )
            return best, size, description
    return None


def _largest_free(
    spec: ModelSpec, nodes: Sequence[_Node]
) -> tuple[tuple[str, int, float] | None, tuple[str, float, bool] | None]:
    gpus = [g for n in nodes for g in n.gpus]
    largest_gpu = None
    if gpus:
        top = max(gpus, key=lambda g: (g.free, -g.index))
        largest_gpu = (top.node, top.index, top.free)
    multi = [n for n in nodes if len(n.gpus) >= 2]
    if spec.kind == "embedding":
        multi = []
    elif spec.parameters_b >= LARGE_B:
        multi = [n for n in multi if n.tensor_parallel]
    largest_split = None
    if multi:
        best = max(multi, key=lambda n: sum(g.free for g in n.gpus))
        largest_split = (best.name, sum(g.free for g in best.gpus), best.tensor_parallel)
    return largest_gpu, largest_split


def plan(config: TyphonConfig, *, free_vram: Mapping[str, Sequence[float]] | None = None) -> Plan:
    """Place every model of ``config.models`` on ``config.nodes``.

    ``free_vram`` maps a node's name to the free GiB of each of its GPUs (from hardware
    discovery); those figures replace the configured ``vram_gb`` of that node, and a node only
    found there is used as a node without tensor parallel. Models that fit nowhere end in
    :attr:`Plan.unplaced`; nothing is raised for them."""
    nodes = _nodes(config, free_vram)
    deployments = _deployments(config)
    skipped = [
        Skipped(d.aliases[0], d.skip_reason, tuple(d.aliases))
        for d in deployments
        if d.spec is None
    ]
    sized = [d for d in deployments if d.spec is not None]
    sized.sort(
        key=lambda d: -vram_need(d.spec).total_gib if d.spec else 0.0
    )  # stable: ties keep order

    placements: list[Placement] = []
    unplaced: list[Unplaced] = []
    for dep in sized:
        spec = dep.spec
        assert spec is not None
        aliases = tuple(dep.aliases)
        notes = list(dep.notes) + list(spec.notes)
        if len(aliases) > 1:
            notes.insert(0, f"one deployment for {', '.join(aliases)}")
        chosen = _choose(spec, nodes)
        if chosen is None:
            largest_gpu, largest_split = _largest_free(spec, nodes)
            size, _ = _steps(spec)
            reason = "; ".join([f"{size}: no GPU or node has room", *notes])
            unplaced.append(
                Unplaced(aliases[0], vram_need(spec), reason, aliases, largest_gpu, largest_split)
            )
            continue
        option, size, description = chosen
        for gpu, used in zip(option.gpus, option.used, strict=True):
            gpu.free -= used
        placements.append(
            Placement(
                alias=aliases[0],
                node=option.node.name,
                gpus=tuple(g.index for g in option.gpus),
                need=option.need,
                tensor_parallel=len(option.gpus) > 1,
                reason="; ".join([f"{size}: {description}", *notes]),
                aliases=aliases,
                free_after_gib=tuple(g.free for g in option.gpus),
            )
        )
    gpus = tuple(GpuState(g.node, g.index, g.name, g.start, g.free) for n in nodes for g in n.gpus)
    return Plan(tuple(placements), tuple(unplaced), tuple(skipped), gpus)


def plan_or_raise(
    config: TyphonConfig, *, free_vram: Mapping[str, Sequence[float]] | None = None
) -> Plan:
    """:func:`plan`, raising :class:`PlacementError` for the first model that fits nowhere."""
    result = plan(config, free_vram=free_vram)
    error = result.error()
    if error is not None:
        raise error
    return result


# -- output ----------------------------------------------------------------------------------------


def _need_json(need: VramNeed) -> dict[str, float]:
    return {
        "weights_gib": round(need.weights_gib, 3),
        "kv_cache_gib": round(need.kv_cache_gib, 3),
        "overhead_gib": round(need.overhead_gib, 3),
        "total_gib": round(need.total_gib, 3),
    }


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON data (GiB rounded to 3 decimals)."""
    return {
        "complete": plan.complete,
        "placements": [
            {
                "alias": p.alias,
                "aliases": list(p.aliases),
                "node": p.node,
                "gpus": list(p.gpus),
                "tensor_parallel": p.tensor_parallel,
                "need": _need_json(p.need),
                "free_after_gib": [round(f, 3) for f in p.free_after_gib],
                "reason": p.reason,
            }
            for p in plan.placements
        ],
        "unplaced": [
            {
                "alias": u.alias,
                "aliases": list(u.aliases),
                "need": _need_json(u.need),
                "reason": u.reason,
                "error": _error_message(u),
                "largest_free_gpu": None
                if u.largest_gpu is None
                else {
                    "node": u.largest_gpu[0],
                    "gpu": u.largest_gpu[1],
                    "free_gib": round(u.largest_gpu[2], 3),
                },
                "largest_free_node": None
                if u.largest_split is None
                else {
                    "node": u.largest_split[0],
                    "free_gib": round(u.largest_split[1], 3),
                    "tensor_parallel": u.largest_split[2],
                },
            }
            for u in plan.unplaced
        ],
        "skipped": [
            {"alias": s.alias, "aliases": list(s.aliases), "reason": s.reason} for s in plan.skipped
        ],
        "gpus": [
            {
                "node": g.node,
                "index": g.index,
                "name": g.name,
                "start_gib": round(g.start_gib, 3),
                "free_gib": round(g.free_gib, 3),
            }
            for g in plan.gpus
        ],
    }


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_text(plan: Plan) -> str:
    """A compact table of the plan, then why each model went where it did."""
    lines: list[str] = []
    if plan.placements:
        rows = [["MODEL", "NODE", "GPUS", "NEED GiB", "WEIGHTS", "KV", "OVERHEAD", "FREE AFTER"]]
        for p in plan.placements:
            rows.append(
                [
                    ", ".join(p.aliases or (p.alias,)),
                    p.node,
                    "+".join(str(i) for i in p.gpus),
                    f"{p.need.total_gib:.1f}",
                    f"{p.need.weights_gib:.1f}",
                    f"{p.need.kv_cache_gib:.1f}",
                    f"{p.need.overhead_gib:.1f}",
                    " + ".join(f"{f:.1f}" for f in p.free_after_gib),
                ]
            )
        lines += _table(rows, right={3, 4, 5, 6})
    else:
        lines.append("no model placed")
    if plan.unplaced:
        lines += ["", "unplaced:"]
        lines += [f"  {_error_message(u)}" for u in plan.unplaced]
    if plan.skipped:
        lines += ["", "skipped:"]
        lines += [f"  {', '.join(s.aliases or (s.alias,))}: {s.reason}" for s in plan.skipped]
    if plan.gpus:
        lines += ["", "free VRAM after the plan (GiB):"]
        rows = [
            [f"  {g.node}", f"GPU {g.index}", g.name, f"{g.free_gib:.1f} of {g.start_gib:.1f}"]
            for g in plan.gpus
        ]
        lines += _table(rows, right={3})
    if plan.placements or plan.unplaced:
        lines += ["", "why:"]
        lines += [f"  {p.alias}: {p.reason}" for p in plan.placements]
        lines += [f"  {u.alias}: {u.reason}" for u in plan.unplaced]
    return "\n".join(lines)
