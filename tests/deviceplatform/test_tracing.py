"""Optional OpenTelemetry tracing (issue 15 item 4; deviceplatform/tracing.py): off and not even
imported by default; on, a request gives a server span with its request id, with the psycopg
queries under it, and sending a Celery task gives a publish span and Redis commands.

Tracing instruments modules process-wide (Django's middleware list, psycopg, redis, Celery), so
each case runs in a process of its own, as the servers do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from tests.bulkops.test_crash_safety import Workers
from tests.helpers import PASSWORD, basic, database_url

REPO = Path(__file__).resolve().parents[2]

TRACED = """
import json
import sys

import django
from django.conf import settings

# The passwords of the make_user fixture are stored with the test settings' MD5 hasher.
settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
django.setup()
from django.test import Client
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bulkops.tasks import advance_bulk_operations

out, authorization, queue = sys.argv[1:]
memory = InMemorySpanExporter()
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(memory))
response = Client().get(
    "/inventory/managedObjects?pageSize=1",
    headers={"Authorization": authorization, "X-Request-ID": "traced-1"},
)
advance_bulk_operations.apply_async(queue=queue)
spans = [
    {
        "name": span.name,
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "trace": span.context.trace_id,
        "id": span.context.span_id,
        "parent": span.parent.span_id if span.parent else None,
    }
    for span in memory.get_finished_spans()
]
with open(out, "w") as file:
    json.dump({"status": response.status_code, "spans": spans}, file, default=str)
"""

UNTRACED = """
import sys

import django
from django.conf import settings

django.setup()
from django.test import Client

Client().get("/inventory")
ours = [
    name
    for name in sys.modules
    if name == "deviceplatform.tracing" or name.startswith("opentelemetry.instrumentation")
]
from opentelemetry import trace

print(ours, type(trace.get_tracer_provider()).__name__, settings.MIDDLEWARE == MIDDLEWARE)
"""


ONE_REQUEST = """
import django

django.setup()
from django.test import Client

assert Client().get("/inventory").status_code == 401
"""


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "OTEL_"))
    }
    base.update(
        DJANGO_SETTINGS_MODULE="deviceplatform.settings",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        **env,
    )
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.django_db
def test_without_otel_variables_nothing_is_traced_or_imported() -> None:
    """(redis-py imports parts of opentelemetry for its own, unused, metrics when the package is
    installed; our tracing module and the instrumentations are not imported.)"""
    script = UNTRACED.replace("MIDDLEWARE)", repr(settings.MIDDLEWARE) + ")")
    done = run(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "ProxyTracerProvider", "True"]


@pytest.mark.django_db(transaction=True)
def test_with_an_exporter_a_request_its_queries_and_a_task_send_give_spans(
    make_user: Callable[..., Any], tmp_path: Path
) -> None:
    assert settings.REDIS_URL, "needs the broker: bin/test sets REDIS_URL"
    make_user("tracer", roles=["ROLE_INVENTORY_READ"])
    out = tmp_path / "spans.json"
    queue = f"test-tracing-{uuid.uuid4().hex[:12]}"  # nobody consumes it
    try:
        done = run(
            TRACED, str(out), basic("tracer", PASSWORD), queue, OTEL_TRACES_EXPORTER="console"
        )
    finally:
        redis.Redis.from_url(settings.REDIS_URL).delete(queue)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["status"] == 200
    spans = result["spans"]
    [server] = [s for s in spans if s["kind"] == "SERVER"]
    assert server["name"].startswith("GET ")
    assert server["attributes"]["http.request_id"] == "traced-1"
    queries = [s for s in spans if s["attributes"].get("db.system") == "postgresql"]
    if connection.vendor == "postgresql":  # psycopg's instrumentation; SQLite has none
        # The request's own queries (authentication, the page) are in its trace; the first
        # queries of a new connection (Django's server checks) are not.
        assert len([q for q in queries if q["trace"] == server["trace"]]) >= 2, (server, queries)
    else:
        assert queries == []
    [send] = [s for s in spans if s["kind"] == "PRODUCER"]
    assert "advance_bulk_operations" in send["name"]
    pushes = [
        s for s in spans if s["attributes"].get("db.system") == "redis" and s["name"] == "LPUSH"
    ]
    assert [push["trace"] for push in pushes] == [send["trace"]], spans
    # The console exporter the variable named wrote the spans too.
    assert '"name": "' + server["name"] + '"' in done.stdout


class Collector(BaseHTTPRequestHandler):
    """Stands in for an OpenTelemetry collector's OTLP/HTTP receiver: keeps what is posted."""

    received: ClassVar[list[tuple[str, str, int]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        self.received.append((self.path, self.headers.get("Content-Type", ""), length))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.django_db
def test_with_an_otlp_endpoint_the_spans_are_posted_to_it_by_the_time_the_process_ends() -> None:
    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        done = run(ONE_REQUEST, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert Collector.received, done.stderr
    path, content_type, length = Collector.received[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert length > 0


PUBLISH = """
import sys

import django

django.setup()
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bulkops.tasks import advance_bulk_operations

out, queue = sys.argv[1:]
memory = InMemorySpanExporter()
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(memory))
advance_bulk_operations.apply_async(queue=queue)
[send] = [span for span in memory.get_finished_spans() if span.kind.name == "PRODUCER"]
with open(out, "w") as file:
    file.write(f"{send.context.trace_id:032x}")
"""


@pytest.mark.django_db(transaction=True)
def test_a_task_sent_by_a_traced_process_runs_in_the_same_trace_in_the_worker(
    tmp_path: Path,
) -> None:
    assert settings.REDIS_URL, "a real worker needs the broker: bin/test sets REDIS_URL"
    pool = Workers(tmp_path)
    pool.queue = f"test-tracing-{uuid.uuid4().hex[:12]}"
    # Spans to the worker's standard output (its log file), exported within 0.1 s.
    pool.env.update(OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="100")
    out = tmp_path / "trace-id"
    try:
        worker = pool.start()
        worker.wait_ready()
        done = run(PUBLISH, str(out), pool.queue, OTEL_TRACES_EXPORTER="console")
        assert done.returncode == 0, done.stderr
        trace_id = f'"trace_id": "0x{out.read_text()}"'
        run_span = '"name": "run/bulkops.tasks.advance_bulk_operations"'
        deadline = time.monotonic() + 60  # a bound for a broken run, not a timing assertion
        while not (run_span in worker.log() and trace_id in worker.log()):
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
    finally:
        pool.stop_all()


OFF_WITH_TRAFFIC = """
import json
import sys

import django
from django.conf import settings

django.setup()
import redis
from django.test import Client
from opentelemetry import metrics, trace
from redis.observability import recorder

from bulkops.tasks import advance_bulk_operations

middleware, queue = sys.argv[1:]
status = Client().get("/inventory").status_code
client = redis.Redis.from_url(settings.REDIS_URL)
client.set(queue + ":probe", "1", ex=60)
client.get(queue + ":probe")
advance_bulk_operations.apply_async(queue=queue)
print(json.dumps({
    "status": status,
    "ours": sorted(
        name for name in sys.modules
        if name == "deviceplatform.tracing" or name.startswith("opentelemetry.instrumentation")
    ),
    "tracer_provider": type(trace.get_tracer_provider()).__name__,
    "meter_provider": type(metrics.get_meter_provider()).__name__,
    "redis_metrics": recorder.is_enabled(),
    "middleware": settings.MIDDLEWARE == json.loads(middleware),
}))
"""


@pytest.mark.django_db
@pytest.mark.parametrize(
    "variables",
    [{}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true"}],
    ids=["no-variables", "exporter-none-with-endpoint", "sdk-disabled-with-endpoint"],
)
def test_tracing_off_with_opentelemetry_installed_records_and_sends_nothing(
    variables: dict[str, str],
) -> None:
    """requirements-otel.txt installed (the test venv has it) but tracing not configured: redis-py
    8 imports opentelemetry-sdk's metrics module for metrics of its own, which stay off (no meter
    provider, its recorder disabled); no tracer provider, no instrumentation, no middleware, and
    nothing reaches the OTLP endpoint the variables name, through requests, Redis commands and a
    Celery send."""
    assert settings.REDIS_URL, "needs the broker: bin/test sets REDIS_URL"
    Collector.received = []
    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    queue = f"test-tracing-off-{uuid.uuid4().hex[:12]}"  # nobody consumes it
    env = dict(variables)
    if variables:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        done = run(OFF_WITH_TRAFFIC, json.dumps(settings.MIDDLEWARE), queue, **env)
    finally:
        server.shutdown()
        redis.Redis.from_url(settings.REDIS_URL).delete(queue, f"{queue}:probe")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "status": 401,
        "ours": [],
        "tracer_provider": "ProxyTracerProvider",
        "meter_provider": "_ProxyMeterProvider",
        "redis_metrics": False,
        "middleware": True,
    }
    assert Collector.received == []


def test_an_unknown_exporter_is_refused_at_start() -> None:
    done = run("import django; django.setup()", OTEL_TRACES_EXPORTER="jaeger")
    assert done.returncode != 0
    assert ImproperlyConfigured.__name__ in done.stderr
    assert "OTEL_TRACES_EXPORTER must be otlp, console or none" in done.stderr
