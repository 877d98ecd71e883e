"""Throughput: no-op runs per second through Typhon against raw Celery on the same workers.

One process starts two real workers on the same Redis broker, with the same argv (late acks,
prefetch 1, no gossip/mingle, INFO logs to a file) and the same concurrency C (default 2):

* ``typhon --config FILE worker --pool bench``: pool ``bench`` with ``cap: C``, in a cluster of
  its own (``cluster: {name: bench-TAG, sustained: C, burst: C}``), serving the ``noop`` crew of
  ``_noop_crew.py``; each run takes a pool slot and a cluster slot (Redis leases), is claimed
  and finished in the run store, and notifies its waiters;
* ``celery -A _raw_celery worker``: a no-op task with a Redis result backend, on its own queue.

Each round submits N runs (default 300) as fast as one caller can, then waits for all of them
the way each API offers: Typhon ``submit()`` N times, then ``RunHandle.wait()`` on each handle;
raw ``send_task()`` N times, then ``AsyncResult.get()`` on each result. Wall time is from just
before the first submit to the last wait returning; runs/s = N / wall. After a warm-up, rounds
alternate Typhon and raw (ABAB...); the table shows each round and the medians, and the target
is median Typhon runs/s / median raw runs/s >= 0.8.

For Typhon each round also checks the run store: how many runs succeeded (must be N), and that
each has exactly one outcome (one terminal event, one attempt). CPU per run (this process, each
worker with its prefork children, the whole machine) comes from /proc.

Usage::

    scripts/services start && eval "$(scripts/services env)"
    .venv/bin/python benchmarks/throughput.py [--n 300] [--concurrency 2] [--rounds 3]
        [--wait handles|counts] [--database-url URL] [--profile]

``--wait counts`` makes the Typhon caller poll the store's queued/running counts instead of
waiting on each handle (the caller's share of the cost, out of the picture).

``--profile`` then times, in this process and against the same Redis and store, N calls each of
``submit()`` (published to a queue nobody consumes), ``execute_run()`` on those runs as a worker
runs it (Redis slots and notifier, INFO logs to a file) and ``RunHandle.wait()`` on the finished
runs: half plainly (wall and CPU), half under cProfile, and prints where the time of one run goes.

The run store is ``--database-url``, else ``$TYPHON_TEST_POSTGRES_URL`` (a fresh schema, dropped
at exit), else a SQLite file in a temporary folder. Workers, the temporary folder, the Redis queues
and the cluster's slot keys are removed at exit. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
    Pair,
    cleanup_redis,
    log_tail,
    run_with_cleanup,
    start_pair,
)

TARGET_RATIO = 0.8
COUNTS_POLL_S = 0.01  # --wait counts: how often the caller reads the store's counts
_CLK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting (/proc) ---------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of one process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK


def tree_cpu(roots: list[int]) -> dict[int, tuple[float, float]]:
    """CPU seconds of each root process: its own, and with all its descendants (prefork
    children)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            parent[int(entry)], cpu[int(entry)] = stat
    totals = dict.fromkeys(roots, 0.0)
    for pid, seconds in cpu.items():
        p: int | None = pid
        for _ in range(64):  # walk up to a root, bounded
            if p in totals:
                totals[p] += seconds
                break
            p = parent.get(p) if p is not None else None
            if not p:
                break
    return {root: (cpu.get(root, 0.0), totals[root]) for root in roots}


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLK


@dataclass
class CpuSnapshot:
    client: float
    workers: dict[int, tuple[float, float]]  # pid: (main process, with its children)
    machine: float

    @classmethod
    def take(cls, worker_pids: list[int]) -> CpuSnapshot:
        t = os.times()
        return cls(t.user + t.system, tree_cpu(worker_pids), machine_busy())


def idle_check(seconds: float = 1.0) -> str:
    """How busy the machine is before the benchmark starts anything (other work skews it)."""
    before = machine_busy()
    time.sleep(seconds)
    share = (machine_busy() - before) / seconds / (os.cpu_count() or 1)
    note = "" if share < 0.1 else " -- other work is running: expect skewed figures"
    return f"machine {share:.0%} busy in the {seconds:g} s before start{note}"


# -- rounds -------------------------------------------------------------------------------------
@dataclass
class Round:
    name: str
    n: int
    submit_s: float  # first submit -> last submit returned
    wall_s: float  # first submit -> the caller has the last result
    worker_s: float  # first submit -> last body finished (worker clock)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds during the round
    succeeded: int = 0
    one_outcome: int = 0  # exactly one terminal event and one attempt (typhon)
    log_lines: int = 0  # lines the worker logged during the round

    @property
    def rate(self) -> float:
        return self.n / self.wall_s

    @property
    def worker_rate(self) -> float:
        return self.n / self.worker_s


class Contestant:
    name: str
    pid: int

    def __init__(self, pair: Pair, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.pair = pair
        self.proc = proc
        self.log = log
        self.pid = proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} worker exited ({self.proc.returncode}); log:\n{log_tail(self.log)}"
            )

    def one(self, timeout: float) -> bool:
        """Submit one run and wait up to ``timeout``; True when it finished."""
        raise NotImplementedError

    def round(self, n: int, timeout: float) -> Round:
        raise NotImplementedError

    def wait_ready(self) -> float:
        """Submit runs until one completes (the worker is up); seconds it took."""
        began = time.monotonic()
        while not self.one(1.0):
            self.check_alive()
            if time.monotonic() - began > READY_TIMEOUT_S:
                raise RuntimeError(f"{self.name} worker not ready after {READY_TIMEOUT_S:.0f}s")
        return time.monotonic() - began


class TyphonContestant(Contestant):
    name = "typhon"

    def __init__(self, pair: Pair, typhon: Any, wait: str) -> None:
        super().__init__(pair, pair.t_proc, pair.t_log)
        self.typhon = typhon
        self.wait = wait  # "handles": wait() on each handle; "counts": poll the store's counts
        self._pending: list[Any] = []

    def one(self, timeout: float) -> bool:
        from typhon.errors import RunTimeoutError

        if not self._pending:
            self._pending.append(self.typhon.submit("noop", "x"))
        try:
            self._pending[0].wait(timeout)
        except RunTimeoutError:
            return False
        self._pending.clear()
        return True

    def round(self, n: int, timeout: float) -> Round:
        from typhon.errors import RunTimeoutError

        submit = self.typhon.submit
        wall0 = time.time()
        t0 = time.perf_counter()
        handles = [submit("noop", "x") for _ in range(n)]
        t_submitted = time.perf_counter()
        deadline = t0 + timeout
        if self.wait == "counts":
            self._wait_counts(deadline, timeout)
        else:
            for i, handle in enumerate(handles):
                try:
                    handle.wait(max(deadline - time.perf_counter(), 0.001))
                except RunTimeoutError:
                    self.check_alive()
                    raise RuntimeError(
                        f"typhon: only {i} of {n} runs finished within {timeout:.0f}s"
                    ) from None
        t_done = time.perf_counter()
        succeeded, one_outcome, last_finish = self.verify([h.run_id for h in handles])
        return Round(
            self.name, n, t_submitted - t0, t_done - t0, last_finish - wall0,
            succeeded=succeeded, one_outcome=one_outcome,
        )  # fmt: skip

    def _wait_counts(self, deadline: float, timeout: float) -> None:
        """Poll the store's queued/running counts until the pool has none."""
        counts = self.typhon.store.counts
        while True:
            active = counts().get(POOL, {})
            if not active.get("queued") and not active.get("running"):
                return
            if time.perf_counter() > deadline:
                self.check_alive()
                raise RuntimeError(f"typhon: runs still active after {timeout:.0f}s: {active}")
            time.sleep(COUNTS_POLL_S)

    def verify(self, ids: list[str]) -> tuple[int, int, float]:
        """(succeeded, with exactly one outcome, latest finished_at) of these runs, from the
        store: one query for the runs, one for their terminal events."""
        import sqlalchemy as sa

        from typhon._types import TERMINAL

        engine = self.typhon.store.engine
        terminal = sorted(s.value for s in TERMINAL)
        runs_q = sa.text(
            "SELECT id, status, attempts, finished_at FROM runs WHERE id IN :ids"
        ).bindparams(sa.bindparam("ids", expanding=True))
        events_q = sa.text(
            "SELECT run_id, count(*) FROM run_events"
            " WHERE run_id IN :ids AND kind IN :kinds GROUP BY run_id"
        ).bindparams(sa.bindparam("ids", expanding=True), sa.bindparam("kinds", expanding=True))
        with engine.connect() as conn:
            rows = conn.execute(runs_q, {"ids": ids}).all()
            outcomes = dict(conn.execute(events_q, {"ids": ids, "kinds": terminal}).all())
        succeeded = sum(1 for r in rows if r.status == "succeeded")
        one = sum(1 for r in rows if outcomes.get(r.id) == 1 and r.attempts == 1)
        finishes = [_timestamp(r.finished_at) for r in rows if r.finished_at is not None]
        return succeeded, one, max(finishes, default=float("nan"))


def _timestamp(value: Any) -> float:
    """A finished_at column value (datetime, or text on SQLite) as a POSIX timestamp."""
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


class RawContestant(Contestant):
    name = "raw celery"

    def __init__(self, pair: Pair, app: Any, poll_s: float) -> None:
        super().__init__(pair, pair.r_proc, pair.r_log)
        self.app = app
        self.poll_s = poll_s
        self._pending: list[Any] = []

    def _send(self) -> Any:
        from _raw_celery import TASK_NAME

        return self.app.send_task(TASK_NAME, queue=self.pair.r_queue, retry=False)

    def one(self, timeout: float) -> bool:
        from celery.exceptions import TimeoutError as CeleryTimeout

        if not self._pending:
            self._pending.append(self._send())
        try:
            self._pending[0].get(timeout=timeout, interval=self.poll_s)
        except CeleryTimeout:
            return False
        self._pending.pop().forget()
        return True

    def round(self, n: int, timeout: float) -> Round:
        from celery.exceptions import TimeoutError as CeleryTimeout

        send = self._send
        wall0 = time.time()
        t0 = time.perf_counter()
        results = [send() for _ in range(n)]
        t_submitted = time.perf_counter()
        deadline = t0 + timeout
        finishes: list[float] = []
        try:
            for result in results:
                left = max(deadline - time.perf_counter(), 0.001)
                finishes.append(result.get(timeout=left, interval=self.poll_s)[1])
            t_done = time.perf_counter()
        except CeleryTimeout:
            self.check_alive()
            raise RuntimeError(
                f"raw: only {len(finishes)} of {n} tasks finished within {timeout:.0f}s"
            ) from None
        finally:
            for result in results:  # drop the results from Redis, outside the timed part
                result.forget()
        return Round(
            self.name, n, t_submitted - t0, t_done - t0, max(finishes) - wall0,
            succeeded=len(finishes), one_outcome=len(finishes),
        )  # fmt: skip


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def measure(
    contestant: Contestant, n: int, timeout: float, worker_pids: list[int], other_pid: int
) -> Round:
    contestant.check_alive()
    lines = _lines(contestant.log)
    before = CpuSnapshot.take(worker_pids)
    result = contestant.round(n, timeout)
    after = CpuSnapshot.take(worker_pids)
    workers = {
        pid: [a - b for a, b in zip(after.workers[pid], before.workers[pid], strict=True)]
        for pid in worker_pids
    }
    result.cpu = {
        "client": after.client - before.client,
        "worker main": workers[contestant.pid][0],
        "worker": workers[contestant.pid][1],
        "other worker": workers[other_pid][1],
        "machine": after.machine - before.machine,
    }
    result.cpu["rest"] = (
        result.cpu["machine"] - result.cpu["client"] - sum(w[1] for w in workers.values())
    )
    result.log_lines = _lines(contestant.log) - lines
    return result


# -- report ---------------------------------------------------------------------------------------
def report(rounds: list[Round]) -> None:
    header = (
        f"{'round':<7}{'contestant':<12}{'runs':>6}{'ok':>6}{'1 outcome':>10}{'submit s':>10}"
        f"{'wall s':>9}{'runs/s':>9}{'worker-clk':>11}"
        f"   CPU ms/run: {'client':>7}{'worker':>8}{'rest':>7}{'machine':>8}"
    )
    print()
    print(header)
    print("-" * len(header))
    for i, r in enumerate(rounds):
        per = {k: v / r.n * 1000 for k, v in r.cpu.items()}
        print(
            f"{i // 2 + 1:<7}{r.name:<12}{r.n:>6}{r.succeeded:>6}{r.one_outcome:>10}"
            f"{r.submit_s:>10.3f}{r.wall_s:>9.3f}{r.rate:>9.1f}{r.worker_rate:>11.1f}"
            f"   {'':>12}{per['client']:>7.2f}{per['worker']:>8.2f}{per['rest']:>7.2f}"
            f"{per['machine']:>8.2f}"
        )
    cpus = os.cpu_count() or 1
    print(
        "  runs/s = runs / wall (first submit -> last wait()/get() returns); worker-clk = runs /"
        " (first submit -> last body finished, worker clock);\n  submit s = the submit loop"
        " alone; CPU: this process, the contestant's worker with its children, rest = the"
        " machine minus both\n  workers and this process (PostgreSQL, Redis, anything else"
        f" running), machine = all busy CPU; {cpus} CPUs give at most {cpus * 1000} ms of CPU"
        " per second"
    )


def summary(rounds: list[Round], n: int) -> None:
    typhon = [r for r in rounds if r.name == "typhon"]
    raw = [r for r in rounds if r.name != "typhon"]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    t_rate, r_rate = med([r.rate for r in typhon]), med([r.rate for r in raw])
    t_wrate, r_wrate = med([r.worker_rate for r in typhon]), med([r.worker_rate for r in raw])
    per_round = [t.rate / r.rate for t, r in zip(typhon, raw, strict=True)]
    print(
        f"\nmedian runs/s      typhon {t_rate:8.1f}   raw {r_rate:8.1f}"
        f"   typhon/raw {t_rate / r_rate:.2f}"
    )
    print(
        f"median worker-clk  typhon {t_wrate:8.1f}   raw {r_wrate:8.1f}"
        f"   typhon/raw {t_wrate / r_wrate:.2f}"
    )
    print("per-round typhon/raw runs/s: " + ", ".join(f"{x:.2f}" for x in per_round))
    for key in ("client", "worker", "worker main", "rest", "machine"):
        t = med([r.cpu[key] / r.n * 1000 for r in typhon])
        w = med([r.cpu[key] / r.n * 1000 for r in raw])
        print(f"median CPU ms/run {key:<12} typhon {t:6.2f}   raw {w:6.2f}   delta {t - w:+6.2f}")
    t_lines = sum(r.log_lines for r in typhon) / sum(r.n for r in typhon)
    r_lines = sum(r.log_lines for r in raw) / sum(r.n for r in raw)
    print(f"worker log lines per run   typhon {t_lines:6.2f}   raw {r_lines:6.2f}")
    all_ok = all(r.succeeded == n for r in typhon)
    all_one = all(r.one_outcome == n for r in typhon)
    print(
        f"typhon runs succeeded: {sum(r.succeeded for r in typhon)} of {n * len(typhon)}"
        f" ({'all' if all_ok else 'NOT all'});"
        f" with exactly one outcome: {sum(r.one_outcome for r in typhon)}"
        f" ({'all' if all_one else 'NOT all'})"
    )
    ratio = t_rate / r_rate
    verdict = "PASS" if ratio >= TARGET_RATIO and all_ok and all_one else "MISS"
    print(
        f"\n{verdict}: median runs/s typhon/raw = {ratio:.2f} (target >= {TARGET_RATIO},"
        " every run succeeded with exactly one outcome)"
    )
    if verdict == "MISS":
        print("  (rerun with --profile for where a run's time goes on the worker side)")


# -- in-process profile ------------------------------------------------------------------------
class _ProbeDispatcher:
    """Publishes for real, but to a queue nobody consumes: submit() as callers pay for it, with
    the runs left queued for execute_run() in this process."""

    def __init__(self, config: Any, queue: str) -> None:
        from typhon.orchestrator import CeleryDispatcher

        self.inner = CeleryDispatcher(config)
        self.queue = queue

    def dispatch(self, run: Any, queue: str) -> None:
        self.inner.dispatch(run, self.queue)

    def close(self) -> None:
        self.inner.close()


# (label, file suffix, function name): pieces reported by cumulative time
Piece = tuple[str, str, str]
_CLIENT: list[Piece] = [
    ("submit() (all)", "typhon/orchestrator.py", "submit"),
    ("  route_for", "typhon/orchestrator.py", "route_for"),
    ("  store.create_run (INSERT+event)", "typhon/store.py", "create_run"),
    ("  publish (send_task, LPUSH)", "workers/celery_app.py", "publish"),
    ("RunHandle.wait() on a finished run (all)", "typhon/orchestrator.py", "wait"),
    ("  pubsub subscribe (connect + SUBSCRIBE)", "redis/client.py", "subscribe"),
    ("  store.get (SELECT)", "typhon/store.py", "get"),
    ("  pubsub reset/close (disconnect)", "redis/client.py", "reset"),
    ("SQL statements (do_execute)", "sqlalchemy/engine/default.py", "do_execute"),
    ("Redis commands (execute_command)", "redis/client.py", "execute_command"),
    ("TCP connects (socket.connect)", "~", "<method 'connect' of '_socket.socket' objects>"),
]
_WORKER: list[Piece] = [
    ("execute_run (all)", "typhon/_runtime.py", "execute_run"),
    ("  slots: acquire (EVALSHA)", "typhon/resources/slots.py", "acquire"),
    ("  store.claim (UPDATE+event)", "typhon/store.py", "claim"),
    ("  heartbeat thread start", "typhon/_runtime.py", "__enter__"),
    ("  _run (crew + outcome)", "typhon/_runtime.py", "_run"),
    ("    _attempt (context, model client, crew)", "typhon/_runtime.py", "_attempt"),
    ("      crew body (noop)", "_noop_crew.py", "noop"),
    ("    store.finish (UPDATE+event)", "typhon/store.py", "finish"),
    ("  heartbeat thread stop (join)", "typhon/_runtime.py", "__exit__"),
    ("  slots: release (EVALSHA)", "typhon/resources/slots.py", "release"),
    ("  notifier.publish (PUBLISH)", "typhon/_notify.py", "publish"),
    ("structlog lines (log.info)", "structlog/_base.py", "_proxy_to_logger"),
    ("SQL statements (do_execute)", "sqlalchemy/engine/default.py", "do_execute"),
    ("connection checkout (Engine.connect)", "sqlalchemy/engine/base.py", "connect"),
    ("Redis commands (execute_command)", "redis/client.py", "execute_command"),
]


def _pick(stats: dict[Any, Any], suffix: str, func: str) -> tuple[int, float]:
    calls, cum = 0, 0.0
    for (filename, _line, name), (_cc, nc, _tt, ct, _callers) in stats.items():
        if name == func and filename.replace(os.sep, "/").endswith(suffix):
            calls += nc
            cum += ct
    return calls, cum


def _timed(
    fn: Callable[[Any], Any], items: list[Any]
) -> tuple[tuple[list[float], list[float]], dict[Any, Any]]:
    """Call fn on the first half of items plainly (wall and process CPU ms each), then on the
    rest under cProfile."""
    import cProfile
    import pstats

    half = len(items) // 2
    wall: list[float] = []
    cpu: list[float] = []
    for item in items[:half]:
        c0, t0 = time.process_time(), time.perf_counter()
        fn(item)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    prof = cProfile.Profile()
    prof.enable()
    for item in items[half:]:
        fn(item)
    prof.disable()
    return (sorted(wall), cpu), pstats.Stats(prof).stats  # type: ignore[attr-defined]


def _print_plain(label: str, plain: tuple[list[float], list[float]]) -> None:
    wall, cpu = plain
    print(
        f"  {label}: median {statistics.median(wall):.2f} ms, p90"
        f" {wall[int(len(wall) * 0.9)]:.2f} ms; CPU of this process {sum(cpu) / len(cpu):.2f}"
        f" ms/call ({len(wall)} calls, no profiler)"
    )


def _print_pieces(stats: dict[Any, Any], n: int, pieces: list[Piece], top: int) -> None:
    print(f"    {'cumulative, per run (cProfile)':<46}{'calls/run':>10}{'ms/run':>9}")
    for label, suffix, func in pieces:
        calls, cum = _pick(stats, suffix, func)
        if calls:
            print(f"    {label:<46}{calls / n:>10.1f}{cum / n * 1000:>9.3f}")
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(
        f"    {'own time (tottime), top ' + str(top):<58}{'calls/run':>10}{'ms/run':>9}{'share':>7}"
    )
    for (filename, line, name), (_cc, nc, tt, _ct, _callers) in rows:
        where = "/".join(Path(filename).parts[-2:]) if filename != "~" else ""
        label = f"{where}:{line} {name}" if where else name
        print(f"    {label[-58:]:<58}{nc / n:>10.1f}{tt / n * 1000:>9.3f}{tt / total:>7.0%}")


def _log_line_cost(log_file: Any, rounds: int = 2000) -> tuple[float, float, float]:
    """Microseconds per INFO line: a Celery line through Typhon's handler (structlog's
    ProcessorFormatter, JSON), the same line through Celery's plain format, and a Typhon
    structlog line. Typhon's logging must be configured (to ``log_file``) already."""
    import logging

    import structlog

    celery_log = logging.getLogger("celery.app.trace")
    args = ("typhon.execute_run", "7a8922ae-acd3-4571-b2b9-464bd46cba39", 0.0012, "succeeded")
    message = "Task %s[%s] succeeded in %ss: %r"
    t0 = time.perf_counter()
    for _ in range(rounds):
        celery_log.info(message, *args)
    typhon_handler = (time.perf_counter() - t0) / rounds * 1e6
    plain = logging.StreamHandler(log_file)
    plain.setFormatter(
        logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    )
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [plain]
    try:
        t0 = time.perf_counter()
        for _ in range(rounds):
            celery_log.info(message, *args)
        plain_us = (time.perf_counter() - t0) / rounds * 1e6
    finally:
        root.handlers[:] = saved
    log = structlog.get_logger("typhon.worker")
    t0 = time.perf_counter()
    for _ in range(rounds):
        log.info("run finished", status="succeeded")
    structlog_us = (time.perf_counter() - t0) / rounds * 1e6
    return typhon_handler, plain_us, structlog_us


def profile(config: Any, n: int, tmp: Path, probe_queue: str) -> None:
    """In this process: submit() n runs (published to a queue nobody consumes), execute_run()
    them one at a time as a worker does, then RunHandle.wait() on each; each first plainly and
    then under cProfile."""
    from typhon._runtime import Runtime, execute_run
    from typhon.logging import configure_logging
    from typhon.orchestrator import RunHandle, Typhon

    half = n // 2
    with (
        Typhon(config, dispatcher=_ProbeDispatcher(config, probe_queue)) as typhon,
        (tmp / "profile.log").open("w") as log_file,
    ):
        runtime = Runtime(config)  # a worker's: Redis slots and notifier, its own store
        try:
            for _ in range(10):  # warm: connections, imports
                execute_run(runtime, typhon.submit("noop", "x").run_id, POOL)
            handles: list[Any] = []
            sub_plain, sub_stats = _timed(
                lambda _: handles.append(typhon.submit("noop", "x")), list(range(2 * half))
            )
            ids = [h.run_id for h in handles]
            configure_logging("info", json=True, stream=log_file)  # as a worker logs
            run_plain, run_stats = _timed(lambda i: execute_run(runtime, i, POOL), ids)
            lines = _log_line_cost(log_file)
            configure_logging("warning")
            wait_plain, wait_stats = _timed(lambda i: RunHandle(typhon, i).wait(5.0), ids)
        finally:
            configure_logging("warning")
            runtime.close()
    store = config.effective_database_url.split("?")[0]
    print(
        f"\nprofile, in this process against the same Redis and {store}:"
        f" {2 * half} no-op runs, one call at a time;\nthe first half timed plainly, the second"
        " half under cProfile (whose overhead inflates the ms/run below)"
    )
    print("\nclient side")
    _print_plain("submit() (published to a queue nobody consumes)", sub_plain)
    _print_plain("RunHandle.wait() on a finished run", wait_plain)
    client_stats = dict(sub_stats)
    for key, value in wait_stats.items():  # disjoint call trees; merge for one table
        if key in client_stats:
            cc, nc, tt, ct, callers = client_stats[key]
            value = (cc + value[0], nc + value[1], tt + value[2], ct + value[3], callers)
        client_stats[key] = value
    _print_pieces(client_stats, half, _CLIENT, 10)
    print("\nworker side: execute_run() as a worker runs it (Redis slots and notifier, INFO logs"
          " to a file); Celery's own per-task work not included")  # fmt: skip
    _print_plain("execute_run()", run_plain)
    _print_pieces(run_stats, half, _WORKER, 12)
    print(
        f"\n  one INFO log line: Celery's through Typhon's handler (structlog ProcessorFormatter,"
        f" JSON) {lines[0]:.0f} us;\n  the same through Celery's plain format {lines[1]:.0f} us;"
        f" a Typhon structlog line {lines[2]:.0f} us"
    )


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=300, help="runs per round (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds each (default 3)")
    p.add_argument("--warmup", type=int, default=50, help="discarded runs each first (50)")
    p.add_argument(
        "--concurrency", "-c", type=int, default=2, help="worker concurrency = pool cap (2)"
    )
    p.add_argument(
        "--poll-s",
        type=float,
        default=0.005,
        help="raw AsyncResult.get() interval (0.005)",
    )
    p.add_argument(
        "--wait",
        choices=("handles", "counts"),
        default="handles",
        help="how the Typhon caller waits: RunHandle.wait() on each handle (default), or"
        f" polling the store's queued/running counts every {COUNTS_POLL_S}s",
    )
    p.add_argument(
        "--round-timeout", type=float, default=60.0, help="seconds a round may take (60)"
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
        "--profile",
        action="store_true",
        help="then time and profile submit(), execute_run() and wait() in this process",
    )
    args = p.parse_args(argv)
    for name in ("n", "rounds", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_with_cleanup(run, parse_args(argv))


def run(args: argparse.Namespace, cleanup: Cleanup) -> None:
    c = args.concurrency
    busy = idle_check()
    pair = start_pair(
        args.broker_url,
        args.database_url,
        cleanup,
        concurrency=c,
        cluster={"sustained": c, "burst": c},
    )

    from _raw_celery import make_app

    from typhon.logging import configure_logging
    from typhon.orchestrator import Typhon

    configure_logging("warning")
    typhon = Typhon(pair.config)
    cleanup.add("close Typhon client", typhon.close)
    raw_app = make_app(args.broker_url, pair.r_queue)
    cleanup.add("close raw client", raw_app.close)

    print(f"$ {shlex.join(sys.orig_argv)}")
    print("throughput: no-op runs/s through Typhon vs raw Celery, same workers and concurrency")
    print(f"  runs     {args.n} per round, {args.rounds} rounds each (ABAB...), after"
          f" {args.warmup} warm-up runs each; concurrency {c}")  # fmt: skip
    print(f"  broker   {args.broker_url}  (queues {pair.t_queue}, {pair.r_queue})")
    print(f"  store    {pair.db_desc}")
    print(f"  cluster  {pair.cluster} (sustained {c}, burst {c}); pool {POOL} cap {c}")
    print(f"  typhon   {' '.join(pair.t_argv)}")
    print(f"  raw      {' '.join(pair.r_argv)}")
    print(f"  python   {sys.version.split()[0]}, {os.cpu_count()} CPUs; {busy}")
    t_wait = (
        "RunHandle.wait() on each handle (pub/sub notification, then one store read)"
        if args.wait == "handles"
        else f"store.counts() every {COUNTS_POLL_S}s until the pool has none queued/running"
    )
    print(
        f"  wait =   typhon: {t_wait}; raw: AsyncResult.get(interval={args.poll_s}) on each"
        " result (Redis backend)"
    )
    typhon_c = TyphonContestant(pair, typhon, args.wait)
    raw_c = RawContestant(pair, raw_app, args.poll_s)
    pids = [typhon_c.pid, raw_c.pid]
    for contestant in (typhon_c, raw_c):
        print(f"  {contestant.name} worker ready after {contestant.wait_ready():.1f}s", flush=True)
    if args.warmup:
        for contestant in (typhon_c, raw_c):
            contestant.round(args.warmup, args.round_timeout)
    t0 = time.monotonic()
    rounds: list[Round] = []
    for _ in range(args.rounds):  # ABAB...: typhon, then raw, in every round
        rounds.append(measure(typhon_c, args.n, args.round_timeout, pids, raw_c.pid))
        rounds.append(measure(raw_c, args.n, args.round_timeout, pids, typhon_c.pid))
    print(f"  measured in {time.monotonic() - t0:.1f}s")
    report(rounds)
    summary(rounds, args.n)
    if args.profile:
        probe_queue = f"probe-bench-{pair.tag}"  # nobody consumes it
        cleanup.add("delete probe queue", lambda: cleanup_redis(args.broker_url, [probe_queue]))
        profile(pair.config, args.n, pair.tmp, probe_queue)


if __name__ == "__main__":
    sys.exit(main())
