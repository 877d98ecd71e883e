"""A crew that does nothing: ``noop`` on the ``bench`` pool returns "ok" and calls no model.

Loaded by the benchmark's worker through ``crew_modules: ["_noop_crew"]`` with ``benchmarks/`` on
``PYTHONPATH``; what is left to measure is Typhon's own dispatch path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from typhon import crew

if TYPE_CHECKING:
    from typhon import RunContext


@crew("noop", pool="bench", description="Benchmark crew: returns 'ok' at once, calls no model.")
def noop(ctx: RunContext) -> str:
    return "ok"
