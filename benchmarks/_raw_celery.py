"""The raw-Celery baseline for ``dispatch_overhead.py``: one no-op task, Typhon's worker settings.

``celery -A _raw_celery worker ...`` (with ``benchmarks/`` on ``PYTHONPATH``) reads the broker and
queue from ``BENCH_BROKER_URL`` / ``BENCH_RAW_QUEUE``; the benchmark builds its client app with
:func:`make_app` and the same values. The settings copy ``workers.celery_app.create_app`` (late
acks, reject on worker loss, prefetch 1, JSON, no task events, root logger left alone); the only
addition is a Redis result backend, which is how a plain Celery caller learns that a task is done.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu.entity import Queue

TASK_NAME = "bench.noop"
_VISIBILITY_TIMEOUT_S = 900 * 2 + 60  # what create_app derives from the default crew timeout


def make_app(broker_url: str, queue: str) -> Celery:
    app = Celery("typhon_bench_raw", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(queue)],
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": _VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3.0,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
    def noop() -> list[float]:
        """The same body cost as the ``noop`` crew: nothing. Returns its own start and end."""
        started = time.time()
        return [started, time.time()]

    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6390/0"),
    os.environ.get("BENCH_RAW_QUEUE", "bench-raw"),
)
