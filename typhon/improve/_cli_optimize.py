"""`typhon improve ...` commands (registered on `typhon.cli.improve_app`); heavy imports happen
inside the commands so that `typhon --help` stays fast.

Here: ``typhon improve eval``, ``optimize``, ``history``, ``promote`` and ``rollback``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from typhon.cli import JsonOpt, _config, _fail, _state, improve_app
from typhon.errors import TyphonError

if TYPE_CHECKING:
    from typhon.config import TyphonConfig
    from typhon.crews import CrewRegistry
    from typhon.store import RunStore

CrewOpt = Annotated[str, typer.Option("--crew", help="The crew, e.g. research.")]
SuiteOpt = Annotated[Path, typer.Option("--suite", help="The suite: a JSONL file of items.")]


@contextmanager
def _open() -> Iterator[tuple[TyphonConfig, RunStore, CrewRegistry]]:
    """Configuration, the run store and the crews; a Typhon error ends as one line."""
    from typhon.crews import default_registry
    from typhon.logging import configure_logging
    from typhon.store import RunStore

    try:
        config = _config()
        configure_logging("debug" if _state.verbose else "warning")
        registry = default_registry()
        registry.load_modules(config.crew_modules)
        store = RunStore(config.effective_database_url)
    except TyphonError as exc:
        _fail(str(exc), exc.exit_code)
    try:
        yield config, store, registry
    except TyphonError as exc:
        _fail(str(exc), exc.exit_code)
    finally:
        store.close()


def _known(store: RunStore, registry: CrewRegistry, crew: str) -> None:
    """A crew is known when it is registered or has prompt versions; else exit 2."""
    from typhon.errors import UnknownCrewError
    from typhon.improve._prompts import PromptVersions

    if crew in registry.names() or PromptVersions(store).history(crew):
        return
    raise UnknownCrewError(crew, registry.names())


@improve_app.command("eval")
def eval_(
    crew: CrewOpt,
    suite: SuiteOpt,
    prompt_version: Annotated[
        int | None,
        typer.Option("--prompt-version", help="A stored version (default: the active one)."),
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Only the train or the test items.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the crew on each suite item and check the outputs (runs on a throwaway store)."""
    from typhon.improve._eval import Evaluator
    from typhon.improve._prompts import PromptVersions
    from typhon.improve._suite import load_suite, split_items

    with _open() as (config, store, registry):
        cls = registry.get(crew)
        items = split_items(load_suite(suite), split)
        if not items:
            _fail(f"suite {suite} has no {split} items", 2)
        versions = PromptVersions(store)
        if prompt_version is None:
            version = versions.ensure(crew, cls)
        else:
            version = versions.get(crew, prompt_version)
        with Evaluator(config, store, registry=registry) as evaluator:
            result = evaluator.evaluate(crew, items, version=version)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    for item in result.items:
        mark = "pass" if item.passed else "FAIL"
        typer.echo(f"{mark}  {item.id:<16} {item.output[:60]!r}  {item.detail[:80]}".rstrip())
    typer.echo(
        f"{crew} v{result.prompt_version}: {result.passed}/{result.n} passed"
        f" ({result.pass_rate:.0%}), {result.model_calls} model calls"
    )


@improve_app.command("optimize")
def optimize_(
    crew: CrewOpt,
    suite: SuiteOpt,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Candidates to try (improve.rounds).", min=1)
    ] = None,
    no_canary: Annotated[
        bool, typer.Option("--no-canary", help="Promote a winner to active at once.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Propose candidates (demonstrations, rewritten instructions), gate each on the suite's
    train items, and promote the best through a canary."""
    from typhon.improve._optimize import optimize
    from typhon.improve._suite import load_suite

    with _open() as (config, store, registry):
        registry.get(crew)
        items = load_suite(suite)
        result = optimize(
            config, store, crew, items, rounds=rounds, canary=not no_canary, registry=registry
        )
    if as_json:
        typer.echo(json.dumps(result))
        return
    base, best = result["baseline"], result["best"]
    for r in result["rounds"]:
        lo, hi = r["interval"]
        typer.echo(
            f"round {r['round']}: v{r['version']} {r['kind']:<8} pass {r['pass_rate']:.0%}"
            f"  gain {r['gain']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            f"  {'accepted' if r['accepted'] else 'rejected'}  calls {r['model_calls']}"
        )
    typer.echo(f"baseline v{base['version']} {base['pass_rate']:.0%} -> best v{best['version']}"
               f" {best['pass_rate']:.0%}")  # fmt: skip
    if result["promoted"]:
        share = result["canary_share"]
        where = f"canary on {share:.0%} of live runs" if share else "active"
        typer.echo(f"v{best['version']} is now the {where}")
    else:
        typer.echo("nothing promoted")


def _when(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else None


@improve_app.command("history")
def history(
    crew: Annotated[str, typer.Argument(help="The crew.")], as_json: JsonOpt = False
) -> None:
    """The crew's prompt versions (status, source, parent, metrics) and what the loop did."""
    from typhon.improve._prompts import PromptVersions

    with _open() as (_, store, registry):
        _known(store, registry, crew)
        versions = PromptVersions(store)
        found = versions.history(crew)
        events = [{**e, "created_at": _when(e["created_at"])} for e in versions.events(crew)]
    if as_json:
        typer.echo(json.dumps({"crew": crew, "versions": [v.to_json() for v in found],
                               "events": events[::-1]}, default=str))  # fmt: skip
        return
    if not found:
        typer.echo(f"{crew} has no prompt versions yet: its code's prompts become v1 on its"
                   " first run")  # fmt: skip
        return
    for v in found:
        share = f" {v.canary_share:.0%}" if v.status == "canary" and v.canary_share else ""
        parent = f" parent v{v.parent}" if v.parent else ""
        rate = v.metrics.get("train_pass_rate")
        rate_text = f" train {rate:.0%}" if isinstance(rate, int | float) else ""
        typer.echo(f"v{v.version:<3} {v.status}{share:<5} {v.source:<18}{parent}{rate_text}"
                   f"  {v.note[:60]}".rstrip())  # fmt: skip
    for e in events[::-1]:
        moved = f"v{e['from_version'] or '-'} -> v{e['to_version'] or '-'}"
        typer.echo(f"{e['created_at']}  {e['kind']:<11} {moved}  {e['reason']}")


@improve_app.command("promote")
def promote(
    crew: Annotated[str, typer.Argument(help="The crew.")],
    version: Annotated[int, typer.Argument(help="The version to promote.")],
    canary: Annotated[
        float | None,
        typer.Option("--canary", help="Serve it to this share of live runs (0..1) first."),
    ] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why.")] = None,
) -> None:
    """Make a version active, or the canary with --canary SHARE."""
    from typhon.improve._prompts import PromptVersions

    if canary is not None and not 0 < canary <= 1:
        _fail(f"--canary {canary} must be a share above 0 and at most 1, e.g. 0.2", 2)
    with _open() as (_, store, registry):
        _known(store, registry, crew)
        done = PromptVersions(store).promote(
            crew, version, canary_share=canary, reason=reason or "promoted by hand"
        )
    where = f"the canary on {canary:.0%} of live runs" if canary is not None else "active"
    typer.echo(f"{done.tag} is now {where}")


@improve_app.command("rollback")
def rollback(
    crew: Annotated[str, typer.Argument(help="The crew.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why.")] = None,
) -> None:
    """Undo the last change: retire the canary, else go back to the active version's parent."""
    from typhon.improve._prompts import PromptVersions

    with _open() as (_, store, registry):
        _known(store, registry, crew)
        versions = PromptVersions(store)
        before = versions.canary(crew) or versions.active(crew)
        now = versions.rollback(crew, reason=reason or "rolled back by hand")
    gone = f"{before.tag} retired; " if before is not None else ""
    typer.echo(f"{gone}{now.tag} is active")
