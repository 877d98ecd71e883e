"""Balancing: two real llama-server replicas of one alias behind one ``BalancedClient``.

One process assembles the bundled gemma-3-270m GGUF into a temporary ``TYPHON_HOME``, starts two
llama-server processes on loopback (``-t 1 -np 4`` each, as ``tests/support/llama.py`` starts
them) and configures them as two ``model_list`` entries of the alias ``fast``. Each phase uses a
fresh ``ModelRegistry`` (so fresh counts) and first makes one call per replica, one after the
other, so that both replicas have their HTTP client before calls come from many threads.

* Share: ``--share-n`` calls (default 40) at once from as many threads, through one client.
  Prints the calls each replica served and its share, the wall time and the failures.
* Failover: ``--threads`` client threads (default 8) issue calls back to back for
  ``--duration`` seconds (default 20). At ``--kill-at`` (5 s) replica #0 is killed with SIGKILL;
  at ``--restart-at`` (12 s) it is started again on the same port. A watcher thread reads the
  group's states every 10 ms. Prints the calls made and failed, the calls in flight on the killed
  replica at the kill (its ``outstanding`` count just before the SIGKILL), the time from the kill
  until the replica is marked down, from the restart until it is marked up again and until it
  answers its first call, and each replica's share in each phase (by the time a call ended).
  Target: no call fails beyond those in flight at the kill (the balancer retries those on the
  other replica, so the expected figure is 0 failures in all).

``--threads-http N`` passes ``--threads-http N`` to both servers (default: what Typhon's own
servers get, ``max(32, 4 x np)``; llama-server's built-in default is about
``max(np + 2, cores - 1)``). Idle keep-alive connections hold those HTTP threads until their
keep-alive runs out, so with more connections than threads some calls wait seconds for a thread:
compare the share phase with ``--threads-http 6``.

Usage::

    .venv/bin/python benchmarks/balancing.py [--share-n 40] [--threads 8] [--duration 20]
        [--kill-at 5] [--restart-at 12] [--max-tokens 4] [--parallel 4] [--threads-http N]

Both servers are stopped at exit, and the temporary folder removed. Exit status 0 whatever the
figures.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))  # _common, throughput; tests.support.llama

from _common import Cleanup, run_with_cleanup  # noqa: E402
from throughput import idle_check  # noqa: E402

ALIAS = "fast"
TARGET_FAILED_BEYOND_IN_FLIGHT = 0
WATCH_S = 0.01  # how often the watcher reads the group's states
ROUTER_SETTINGS: dict[str, Any] = {
    "cooldown_time": 2,
    "health_check_interval": 1,
    "allowed_fails": 1,
    "num_retries": 2,
    "health_check_timeout": 3,
    "queue_timeout": 30,
}


@dataclass
class Call:
    thread: int
    start: float  # monotonic
    end: float
    url: str | None  # the replica that answered; None: the call failed
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Count to {i % 7 + 2}."}]


def _chat(client: Any, i: int, max_tokens: int, thread: int) -> Call:
    start = time.monotonic()
    try:
        result = client.chat(_messages(i), max_tokens=max_tokens, temperature=0)
    except Exception as exc:
        return Call(thread, start, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
    return Call(thread, start, time.monotonic(), result.url)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


class Bench:
    """The two servers, the configuration, and a fresh registry per phase."""

    def __init__(self, args: argparse.Namespace, cleanup: Cleanup):
        from tests.support.llama import start_llama_server
        from typhon.config import TyphonConfig
        from typhon.models._local import _bundled_model

        self.args = args
        self.cleanup = cleanup
        self.tmp = Path(tempfile.mkdtemp(prefix="typhon-balancing-"))
        cleanup.add(f"remove {self.tmp}", lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        home = self.tmp / "home"
        started = time.perf_counter()
        self.model = _bundled_model(home)
        self.assemble_s = time.perf_counter() - started
        self.servers = []
        for name in ("a", "b"):
            started = time.perf_counter()
            server = start_llama_server(
                self.model,
                parallel=args.parallel,
                log_path=self.tmp / f"llama-{name}.log",
                extra_args=["--threads-http", str(args.threads_http)] if args.threads_http else (),
            )
            cleanup.add(f"stop llama-server {server.url}", server.stop)
            self.servers.append(server)
            print(f"  replica {name}  {server.url}/v1 ready after"
                  f" {time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
        self.urls = [f"{s.url}/v1" for s in self.servers]
        self.config = TyphonConfig(
            home=home,
            model_list=[
                {"model_name": ALIAS, "litellm_params": {"model": "openai/gemma", "api_base": u}}
                for u in self.urls
            ],
            router_settings=ROUTER_SETTINGS,
            routing=dict.fromkeys(("simple", "complex", "code", "creative"), ALIAS),
        )

    def registry(self) -> Any:
        from typhon.models import ModelRegistry

        registry = ModelRegistry(self.config)
        self.cleanup.add("close the model registry", registry.close)
        client = registry.client(ALIAS)
        for i in range(len(self.urls)):  # one call per replica: each builds its client
            client.chat(_messages(i), max_tokens=1)
        return registry

    def name(self, url: str | None) -> str:
        return "failed" if url is None else f"#{self.urls.index(url)}"


# -- share ----------------------------------------------------------------------------------------
def share(bench: Bench) -> None:
    n, max_tokens = bench.args.share_n, bench.args.max_tokens
    registry = bench.registry()
    client, group = registry.client(ALIAS), registry.group(ALIAS)
    before = {s["url"]: s["served"] for s in group.states()}
    calls: list[Call] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        call = _chat(client, i, max_tokens, i)
        with lock:
            calls.append(call)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    states = group.states()
    failed = [c for c in calls if c.url is None]
    print()
    print(f"share: {n} calls at once from {n} threads through one BalancedClient"
          f" (max_tokens {max_tokens})")  # fmt: skip
    print(f"  {'replica':<34}{'served':>8}{'share':>8}{'p50 ms':>9}{'max ms':>9}")
    for state in states:
        url = state["url"]
        served = state["served"] - before[url]
        lat = [c.latency for c in calls if c.url == url]
        print(f"  {bench.name(url)} {url:<31}{served:>8}{served / n:>8.0%}"
              f"{_pct(lat, 0.5) * 1000:>9.0f}{max(lat, default=0) * 1000:>9.0f}")  # fmt: skip
    print(f"  wall {wall:.2f}s for {n} calls ({n / wall:.1f} calls/s); failures {len(failed)}")
    for call in failed[:3]:
        print(f"    failed: {call.error}")
    registry.close()


# -- failover -------------------------------------------------------------------------------------
class Watcher(threading.Thread):
    """Reads the group's states every 10 ms: when the victim is first seen down after the kill,
    and up after the restart."""

    def __init__(self, group: Any, url: str):
        super().__init__(name="watcher", daemon=True)
        self.group = group
        self.url = url
        self.stop = threading.Event()
        self.kill_at: float | None = None
        self.restart_at: float | None = None
        self.down_at: float | None = None
        self.up_at: float | None = None
        self.reads = 0

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            state = next(s for s in self.group.states() if s["url"] == self.url)
            self.reads += 1
            if self.kill_at is not None and self.down_at is None and not state["up"]:
                self.down_at = now
            if self.restart_at is not None and self.up_at is None and state["up"]:
                self.up_at = now
            time.sleep(WATCH_S)


def failover(bench: Bench) -> None:
    args = bench.args
    registry = bench.registry()
    client, group = registry.client(ALIAS), registry.group(ALIAS)
    victim, victim_url = bench.servers[0], bench.urls[0]
    calls: list[Call] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**9))

    def worker(k: int) -> None:
        while not stop.is_set():
            call = _chat(client, next(counter), args.max_tokens, k)
            with lock:
                calls.append(call)

    watcher = Watcher(group, victim_url)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.threads)]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()

    time.sleep(max(0.0, t0 + args.kill_at - time.monotonic()))
    in_flight = next(s for s in group.states() if s["url"] == victim_url)["outstanding"]
    kill_at = time.monotonic()
    victim.kill()
    watcher.kill_at = kill_at

    time.sleep(max(0.0, t0 + args.restart_at - time.monotonic()))
    restart_at = time.monotonic()
    watcher.restart_at = restart_at
    victim.restart()
    ready_at = time.monotonic()

    time.sleep(max(0.0, t0 + args.duration - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join()
    end = time.monotonic()
    time.sleep(0.05)
    watcher.stop.set()
    watcher.join()

    failed = [c for c in calls if c.url is None]
    beyond = max(0, len(failed) - in_flight)
    first_served = min(
        (c.end for c in calls if c.url == victim_url and c.start >= restart_at), default=None
    )
    since_kill = None if watcher.down_at is None else watcher.down_at - kill_at
    up_after = None if watcher.up_at is None else watcher.up_at - restart_at
    served_after = None if first_served is None else first_served - restart_at

    print()
    print(f"failover: {args.threads} threads calling back to back for {args.duration:g}s"
          f" (max_tokens {args.max_tokens}); SIGKILL #0 at {args.kill_at:g}s,"
          f" restart it at {args.restart_at:g}s")  # fmt: skip
    print(f"  calls {len(calls)}, failed {len(failed)}; in flight on #0 at the kill {in_flight}")
    for call in failed[:5]:
        print(f"    failed at {call.end - t0:.2f}s: {call.error}")
    print(
        f"  kill -> #0 marked down            {_ms(since_kill)}"
        f"   (watcher read the states every {WATCH_S * 1000:.0f} ms, {watcher.reads} reads)"
    )
    print(
        f"  restart -> llama-server healthy   {_ms(ready_at - restart_at)}"
        "   (process start and model load, as LlamaProcess.restart() waits for /health)"
    )
    print(f"  restart -> #0 marked up           {_ms(up_after)}")
    print(f"  restart -> #0 answers a call      {_ms(served_after)}")  # fmt: skip
    phases = [
        ("before the kill", t0, kill_at),
        ("#0 killed", kill_at, restart_at),
        ("after the restart", restart_at, end + 1),
    ]
    print(f"  {'phase (by call end)':<22}{'secs':>6}{'calls':>7}{'#0':>7}{'#1':>7}{'failed':>8}"
          f"{'p50 ms':>8}{'max ms':>8}")  # fmt: skip
    for label, lo, hi in phases:
        inside = [c for c in calls if lo <= c.end < hi]
        ok = [c.latency for c in inside if c.url is not None]
        counts = [sum(c.url == u for c in inside) for u in bench.urls]
        total = max(len(inside), 1)
        shares = "".join(f"{k / total:>7.0%}" for k in counts)
        print(f"  {label:<22}{min(hi, end) - lo:>6.1f}{len(inside):>7}{shares}"
              f"{sum(c.url is None for c in inside):>8}{_pct(ok, 0.5) * 1000:>8.0f}"
              f"{max(ok, default=0) * 1000:>8.0f}")  # fmt: skip
    final = group.states()
    for state in final:
        print(f"  state {bench.name(state['url'])}: up {state['up']}, served {state['served']},"
              f" failures {state['failures']}, last_error {state['last_error']!r}")  # fmt: skip
    verdict = "PASS" if beyond <= TARGET_FAILED_BEYOND_IN_FLIGHT else "MISS"
    print(f"{verdict}: calls failed beyond those in flight at the kill: {beyond}"
          f" (target {TARGET_FAILED_BEYOND_IN_FLIGHT}; failed {len(failed)},"
          f" in flight {in_flight})")  # fmt: skip
    registry.close()


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--share-n", type=int, default=40, help="calls at once in the share phase (40)")
    p.add_argument("--threads", type=int, default=8, help="client threads in the failover (8)")
    p.add_argument("--duration", type=float, default=20.0, help="failover phase seconds (20)")
    p.add_argument("--kill-at", type=float, default=5.0, help="SIGKILL replica #0 at (5 s)")
    p.add_argument("--restart-at", type=float, default=12.0, help="restart it at (12 s)")
    p.add_argument("--max-tokens", type=int, default=4, help="max_tokens of every call (4)")
    p.add_argument("--parallel", type=int, default=4, help="llama-server slots (-np) each (4)")
    p.add_argument(
        "--threads-http", type=int, default=0, help="llama-server HTTP threads (max(32, 4 x np))"
    )
    args = p.parse_args(argv)
    if not 0 < args.kill_at < args.restart_at < args.duration:
        p.error("need 0 < --kill-at < --restart-at < --duration")
    for name in ("share_n", "threads", "max_tokens", "parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_with_cleanup(run, parse_args(argv))


def run(args: argparse.Namespace, cleanup: Cleanup) -> None:
    from typhon.logging import configure_logging

    configure_logging("error")  # replica down/up warnings would interleave with the table
    busy = idle_check()
    print(f"$ {shlex.join(sys.orig_argv)}")
    print("balancing: one alias, two real llama-server replicas, one BalancedClient")
    bench = Bench(args, cleanup)
    print(f"  model    {bench.model.name} (assembled in {bench.assemble_s:.1f}s),"
          f" llama-server -t 1 -np {args.parallel} each, HTTP threads"
          f" {args.threads_http or max(32, 4 * args.parallel)}")  # fmt: skip
    settings = ", ".join(f"{k} {v}" for k, v in ROUTER_SETTINGS.items())
    print(f"  router   {settings}; routing_strategy least-busy")
    print(f"  python   {sys.version.split()[0]}, {os.cpu_count()} CPUs; {busy}")
    share(bench)
    failover(bench)


if __name__ == "__main__":
    sys.exit(main())
