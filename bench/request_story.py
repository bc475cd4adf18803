"""What a request's story costs (issue 15 item 4): the request id and access log, and tracing.

Runs REST requests in-process through the real WSGI application (no network, no server) on a
dedicated PostgreSQL database and prints the CPU time per request of three variants, measured in
batches that alternate between the variants (see `measure`):

- `ceiling`: the application without `deviceplatform.logs.access_log_middleware` (no request id,
  no access line), its other loggers as configured;
- `request id`: as shipped: the id made (or checked) per request, put on every record by the
  logging filter, in the error body and the response header, and the access line formatted (plain,
  LOG_LEVEL=INFO) and written (to /dev/null);
- `tracing` (a second process, `--no-tracing` skips it): as shipped plus OpenTelemetry with the
  OTLP/HTTP exporter posting to a local sink (a stand-in for a collector), so span creation, the
  psycopg and Django instrumentation and the export are all counted (process CPU includes the
  exporter's thread).

Requests: a managed object GET (200) and a refused operation POST (422, error body). Whole
requests vary by more than the request id costs between rounds on a shared machine, so the
middleware's own cost is also measured alone: an empty view with and without it.

Usage: .venv/bin/python bench/request_story.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _common import (  # noqa: E402
    BENCH_USER,
    Report,
    basic_auth,
    bench_env,
    checked_database_url,
    command_line,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    recreate_database,
    run_main,
    setup_django,
    summary,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_story"
ACCESS_MIDDLEWARE = "deviceplatform.logs.access_log_middleware"


def environ(method: str, path: str, body: bytes = b"") -> dict[str, object]:
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_AUTHORIZATION": basic_auth(),
        "HTTP_ACCEPT": "application/json",
        "CONTENT_TYPE": "application/json" if body else "",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


class Sink(BaseHTTPRequestHandler):
    """Takes OTLP/HTTP posts and answers 200, as a collector would."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


BATCH = 50  # requests per measured batch: variants alternate batch by batch


def measure(
    variants: dict[str, Any], requests: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """CPU µs per request of each (variant, request kind), one figure per batch of BATCH requests.
    Variants take turns batch by batch (in alternating order), so that batch k of each variant ran
    at nearly the same moment: on a shared machine the CPU a request costs drifts by tens of percent
    within seconds, and paired batches cancel most of that drift."""
    from inventory.models import ManagedObject

    device = ManagedObject.objects.get(name="device")
    kinds = {
        "get 200": lambda: environ("GET", f"/inventory/managedObjects/{device.pk}"),
        "post 422": lambda: environ("POST", "/devicecontrol/operations", b'{"c8y_Restart": {}}'),
    }
    expected = {"get 200": "200", "post 422": "422"}
    for app in variants.values():  # warm: the password check, imports, the pool
        for kind, make in kinds.items():
            for _ in range(30):
                status = call(app, make())
                assert status.startswith(expected[kind]), (kind, status)
    samples: dict[str, dict[str, list[float]]] = {
        name: {kind: [] for kind in kinds} for name in variants
    }
    for batch in range(rounds * max(1, requests // BATCH)):
        order = list(variants.items())
        for name, app in order if batch % 2 == 0 else reversed(order):
            for kind, make in kinds.items():
                envs = [make() for _ in range(BATCH)]
                started = time.process_time()
                for env in envs:
                    call(app, env)
                samples[name][kind].append((time.process_time() - started) / BATCH * 1e6)
    return samples


def middleware_alone(requests: int, rounds: int) -> tuple[float, float]:
    """Median CPU µs per request of a view that does nothing, without and with the access log
    middleware (a fresh id made, the record filtered, formatted and written): its own cost."""
    from django.http import HttpResponse
    from django.test import RequestFactory

    from deviceplatform.logs import access_log_middleware

    def view(request: Any) -> HttpResponse:
        return HttpResponse(b"{}")

    wrapped = access_log_middleware(view)
    factory = RequestFactory()
    bare_times: list[float] = []
    wrapped_times: list[float] = []
    for _ in range(rounds):
        for handler, times in ((view, bare_times), (wrapped, wrapped_times)):
            batch = [factory.get("/inventory/managedObjects/1") for _ in range(requests)]
            started = time.process_time()
            for request in batch:
                handler(request)
            times.append((time.process_time() - started) / requests * 1e6)
    return statistics.median(bare_times), statistics.median(wrapped_times)


def call(app: Any, env: dict[str, object]) -> str:
    status: list[str] = []
    for _ in app(env, lambda s, h, *a: status.append(s)):
        pass
    return status[0]


def quiet_console() -> None:
    """The configured console handler writes to /dev/null: formatting and writing still cost."""
    sink = open(os.devnull, "w")  # noqa: SIM115 - for the whole run
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sink)


def child(args: argparse.Namespace) -> int:
    """The tracing variant, in a process of its own (instrumentation is process-wide)."""
    from django.core.wsgi import get_wsgi_application

    quiet_console()
    result = measure({"tracing": get_wsgi_application()}, args.requests, args.rounds)
    print("RESULT " + json.dumps(result))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and kind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--no-tracing", action="store_true", help="skip the tracing variant")
    parser.add_argument(
        "--sample",
        type=float,
        default=1.0,
        help="tracing variant: the share of traces kept (OTEL_TRACES_SAMPLER_ARG), default all",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    env = bench_env(url, drop=[k for k in os.environ if k.startswith("OTEL_")], LOG_LEVEL="INFO")
    if args.child:
        setup_django(env)
        return child(args)

    report = Report()
    report(f"# bench/request_story.py: {args.requests} requests x {args.rounds} rounds per kind")
    report(command_line(__file__, argv))
    report(machine_line())
    report(load_average_line())
    recreate_database(url, admin_url)
    migrate_and_create_user(env)
    setup_django(env)

    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler

    from inventory.models import ManagedObject

    ManagedObject.objects.create(
        name="device", owner=BENCH_USER, fragments={"c8y_IsDevice": {}}, is_device=True
    )
    quiet_console()
    shipped = WSGIHandler()
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if m != ACCESS_MIDDLEWARE]
    ceiling = WSGIHandler()
    samples = measure({"ceiling": ceiling, "request id": shipped}, args.requests, args.rounds)
    bare_view, with_middleware = middleware_alone(args.requests * 5, args.rounds)

    if not args.no_tracing:
        server = HTTPServer(("127.0.0.1", 0), Sink)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        child_env = dict(
            env,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
            PYTHONPATH=str(BENCH.parent),
        )
        if args.sample < 1:
            child_env.update(
                OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                OTEL_TRACES_SAMPLER_ARG=str(args.sample),
            )
        done = subprocess.run(
            [sys.executable, __file__, "--child", *argv],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        server.shutdown()
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            report(f"tracing variant failed (rc={done.returncode}):\n{done.stderr[-2000:]}")
        else:
            samples.update(json.loads(lines[-1][len("RESULT ") :]))

    results = {
        name: {kind: statistics.median(values) for kind, values in by_kind.items()}
        for name, by_kind in samples.items()
    }
    report()
    report(f"{'variant':<14}" + "".join(f"{kind + ' µs CPU':>18}" for kind in results["ceiling"]))
    for name, by_kind in results.items():
        report(f"{name:<14}" + "".join(f"{value:>18.1f}" for value in by_kind.values()))
    report()
    own = with_middleware - bare_view
    get = results["ceiling"]["get 200"]
    report(
        f"the access log middleware alone: {own:.1f} µs per request (an empty view: "
        f"{bare_view:.1f} µs without, {with_middleware:.1f} µs with), "
        f"{own / get * 100:.1f} % of a managed object GET ({get:.0f} µs)"
    )
    summary(
        report,
        "managed object GET with the request id's own cost (requests/s of CPU)",
        1e6 / (get + own),
        "req/s",
        ceiling="the GET without it",
        ceiling_value=1e6 / get,
        goal=">= 0.95x",
        met=(get / (get + own)) >= 0.95,
    )
    for kind in results["ceiling"]:
        base = results["ceiling"][kind]
        for name in ("request id", "tracing"):
            if name not in results:
                continue
            if name == "request id":  # measured in this process, batch by batch with the ceiling
                pairs = zip(samples[name][kind], samples["ceiling"][kind], strict=True)
                extra = statistics.median(a - b for a, b in pairs)
                how = "median of paired batches"
            else:  # another process: medians only
                extra = results[name][kind] - base
                how = "difference of the medians"
            value = base + extra
            report(f"{name} on {kind}: {extra:+.1f} µs per request ({value / base:.3f}x; {how})")
            summary(
                report,
                f"{kind} with {name} (requests/s of CPU)",
                1e6 / value,
                "req/s",
                ceiling="without the access log middleware",
                ceiling_value=1e6 / base,
            )
    return 0


if __name__ == "__main__":
    run_main(main)
