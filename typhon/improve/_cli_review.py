"""`typhon improve ...` commands (registered on `typhon.cli.improve_app`); heavy imports happen
inside the commands so that `typhon --help` stays fast.

Here: ``typhon improve review RUN_ID | --pending``, ``typhon improve report``, and the top-level
``typhon feedback`` and ``typhon activity``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from typhon.cli import JsonOpt, _config, _fail, _state, app, improve_app
from typhon.errors import InputError, ModelUnavailableError, RunNotFoundError, TyphonError

if TYPE_CHECKING:
    from typhon._runtime import Runtime
    from typhon.store import RunStore


def _runtime() -> Runtime:
    from typhon._runtime import Runtime
    from typhon.logging import configure_logging

    config = _config()
    configure_logging("debug" if _state.verbose else "warning")
    return Runtime(config)


def _store() -> RunStore:
    from typhon.store import RunStore

    return RunStore(_config().effective_database_url)


def _review_line(review: dict[str, Any]) -> str:
    if review.get("error"):
        return f"{review['run_id']}  pending  ({review['error']})"
    score = "-" if review["score"] is None else f"{review['score']:.2f}"
    line = (
        f"{review['run_id']}  {review['status']}  score={score}"
        f" verdict={review['verdict'] or '-'}  reviewer={review['reviewer']}"
    )
    if review["critique"]:
        line += f"\n  {review['critique']}"
    for issue in review["issues"]:
        line += f"\n  - {issue}"
    return line


@improve_app.command("review")
def improve_review(
    run_id: Annotated[str | None, typer.Argument(help="The run to review.")] = None,
    pending: Annotated[
        bool, typer.Option("--pending", help="Review every run whose review is pending.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """QA-review a finished run now (again, if it was reviewed), or every pending review."""
    from typhon.improve._review import review_pending, review_run

    if (run_id is None) == (not pending):
        _fail("give a RUN_ID or --pending (not both)", 2)
    runtime = _runtime()
    try:
        if pending:
            done = review_pending(
                runtime.config, runtime.store, runtime.models,
                registry=runtime.registry, memory=runtime.memory,
            )  # fmt: skip
            typer.echo(json.dumps(done) if as_json else "\n".join(map(_review_line, done)))
            if any(r.get("error") for r in done):
                raise typer.Exit(1)
            return
        assert run_id is not None
        try:
            review = review_run(
                runtime.config, runtime.store, runtime.models, run_id,
                registry=runtime.registry, memory=runtime.memory,
            )  # fmt: skip
        except (RunNotFoundError, InputError) as exc:
            _fail(str(exc), 2)
        except ModelUnavailableError as exc:
            _fail(f"{exc}; the review stays pending (typhon improve review --pending)", 1)
        assert review is not None
        typer.echo(json.dumps(review) if as_json else _review_line(review))
    finally:
        runtime.close()


@improve_app.command("report")
def improve_report(
    days: Annotated[float, typer.Option(min=0.01, help="The period, in days.")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Success rate, scores and trends per crew and model, top failure categories: written as
    Markdown and JSON under $TYPHON_HOME/reports/ (also daily on beat)."""
    from typhon.improve._report import write_report

    config = _config()
    store = _store()
    try:
        written = write_report(config, store, days=days)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(written))
        return
    typer.echo(written["markdown"])
    typer.echo(written["json"])


def _read_correction(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _fail(f"cannot read --correction {path}: {reason}; give a readable UTF-8 text file", 2)


@app.command()
def feedback(
    run_id: Annotated[str, typer.Argument(help="The run.")],
    vote: Annotated[str, typer.Argument(help="up or down.")],
    note: Annotated[str, typer.Option("--note", help="What was good or wrong.")] = "",
    correction: Annotated[
        Path | None,
        typer.Option("--correction", help="A file with the output the run should have given."),
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who says so (default: $USER).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Thumbs up or down on a finished run; it outranks the QA review and teaches the loop."""
    from typhon.improve._feedback import VOTES, record_feedback
    from typhon.improve._learn import is_preference

    if vote not in VOTES:
        _fail(f"vote must be up or down, not '{vote}'", 2)
    text = _read_correction(correction) if correction is not None else None
    config = _config()
    store = _store()
    memory = None
    try:
        store.get(run_id)  # an unknown run: exit 2 before anything else
        if is_preference(note):
            memory = _open_memory(config, store)
        saved = record_feedback(
            config, store, run_id, vote, note=note, correction=text,
            by=os.environ.get("USER", "") if by is None else by, memory=memory,
        )  # fmt: skip
    except (RunNotFoundError, InputError) as exc:
        _fail(str(exc), 2)
    finally:
        if memory is not None:
            memory.close()
        store.close()
    if as_json:
        typer.echo(json.dumps(saved))
        return
    learned = saved["learned"]
    score = "-" if saved["score"] is None else f"{saved['score']:.2f}"
    extra = [
        "an example" if learned["example"] else "",
        "a correction example" if learned["correction"] else "",
        f"a diagnosis ({learned['diagnosis']})" if learned["diagnosis"] else "",
        "a preference" if learned["preference"] else "",
    ]
    kept = ", ".join(e for e in extra if e)
    typer.echo(
        f"{vote} on run {run_id} recorded; score {score} ({saved['score_source']})"
        + (f"; learned {kept}" if kept else "")
    )


def _open_memory(config: Any, store: RunStore) -> Any:
    """Memory for a stated preference; None (logged) when it cannot be opened."""
    from typhon.memory import open_memory

    try:
        return open_memory(config, store)
    except TyphonError as exc:
        typer.echo(f"warning: memory is off ({exc}); the preference is not remembered", err=True)
        return None


@app.command()
def activity(
    crew: Annotated[str | None, typer.Option(help="Only this crew (or agent).")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs in this status.")] = None,
    model: Annotated[str | None, typer.Option(help="Only runs on this model alias.")] = None,
    hours: Annotated[
        float | None, typer.Option(min=0.001, help="Only runs created in the last N hours.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="How many, newest first.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Every run's outcome: crew, status, model, versions, tokens, latency, scores."""
    from typhon.improve._activity import activity as list_activity
    from typhon.improve._activity import render_activity

    store = _store()
    try:
        rows = list_activity(store, crew=crew, status=status, model=model, hours=hours, limit=limit)
    except InputError as exc:
        _fail(str(exc), 2)
    finally:
        store.close()
    typer.echo(json.dumps(rows) if as_json else render_activity(rows))
