"""Typhon's configuration: ``typhon.yaml`` plus ``TYPHON_*`` variables, validated by pydantic.

Where the file is looked for, first match wins:

1. the path given explicitly (``--config PATH`` / ``Typhon.from_config(path)``),
2. ``$TYPHON_CONFIG``,
3. ``./typhon.yaml``,
4. ``~/.config/typhon/typhon.yaml``,
5. nothing: the embedded defaults (SQLite, in-process dispatch, a local llama-server).

Any setting can be overridden by a variable: ``TYPHON_BROKER_URL``, ``TYPHON_DATABASE_URL``, and for
nested keys a double underscore, e.g. ``TYPHON_ROUTING__SIMPLE=llama-7b``. Values are read as YAML
scalars, so ``TYPHON_CREWS__RESEARCH__TIMEOUT_S=120`` is a number.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from typhon.api._settings import ApiConfig, HookConfig
from typhon.errors import ConfigError
from typhon.resources import parse_cpuset

__all__ = [
    "CATEGORIES",
    "ClusterConfig",
    "CrewSettings",
    "GpuSpec",
    "LitellmParams",
    "MemoryCacheSettings",
    "MemoryConfig",
    "ModelEntry",
    "ModelInfo",
    "NodeConfig",
    "PoolConfig",
    "RouterSettings",
    "TyphonConfig",
    "default_home",
    "find_config_file",
    "load_config",
    "masked",
]

CATEGORIES = ("simple", "complex", "code", "creative")

Category = Literal["simple", "complex", "code", "creative"]
LOCAL_ALIAS = "local"
# LiteLLM provider prefixes Typhon serves, by client. Cloud providers are not among them: Typhon
# talks to the cluster's own servers only.
OPENAI_PROVIDERS = ("openai", "hosted_vllm", "lm_studio", "llamafile", "litellm_proxy")
OLLAMA_PROVIDERS = ("ollama", "ollama_chat")
PROVIDERS = (*OPENAI_PROVIDERS, *OLLAMA_PROVIDERS, "local")
# LiteLLM's routing strategies. Typhon balances every replica group by least outstanding
# requests; latency-based-routing breaks ties by measured latency, the others in turn.
ROUTING_STRATEGIES = (
    "simple-shuffle",
    "least-busy",
    "usage-based-routing",
    "usage-based-routing-v2",
    "latency-based-routing",
    "cost-based-routing",
)
_SECRET_WORDS = ("api_key", "password", "secret", "token")


def default_home() -> Path:
    """``$TYPHON_HOME``, else ``~/.local/share/typhon``."""
    env = os.environ.get("TYPHON_HOME")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "typhon"


def _check_url(value: str | None, schemes: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in schemes:
        raise ValueError(f"'{value}' is not a URL with scheme {' or '.join(schemes)}")
    if scheme != "sqlite" and not parts.hostname:
        raise ValueError(f"'{value}' has no host")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LitellmParams(BaseModel):
    """LiteLLM's ``litellm_params``. Unknown LiteLLM keys (rpm, tpm, ...) are kept, not refused.

    ``model`` is ``PROVIDER/NAME``: ``openai/...`` for any OpenAI-compatible server (TabbyAPI,
    llama-server, vLLM, a LiteLLM proxy), ``ollama/...`` for Ollama, and ``local/...`` for a
    llama-server that Typhon starts itself from a GGUF file (the bundled model when none is named).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str
    api_base: str | None = None
    api_key: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0)
    # local/... only
    model_path: str | None = None
    threads: int = Field(default=1, ge=1)
    parallel: int = Field(default=4, ge=1)
    ctx_size: int = Field(default=32768, ge=512)

    @field_validator("api_base")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return _check_url(v, ("http", "https"))

    @field_validator("model")
    @classmethod
    def _provider(cls, v: str) -> str:
        if "/" not in v:
            raise ValueError(
                f"'{v}' must be PROVIDER/NAME, e.g. openai/default or ollama/qwen2.5:7b"
            )
        return v

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0]

    @property
    def model_id(self) -> str:
        return self.model.split("/", 1)[1]


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    description: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    parameters_b: float | None = Field(default=None, gt=0)
    quantization_bits: float | None = Field(default=None, gt=0)
    context_length: int | None = Field(default=None, ge=1)
    # GPUs one request occupies (2 for a tensor-parallel 70B): GPU-seconds = compute time x gpus.
    # Unset: 1 for a remote server, 0 for a ``local`` llama-server on this machine's CPU.
    gpus: int | None = Field(default=None, ge=0)


class ModelEntry(_Strict):
    """One entry of a LiteLLM-style ``model_list``."""

    model_name: str = Field(min_length=1)
    litellm_params: LitellmParams
    model_info: ModelInfo = Field(default_factory=ModelInfo)

    @property
    def is_chat(self) -> bool:
        """A chat model (LiteLLM's ``model_info.mode``, chat unless it says otherwise)."""
        return bool((self.model_info.model_extra or {}).get("mode", "chat") == "chat")

    @model_validator(mode="after")
    def _needs_base(self) -> ModelEntry:
        provider = self.litellm_params.provider
        if provider not in PROVIDERS:
            raise ValueError(
                f"model '{self.model_name}': unsupported provider '{provider}/' in"
                f" '{self.litellm_params.model}'; use openai/ for an OpenAI-compatible server"
                " (TabbyAPI, llama-server, vLLM, a LiteLLM proxy), ollama/ for Ollama, or local/"
            )
        if provider != "local" and not self.litellm_params.api_base:
            raise ValueError(f"model '{self.model_name}' needs litellm_params.api_base")
        return self

    @property
    def gpus(self) -> int:
        if self.model_info.gpus is not None:
            return self.model_info.gpus
        return 0 if self.litellm_params.provider == "local" else 1

    @property
    def context_window(self) -> int | None:
        info = self.model_info
        extra = info.model_extra or {}
        value = info.context_length or extra.get("max_input_tokens")
        if value is None and self.litellm_params.provider == "local":
            value = self.litellm_params.ctx_size // max(1, self.litellm_params.parallel)
        return int(value) if value else None


class RouterSettings(BaseModel):
    """LiteLLM's ``router_settings``, with the keys Typhon acts on; other LiteLLM keys are kept.

    Entries of ``model_list`` that share a ``model_name`` are one replica group, balanced by least
    outstanding requests. A replica that fails ``allowed_fails`` times in a row, or refuses the
    connection, cools down for ``cooldown_time`` seconds; health checks every
    ``health_check_interval`` seconds mark replicas down and bring them back. ``fallbacks``
    (LiteLLM's shape: ``[{"gpt-4": ["gpt-3.5-turbo"]}]``) name the aliases to use while every
    replica of an alias is down (the run is marked degraded). With nothing up, a call waits up to
    ``queue_timeout`` seconds for a replica before it fails."""

    model_config = ConfigDict(extra="allow", frozen=True)

    routing_strategy: str = "least-busy"
    enable_pre_call_checks: bool = False
    fallbacks: list[dict[str, list[str]]] = Field(default_factory=list)
    num_retries: int = Field(default=2, ge=0, le=10)
    allowed_fails: int = Field(default=3, ge=1)
    cooldown_time: float = Field(default=30.0, ge=0)
    timeout: float | None = Field(default=None, gt=0)
    health_check_interval: float = Field(default=15.0, gt=0)
    health_check_timeout: float = Field(default=3.0, gt=0)
    queue_timeout: float = Field(default=30.0, ge=0)

    @field_validator("routing_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if v not in ROUTING_STRATEGIES:
            raise ValueError(
                f"unknown routing_strategy '{v}'; use one of {', '.join(ROUTING_STRATEGIES)}"
            )
        return v

    def fallbacks_for(self, alias: str) -> list[str]:
        for item in self.fallbacks:
            if alias in item:
                return list(item[alias])
        return []


class PoolConfig(_Strict):
    """A crew pool: its queue, its sustained ``cap``, and ``burst_cap``, the most runs it may
    have at once when it also takes burst slots (only once its own ``cap`` slots are full)."""

    name: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9_-]*$")
    queue: str = ""
    cap: int = Field(ge=1)
    burst_cap: int | None = Field(default=None, ge=1)
    cpuset: str | None = None

    @property
    def ceiling(self) -> int:
        """The most runs at once: ``burst_cap`` when set, else ``cap`` (the worker concurrency)."""
        return max(self.cap, self.burst_cap or self.cap)

    @model_validator(mode="after")
    def _burst_above_cap(self) -> PoolConfig:
        if self.burst_cap is not None and self.burst_cap < self.cap:
            raise ValueError(f"burst_cap ({self.burst_cap}) must be at least cap ({self.cap})")
        return self

    @field_validator("cpuset")
    @classmethod
    def _cpuset(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpuset(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_queue(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("queue") and data.get("name"):
            return {**data, "queue": data["name"]}
        return data


class CrewSettings(_Strict):
    """Per-crew settings. ``model`` fixes the alias. Otherwise the router picks it: for
    ``category`` when set (or the crew's own), else for the category it reads in the input.

    ``timeout_s`` is the soft limit (the crew is stopped at its next step or model call);
    ``hard_timeout_s`` (default soft + 60) ends the worker process running it.
    ``max_retries`` re-runs the crew after a transient model error, with exponential backoff."""

    pool: str | None = None
    model: str | None = None
    category: Category | None = None
    timeout_s: float = Field(default=900, gt=0)
    hard_timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=2.0, gt=0)
    max_tokens: int = Field(default=512, ge=16)
    temperature: float = Field(default=0.2, ge=0, le=2)

    @property
    def hard_limit_s(self) -> float:
        return self.hard_timeout_s or self.timeout_s + 60


class ClusterConfig(_Strict):
    """Cluster-wide concurrency: ``sustained`` slots first, then ``burst`` slots (run on
    ``burst_cpuset`` when set). Slots are leases that expire ``lease_ttl_s`` after their holder
    stops renewing them, so a dead worker never keeps capacity."""

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]+$")
    sustained: int = Field(default=12, ge=1)
    burst: int = Field(default=20, ge=1)
    burst_cpuset: str | None = None
    reserved_cpusets: dict[str, str] = Field(default_factory=dict)
    lease_ttl_s: float = Field(default=30, gt=0)
    reaper_interval_s: float = Field(default=10, gt=0)
    stale_queue_s: float = Field(default=300, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # Celery task events, which Flower shows (tasks, their names by crew, timings); off saves
    # a few messages per run
    task_events: bool = True

    @field_validator("burst_cpuset")
    @classmethod
    def _cpuset(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpuset(v)
        return v

    @field_validator("reserved_cpusets")
    @classmethod
    def _reserved(cls, v: dict[str, str]) -> dict[str, str]:
        for cpus in v.values():
            parse_cpuset(cpus)
        return v

    @model_validator(mode="after")
    def _order(self) -> ClusterConfig:
        if self.burst < self.sustained:
            raise ValueError(f"burst ({self.burst}) must be at least sustained ({self.sustained})")
        return self


class GpuSpec(_Strict):
    name: str
    vram_gb: float = Field(gt=0)
    compute_capability: str | None = None


class NodeConfig(_Strict):
    """A machine of the cluster: where its hardware summary answers, and its GPUs as known
    (used for placement when the node cannot be asked)."""

    name: str = Field(min_length=1)
    url: str | None = None
    # a read-scope API token of that node's `typhon serve` (its /hardware/summary needs one)
    token: str | None = None
    gpus: list[GpuSpec] = Field(default_factory=list)
    tensor_parallel: bool = False
    roles: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return _check_url(v, ("http", "https"))


def _default_models() -> list[ModelEntry]:
    return [
        ModelEntry(
            model_name=LOCAL_ALIAS,
            litellm_params=LitellmParams(model="local/gemma-3-270m"),
            model_info=ModelInfo(
                description="bundled gemma-3-270m on a llama-server that Typhon starts itself",
                max_tokens=512,
                parameters_b=0.27,
                quantization_bits=4,
                context_length=32768,
            ),
        )
    ]


def _default_pools() -> list[PoolConfig]:
    return [
        PoolConfig(name="research", cap=4),
        PoolConfig(name="development", cap=2),
        PoolConfig(name="creative", cap=2),
        PoolConfig(name="monitoring", cap=4),
    ]


class MemoryCacheSettings(_Strict):
    """The semantic cache in front of model calls: a hit needs ``threshold`` similarity, the same
    model alias and the same prompt-template version, within ``ttl_s``."""

    enabled: bool = True
    threshold: float = Field(default=0.92, gt=0, le=1)
    ttl_s: float = Field(default=7 * 24 * 3600, gt=0)
    max_entries: int = Field(default=100_000, ge=1)


class MemoryConfig(_Strict):
    """Where memory lives and how much of it.

    ``backend``: ``builtin`` (records and vectors in the run store's database, searched by an
    HNSW index in each process, or by the Qdrant server at ``qdrant_url``) or ``letta``
    (``letta_url``).
    ``embeddings``: ``local`` (all-MiniLM-L6-v2 on onnxruntime, in process) or a model alias
    of the model list with an embeddings endpoint."""

    backend: Literal["builtin", "letta"] = "builtin"
    qdrant_url: str | None = None
    letta_url: str | None = None
    letta_token: str | None = None
    # The OpenAI-compatible /v1 embeddings endpoint Letta's archives call (a fixed address the
    # Letta server can reach): `typhon embeddings serve` for the local model, else the
    # embeddings alias's own endpoint is used.
    letta_embeddings_url: str | None = None
    letta_namespace: str = Field(default="typhon", pattern=r"^[A-Za-z0-9_.-]+$")
    embeddings: str = "local"
    max_record_chars: int = Field(default=20_000, ge=100)
    max_records: dict[str, int] = Field(
        default_factory=lambda: {"episodic": 50_000, "semantic": 100_000}
    )
    compact_after_days: float = Field(default=30, gt=0)
    recall_k: int = Field(default=5, ge=0, le=100)
    recall_token_budget: int = Field(default=800, ge=0)
    cache: MemoryCacheSettings = Field(default_factory=MemoryCacheSettings)

    @field_validator("qdrant_url", "letta_url", "letta_embeddings_url")
    @classmethod
    def _urls(cls, v: str | None) -> str | None:
        return _check_url(v, ("http", "https"))

    @model_validator(mode="after")
    def _letta_needs_url(self) -> MemoryConfig:
        if self.backend == "letta" and not self.letta_url:
            raise ValueError("memory.backend letta needs memory.letta_url (e.g. http://host:8283)")
        if self.backend == "letta" and self.embeddings == "local" and not self.letta_embeddings_url:
            raise ValueError(
                "memory.backend letta with local embeddings needs memory.letta_embeddings_url:"
                " run `typhon embeddings serve --host HOST --port 8701` and give its /v1 URL"
            )
        return self


class CreativeConfig(_Strict):
    """The Creative crew's services: ComfyUI (``comfyui_url``, e.g. port 8188) renders the
    images, an OpenAI-compatible speech server (``tts_url``; the seed runs Kokoro on 8880)
    speaks the lines. ``checkpoint`` is the model file the shipped workflow templates load;
    ``templates_dir`` adds templates of your own."""

    comfyui_url: str | None = None
    tts_url: str | None = None
    tts_model: str = "kokoro"
    tts_voice: str = "af_bella"
    tts_format: Literal["mp3", "wav", "opus", "flac", "aac", "pcm"] = "mp3"
    checkpoint: str = "sd_xl_base_1.0.safetensors"
    timeout_s: float = Field(default=600, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0)
    templates_dir: Path | None = None

    @field_validator("comfyui_url", "tts_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return _check_url(v, ("http", "https"))


class MonitoringConfig(_Strict):
    """The Monitoring crew's checks, run from beat every ``interval_s``: the seed's alerts."""

    enabled: bool = True
    interval_s: float = Field(default=60, gt=0)
    vram_percent: float = Field(default=95, gt=0, le=100)
    gpu_temp_c: float = Field(default=80, gt=0)
    failure_rate: float = Field(default=0.20, gt=0, le=1)
    failure_window_s: float = Field(default=3600, gt=0)
    min_runs: int = Field(default=5, ge=1)
    storage_percent: float = Field(default=95, gt=0, le=100)


class SandboxSettings(_Strict):
    """Limits for generated code under test: CPU seconds, memory, wall time, file size."""

    cpu_s: int = Field(default=60, ge=1)
    memory_mb: int = Field(default=1024, ge=64)
    wall_s: float = Field(default=120, gt=0)
    file_mb: int = Field(default=64, ge=1)


class DevelopmentConfig(_Strict):
    """The Development crew's loop: at most ``max_iterations`` implement-test-review rounds,
    ``max_tokens`` model tokens and ``max_seconds`` in all; ``test_command`` runs in the sandbox
    (default: pytest when the workspace has tests, else each Python file is compiled);
    ``approval`` asks a person before the result is final."""

    max_iterations: int = Field(default=3, ge=1, le=20)
    max_tokens: int = Field(default=20_000, ge=100)
    max_seconds: float = Field(default=900, gt=0)
    test_command: list[str] | None = None
    approval: bool = False
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)


class ImproveConfig(_Strict):
    """The learning loop.

    Reviews: after every run, a QA review by another model tier (``reviewers`` maps a producing
    alias to its reviewer; by default the chat model of the list that differs most in size from
    the producer, or the producer itself when it is the only one), on the improve queue that the
    workers of ``pool`` serve. Runs judged at least ``example_min_score`` become candidate
    few-shot examples. Optimizer gate: a candidate must beat the active version on a suite by
    ``gain_margin`` with a paired bootstrap interval (``confidence``) that excludes 0; then it
    serves ``canary_share`` of live runs, and after ``canary_min_runs`` judged runs it is
    promoted, or rolled back when its live score trails the active one's by ``canary_margin``.
    ``suites`` names a suite file per crew for the weekly optimizer pass."""

    review: bool = True
    # a run is reviewed by another tier; with one model only, reviewing it by itself costs a
    # call per run for a weak signal, so it is off unless asked for
    self_review: bool = False
    reviewers: dict[str, str] = Field(default_factory=dict)
    pool: str = "monitoring"
    example_min_score: float = Field(default=0.8, ge=0, le=1)
    gain_margin: float = Field(default=0.05, ge=0, le=1)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    bootstrap_samples: int = Field(default=2000, ge=100)
    canary_share: float = Field(default=0.2, gt=0, le=1)
    canary_min_runs: int = Field(default=10, ge=1)
    canary_margin: float = Field(default=0.1, ge=0, le=1)
    rounds: int = Field(default=3, ge=1, le=20)
    demos: int = Field(default=3, ge=0, le=16)
    suites: dict[str, Path] = Field(default_factory=dict)
    rewrite_model: str | None = None
    report_hour_utc: int = Field(default=6, ge=0, le=23)


def _check_improve(improve: ImproveConfig, aliases: list[str]) -> None:
    for producer, reviewer in improve.reviewers.items():
        for name in (producer, reviewer):
            if name not in aliases:
                raise ValueError(
                    f"improve.reviewers names model '{name}', which is not in the model list"
                )
    if improve.rewrite_model is not None and improve.rewrite_model not in aliases:
        name = improve.rewrite_model
        raise ValueError(f"improve.rewrite_model '{name}' is not in the model list")


class TelemetryConfig(_Strict):
    """Traces: an OTLP/HTTP collector's base URL (spans go to ``{url}/v1/traces``); none, and
    nothing is exported. ``OTEL_EXPORTER_OTLP_ENDPOINT`` works too."""

    otlp_endpoint: str | None = None
    service_name: str = "typhon"

    @field_validator("otlp_endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return _check_url(v, ("http", "https"))


class TyphonConfig(_Strict):
    """The effective configuration. ``source`` is the file it came from (None: defaults only)."""

    home: Path = Field(default_factory=default_home)
    profile: Literal["embedded", "hydra"] = "embedded"
    database_url: str | None = None
    broker_url: str | None = None
    search_url: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    pools: list[PoolConfig] = Field(default_factory=_default_pools)
    models: list[ModelEntry] = Field(default_factory=_default_models, alias="model_list")
    router_settings: RouterSettings = Field(default_factory=RouterSettings)
    routing: dict[Category, str] = Field(default=None, validate_default=True)  # type: ignore[assignment]
    crews: dict[str, CrewSettings] = Field(default_factory=dict)
    crew_modules: list[str] = Field(default_factory=list)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    nodes: list[NodeConfig] = Field(default_factory=list)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    creative: CreativeConfig = Field(default_factory=CreativeConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    development: DevelopmentConfig = Field(default_factory=DevelopmentConfig)
    improve: ImproveConfig = Field(default_factory=ImproveConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    hooks: dict[str, HookConfig] = Field(default_factory=dict)
    source: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("routing", mode="before")
    @classmethod
    def _routing_defaults(cls, v: Any, info: ValidationInfo) -> Any:
        """Categories a file or variable does not route go to ``local`` when the model list has
        it, else to the first chat model of the list (a LiteLLM model_list pasted as it is)."""
        if v is not None and not isinstance(v, dict):
            return v
        models: list[ModelEntry] = info.data.get("models") or []
        names = [m.model_name for m in models]
        chat = [m.model_name for m in models if m.is_chat]
        fallback = LOCAL_ALIAS if LOCAL_ALIAS in names or not chat else chat[0]
        return {**dict.fromkeys(CATEGORIES, fallback), **(v or {})}

    @field_validator("database_url")
    @classmethod
    def _db(cls, v: str | None) -> str | None:
        return _check_url(v, ("sqlite", "postgresql", "postgres"))

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str | None) -> str | None:
        return _check_url(v, ("redis", "rediss", "amqp", "sqla", "memory"))

    @field_validator("search_url")
    @classmethod
    def _search(cls, v: str | None) -> str | None:
        return _check_url(v, ("http", "https"))

    @model_validator(mode="after")
    def _cross_check(self) -> TyphonConfig:
        aliases = [m.model_name for m in self.models]
        _check_groups(self.models)
        for item in self.router_settings.fallbacks:
            for alias, chain in item.items():
                for name in (alias, *chain):
                    if name not in aliases:
                        raise ValueError(
                            f"router_settings.fallbacks names model '{name}', which is not in the"
                            f" model list ({', '.join(dict.fromkeys(aliases))})"
                        )
        if self.memory.embeddings != "local" and self.memory.embeddings not in aliases:
            raise ValueError(
                f"memory.embeddings names model '{self.memory.embeddings}', which is not in the"
                " model list; use 'local' or an alias with an embeddings endpoint"
            )
        for category, alias in self.routing.items():
            if alias not in aliases:
                raise ValueError(
                    f"routing.{category} names model '{alias}', which is not in the model list"
                    f" ({', '.join(aliases)})"
                )
        pools = [p.name for p in self.pools]
        if len(set(pools)) != len(pools):
            raise ValueError("pool names must be unique")
        _check_cpusets(self)
        _check_improve(self.improve, aliases)
        for name, crew in self.crews.items():
            if crew.model is not None and crew.model not in aliases:
                raise ValueError(f"crews.{name}.model '{crew.model}' is not in the model list")
            if crew.pool is not None and crew.pool not in pools:
                raise ValueError(f"crews.{name}.pool '{crew.pool}' is not a configured pool")
        return self

    # -- derived values ----------------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'typhon.db'}"

    def model(self, alias: str) -> ModelEntry:
        """The first deployment of ``alias``; ConfigError naming the known aliases if none."""
        return self.deployments(alias)[0]

    def deployments(self, alias: str) -> list[ModelEntry]:
        """Every ``model_list`` entry named ``alias``: more than one is a replica group."""
        found = [entry for entry in self.models if entry.model_name == alias]
        if found:
            return found
        known = ", ".join(dict.fromkeys(m.model_name for m in self.models))
        raise ConfigError(
            f"no model '{alias}' in the model list (known: {known})", key="model_list"
        )

    def aliases(self) -> list[str]:
        return list(dict.fromkeys(m.model_name for m in self.models))

    def pool(self, name: str) -> PoolConfig:
        for pool in self.pools:
            if pool.name == name:
                return pool
        known = ", ".join(p.name for p in self.pools)
        raise ConfigError(f"no pool '{name}' (configured pools: {known})", key="pools")

    def crew_settings(self, crew: str) -> CrewSettings:
        return self.crews.get(crew) or CrewSettings()


def _check_groups(models: list[ModelEntry]) -> None:
    """Replicas of one alias must serve the same kind of model through the same client."""
    first: dict[str, ModelEntry] = {}
    for entry in models:
        seen = first.setdefault(entry.model_name, entry)
        if seen is entry:
            continue
        kinds = {_client_kind(seen), _client_kind(entry)}
        if len(kinds) > 1:
            raise ValueError(
                f"model '{entry.model_name}' has replicas of different kinds"
                f" ({' and '.join(sorted(kinds))}); replicas of one alias must all be"
                " openai-compatible, all ollama or all local"
            )
        if entry.litellm_params.provider == "local":
            raise ValueError(
                f"model '{entry.model_name}': a local/ model cannot have replicas;"
                " give each its own alias"
            )


def _client_kind(entry: ModelEntry) -> str:
    provider = entry.litellm_params.provider
    if provider in OLLAMA_PROVIDERS:
        return "ollama"
    return "local" if provider == "local" else "openai"


def _check_cpusets(config: TyphonConfig) -> None:
    """Pools, the burst set and reserved sets may not share CPUs."""
    owners: dict[int, str] = {}
    named = [(f"pools.{p.name}.cpuset", p.cpuset) for p in config.pools]
    named.append(("cluster.burst_cpuset", config.cluster.burst_cpuset))
    named += [
        (f"cluster.reserved_cpusets.{k}", v) for k, v in config.cluster.reserved_cpusets.items()
    ]
    for key, cpus in named:
        if cpus is None:
            continue
        for cpu in sorted(parse_cpuset(cpus)):
            if cpu in owners:
                raise ValueError(f"{key} ({cpus}) overlaps {owners[cpu]} on CPU {cpu}")
            owners[cpu] = f"{key} ({cpus})"


def _profile(name: str) -> dict[str, Any]:
    if name == "embedded":
        return {}
    text = (resources.files("typhon") / "profiles" / f"{name}.yaml").read_text(encoding="utf-8")
    return dict(yaml.safe_load(text))


def find_config_file(
    explicit: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The configuration file to read, in the documented order; None means defaults only."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError("file not found; check the --config path", source=str(path))
        return path
    env = (os.environ if environ is None else environ).get("TYPHON_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError("file not found; fix or unset TYPHON_CONFIG", source=str(path))
        return path
    for candidate in (Path("typhon.yaml"), Path.home() / ".config" / "typhon" / "typhon.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    fields = {name for name in TyphonConfig.model_fields if name != "source"} | {"model_list"}
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("TYPHON_") or name == "TYPHON_CONFIG":
            continue
        path = name[len("TYPHON_") :].lower().split("__")
        if path[0] not in fields:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(
                "not a valid YAML value; quote it or fix the syntax",
                source=name,
                key=".".join(path),
            ) from None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> TyphonConfig:
    """Find, read, merge with ``TYPHON_*`` variables and validate the configuration."""
    environ = os.environ if environ is None else environ
    file = find_config_file(path, environ)
    source = str(file) if file else "defaults"
    data: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read YAML: {exc}".splitlines()[0], source=source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("top level must be a mapping of settings", source=source)
        data = loaded or {}
    env = _env_overrides(environ)
    if env:
        data = _merge(data, env)
        source = f"{source} + TYPHON_* variables"
    profile = data.get("profile", "embedded")
    if profile in ("embedded", "hydra"):
        data = _merge(_profile(str(profile)), data)
    data["source"] = str(file) if file else None
    try:
        return TyphonConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown setting; see `typhon config show` for the known ones"
        raise ConfigError(message, source=source, key=key) from None


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def masked(value: Any, key: str = "") -> Any:
    """A copy of a config dump with secrets replaced by ``***`` and URL passwords hidden."""
    if isinstance(value, dict):
        return {k: masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if isinstance(value, str):
        if value and any(word in key.lower() for word in _SECRET_WORDS):
            return "***"
        if "://" in value:
            return _mask_url(value)
    return value
