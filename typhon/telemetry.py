"""Tracing: OpenTelemetry spans from submit through the Celery task and the crew to every model
call, exported over OTLP/HTTP when an endpoint is configured, and nothing at all when not.

The span tree of one run::

    typhon.submit {crew}            (the process that submitted: CLI, API, Python)
      typhon.execute_run {crew}     (the worker: Celery task or in-process runner)
        invoke_agent {crew}         (the crew; gen_ai.operation.name = invoke_agent)
          chat {alias}              (each model call; gen_ai.operation.name = chat)

Every span carries ``typhon.run_id``; the crew and model spans carry the GenAI semantic
conventions' ``gen_ai.agent.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` and
``gen_ai.usage.output_tokens``. The run record carries the W3C ``traceparent`` of its submit
span (option ``_traceparent``), which is how a worker on another machine joins the trace.

``telemetry.otlp_endpoint`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``): the collector's base URL,
e.g. ``http://127.0.0.1:4318``; spans go to ``{endpoint}/v1/traces``. Without one, no tracer
provider is installed: spans are OpenTelemetry's no-op spans and nothing is sent anywhere.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from typhon.config import TyphonConfig

__all__ = ["SpanKind", "configure", "extract", "inject", "shutdown", "span", "tracer"]

_lock = threading.Lock()
_provider: Any = None
_propagator = TraceContextTextMapPropagator()


def endpoint_of(config: TyphonConfig) -> str | None:
    return config.telemetry.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def configure(config: TyphonConfig) -> bool:
    """Install the OTLP exporter once per process when an endpoint is configured; True when
    spans are exported."""
    global _provider
    endpoint = endpoint_of(config)
    with _lock:
        if _provider is not None:
            return True
        if not endpoint:
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(
            resource=Resource.create({"service.name": config.telemetry.service_name})
        )
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=5)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        trace.set_tracer_provider(provider)
        _provider = provider
        return True


def shutdown() -> None:
    """Send what is buffered (at process exit)."""
    provider = _provider
    if provider is not None:
        with contextlib.suppress(Exception):
            provider.force_flush(timeout_millis=5000)


def tracer() -> trace.Tracer:
    return trace.get_tracer("typhon")


def inject() -> str | None:
    """The current span's W3C traceparent, to carry a trace across processes."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def extract(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: str | None = None,
    attributes: dict[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A span, child of ``parent`` (a traceparent) when given, else of the current span."""
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with tracer().start_as_current_span(
        name, context=extract(parent), kind=kind, attributes=attrs
    ) as current:
        yield current
