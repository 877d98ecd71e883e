"""``typhon models list|check|stats``: the model list as Typhon reads it, and a probe of each
endpoint."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from typhon.config import TyphonConfig
from typhon.models._client import Probe
from typhon.models._registry import ModelRegistry, endpoint_of

__all__ = ["check_models", "list_models", "render_check", "render_list", "render_stats"]


def list_models(config: TyphonConfig) -> list[dict[str, Any]]:
    """One row per alias: its replicas, provider, model, description, limits, fallbacks, and the
    categories the configuration routes to it."""
    rows = []
    routed: dict[str, list[str]] = {}
    for category, alias in config.routing.items():
        routed.setdefault(alias, []).append(category)
    for alias in config.aliases():
        entries = config.deployments(alias)
        first = entries[0]
        info = first.model_info
        extra = info.model_extra or {}
        rows.append(
            {
                "alias": alias,
                "provider": first.litellm_params.provider,
                "model": first.litellm_params.model_id,
                "endpoints": [endpoint_of(e) for e in entries],
                "replicas": len(entries),
                "description": info.description,
                "mode": extra.get("mode", "chat"),
                "max_tokens": info.max_tokens,
                "context_length": first.context_window,
                "parameters_b": info.parameters_b,
                "quantization_bits": info.quantization_bits,
                "gpus": first.gpus,
                "fallbacks": config.router_settings.fallbacks_for(alias),
                "routed_categories": routed.get(alias, []),
            }
        )
    return rows


def render_list(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        size = f"{r['parameters_b']:g}B" if r["parameters_b"] else "?"
        if r["quantization_bits"]:
            size += f" @{r['quantization_bits']:g}bit"
        routes = ",".join(r["routed_categories"]) or "-"
        lines.append(
            f"{r['alias']:<24} {r['provider']}/{r['model']:<24} {size:<12} routes: {routes}"
        )
        for url in r["endpoints"]:
            lines.append(f"    {url}")
        if r["fallbacks"]:
            lines.append(f"    fallbacks: {' -> '.join(r['fallbacks'])}")
        if r["description"]:
            lines.append(f"    {r['description']}")
    return "\n".join(lines)


def check_models(
    config: TyphonConfig, aliases: list[str] | None = None, *, registry: ModelRegistry | None = None
) -> list[Probe]:
    """Probe every endpoint of the given aliases (all by default) at once."""
    names = aliases or config.aliases()
    for name in names:
        config.deployments(name)  # unknown alias: ConfigError before any probe
    own = registry is None
    registry = registry or ModelRegistry(config)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(registry.probe, names))
    finally:
        if own:
            registry.close()
    return [probe for group in results for probe in group]


def render_check(probes: list[Probe]) -> str:
    lines = []
    for p in probes:
        if not p.reachable:
            lines.append(f"FAIL  {p.alias:<24} {p.url}  unreachable: {p.error}")
            continue
        present = {True: "model present", False: "MODEL MISSING", None: "serves its loaded model"}
        ok = "ok  " if p.model_present is not False else "FAIL"
        lines.append(
            f"{ok}  {p.alias:<24} {p.url}  {present[p.model_present]} ({p.model})"
            f"  {p.latency_s * 1000:.0f} ms"
        )
    return "\n".join(lines)


def render_stats(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no model calls recorded yet"
    lines = [
        f"{'alias':<20} {'category':<9} {'calls':>6} {'fail':>5} {'tokens in/out':>15}"
        f" {'mean s':>8} {'GPU-s':>9}"
    ]
    for r in rows:
        tokens = f"{r['prompt_tokens']}/{r['completion_tokens']}"
        lines.append(
            f"{r['alias']:<20} {r['category'] or '-':<9} {r['calls']:>6} {r['failures']:>5}"
            f" {tokens:>15} {r['mean_latency_s']:>8.3f} {r['gpu_s']:>9.2f}"
        )
    return "\n".join(lines)
