"""``typhon serve``: the API under uvicorn, over a Typhon built from the configuration."""

from __future__ import annotations

import ipaddress

from typhon.api._settings import api_settings
from typhon.api._tokens import TokenStore
from typhon.config import TyphonConfig
from typhon.errors import ConfigError
from typhon.store import RunStore

__all__ = ["check_bind", "is_loopback", "serve"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(config: TyphonConfig, host: str) -> None:
    """ConfigError when ``host`` is not loopback and no API token exists: a server reachable
    from the network must not start open to everyone."""
    if is_loopback(host):
        return
    store = RunStore(config.effective_database_url)
    try:
        count = TokenStore(store).active_count()
    finally:
        store.close()
    if count == 0:
        raise ConfigError(
            f"refusing to listen on {host} with no API token: create one with"
            " `typhon tokens create --scope admin`, or listen on 127.0.0.1"
        )


def serve(config: TyphonConfig, host: str | None = None, port: int | None = None) -> None:
    """Serve until interrupted; runs submitted here use this configuration's mode."""
    import uvicorn

    from typhon.api._app import create_app
    from typhon.orchestrator import Typhon

    settings = api_settings(config)
    host = host or settings.host
    port = port or settings.port
    check_bind(config, host)
    with Typhon(config) as typhon:
        app = create_app(typhon, settings=settings)
        uvicorn.run(
            app, host=host, port=port, log_level=config.log_level, server_header=False,
            proxy_headers=False, timeout_graceful_shutdown=10,
        )  # fmt: skip
