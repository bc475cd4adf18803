"""Prometheus metrics (issue 15 item 3): each metric moves when its event happens, read back through
a real scrape of /metrics; the scrape's protection (address allow-list, bearer token); the samples
of several processes added up through PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from bulkops.tasks import advance_bulk_operations
from devicecontrol import services as dc_services
from devicecontrol.models import Operation
from devicecontrol.tasks import expire_pending_operations
from deviceplatform.realtime.store import MemoryStore, RedisStore
from tests.bulkops.conftest import at, create_bulk, make_fleet
from tests.devicecontrol.conftest import add_child_devices, make_device
from tests.helpers import basic
from tests.servers import REPO

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Any, **extra: Any) -> Samples:
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.content.decode())


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Delta:
    """Scrape before and after: how much each named sample moved."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.before = scrape(client)

    def __call__(self, name: str, **labels: str) -> float:
        return value(scrape(self.client), name, **labels) - value(self.before, name, **labels)


# --- access -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_from_an_allowed_address_without_credentials(client: Any) -> None:
    samples = scrape(client)  # the test client comes from 127.0.0.1
    assert ("deviceplatform_realtime_sessions", frozenset()) in samples


def test_an_address_outside_the_allow_list_is_403_in_the_error_shape(
    client: Any, settings: Any
) -> None:
    settings.METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]
    response = client.get("/metrics")
    assert response.status_code == 403
    assert response.json()["error"] == "security/Forbidden"
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200


# The production layout: nginx on the public address proxies to the servers on 127.0.0.1, so every
# request reaches Django from REMOTE_ADDR 127.0.0.1 (the test client's), with the X-Forwarded-For
# that deploy/nginx.conf sets ($proxy_add_x_forwarded_for: what the client sent, then its address).
OUTSIDE_THROUGH_NGINX = {"HTTP_X_FORWARDED_FOR": "203.0.113.9"}
LOCAL_THROUGH_NGINX = {"HTTP_X_FORWARDED_FOR": "127.0.0.1"}
OUTSIDE_CLAIMING_LOCAL = {"HTTP_X_FORWARDED_FOR": "127.0.0.1, 203.0.113.9"}


@pytest.mark.django_db
def test_behind_a_trusted_proxy_the_forwarded_address_counts(client: Any, settings: Any) -> None:
    settings.USE_X_FORWARDED_FOR = True
    assert client.get("/metrics", **OUTSIDE_THROUGH_NGINX).status_code == 403
    assert client.get("/metrics", **OUTSIDE_CLAIMING_LOCAL).status_code == 403
    scrape(client, **LOCAL_THROUGH_NGINX)  # Prometheus on the proxy's host
    scrape(client, HTTP_X_FORWARDED_FOR="1.2.3.4, 127.0.0.1")  # the address nginx appended counts
    scrape(client)  # straight to the server on 127.0.0.1, no proxy: REMOTE_ADDR
    settings.METRICS_ALLOWED_NETWORKS = ["203.0.113.0/24"]
    scrape(client, **OUTSIDE_THROUGH_NGINX)
    assert client.get("/metrics", **LOCAL_THROUGH_NGINX).status_code == 403


@pytest.mark.django_db
def test_a_forwarded_request_is_never_admitted_by_the_proxys_own_address(
    client: Any, settings: Any
) -> None:
    """USE_X_FORWARDED_FOR off (its default) behind a proxy: REMOTE_ADDR is the proxy's, inside the
    default allow-list; a request that shows it came through a proxy is refused by address (the
    token still opens it), whatever client it came from."""
    settings.USE_X_FORWARDED_FOR = False
    for headers in (
        OUTSIDE_THROUGH_NGINX,
        LOCAL_THROUGH_NGINX,
        {"HTTP_FORWARDED": "for=203.0.113.9;proto=https"},
        {"HTTP_X_REAL_IP": "203.0.113.9"},
    ):
        response = client.get("/metrics", **headers)
        assert response.status_code == 403, headers
        body = response.json()
        assert body["error"] == "security/Forbidden"
        assert "came through a proxy and USE_X_FORWARDED_FOR is off" in body["message"]
    settings.METRICS_TOKEN = "s3cret-token"
    scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-token", **OUTSIDE_THROUGH_NGINX)
    scrape(client)  # no proxy header: REMOTE_ADDR 127.0.0.1 is the client's own


@pytest.mark.django_db
def test_a_trusted_proxy_that_names_no_client_is_not_admitted_by_its_own_address(
    client: Any, settings: Any
) -> None:
    settings.USE_X_FORWARDED_FOR = True
    for headers in (
        {"HTTP_FORWARDED": "for=203.0.113.9"},
        {"HTTP_X_REAL_IP": "203.0.113.9"},
        {"HTTP_X_FORWARDED_FOR": " , ", "HTTP_X_REAL_IP": "203.0.113.9"},
        {"HTTP_X_FORWARDED_FOR": "203.0.113.9, "},
    ):
        assert client.get("/metrics", **headers).status_code == 403, headers


def nginx_blocks(text: str) -> list[tuple[str, str]]:
    """deploy/nginx.conf's `server` and `location` blocks: (header line, body without nested
    blocks)."""
    # Comments and quoted strings (which may hold braces or #) go, in one left-to-right pass.
    text = re.sub(r"#[^\n]*|'[^']*'|\"[^\"]*\"", lambda m: "" if m[0][0] == "#" else '""', text)
    blocks: list[tuple[str, str]] = []
    stack: list[tuple[str, list[str]]] = []
    header = ""
    for token in re.split(r"([{}])", text):
        if token == "{":
            stack.append((header.strip().splitlines()[-1].strip() if header.strip() else "", []))
            header = ""
        elif token == "}":
            name, body = stack.pop()
            body.append(header)
            blocks.append((name, "".join(body)))
            header = ""
        else:
            if stack:
                stack[-1][1].append(token.rsplit(";", 1)[0] + ";" if ";" in token else "")
            header = token.rsplit(";", 1)[-1]
    return blocks


def test_deploy_nginx_conf_always_appends_the_client_address_and_bin_run_trusts_it() -> None:
    """What the rule above relies on in the production layout: every proxied location sends
    X-Forwarded-For with the client's address appended (a location that sets any header inherits
    none from the server block), and `bin/run --production` turns USE_X_FORWARDED_FOR on."""
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    blocks = nginx_blocks(conf)
    servers = [body for name, body in blocks if name.startswith("server")]
    locations = [(name, body) for name, body in blocks if name.startswith("location")]
    assert len(servers) == 1
    assert len(locations) >= 4
    appends = re.compile(r"proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for;")
    assert appends.search(servers[0])
    for name, body in locations:
        if "proxy_pass" in body and "proxy_set_header" in body:
            assert appends.search(body), name
    run = (REPO / "bin" / "run").read_text()
    assert 'export USE_X_FORWARDED_FOR="${USE_X_FORWARDED_FOR:-true}"' in run


@pytest.mark.django_db
def test_the_bearer_token_opens_metrics_from_anywhere(client: Any, settings: Any) -> None:
    settings.METRICS_ALLOWED_NETWORKS = []
    settings.METRICS_TOKEN = "s3cret-token"
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION=basic("admin", "x")).status_code == 403
    scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-token")


def test_without_token_and_networks_metrics_are_off(client: Any, settings: Any) -> None:
    settings.METRICS_ALLOWED_NETWORKS = []
    settings.METRICS_TOKEN = ""
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.json()["error"] == "general/Not Found"


# --- HTTP and authentication -------------------------------------------------------------------


@pytest.mark.django_db
def test_requests_count_by_route_method_and_status(client: Any, admin_api: APIClient) -> None:
    delta = Delta(client)
    route = {"route": "/inventory/managedObjects/{pk}", "method": "GET"}
    assert admin_api.get("/inventory/managedObjects/999999").status_code == 404
    assert admin_api.get("/inventory/managedObjects/999998/").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    assert delta("deviceplatform_http_requests_total", **route, status="404") == 2
    assert delta("deviceplatform_http_request_duration_seconds_count", **route, status="404") == 2
    assert delta("deviceplatform_http_request_duration_seconds_sum", **route, status="404") > 0
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert delta("deviceplatform_http_requests_total", **unmatched) == 1
    # The scrapes themselves count too, under their own route.
    metrics = {"route": "/metrics", "method": "GET", "status": "200"}
    assert delta("deviceplatform_http_requests_total", **metrics) >= 1


@pytest.mark.django_db
def test_failed_logins_count_by_reason(client: Any, admin: Any, settings: Any) -> None:
    delta = Delta(client)
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION=basic("t100/admin", "wrong password"))
    assert wrong.get("/inventory/managedObjects").status_code == 401
    assert delta("deviceplatform_auth_failures_total", reason="bad_credentials") == 1
    settings.AUTH_FAILURES_PER_USER = 1
    settings.AUTH_FAILURE_PREFIX = f"test:metrics:{uuid.uuid4().hex[:12]}"
    assert wrong.get("/inventory/managedObjects").status_code == 401  # the one allowed
    assert wrong.get("/inventory/managedObjects").status_code == 429
    assert delta("deviceplatform_auth_failures_total", reason="bad_credentials") == 2
    assert delta("deviceplatform_auth_failures_total", reason="throttled") == 1


# --- operations ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_operations_created_and_status_changes_count_after_commit(
    client: Any, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    agent = make_device("Agent", agent=True)
    device = make_device("Device")
    add_child_devices(agent, device)
    delta = Delta(client)
    with django_capture_on_commit_callbacks(execute=True):
        operation = dc_services.operation_create(device=device, data={"c8y_Restart": {}})
    assert delta("deviceplatform_operations_created_total", status="PENDING") == 1
    with django_capture_on_commit_callbacks(execute=True):
        dc_services.operation_update(operation_id=operation.pk, data={"status": "EXECUTING"})
        dc_services.operation_update(operation_id=operation.pk, data={"status": "EXECUTING"})
    assert delta("deviceplatform_operation_status_changes_total", status="EXECUTING") == 1
    # A rolled-back creation counts nothing: the hook runs on commit only.
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        dc_services.operation_create(device=device, data={"c8y_Restart": {}})
    assert callbacks  # registered, never run (the transaction never commits)
    assert delta("deviceplatform_operations_created_total", status="PENDING") == 1


@pytest.mark.django_db
def test_the_expiry_sweep_counts_its_run_rows_and_status_changes(
    client: Any, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    agent = make_device("Agent", agent=True)
    devices = [make_device(f"Device {i}") for i in range(3)]
    add_child_devices(agent, *devices)
    for device in devices:
        dc_services.operation_create(device=device, data={"c8y_Restart": {}, "pendingTimeout": 1})
    Operation.objects.update(expires_at=timezone.now() - timedelta(days=1))
    delta = Delta(client)
    task = {"task": "expire_pending_operations"}
    with django_capture_on_commit_callbacks(execute=True):
        assert expire_pending_operations.apply().get() == 3
    assert delta("deviceplatform_sweeps_total", **task) == 1
    assert delta("deviceplatform_sweep_rows_total", **task) == 3
    assert delta("deviceplatform_operation_status_changes_total", status="FAILED") == 3
    expire_pending_operations.apply()  # nothing left: a run, no rows
    assert delta("deviceplatform_sweeps_total", **task) == 2
    assert delta("deviceplatform_sweep_rows_total", **task) == 3


@pytest.mark.django_db
def test_pending_operations_per_agent_as_a_histogram_and_the_top_agents(
    client: Any, settings: Any
) -> None:
    settings.METRICS_PENDING_TOP_AGENTS = 1
    settings.METRICS_PENDING_CACHE_SECONDS = 0  # counted on this scrape (the cache: below)
    busy, quiet = make_device("Busy", agent=True), make_device("Quiet", agent=True)
    busy_devices = [make_device(f"B{i}") for i in range(3)]
    quiet_device = make_device("Q")
    add_child_devices(busy, *busy_devices)
    add_child_devices(quiet, quiet_device)
    for device in [*busy_devices, quiet_device]:
        dc_services.operation_create(device=device, data={"c8y_Restart": {}})
    samples = scrape(client)
    name = "deviceplatform_pending_operations_per_agent"
    assert value(samples, f"{name}_bucket", le="1.0") == 1  # quiet
    assert value(samples, f"{name}_bucket", le="2.0") == 1
    assert value(samples, f"{name}_bucket", le="5.0") == 2  # and busy
    assert value(samples, f"{name}_count") == 2
    assert value(samples, f"{name}_sum") == 4
    top = {key: v for key, v in samples.items() if key[0].endswith("pending_operations_top_agents")}
    assert top == {
        ("deviceplatform_pending_operations_top_agents", frozenset({("agent", str(busy.pk))})): 3
    }


def pending_figures(now: float) -> tuple[float, float, dict[str, float], float]:
    """(agents, PENDING operations, {agent: count} of the top agents, age) as a scrape reads them."""
    from devicecontrol.metrics import pending_per_agent

    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in pending_per_agent(now=now)
        for sample in family.samples
    }
    name = "deviceplatform_pending_operations_per_agent"
    top = {
        dict(labels)["agent"]: count
        for (sample, labels), count in samples.items()
        if sample == "deviceplatform_pending_operations_top_agents"
    }
    age = value(samples, "deviceplatform_pending_operations_age_seconds")
    return value(samples, f"{name}_count"), value(samples, f"{name}_sum"), top, age


@pytest.mark.django_db
@pytest.mark.parametrize("shared", [True, False], ids=["redis", "in-process"])
def test_pending_figures_are_counted_once_per_cache_period_and_follow_the_operations(
    settings: Any, shared: bool
) -> None:
    """A scrape within METRICS_PENDING_CACHE_SECONDS of the last count serves it (with its age);
    the first one after counts again, and the figures follow operations created and finished."""
    from deviceplatform.metrics import _cache_claim

    if shared and not settings.REDIS_URL:
        pytest.skip("REDIS_URL is not set: the shared cache needs Redis")  # bin/test sets it
    if not shared:
        settings.REDIS_URL = ""
    settings.METRICS_CACHE_PREFIX = f"test:metrics:{uuid.uuid4().hex}"
    settings.METRICS_PENDING_CACHE_SECONDS = 30
    agent = make_device("Agent", agent=True)
    devices = [make_device(f"D{i}") for i in range(3)]
    add_child_devices(agent, *devices)
    operations = [
        dc_services.operation_create(device=device, data={"c8y_Restart": {}}) for device in devices
    ]
    t0 = 1_000_000.0
    assert pending_figures(t0) == (1, 3, {str(agent.pk): 3}, 0)
    for device in devices:
        dc_services.operation_create(device=device, data={"c8y_Restart": {}})
    assert pending_figures(t0 + 29) == (1, 3, {str(agent.pk): 3}, 29)  # the count of t0
    assert pending_figures(t0 + 30) == (1, 6, {str(agent.pk): 6}, 0)  # counted again
    for operation in operations:
        dc_services.operation_update(operation_id=operation.pk, data={"status": "SUCCESSFUL"})
    assert pending_figures(t0 + 45)[1] == 6
    assert pending_figures(t0 + 60) == (1, 3, {str(agent.pk): 3}, 0)
    # While another process is counting, a stale count is served rather than counted twice.
    for operation in Operation.objects.filter(status="PENDING"):
        dc_services.operation_update(operation_id=operation.pk, data={"status": "FAILED"})
    assert _cache_claim(f"{settings.METRICS_CACHE_PREFIX}:pending_per_agent", 30)
    assert pending_figures(t0 + 95) == (1, 3, {str(agent.pk): 3}, 35)
    settings.METRICS_PENDING_CACHE_SECONDS = 0  # off: every scrape counts
    assert pending_figures(t0 + 96) == (0, 0, {}, 0)


# --- bulk operations -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_running_bulk_operation_shows_its_ramp_lag_and_children(
    client: Any, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    fleet = make_fleet(4)
    start = (timezone.now() - timedelta(minutes=1)).replace(microsecond=0)
    # Children due at start, start + 1 s, ... (a minute ago).
    bulk = create_bulk(fleet.group, now=start, startDate=start.isoformat(), creationRamp=1)
    samples = scrape(client)
    assert value(samples, "deviceplatform_bulk_operations_active", status="ACTIVE") == 1
    assert value(samples, "deviceplatform_bulk_ramp_behind_seconds") >= 60
    delta = Delta(client)
    with django_capture_on_commit_callbacks(execute=True):
        # 0.25 s after the first child was due: one batch, the first child.
        from bulkops.services import bulk_operations_advance

        assert bulk_operations_advance(now=at(0.25, start)) == 1
    assert delta("deviceplatform_bulk_ramp_lag_seconds_count") == 1
    assert delta("deviceplatform_bulk_ramp_lag_seconds_sum") == pytest.approx(0.25)
    assert delta("deviceplatform_bulk_ramp_lag_seconds_bucket", le="0.1") == 0
    assert delta("deviceplatform_bulk_ramp_lag_seconds_bucket", le="0.25") == 1
    assert delta("deviceplatform_bulk_children_created_total") == 1
    assert delta("deviceplatform_operations_created_total", status="PENDING") == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert bulk_operations_advance(now=at(10, start)) == 3  # 9 s late for the second
    assert delta("deviceplatform_bulk_ramp_lag_seconds_sum") == pytest.approx(9.25)
    assert delta("deviceplatform_bulk_children_created_total") == 4
    samples = scrape(client)
    assert value(samples, "deviceplatform_bulk_operations_active", status="IN_PROGRESS") == 0
    assert value(samples, "deviceplatform_bulk_operations_active", status="ACTIVE") == 0
    assert value(samples, "deviceplatform_bulk_ramp_behind_seconds") == 0
    bulk.refresh_from_db()
    assert bulk.status == "COMPLETED"


@pytest.mark.django_db
def test_the_ramps_beat_task_counts_as_a_sweep(client: Any) -> None:
    delta = Delta(client)
    assert advance_bulk_operations.apply().get() == 0
    assert delta("deviceplatform_sweeps_total", task="advance_bulk_operations") == 1
    assert delta("deviceplatform_sweep_rows_total", task="advance_bulk_operations") == 0


# --- realtime ------------------------------------------------------------------------------------


def _fill_a_session(store: MemoryStore | RedisStore) -> None:
    async def run() -> None:
        await store.create_session(
            "m" * 32,
            {"family": "internal", "uid": "u", "user": "", "timeout": "0", "interval": "0"},
            ttl_ms=60_000,
            limit=10,
        )
        await store.subscribe("m" * 32, ["/a", "/b"], add=True)

    asyncio.run(run())
    store.publish([(b'{"n":1}', ["/a"]), (b'{"n":2}', ["/a", "/b"]), (b'{"n":3}', ["/b"])])


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_realtime_events_queued_and_dropped_and_the_sessions(
    client: Any, settings: Any, kind: str
) -> None:
    prefix = f"test:metrics:{uuid.uuid4().hex[:12]}"
    settings.REALTIME_PREFIX = prefix
    settings.REALTIME_QUEUE_LIMIT = 2
    settings.REDIS_URL = settings.REDIS_URL if kind == "redis" else ""
    from deviceplatform.realtime.hub import get_store

    store = get_store()
    assert isinstance(store, RedisStore if kind == "redis" else MemoryStore)
    delta = Delta(client)
    _fill_a_session(store)
    assert delta("deviceplatform_realtime_events_queued_total") == 3
    assert delta("deviceplatform_realtime_events_dropped_total") == 1  # limit 2
    samples = scrape(client)
    assert value(samples, "deviceplatform_realtime_sessions") == 1
    assert value(samples, "deviceplatform_realtime_subscriptions") == 2
    asyncio.run(store.remove_session("m" * 32))
    assert value(scrape(client), "deviceplatform_realtime_sessions") == 0


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_realtime_delivery_latency_times_a_held_connect_from_the_publish(
    client: Any, settings: Any, kind: str, realtime_loop: Callable[..., Any]
) -> None:
    settings.REALTIME_PREFIX = f"test:metrics:{uuid.uuid4().hex[:12]}"
    settings.REDIS_URL = settings.REDIS_URL if kind == "redis" else ""
    from deviceplatform.realtime.hub import watching

    async def deliver_one() -> list[bytes]:
        async with watching(["/latency"]) as watch:
            held = asyncio.create_task(watch.next(30))
            # Publish once the connect holds the session (not before: it would answer at once).
            while not (await watch.hub.store.get_session(watch.client_id) or {}).get("hold"):
                await asyncio.sleep(0.01)
            watch.hub.store.publish([(b'{"n":1}', ["/latency"])])
            return await held

    delta = Delta(client)
    assert realtime_loop(deliver_one()) == [b'{"n":1}']
    assert delta("deviceplatform_realtime_delivery_latency_seconds_count") == 1
    assert delta("deviceplatform_realtime_delivery_latency_seconds_sum") >= 0


# --- multi-process -------------------------------------------------------------------------------

COUNT_IN_A_PROCESS = """
import django
django.setup()
from deviceplatform import metrics
for _ in range(3):
    metrics.auth_failed("bad_credentials")
metrics.BULK_RAMP_LAG.observe(0.5)
"""
SCRAPE_IN_A_PROCESS = """
import django
django.setup()
from prometheus_client.exposition import generate_latest
from deviceplatform.metrics import scrape_registry
print(generate_latest(scrape_registry()).decode())
"""


def test_a_scrape_adds_up_every_process_through_the_multiprocess_directory(
    tmp_path: Path,
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(
        DJANGO_SETTINGS_MODULE="deviceplatform.settings", PROMETHEUS_MULTIPROC_DIR=str(tmp_path)
    )

    def run(code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    run(COUNT_IN_A_PROCESS)
    run(COUNT_IN_A_PROCESS)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2  # one file per process
    samples = parse(run(SCRAPE_IN_A_PROCESS))
    assert value(samples, "deviceplatform_auth_failures_total", reason="bad_credentials") == 6
    assert value(samples, "deviceplatform_bulk_ramp_lag_seconds_count") == 2
    assert value(samples, "deviceplatform_bulk_ramp_lag_seconds_bucket", le="0.5") == 2
