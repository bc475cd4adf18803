"""Optional OpenTelemetry tracing (README "Request ids and tracing").

Off unless `settings.OTEL_TRACES` names an exporter (settings.py reads the standard OTEL_*
variables); this module, and with it every opentelemetry package, is imported only then
(`DevicePlatformConfig.ready`), so a platform without tracing pays nothing and needs none of
requirements-otel.txt. When on, every process (server, gunicorn and uvicorn workers, Celery worker
and beat) traces Django requests, psycopg queries, Celery task sends and runs and Redis commands,
and exports its spans in batches: to the OTLP/HTTP endpoint of OTEL_EXPORTER_OTLP_ENDPOINT (the
exporter reads the OTEL_EXPORTER_OTLP_* variables itself), or as JSON to standard output
(`console`). A request's span carries its request id (`http.request_id`), which links a trace to
the request's log lines. The batch processor restarts its thread in forked workers (gunicorn,
Celery prefork), so starting in the parent is enough."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from deviceplatform.logs import REQUEST_ID_HEADER

REQUEST_ID_ATTRIBUTE = "http.request_id"


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _tag_request_id(span: Any, request: Any, response: Any) -> None:
    """Django instrumentation's response hook: its middleware runs before ours, so the id is
    read from the response, where deviceplatform.logs put it."""
    request_id = response.get(REQUEST_ID_HEADER) if response is not None else None
    if request_id and span.is_recording():
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)


def start(exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the tracer provider and the instrumentations (once per process). `exporter`: for
    tests (an in-memory one); by default the one `settings.OTEL_TRACES` names."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.OTEL_SERVICE_NAME})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(settings.OTEL_TRACES)))
    trace.set_tracer_provider(provider)
    # Django's instrumentation adds its middleware to settings.MIDDLEWARE: before the first
    # request handler is built, which `ready()` is.
    DjangoInstrumentor().instrument(response_hook=_tag_request_id)
    PsycopgInstrumentor().instrument(enable_commenter=False)
    CeleryInstrumentor().instrument()
    RedisInstrumentor().instrument()
    return provider
