"""`typhon improve routing`: routing-rule changes the evidence supports (registered on
`typhon.cli.improve_app`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from typhon.cli import JsonOpt, _config, improve_app


@improve_app.command("routing")
def routing(
    apply: Annotated[
        bool, typer.Option("--apply", help="Add a rules version with the proposals.")
    ] = False,
    days: Annotated[float, typer.Option(help="Judged runs of the last N days.", min=0.1)] = 30,
    min_runs: Annotated[int, typer.Option(help="Judged runs each model needs.", min=1)] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Propose moving a category to a model that does better on it (and apply with --apply)."""
    from typhon.improve._routing import refine_routing
    from typhon.store import RunStore

    config = _config()
    store = RunStore(config.effective_database_url)
    try:
        result = refine_routing(config, store, apply=apply, days=days, min_runs=min_runs)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(result))
        return
    if not result["proposals"]:
        typer.echo("no change: no category has a model that does better by the gate's margin")
        return
    for p in result["proposals"]:
        lo, hi = p["interval"]
        typer.echo(
            f"{p['category']}: {p['current']} -> {p['proposed']}  score {p['current_score']:.2f}"
            f" -> {p['proposed_score']:.2f}  interval {lo:+.2f}..{hi:+.2f}"
            f"  runs {p['current_runs']}/{p['proposed_runs']}"
        )
    if result["version"] is not None:
        typer.echo(f"rules version {result['version']} is active (typhon routing history)")
