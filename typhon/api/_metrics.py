"""Typhon's Prometheus metrics, read from the run store (and the broker) at scrape time.

:class:`TyphonCollector` is a prometheus-client custom collector: every scrape asks the run store
with a handful of aggregate SQL queries (``GROUP BY``, bucket counts summed in SQL: no run is
loaded one by one), so the numbers are the cluster's, whichever process answers the scrape, and
no worker keeps counters of its own (no multiprocess registry, nothing to reset). Totals come
from rows that exist: deleting old rows lowers a counter, which Prometheus reads as a reset.

=========================================== ========= ====================== =====================
metric                                      type      labels                 source
=========================================== ========= ====================== =====================
``activity_completed_total``                counter   crew, status           ``runs`` (finished)
``activity_completed``                      untyped   crew, status           the same values
``typhon_runs_running``                     gauge     pool                   ``runs`` running
``typhon_runs_waiting``                     gauge     pool                   ``runs`` waiting
``typhon_queue_depth``                      gauge     pool                   ``runs`` queued
``typhon_run_duration_seconds``             histogram crew                   ``runs`` started and
                                                                             finished
``typhon_model_calls_total``                counter   alias, status (ok,     ``model_calls``
                                                      error)
``typhon_model_tokens_total``               counter   alias, kind (prompt,   ``model_calls``
                                                      completion)
``typhon_model_latency_seconds``            histogram alias                  ``model_calls``
``typhon_model_gpu_seconds_total``          counter   alias                  ``model_calls``
``typhon_cache_hits_total``                 counter   alias                  ``memory_cache_counts``
``typhon_cache_misses_total``               counter   alias                  ``memory_cache_counts``
``typhon_qa_score``                         histogram crew                   ``run_reviews`` (ok)
``typhon_feedback_total``                   counter   crew, vote (up, down)  ``run_feedback``
``typhon_alerts_open``                      gauge     kind                   ``alerts`` unresolved
``typhon_pool_cap``                         gauge     pool                   config (sustained)
``typhon_pool_burst_cap``                   gauge     pool                   config (ceiling)
``typhon_cluster_slots``                    gauge     kind (sustained,       config ``cluster``
                                                      burst)
``typhon_broker_up``                        gauge                            Redis broker answers
``typhon_broker_queue_length``              gauge     queue                  Redis ``LLEN``
``typhon_slots_in_use``                     gauge     pool                   Redis slot leases
``typhon_cluster_slots_in_use``             gauge                            Redis slot leases
``typhon_gpu_memory_used_bytes``            gauge     host, gpu, uuid, name  this host (NVML)
``typhon_gpu_memory_total_bytes``           gauge     host, gpu, uuid, name  this host (NVML)
``typhon_gpu_temperature_celsius``          gauge     host, gpu, uuid, name  this host (NVML)
``typhon_gpu_utilization_percent``          gauge     host, gpu, uuid, name  this host (NVML)
``typhon_disk_used_percent``                gauge     host, mount, device    this host
``typhon_build_info``                       gauge     version                1
=========================================== ========= ====================== =====================

``status`` of ``activity_completed_total`` is ``success`` (succeeded), ``failure`` (failed) or
``cancelled``; every crew seen in the run store, built in or configured has all three series,
at 0 until a run ends that way, so that ``rate()`` counts a crew's first outcome. External agents'
activity (``POST /activity``) is recorded as runs, so it is counted here under the agent's name.
The seed's success-rate query names ``activity_completed``, not a counter's ``_total`` name, so
the same values are exposed under that name too and the seed's query works as written::

    sum(rate(activity_completed{status="success"}[1h])) / sum(rate(activity_completed[1h])) * 100

The alert rules (``deploy/prometheus/alerts.yml``) and the dashboards use the counter,
``activity_completed_total``; the agent failure-rate alert is exactly::

    sum(rate(activity_completed_total{status="failure", crew!="monitoring"}[1h]))
      / sum(rate(activity_completed_total{status=~"success|failure", crew!="monitoring"}[1h]))
      > 0.2
    and sum(increase(activity_completed_total{status=~"success|failure", crew!="monitoring"}[1h]))
      >= 5

(the Monitoring crew's own runs and cancelled runs left out, and at least 5 runs in the hour, as
the Monitoring crew counts it).

A run's duration is ``finished_at - started_at`` of a run that started and finished (any
outcome). Queue depth is the runs recorded as queued; with a Redis broker, the length of each
Celery queue (pools', control, improve: its list and its priority lists) is also shown, with
``typhon_broker_up`` 0 and no lengths when the broker does not answer. The GPU and disk figures
are those of the host that answers the scrape (``hardware.local_summary()``), so the seed's alerts
work where no DCGM or node exporter runs.

Scrape one ``typhon serve`` per cluster for the run metrics (each answers the same cluster
totals). :func:`render` answers ``GET /metrics`` and ``typhon metrics``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from typhon._types import RunStatus
from typhon.store import alerts, cache_counts, model_calls, run_feedback, run_reviews, runs

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from sqlalchemy.engine import Connection

    from typhon.config import TyphonConfig
    from typhon.store import RunStore

__all__ = [
    "CONTENT_TYPE",
    "MODEL_LATENCY_BUCKETS",
    "OUTCOMES",
    "QA_SCORE_BUCKETS",
    "RUN_DURATION_BUCKETS",
    "TyphonCollector",
    "render",
]

# The text exposition format (0.0.4): what every Prometheus 2.x and 3.x scrapes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Upper bounds (seconds, or score) of the histograms' buckets; +Inf is added.
RUN_DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
MODEL_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QA_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# A finished run's status -> the ``status`` label of activity_completed_total.
OUTCOMES = {
    RunStatus.SUCCEEDED.value: "success",
    RunStatus.FAILED.value: "failure",
    RunStatus.CANCELLED.value: "cancelled",
}

_BROKER_TIMEOUT_S = 2.0
Summary = dict[str, Any]


def _seconds(conn: Connection, start: Any, end: Any) -> Any:
    """SQL for the seconds from ``start`` to ``end`` (two timestamp columns)."""
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.extract("epoch", end - start), sa.Float)
    return (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0


def _histogram(
    conn: Connection,
    key: Any,
    value: Any,
    where: Sequence[Any],
    bounds: Sequence[float],
) -> dict[str, tuple[list[int], int, float]]:
    """Per ``key``: the cumulative count at or under each bound, the count and the sum of
    ``value`` over the rows matching ``where``, counted by the database in one query."""
    rows = sa.select(key.label("k"), value.label("v")).where(*where).subquery()
    columns = [rows.c.k, sa.func.count(), sa.func.sum(rows.c.v)]
    columns += [sa.func.sum(sa.case((rows.c.v <= b, 1), else_=0)) for b in bounds]
    query = sa.select(*columns).group_by(rows.c.k).order_by(rows.c.k)
    out: dict[str, tuple[list[int], int, float]] = {}
    for row in conn.execute(query):
        out[str(row[0])] = ([int(n or 0) for n in row[3:]], int(row[1]), float(row[2] or 0.0))
    return out


def _histogram_family(
    name: str,
    doc: str,
    label: str,
    data: dict[str, tuple[list[int], int, float]],
    bounds: Sequence[float],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for key, (cumulative, count, total) in data.items():
        buckets = [(repr(float(b)), float(n)) for b, n in zip(bounds, cumulative, strict=True)]
        family.add_metric([key], [*buckets, ("+Inf", float(count))], sum_value=total)
    return family


def _gauge(name: str, doc: str, labels: Sequence[str], values: Iterable[tuple[Any, ...]]) -> Any:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for *label_values, value in values:
        family.add_metric([str(v) for v in label_values], float(value))
    return family


def _counter(name: str, doc: str, labels: Sequence[str], values: Iterable[tuple[Any, ...]]) -> Any:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for *label_values, value in values:
        family.add_metric([str(v) for v in label_values], float(value))
    return family


class TyphonCollector(Collector):
    """Typhon's metrics from ``store`` (and the broker of ``config``), read on each collect.

    ``hardware`` gives the host summary the GPU and disk figures come from (by default
    ``typhon.resources.hardware.local_summary``)."""

    def __init__(
        self,
        config: TyphonConfig,
        store: RunStore,
        *,
        hardware: Callable[[], Summary] | None = None,
    ):
        self.config = config
        self.store = store
        self._hardware = hardware

    def describe(self) -> Iterable[Metric]:
        return []  # registering the collector must not query the store

    def collect(self) -> Iterable[Metric]:
        self.store.migrate_once()
        with self.store.engine.connect() as conn:
            families = [
                *self._runs(conn),
                *self._models(conn),
                *self._cache(conn),
                *self._reviews(conn),
                *self._alerts(conn),
            ]
        yield from families
        yield from self._capacity()
        yield from self._broker()
        yield from self._host()
        from typhon import __version__

        yield _gauge("typhon_build_info", "Typhon's version (always 1).", ["version"],
                     [(__version__, 1)])  # fmt: skip

    # -- runs ------------------------------------------------------------------------------------
    def _crews(self, conn: Connection) -> list[str]:
        """Crews seen in the store, built in, or configured: the same for every process (not
        whatever this one happens to have registered)."""
        from typhon.crews._base import BUILTIN_CREWS

        seen = conn.execute(sa.select(runs.c.crew).distinct()).scalars()
        return sorted({*seen, *BUILTIN_CREWS, *self.config.crews})

    def _runs(self, conn: Connection) -> Iterator[Metric]:
        c = runs.c
        finished = conn.execute(
            sa.select(c.crew, c.status, sa.func.count())
            .where(c.status.in_(list(OUTCOMES)))
            .group_by(c.crew, c.status)
        )
        done = {(crew, OUTCOMES[status]): int(n) for crew, status, n in finished}
        values = [
            (crew, outcome, done.get((crew, outcome), 0))
            for crew in self._crews(conn)
            for outcome in OUTCOMES.values()
        ]
        yield _counter("activity_completed_total", "Runs finished, per crew and outcome.",
                       ["crew", "status"], values)  # fmt: skip
        seed = UnknownMetricFamily(
            "activity_completed",
            "The values of activity_completed_total under the name the seed's queries use.",
            labels=["crew", "status"],
        )
        for crew, outcome, n in values:
            seed.add_metric([crew, outcome], float(n))
        yield seed

        open_ = (RunStatus.QUEUED.value, RunStatus.RUNNING.value, RunStatus.WAITING.value)
        active = conn.execute(
            sa.select(c.pool, c.status, sa.func.count())
            .where(c.status.in_(open_))
            .group_by(c.pool, c.status)
        )
        counts = {(pool, status): int(n) for pool, status, n in active}
        pools = sorted({p.name for p in self.config.pools} | {pool for pool, _ in counts})
        for name, status, doc in (
            ("typhon_runs_running", RunStatus.RUNNING, "Runs running, per pool."),
            ("typhon_runs_waiting", RunStatus.WAITING, "Runs waiting for a person, per pool."),
            ("typhon_queue_depth", RunStatus.QUEUED, "Runs queued (not started), per pool."),
        ):
            yield _gauge(
                name, doc, ["pool"], [(p, counts.get((p, status.value), 0)) for p in pools]
            )

        durations = _histogram(
            conn,
            c.crew,
            _seconds(conn, c.started_at, c.finished_at),
            [c.status.in_(list(OUTCOMES)), c.started_at.is_not(None), c.finished_at.is_not(None)],
            RUN_DURATION_BUCKETS,
        )
        yield _histogram_family(
            "typhon_run_duration_seconds",
            "Time from start to outcome of finished runs, per crew.",
            "crew",
            durations,
            RUN_DURATION_BUCKETS,
        )

    # -- model calls, cache ------------------------------------------------------------------------
    def _models(self, conn: Connection) -> Iterator[Metric]:
        c = model_calls.c
        failed = sa.func.sum(sa.case((c.ok == sa.false(), 1), else_=0))
        rows = list(
            conn.execute(
                sa.select(
                    c.alias, sa.func.count(), failed, sa.func.sum(c.prompt_tokens),
                    sa.func.sum(c.completion_tokens), sa.func.sum(c.gpu_s),
                ).group_by(c.alias).order_by(c.alias)
            )
        )  # fmt: skip
        calls: list[tuple[Any, ...]] = []
        tokens: list[tuple[Any, ...]] = []
        for alias, n, bad, prompt, completion, _ in rows:
            calls += [(alias, "ok", int(n) - int(bad or 0)), (alias, "error", int(bad or 0))]
            tokens += [(alias, "prompt", int(prompt or 0)), (alias, "completion", completion or 0)]
        yield _counter("typhon_model_calls_total", "Model calls, per alias and outcome.",
                       ["alias", "status"], calls)  # fmt: skip
        yield _counter("typhon_model_tokens_total", "Tokens of model calls, per alias and kind.",
                       ["alias", "kind"], tokens)  # fmt: skip
        yield _counter("typhon_model_gpu_seconds_total", "GPU-seconds of model calls, per alias.",
                       ["alias"], [(r[0], float(r[5] or 0.0)) for r in rows])  # fmt: skip
        latency = _histogram(conn, c.alias, c.latency_s, [], MODEL_LATENCY_BUCKETS)
        yield _histogram_family(
            "typhon_model_latency_seconds",
            "Wall time of model calls as their callers saw it, per alias.",
            "alias",
            latency,
            MODEL_LATENCY_BUCKETS,
        )

    def _cache(self, conn: Connection) -> Iterator[Metric]:
        c = cache_counts.c
        rows = list(conn.execute(sa.select(c.alias, c.hits, c.misses).order_by(c.alias)))
        yield _counter("typhon_cache_hits_total", "Semantic cache hits, per model alias.",
                       ["alias"], [(a, hits) for a, hits, _ in rows])  # fmt: skip
        yield _counter("typhon_cache_misses_total", "Semantic cache misses, per model alias.",
                       ["alias"], [(a, misses) for a, _, misses in rows])  # fmt: skip

    # -- learning loop, alerts ---------------------------------------------------------------------
    def _reviews(self, conn: Connection) -> Iterator[Metric]:
        r = run_reviews.c
        scores = _histogram(
            conn, r.crew, r.score, [r.status == "ok", r.score.is_not(None)], QA_SCORE_BUCKETS
        )
        yield _histogram_family(
            "typhon_qa_score",
            "QA review scores (0 useless .. 1 excellent) of runs, per crew.",
            "crew",
            scores,
            QA_SCORE_BUCKETS,
        )
        f = run_feedback.c
        votes = conn.execute(
            sa.select(f.crew, f.vote, sa.func.count()).group_by(f.crew, f.vote).order_by(f.crew)
        )
        yield _counter("typhon_feedback_total", "People's verdicts on runs, per crew and vote.",
                       ["crew", "vote"], [tuple(v) for v in votes])  # fmt: skip

    def _alerts(self, conn: Connection) -> Iterator[Metric]:
        from typhon.crews.monitoring import ACTIONS

        rows = conn.execute(
            sa.select(alerts.c.kind, sa.func.count())
            .where(alerts.c.resolved_at.is_(None))
            .group_by(alerts.c.kind)
        )
        found = {kind: int(n) for kind, n in rows}
        kinds = sorted({*ACTIONS, *found})
        yield _gauge("typhon_alerts_open", "Open alerts of the Monitoring crew, per kind.",
                     ["kind"], [(k, found.get(k, 0)) for k in kinds])  # fmt: skip

    # -- configuration, broker -------------------------------------------------------------------
    def _capacity(self) -> Iterator[Metric]:
        pools = self.config.pools
        yield _gauge("typhon_pool_cap", "Sustained concurrent runs a pool may have.", ["pool"],
                     [(p.name, p.cap) for p in pools])  # fmt: skip
        yield _gauge("typhon_pool_burst_cap", "Most concurrent runs a pool may have (burst).",
                     ["pool"], [(p.name, p.ceiling) for p in pools])  # fmt: skip
        cluster = self.config.cluster
        yield _gauge("typhon_cluster_slots", "The cluster's concurrent-run slots.", ["kind"],
                     [("sustained", cluster.sustained), ("burst", cluster.burst)])  # fmt: skip

    def _queues(self) -> list[str]:
        from workers.celery_app import control_queue, improve_queue

        names = [p.queue for p in self.config.pools]
        names += [control_queue(self.config), improve_queue(self.config)]
        return list(dict.fromkeys(names))

    def _broker(self) -> Iterator[Metric]:
        url = self.config.broker_url
        if not url or not url.startswith(("redis://", "rediss://")):
            return
        import redis
        from kombu.transport.redis import PRIORITY_STEPS, Channel

        queues = self._queues()
        client: Any = redis.Redis.from_url(
            url, socket_connect_timeout=_BROKER_TIMEOUT_S, socket_timeout=_BROKER_TIMEOUT_S
        )
        try:
            pipe = client.pipeline(transaction=False)
            for queue in queues:  # Celery's list, and one per priority step (as kombu names them)
                for step in PRIORITY_STEPS:
                    pipe.llen(f"{queue}{Channel.sep}{step}" if step else queue)
            lengths = pipe.execute()
        except redis.RedisError:
            yield _gauge("typhon_broker_up", "Whether the Redis broker answered.", [], [(0,)])
            return
        finally:
            client.close()
        yield _gauge("typhon_broker_up", "Whether the Redis broker answered.", [], [(1,)])
        per = len(PRIORITY_STEPS)
        yield _gauge(
            "typhon_broker_queue_length",
            "Messages waiting in the broker, per Celery queue.",
            ["queue"],
            [(q, sum(lengths[i * per : (i + 1) * per])) for i, q in enumerate(queues)],
        )
        yield from self._slots(url)

    def _slots(self, url: str) -> Iterator[Metric]:
        import redis

        from typhon.resources.slots import RedisSlots

        slots = RedisSlots(url, self.config.cluster, name=self.config.cluster.name)
        try:
            held = slots.in_use()
        except redis.RedisError:
            return
        finally:
            with contextlib.suppress(redis.RedisError):
                slots.close()
        cluster = held.pop("_cluster", 0)
        pools = sorted({p.name for p in self.config.pools} | set(held))
        yield _gauge("typhon_slots_in_use", "Slot leases held, per pool.", ["pool"],
                     [(p, held.get(p, 0)) for p in pools])  # fmt: skip
        yield _gauge("typhon_cluster_slots_in_use", "Cluster slot leases held.", [],
                     [(cluster,)])  # fmt: skip

    # -- this host ---------------------------------------------------------------------------------
    def _host(self) -> Iterator[Metric]:
        if self._hardware is None:
            from typhon.resources.hardware import local_summary

            summary = local_summary()
        else:
            summary = self._hardware()
        host = str(summary.get("host") or "")
        labels = ["host", "gpu", "uuid", "name"]
        gpus = summary.get("gpus") or []

        def per_gpu(field: str, scale: float = 1.0) -> list[tuple[Any, ...]]:
            return [
                (host, g["index"], g.get("uuid") or "", g.get("name") or "", g[field] * scale)
                for g in gpus
                if g.get(field) is not None
            ]

        yield _gauge("typhon_gpu_memory_used_bytes", "VRAM in use, per GPU of this host.",
                     labels, per_gpu("vram_used_bytes"))  # fmt: skip
        yield _gauge("typhon_gpu_memory_total_bytes", "VRAM, per GPU of this host.",
                     labels, per_gpu("vram_total_bytes"))  # fmt: skip
        yield _gauge("typhon_gpu_temperature_celsius", "Temperature, per GPU of this host.",
                     labels, per_gpu("temperature_c"))  # fmt: skip
        yield _gauge("typhon_gpu_utilization_percent", "Utilisation, per GPU of this host.",
                     labels, per_gpu("utilization_percent"))  # fmt: skip
        yield _gauge(
            "typhon_disk_used_percent",
            "Used share of the space a user can have, per filesystem of this host (as df).",
            ["host", "mount", "device"],
            [(host, d["mount"], d["device"], d["percent"]) for d in summary.get("disks") or []],
        )


def render(
    config: TyphonConfig, store: RunStore, *, hardware: Callable[[], Summary] | None = None
) -> bytes:
    """The metrics in the text exposition format (content type :data:`CONTENT_TYPE`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TyphonCollector(config, store, hardware=hardware))
    return generate_latest(registry)
