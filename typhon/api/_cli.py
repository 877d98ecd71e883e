"""``typhon serve`` and ``typhon tokens``. Light at import: the server loads inside commands."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from typhon.cli import JsonOpt, _config, _fail, app

if TYPE_CHECKING:
    from typhon.api._tokens import TokenStore

__all__ = ["serve", "tokens_app"]

tokens_app = typer.Typer(help="API tokens for `typhon serve`.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default api.host: 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default api.port: 8700).")
    ] = None,
) -> None:
    """Serve the HTTP API (runs, webhooks, activity, hardware, metrics); runs start here when
    no broker is configured, else on the workers."""
    from typhon.api._server import check_bind
    from typhon.api._server import serve as run_server
    from typhon.api._settings import api_settings
    from typhon.errors import ConfigError

    config = _config()
    try:
        check_bind(config, host or api_settings(config).host)
    except ConfigError as exc:
        _fail(str(exc), 2)
    config.home.mkdir(parents=True, exist_ok=True)
    from typhon.logging import configure_logging

    configure_logging(config.log_level)
    run_server(config, host, port)


def _tokens() -> TokenStore:
    from typhon.api._tokens import TokenStore
    from typhon.store import RunStore

    return TokenStore(RunStore(_config().effective_database_url))


@tokens_app.command("create")
def tokens_create(
    scope: Annotated[
        str, typer.Option("--scope", help="read (GETs), submit (runs, feedback) or admin.")
    ],
    name: Annotated[str, typer.Option("--name", help="What the token is for.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print it; it is shown only this once."""
    from typhon.api._tokens import SCOPES

    if scope not in SCOPES:
        _fail(f"--scope must be one of {', '.join(SCOPES)}, not '{scope}'", 2)
    tokens = _tokens()
    try:
        info, token = tokens.create(scope, name)
    finally:
        tokens.store.close()
    if as_json:
        typer.echo(json.dumps({**info.to_json(), "token": token}))
        return
    typer.echo(token)
    typer.echo(f"token {info.id} ({scope}) created; it is not shown again", err=True)


@tokens_app.command("list")
def tokens_list(
    as_json: JsonOpt = False,
    all_: Annotated[bool, typer.Option("--all", help="Revoked tokens too.")] = False,
) -> None:
    """The tokens (never their secrets): id, name, scope, created, last used."""
    tokens = _tokens()
    try:
        found = tokens.list(include_revoked=all_)
    finally:
        tokens.store.close()
    if as_json:
        typer.echo(json.dumps([t.to_json() for t in found]))
        return
    for t in found:
        used = t.last_used_at.strftime("%Y-%m-%d %H:%M") if t.last_used_at else "never"
        revoked = "  REVOKED" if t.revoked_at else ""
        typer.echo(
            f"{t.id}  {t.scope:<6}  {t.created_at:%Y-%m-%d %H:%M}  used {used}  {t.name}{revoked}"
        )


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke a token; requests with it are refused from now on."""
    tokens = _tokens()
    try:
        revoked = tokens.revoke(token_id)
    finally:
        tokens.store.close()
    if not revoked:
        _fail(f"no active token '{token_id}'; see `typhon tokens list`", 1)
    typer.echo(f"revoked {token_id}")
