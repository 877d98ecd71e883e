"""The ``typhon`` command. Heavy modules are imported inside commands so ``--help`` stays fast."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from typhon.errors import TyphonError

if TYPE_CHECKING:
    from typhon._types import RunRecord
    from typhon.config import TyphonConfig
    from typhon.orchestrator import RunHandle, Typhon

app = typer.Typer(
    name="typhon",
    help="Typhon: multi-agent crews on your own models and machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
models_app = typer.Typer(
    help="The model list: aliases, endpoints, health, cost.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
routing_app = typer.Typer(help="Versions of the routing rules.", no_args_is_help=True)
app.add_typer(routing_app, name="routing")
memory_app = typer.Typer(help="Search, add and forget memories.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")
improve_app = typer.Typer(
    help="The learning loop: reviews, prompt versions, evaluation, optimizer, reports.",
    no_args_is_help=True,
)
app.add_typer(improve_app, name="improve")
embeddings_app = typer.Typer(help="The local embedding model.", no_args_is_help=True)
app.add_typer(embeddings_app, name="embeddings")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="typhon.yaml to use.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


class _State:
    config_path: Path | None = None
    verbose: bool = False


_state = _State()


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _config() -> TyphonConfig:
    from typhon.config import load_config

    return load_config(_state.config_path)


def _typhon() -> Typhon:
    from typhon.logging import configure_logging
    from typhon.orchestrator import Typhon

    config = _config()
    configure_logging("debug" if _state.verbose else "warning")
    return Typhon(config)


@app.callback()
def _main(
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log to stderr.")] = False,
) -> None:
    _state.config_path = config
    _state.verbose = verbose


def _print_record(record: RunRecord, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record.to_json()))
        return
    if record.output:
        typer.echo(record.output)
    if record.error:
        typer.echo(f"error: run {record.id} {record.status.value}: {record.error}", err=True)
    for path in record.artifacts:
        typer.echo(f"artifact: {path}", err=True)


def _follow(typhon: Typhon, handle: RunHandle, crew: str, timeout: float | None) -> RunRecord:
    """Wait for the run, showing crew, current step and elapsed time on a live status line."""
    from rich.console import Console

    console = Console(stderr=True)
    started = time.monotonic()
    step, last_event = "queued", 0
    if not console.is_terminal:
        return handle.wait(timeout)
    with console.status("") as status:
        while True:
            for event in typhon.store.events(handle.run_id, after=last_event):
                last_event = event.seq
                step = str(event.data.get("name", event.kind))
                if event.data.get("phase"):  # a graph node's start or end
                    step += f" ({event.data['phase']})"
                elif event.data.get("max"):  # a renderer's progress
                    step += f" {event.data.get('node_type', '')} {event.data.get('value')}/"
                    step += f"{event.data['max']}"
            record = typhon.store.get(handle.run_id)
            elapsed = time.monotonic() - started
            status.update(f"[bold]{crew}[/] · {step} · {elapsed:0.0f}s  [dim]{handle.run_id}[/]")
            if record.status.finished or record.status.value == "waiting":
                return record
            if timeout is not None and elapsed > timeout:
                return handle.wait(0)
            time.sleep(0.25)


@app.command()
def run(
    crew: Annotated[str, typer.Argument(help="Crew to run, e.g. research.")],
    input: Annotated[str, typer.Argument(help="What the crew should work on.")],
    as_json: JsonOpt = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Print the run id and return.")
    ] = False,
    docs: Annotated[
        Path | None, typer.Option("--docs", help="Folder of local documents for the crew.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model alias to use.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait.")] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Do not answer from the semantic cache.")
    ] = False,
    repo: Annotated[
        Path | None,
        typer.Option("--repo", help="Repository the development crew works on (copied)."),
    ] = None,
    approval: Annotated[
        bool, typer.Option("--approval", help="Wait for `typhon approve` before the result.")
    ] = False,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-o", help="A crew option KEY=VALUE (VALUE read as JSON when it is)."
        ),
    ] = None,
) -> None:
    """Run a crew and wait for its result (exit 0 only when it succeeded; 3 when it waits
    for approval)."""
    options: dict[str, Any] = {}
    for item in option or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            _fail(f"--option {item!r} is not KEY=VALUE; e.g. --option images=2", 2)
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    if no_cache:
        options["no_cache"] = True
    if repo is not None:
        if not repo.is_dir():
            _fail(f"--repo {repo} is not a folder; give the repository's folder", 2)
        options["repo"] = str(repo.resolve())
    if approval:
        options["approval"] = True
    if docs is not None:
        if not docs.is_dir():
            _fail(f"--docs {docs} is not a folder; give a folder of text, Markdown or PDF files", 2)
        options["docs"] = str(docs.resolve())
    if model:
        options["model"] = model
    with _typhon() as typhon:
        handle = typhon.submit(crew, input, **options)
        if no_wait:
            typer.echo(handle.run_id)
            if typhon.embedded:  # nothing else would run it: finish before the process exits
                handle.wait(timeout)
            return
        try:
            record = _follow(typhon, handle, crew, timeout)
        except KeyboardInterrupt:
            handle.cancel()
            typer.echo(f"cancelled run {handle.run_id}", err=True)
            typhon.close()  # the run is recorded cancelled and every server stopped
            # Leave at once: the crew's own worker threads may still be inside native code
            # (CrewAI's executor, onnxruntime) that must not meet interpreter finalization.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    _end(record, as_json)


def _end(record: RunRecord, as_json: bool) -> None:
    """Print a run's result; exit 0 when it succeeded, 3 when it waits, else 1."""
    _print_record(record, as_json)
    if record.status.value == "waiting":
        typer.echo(
            f"run {record.id} waits for approval: `typhon approve {record.id}` or"
            f" `typhon reject {record.id} --note TEXT`",
            err=True,
        )
        raise typer.Exit(3)
    if record.status.value != "succeeded":
        raise typer.Exit(1)


def _answer(run_id: str, decision: str, note: str, as_json: bool, no_wait: bool) -> None:
    by = os.environ.get("USER", "")
    with _typhon() as typhon:
        answer = typhon.approve if decision == "approved" else typhon.reject
        handle = answer(run_id, note=note, by=by)
        if no_wait and not typhon.embedded:
            typer.echo(handle.run_id)
            return
        record = _follow(typhon, handle, typhon.store.get(run_id).crew, None)
    _end(record, as_json)


@app.command()
def approve(
    run_id: str,
    note: Annotated[str, typer.Option("--note", help="A note kept with the decision.")] = "",
    as_json: JsonOpt = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once resumed.")] = False,
) -> None:
    """Approve a run that waits for approval; it goes on to its result."""
    _answer(run_id, "approved", note, as_json, no_wait)


@app.command()
def reject(
    run_id: str,
    note: Annotated[str, typer.Option("--note", help="What to change.")] = "",
    as_json: JsonOpt = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once resumed.")] = False,
) -> None:
    """Reject a waiting run with a note; it revises while its budget lasts, else fails."""
    _answer(run_id, "rejected", note, as_json, no_wait)


@app.command()
def status(run_id: str, as_json: JsonOpt = False) -> None:
    """Show one run."""
    with _typhon() as typhon:
        record = typhon.store.get(run_id)
    if as_json:
        typer.echo(json.dumps(record.to_json()))
        return
    route = f"  category={record.category}" if record.category else ""
    if record.rules_version:
        route += f" (rules v{record.rules_version})"
    typer.echo(
        f"{record.id}  {record.crew}  {record.status.value}  model={record.model}{route}"
        f"  tokens={record.usage.total_tokens}" + ("  DEGRADED" if record.degraded else "")
    )
    _print_record(record, False)


@app.command()
def runs(
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    crew: Annotated[str | None, typer.Option(help="Only this crew.")] = None,
) -> None:
    """List recent runs."""
    with _typhon() as typhon:
        records = typhon.runs(limit=limit, crew=crew)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in records]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("run_id", "crew", "status", "model", "created", "input")
    for r in records:
        table.add_row(
            r.id,
            r.crew,
            r.status.value,
            r.model or "",
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.input[:40],
        )
    Console().print(table)


@app.command()
def cancel(run_id: str) -> None:
    """Cancel a queued or running run."""
    with _typhon() as typhon:
        if typhon.cancel(run_id):
            typer.echo(f"cancelled {run_id}")
            return
        state = typhon.store.status(run_id).value
    _fail(f"run {run_id} already finished ({state}); nothing to cancel", 1)


@app.command()
def worker(
    pool: Annotated[str, typer.Option("--pool", help="Pool whose queue this worker serves.")],
    cpuset: Annotated[
        str | None, typer.Option("--cpuset", help="CPUs to pin to, overriding the pool's.")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    beat: Annotated[
        bool,
        typer.Option("--beat", help="Also run the periodic tasks (the reaper); one per cluster."),
    ] = False,
) -> None:
    """Start a Celery worker for one pool (concurrency = the pool's cap, or burst_cap)."""
    from typhon.resources import format_cpuset, parse_cpuset

    config = _config()
    if not config.broker_url:
        _fail("a worker needs broker_url (set it in typhon.yaml or TYPHON_BROKER_URL)", 2)
    spec = config.pool(pool)
    wanted = cpuset or spec.cpuset
    if wanted:
        try:
            cpus = parse_cpuset(wanted)
        except ValueError as exc:
            _fail(f"--cpuset: {exc}", 2)
        have = os.sched_getaffinity(0)
        if not cpus <= have:
            _fail(
                f"pool '{pool}' wants CPUs {wanted}, but this host has {format_cpuset(have)};"
                " pass --cpuset to override",
                2,
            )
        os.sched_setaffinity(0, cpus)
    if config.source:
        os.environ["TYPHON_CONFIG"] = str(Path(config.source).resolve())
    from typhon.logging import configure_logging
    from workers.celery_app import create_app, worker_argv

    configure_logging(config.log_level)
    config.home.mkdir(parents=True, exist_ok=True)
    create_app(config).worker_main(worker_argv(config, pool, loglevel=loglevel, beat=beat))


@app.command()
def beat(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """Run Celery beat for Typhon's periodic tasks (the reaper). Run exactly one per cluster."""
    config = _config()
    if not config.broker_url:
        _fail("beat needs broker_url (set it in typhon.yaml or TYPHON_BROKER_URL)", 2)
    from typhon.logging import configure_logging
    from workers.celery_app import create_app

    configure_logging(config.log_level)
    config.home.mkdir(parents=True, exist_ok=True)
    schedule = str(config.home / "celerybeat-schedule")
    create_app(config).start(["beat", f"--schedule={schedule}", f"--loglevel={loglevel}"])


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Port for Flower's web UI and API.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    basic_auth: Annotated[
        str | None,
        typer.Option("--basic-auth", help="user:password (needed off loopback)."),
    ] = None,
) -> None:
    """Celery Flower on the configured broker: workers per pool, runs as tasks named by crew."""
    import ipaddress

    config = _config()
    if not config.broker_url:
        _fail("flower needs broker_url (set it in typhon.yaml or TYPHON_BROKER_URL)", 2)
    loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    if not loopback and not basic_auth:
        _fail(f"flower on {address} needs --basic-auth user:password (or bind 127.0.0.1)", 2)
    if loopback and not basic_auth:  # only this machine can reach it: its API needs no login
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    from typhon.logging import configure_logging
    from workers.celery_app import create_app

    configure_logging(config.log_level)
    config.home.mkdir(parents=True, exist_ok=True)
    argv = [
        "flower", f"--port={port}", f"--address={address}",
        f"--db={config.home / 'flower.db'}", "--persistent=False",
    ]  # fmt: skip
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    create_app(config).start(argv)


@app.command()
def reap(as_json: JsonOpt = False) -> None:
    """Recover runs whose worker died or whose message was lost, once, now."""
    from typhon.resources.reaper import reap as reap_once

    with _typhon() as typhon:
        report = reap_once(typhon.config, typhon.store, typhon.republisher())
    data = {"failed": report.failed, "requeued": report.requeued,
            "republished": report.republished}  # fmt: skip
    if as_json:
        typer.echo(json.dumps(data))
    else:
        for key, ids in data.items():
            typer.echo(f"{key}: {len(ids)}" + (f"  ({', '.join(ids)})" if ids else ""))


@app.command()
def pools(as_json: JsonOpt = False) -> None:
    """Each pool: cap, cpuset, runs in use and queued, from live state."""
    with _typhon() as typhon:
        data = typhon.pools()
    if as_json:
        typer.echo(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("pool", "queue", "cap", "burst cap", "cpuset", "running", "slots", "queued")
    for p in data["pools"]:
        table.add_row(
            p["name"], p["queue"], str(p["cap"]), str(p["burst_cap"]), p["cpuset"] or "any",
            str(p["running"]), str(p["slots_in_use"]), str(p["queued"]),
        )  # fmt: skip
    console = Console()
    console.print(table)
    c = data["cluster"]
    console.print(
        f"cluster: {c['slots_in_use']} of {c['sustained']} sustained / {c['burst']} burst slots"
        f" in use; burst cpuset {c['burst_cpuset'] or 'none'}"
    )


@app.command()
def hardware(as_json: JsonOpt = False) -> None:
    """This host's CPUs, memory, disks and GPUs, and every configured node's."""
    from typhon.resources.hardware import cluster_summary, render_text

    summary = cluster_summary(_config())
    typer.echo(json.dumps(summary) if as_json else render_text(summary))


@app.command()
def alerts(
    show_all: Annotated[
        bool, typer.Option("--all", help="Also alerts resolved in the last --days.")
    ] = False,
    days: Annotated[float, typer.Option(min=0, help="How far back --all looks.")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Open alerts of the Monitoring crew (VRAM, GPU temperature, failure rate, storage)."""
    from datetime import UTC, datetime, timedelta

    from typhon.crews.monitoring import list_alerts, render_alerts
    from typhon.store import RunStore

    store = RunStore(_config().effective_database_url)
    try:
        since = datetime.now(UTC) - timedelta(days=days)
        found = list_alerts(store, include_resolved=show_all, since=since)
    finally:
        store.close()
    typer.echo(json.dumps([a.to_json() for a in found]) if as_json else render_alerts(found))


@app.command()
def placement(as_json: JsonOpt = False) -> None:
    """Which node and GPUs each model should run on, from its VRAM need."""
    from typhon.resources.placement import plan, plan_to_json, render_text

    result = plan(_config())
    typer.echo(json.dumps(plan_to_json(result)) if as_json else render_text(result))
    error = result.error()
    if error is not None:
        _fail(str(error), error.exit_code)


@app.command()
def route(
    prompt: Annotated[str, typer.Argument(help="The request to route.")],
    as_json: JsonOpt = False,
    crew: Annotated[
        str | None, typer.Option(help="Route as a run of this crew would be (its fixed model).")
    ] = None,
) -> None:
    """Which category PROMPT is and which model would serve it, with the rules version."""
    if not prompt.strip():
        _fail("the prompt is empty; give the request to route, e.g. typhon route 'hello'", 2)
    with _typhon() as typhon:
        if crew is not None:
            result = typhon.route_for(crew, prompt)
        else:
            result = typhon.runtime.router.route(prompt)
    data = result.to_json()
    if as_json:
        typer.echo(json.dumps(data))
        return
    typer.echo(
        f"{data['category']} -> {data['model']} ({data['backend']})"
        f"  rules v{data['rules_version']}: {data['reason']}"
    )


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Every alias: provider, model, replicas, size, the categories routed to it."""
    from typhon.models._inspect import list_models, render_list

    rows = list_models(_config())
    typer.echo(json.dumps(rows) if as_json else render_list(rows))


@models_app.command("check")
def models_check(
    aliases: Annotated[
        list[str] | None, typer.Argument(help="Aliases to check (default: all).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Probe each endpoint: reachable, model present, latency. Exit 1 if any fails."""
    from typhon.models._inspect import check_models, render_check

    probes = check_models(_config(), aliases or None)
    if as_json:
        typer.echo(json.dumps([p.to_json() for p in probes]))
    else:
        typer.echo(render_check(probes))
    if not all(p.reachable and p.model_present is not False for p in probes):
        raise typer.Exit(1)


@models_app.command("stats")
def models_stats(
    as_json: JsonOpt = False,
    hours: Annotated[float | None, typer.Option(help="Only the last N hours.")] = None,
) -> None:
    """Calls, failures, tokens, latency and GPU-seconds per model and category."""
    from datetime import UTC, datetime, timedelta

    from typhon.models._inspect import render_stats

    since = datetime.now(UTC) - timedelta(hours=hours) if hours else None
    with _typhon() as typhon:
        rows = typhon.store.model_stats(since=since)
    typer.echo(json.dumps(rows) if as_json else render_stats(rows))


@routing_app.command("history")
def routing_history(as_json: JsonOpt = False) -> None:
    """Every version of the routing rules, the active one marked."""
    with _typhon() as typhon:
        typhon.runtime.router.rules()  # seeds version 1 from the configuration
        rows = typhon.store.rules_versions()
    if as_json:
        typer.echo(json.dumps([{**r, "created_at": r["created_at"].isoformat()} for r in rows]))
        return
    for r in rows:
        mapping = ", ".join(f"{c}={v['model']}" for c, v in r["body"]["categories"].items())
        mark = "*" if r["active"] else " "
        typer.echo(
            f"{mark} v{r['version']:<3} {r['created_at']:%Y-%m-%d %H:%M}  {r['source']:<8}"
            f" {mapping}  {r['note']}"
        )


@routing_app.command("activate")
def routing_activate(version: Annotated[int, typer.Argument(help="Rules version.")]) -> None:
    """Make VERSION the active routing rules (promote or roll back)."""
    with _typhon() as typhon:
        typhon.runtime.router.rules()
        known = [r["version"] for r in typhon.store.rules_versions()]
        if version not in known:
            _fail(f"no routing rules v{version}; see `typhon routing history` ({known})", 2)
        typhon.store.activate_rules(version)
    typer.echo(f"routing rules v{version} active")


def _memory_tier(tier: str, allowed: tuple[str, ...]) -> str:
    if tier not in allowed:
        _fail(f"unknown tier '{tier}'; use one of {', '.join(allowed)}", 2)
    return tier


@memory_app.command("search")
def memory_search(
    query: Annotated[str, typer.Argument(help="What to look for, in words.")],
    tier: Annotated[str, typer.Option(help="semantic, episodic or all.")] = "all",
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="How many.")] = 5,
    crew: Annotated[str | None, typer.Option(help="Only this crew's memories.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Only with this tag (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Memories closest in meaning to QUERY, best first."""
    if not query.strip():
        _fail("the query is empty; say what to look for, e.g. typhon memory search 'GPUs'", 2)
    tiers = ("semantic", "episodic") if tier == "all" else (
        _memory_tier(tier, ("semantic", "episodic", "all")),
    )  # fmt: skip
    with _typhon() as typhon:
        memory = typhon.runtime.memory
        if memory is None:
            _fail("memory is off for this configuration (see the log with -v)", 1)
        hits = []
        for name in tiers:
            store = getattr(memory.backend, name)
            hits += store.search(query, k=k, crew=crew, tags=tag or ())
    hits.sort(key=lambda r: r.score or 0.0, reverse=True)
    hits = hits[:k]
    if as_json:
        typer.echo(json.dumps([h.to_json() for h in hits]))
        return
    for h in hits:
        typer.echo(f"{h.score or 0:.3f}  {h.tier:<9} {h.id}  {h.text[:100]}")


@memory_app.command("add")
def memory_add(
    text: Annotated[str, typer.Argument(help="What to remember.")],
    tier: Annotated[str, typer.Option(help="semantic or episodic.")] = "semantic",
    kind: Annotated[str, typer.Option(help="fact, preference, note, ...")] = "fact",
    crew: Annotated[str | None, typer.Option(help="The crew it belongs to.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="A tag (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remember TEXT (semantic memory by default)."""
    _memory_tier(tier, ("semantic", "episodic"))
    with _typhon() as typhon:
        memory = typhon.runtime.memory
        if memory is None:
            _fail("memory is off for this configuration (see the log with -v)", 1)
        rec = getattr(memory.backend, tier).add(text, kind=kind, crew=crew, tags=tag or ())
    typer.echo(json.dumps(rec.to_json()) if as_json else rec.id)


@memory_app.command("forget")
def memory_forget(record_id: Annotated[str, typer.Argument(help="The memory's id.")]) -> None:
    """Forget one memory (episodic or semantic) by its id."""
    with _typhon() as typhon:
        memory = typhon.runtime.memory
        if memory is None:
            _fail("memory is off for this configuration (see the log with -v)", 1)
        if not any(getattr(memory.backend, t).forget(record_id) for t in ("semantic", "episodic")):
            _fail(f"no memory '{record_id}'; see typhon memory search", 2)
    typer.echo(f"forgot {record_id}")


@embeddings_app.command("serve")
def embeddings_serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8701,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback bind.")
    ] = False,
) -> None:
    """Serve the local MiniLM model as an OpenAI-compatible /v1/embeddings endpoint (for Letta)."""
    import threading

    from typhon.memory._embed import default_embedder
    from typhon.memory._embed_server import EmbeddingServer

    try:
        server = EmbeddingServer(default_embedder(), host, port, allow_remote=allow_remote)
        url = server.start()
    except (OSError, ValueError) as exc:
        _fail(f"cannot serve embeddings on {host}:{port}: {exc}", 2)
    typer.echo(f"serving {default_embedder().model} at {url} (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


@memory_app.command("compact")
def memory_compact(
    days: Annotated[
        float | None, typer.Option(help="Episodes older than this (default: the configuration).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fold old episodes into summaries and drop expired cache entries (also daily on beat)."""
    from typhon.memory._retention import maintain

    with _typhon() as typhon:
        memory = typhon.runtime.memory
        if memory is None:
            _fail("memory is off for this configuration (see the log with -v)", 1)
        report = maintain(
            memory, compact_after_days=days or typhon.config.memory.compact_after_days
        )
    typer.echo(
        json.dumps(report)
        if as_json
        else f"{report['episodes_compacted']} episodes compacted,"
        f" {report['cache_entries_expired']} cache entries expired"
    )


@memory_app.command("stats")
def memory_stats(as_json: JsonOpt = False) -> None:
    """Records per tier, model performance, semantic-cache hits and misses."""
    with _typhon() as typhon:
        memory = typhon.runtime.memory
        if memory is None:
            _fail("memory is off for this configuration (see the log with -v)", 1)
        data = {
            "backend": memory.backend.name,
            "embeddings": memory.embedder.model,
            "episodic": memory.backend.episodic.count(),
            "semantic": memory.backend.semantic.count(),
            "performance": memory.backend.performance.stats(),
            "cache": memory.cache.stats() if memory.cache else None,
        }
    if as_json:
        typer.echo(json.dumps(data))
        return
    typer.echo(
        f"backend {data['backend']} ({data['embeddings']}): {data['episodic']} episodic,"
        f" {data['semantic']} semantic"
    )
    cache = data["cache"]
    if isinstance(cache, dict):
        total = cache["_all"]
        typer.echo(
            f"cache: {total['entries']} entries, {total['hits']} hits, {total['misses']} misses"
        )
    for row in data["performance"]:  # type: ignore[attr-defined]
        typer.echo(
            f"  {row['alias']:<20} {row['category'] or '-':<9} runs {row['runs']}"
            f" ok {row['runs_ok']} calls {row['calls']} fail {row['failures']}"
            f" gpu_s {row['gpu_s']:.2f}"
        )


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration, secrets masked."""
    import yaml

    from typhon.config import masked

    config = _config()
    data = config.model_dump(mode="json", exclude={"source"})
    data["database_url"] = config.effective_database_url
    typer.echo(f"# source: {config.source or 'embedded defaults'}")
    typer.echo(yaml.safe_dump(masked(data), sort_keys=False).rstrip())


@config_app.command("check")
def config_check() -> None:
    """Check every configured service and endpoint: one line each."""
    from typhon._checks import run_checks

    results = run_checks(_config())
    for ok, name, detail in results:
        typer.echo(f"{'ok  ' if ok else 'FAIL'}  {name:<28} {detail}")
    if not all(ok for ok, _, _ in results):
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except TyphonError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()


# Commands defined beside their rooms (light modules: heavy imports happen inside them).
from typhon.api import _cli, _cli_metrics  # noqa: E402, F401
from typhon.improve import _cli_optimize, _cli_review, _cli_routing  # noqa: E402, F401
