"""Dispatch overhead: Typhon's submit -> start / submit -> done against raw Celery, no-op bodies.

One process starts two real workers on the same Redis broker, each with the same settings
(late acks, prefetch 1, concurrency 1, no gossip/mingle, INFO log level, logs to a file):

* ``typhon --config FILE worker --pool bench`` serving the ``noop`` crew of ``_noop_crew.py``;
* ``celery -A _raw_celery worker`` serving a no-op task on a queue of its own.

It then submits N runs to each, one at a time (submit, wait, next), alternating blocks of runs
(ABBA order) so that drift hits both alike, and prints p50/p99 of:

* submit -> start: the worker's own clock when the body is about to run (Typhon: the run's
  ``started_at``; raw: ``time.time()`` at the top of the task), minus ``time.time()`` just before
  submitting. Same host, same wall clock.
* submit -> done: when the caller *knows* the result. Typhon: ``RunHandle.wait()`` returns (woken
  by the run's pub/sub notification, then one read of the run store); raw:
  ``AsyncResult.get(interval=...)`` returns (the Redis result backend pushes the result over
  pub/sub). This is what each API gives its callers.
* submit -> finish: the worker's clock when the body has finished (Typhon: ``finished_at``; raw:
  ``time.time()`` at the end of the task); i.e. done without the caller's way of waiting.

Usage::

    scripts/services start && eval "$(scripts/services env)"
    .venv/bin/python benchmarks/dispatch_overhead.py [--n 200] [--database-url URL] [--breakdown]

It also prints the median of each phase, and with ``--breakdown`` in-process timings of each
run-store call, of ``submit()`` without publishing, of the publish alone and of ``execute_run()``.

A PostgreSQL run store gets a schema of its own (dropped at exit); SQLite gets a file in a temporary
folder. Exit status 0 whatever the figures; PASS/MISS compares the p50 submit->done ratio with
the target.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # _common, _noop_crew, _raw_celery

from _common import (  # noqa: E402
    DEFAULT_REDIS,
    POOL,
    READY_TIMEOUT_S,
    Cleanup,
    cleanup_redis,
    log_tail,
    run_with_cleanup,
    start_pair,
)

TARGET_P50_DONE_RATIO = 1.25
RUN_TIMEOUT_S = 30.0


# -- samples and statistics ---------------------------------------------------------------------
@dataclass
class Sample:
    submit: float  # submit call returned
    start: float  # body about to run (worker clock)
    finish: float  # body finished (worker clock)
    done: float  # caller got the result


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def values(self, attr: str) -> list[float]:
        return [getattr(s, attr) for s in self.samples]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 200 values is the 198th smallest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


# -- the two contestants ----------------------------------------------------------------------
class Contestant:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def once(self, timeout: float) -> Sample:
        raise NotImplementedError

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} worker exited ({self.proc.returncode}); log:\n{log_tail(self.log)}"
            )

    def wait_ready(self) -> float:
        """Submit runs until one completes (the worker is up and warm); seconds it took."""
        began = time.monotonic()
        while True:
            self.check_alive()
            try:
                self.once(1.0)
                return time.monotonic() - began
            except TimeoutError:
                if time.monotonic() - began > READY_TIMEOUT_S:
                    raise RuntimeError(
                        f"{self.name} worker not ready after {READY_TIMEOUT_S:.0f}s;"
                        f" log:\n{log_tail(self.log)}"
                    ) from None


class TyphonContestant(Contestant):
    def __init__(self, typhon: Any, proc: subprocess.Popen[bytes], log: Path, poll_s: float | None):
        self.name = "typhon"
        self.typhon = typhon
        self.proc = proc
        self.log = log
        self.poll_s = poll_s
        self._pending: Any = None

    def once(self, timeout: float) -> Sample:
        from typhon.errors import RunTimeoutError

        if self._pending is None:  # a run that timed out is waited for again, not resubmitted
            t0 = time.time()
            handle = self.typhon.submit("noop", "x")
            self._pending = (handle, t0, time.time())
        handle, t0, t_submit = self._pending
        try:
            if self.poll_s is None:  # RunHandle.wait's own default
                record = handle.wait(timeout)
            else:
                record = handle.wait(timeout, poll_s=self.poll_s)
        except RunTimeoutError:
            raise TimeoutError from None
        t_done = time.time()
        self._pending = None
        if record.status.value != "succeeded":
            raise RuntimeError(f"run {record.id} {record.status.value}: {record.error}")
        return Sample(
            t_submit - t0,
            record.started_at.timestamp() - t0,
            record.finished_at.timestamp() - t0,
            t_done - t0,
        )


class RawContestant(Contestant):
    def __init__(
        self, app: Any, queue: str, proc: subprocess.Popen[bytes], log: Path, poll_s: float
    ):
        self.name = "raw celery"
        self.app = app
        self.queue = queue
        self.proc = proc
        self.log = log
        self.poll_s = poll_s
        self._pending: Any = None

    def once(self, timeout: float) -> Sample:
        from _raw_celery import TASK_NAME
        from celery.exceptions import TimeoutError as CeleryTimeout

        if self._pending is None:  # a task that timed out is waited for again, not resent
            t0 = time.time()
            result = self.app.send_task(TASK_NAME, queue=self.queue, retry=False)
            self._pending = (result, t0, time.time())
        result, t0, t_submit = self._pending
        try:
            started, finished = result.get(timeout=timeout, interval=self.poll_s)
        except CeleryTimeout:
            raise TimeoutError from None
        t_done = time.time()
        self._pending = None
        result.forget()
        return Sample(t_submit - t0, started - t0, finished - t0, t_done - t0)


# -- measuring ----------------------------------------------------------------------------------
def measure(
    contestants: list[Contestant], n: int, warmup: int, block: int, max_s: float
) -> list[Series]:
    """Warm up, then alternate blocks of ``block`` runs in ABBA order until ``n`` runs each."""
    for c in contestants:
        for _ in range(warmup):
            c.once(RUN_TIMEOUT_S)
    series = {c.name: Series(c.name) for c in contestants}
    deadline = time.monotonic() + max_s
    blocks = math.ceil(n / block)
    for b in range(blocks):
        order = contestants if b % 2 == 0 else contestants[::-1]
        for c in order:
            todo = min(block, n - len(series[c.name].samples))
            for _ in range(todo):
                c.check_alive()
                series[c.name].samples.append(c.once(RUN_TIMEOUT_S))
        if time.monotonic() > deadline:
            print(f"note: stopped after {b + 1} of {blocks} blocks (--max-seconds {max_s:g})")
            break
    return [series[c.name] for c in contestants]


def report(typhon: Series, raw: Series) -> bool:
    rows = [
        ("submit -> start", "start"),
        ("submit -> done", "done"),
        ("submit -> finish (worker clock)", "finish"),
        ("submit() call returns", "submit"),
    ]
    print()
    header = (
        f"{'latency [ms]':<33}{'typhon p50':>11}{'p99':>9}"
        f"{'raw p50':>11}{'p99':>9}{'ratio p50':>11}{'ratio p99':>11}"
    )
    print(header)
    print("-" * len(header))
    for label, attr in rows:
        tv, rv = typhon.values(attr), raw.values(attr)
        t50, t99 = percentile(tv, 50), percentile(tv, 99)
        r50, r99 = percentile(rv, 50), percentile(rv, 99)
        print(
            f"{label:<33}{ms(t50):>11}{ms(t99):>9}{ms(r50):>11}{ms(r99):>9}"
            f"{t50 / r50:>11.2f}{t99 / r99:>11.2f}"
        )
    print(f"(n = {len(typhon.samples)} typhon runs, {len(raw.samples)} raw runs)")
    ratio = percentile(typhon.values("done"), 50) / percentile(raw.values("done"), 50)
    verdict = "PASS" if ratio <= TARGET_P50_DONE_RATIO else "MISS"
    print(
        f"\n{verdict}: p50 submit->done typhon/raw = {ratio:.2f}"
        f" (target <= {TARGET_P50_DONE_RATIO})"
    )
    return verdict == "PASS"


def report_phases(typhon: Series, raw: Series) -> None:
    """Where the time goes, medians of per-run differences."""

    def med(series: Series, fn: Callable[[Sample], float]) -> float:
        return statistics.median(fn(s) for s in series.samples)

    phases: list[tuple[str, Callable[[Sample], float]]] = [
        ("submit() (typhon: route + store + publish)", lambda s: s.submit),
        ("submit returned -> body starts", lambda s: s.start - s.submit),
        ("body start -> body finish", lambda s: s.finish - s.start),
        ("body finish -> caller has result", lambda s: s.done - s.finish),
    ]
    print("\nphases, median [ms]                          typhon       raw     delta")
    for label, fn in phases:
        t, r = med(typhon, fn), med(raw, fn)
        print(f"  {label:<42}{ms(t):>9} {ms(r):>9} {ms(t - r):>9}")
    print(
        "  (typhon's start/finish are started_at/finished_at, taken just before the UPDATE that"
        " records them;\n   raw's are taken inside the task)"
    )


@contextmanager
def timed(results: dict[str, list[float]], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    results.setdefault(name, []).append(time.perf_counter() - t0)


class _NoDispatch:
    """A dispatcher that publishes nothing: submit() minus the broker."""

    def dispatch(self, run: Any, queue: str) -> None:
        pass

    def close(self) -> None:
        pass


def _median_ms(values: list[float]) -> str:
    return ms(statistics.median(values))


def breakdown(config: Any, rounds: int, probe_queue: str) -> None:
    """Time each piece of the dispatch path in this process, against the same store and broker."""
    import sqlalchemy as sa

    from typhon._runtime import execute_run
    from typhon._types import RunStatus
    from typhon.orchestrator import CeleryDispatcher, Typhon
    from typhon.store import RunStore

    url = config.effective_database_url
    stores = {"as shipped": RunStore(url)}
    if not url.startswith("sqlite"):
        engine = sa.create_engine(url, pool_pre_ping=False, pool_size=5)
        stores["pool_pre_ping=False"] = RunStore(url, engine=engine)
    print(f"\nbreakdown, median of {rounds} calls in this process [ms]")
    for label, store in stores.items():
        results: dict[str, list[float]] = {}
        store.migrate()
        for _ in range(rounds):
            with timed(results, "create_run (INSERT run + event; get)"):
                rec = store.create_run(crew="probe", input="x", pool=POOL, model="local")
            with timed(results, "get (one poll of RunHandle.wait)"):
                store.get(rec.id)
            with timed(results, "status"):
                store.status(rec.id)
            with timed(results, "mark_running (UPDATE + event)"):
                store.mark_running(rec.id)
            with timed(results, "finish (UPDATE + event)"):
                store.finish(rec.id, RunStatus.SUCCEEDED, output="ok")
        print(f"  run store, {label}")
        for name, values in results.items():
            print(f"    {name:<46}{_median_ms(values)}")
        store.close()

    results = {}
    with Typhon(config, dispatcher=_NoDispatch()) as typhon:
        dispatcher = CeleryDispatcher(config)
        try:
            dispatcher.check()
            for _ in range(rounds):
                with timed(results, "Typhon.submit() without publishing"):
                    handle = typhon.submit("noop", "x")
                record = handle.result()
                with timed(results, "publish alone (CeleryDispatcher.dispatch)"):
                    dispatcher.dispatch(record, probe_queue)  # a queue nobody consumes
                with timed(results, "execute_run() in-process, no broker"):
                    execute_run(typhon.runtime, record.id)
        finally:
            dispatcher.close()
    print("  dispatch path")
    for name, values in results.items():
        print(f"    {name:<46}{_median_ms(values)}")


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=200, help="measured runs each (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="discarded runs each (default 20)")
    p.add_argument("--block", type=int, default=10, help="runs per alternating block")
    p.add_argument(
        "--poll-s", type=float, default=0.005, help="raw AsyncResult.get() interval (0.005)"
    )
    p.add_argument(
        "--broker-url",
        default=os.environ.get("TYPHON_TEST_REDIS_URL") or DEFAULT_REDIS,
        help="Redis broker (default $TYPHON_TEST_REDIS_URL, else %(default)s)",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="run store (default $TYPHON_TEST_POSTGRES_URL, else a SQLite file in a temp dir)",
    )
    p.add_argument(
        "--max-seconds", type=float, default=100.0, help="stop measuring after this long"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time store calls, submit, publish and execute_run in-process",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_with_cleanup(run, parse_args(argv))


def run(args: argparse.Namespace, cleanup: Cleanup) -> None:
    pair = start_pair(args.broker_url, args.database_url, cleanup, concurrency=1)
    t_queue, r_queue = pair.t_queue, pair.r_queue
    p_queue = f"probe-bench-{pair.tag}"  # a queue nobody consumes, for --breakdown
    cleanup.add("delete probe queue", lambda: cleanup_redis(args.broker_url, [p_queue]))
    config, db_desc, t_argv, r_argv = pair.config, pair.db_desc, pair.t_argv, pair.r_argv

    from typhon.logging import configure_logging
    from typhon.orchestrator import Typhon

    configure_logging("warning")

    from _raw_celery import make_app

    typhon = Typhon(config)
    cleanup.add("close Typhon client", typhon.close)
    raw_app = make_app(args.broker_url, r_queue)
    cleanup.add("close raw client", raw_app.close)

    print("dispatch overhead: no-op crew through Typhon vs no-op task on raw Celery")
    print(f"  broker   {args.broker_url}  (queues {t_queue}, {r_queue})")
    print(f"  store    {db_desc}")
    print(f"  typhon   {' '.join(t_argv)}")
    print(f"  raw      {' '.join(r_argv)}")
    print(f"  python   {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(
        f"  done =   typhon: RunHandle.wait() returns (woken by the run's pub/sub notification);"
        f" raw: AsyncResult.get(interval={args.poll_s}) returns (Redis pub/sub)"
    )
    contestants: list[Contestant] = [
        TyphonContestant(typhon, pair.t_proc, pair.t_log, None),
        RawContestant(raw_app, r_queue, pair.r_proc, pair.r_log, args.poll_s),
    ]
    for c in contestants:
        print(f"  {c.name} worker ready after {c.wait_ready():.1f}s")
    t0 = time.monotonic()
    typhon_series, raw_series = measure(
        contestants, args.n, args.warmup, args.block, args.max_seconds
    )
    print(f"  measured in {time.monotonic() - t0:.1f}s")
    report(typhon_series, raw_series)
    report_phases(typhon_series, raw_series)
    if args.breakdown:
        breakdown(config, 100, p_queue)


if __name__ == "__main__":
    sys.exit(main())
