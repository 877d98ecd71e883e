"""`typhon metrics`: the Prometheus metrics that ``GET /metrics`` answers, printed once (for a
look, or for node exporter's textfile collector). Registered on `typhon.cli.app`."""

from __future__ import annotations

import sys

from typhon.cli import _config, app


@app.command()
def metrics() -> None:
    """Typhon's Prometheus metrics (runs, queues, models, cache, QA, alerts, this host's GPUs
    and disks) in the text exposition format."""
    from typhon.api._metrics import render
    from typhon.store import RunStore

    config = _config()
    store = RunStore(config.effective_database_url)
    try:
        text = render(config, store)
    finally:
        store.close()
    sys.stdout.buffer.write(text)
    sys.stdout.buffer.flush()
