"""Prometheus metrics: every metric of the platform, the one-line hooks that move them, the request
middleware and the protected `/metrics` view (docs/metrics.md lists every metric).

Counters and histograms are prometheus-client's. With PROMETHEUS_MULTIPROC_DIR set (bin/run sets
it for every process: gunicorn and uvicorn workers, Celery worker and beat) each process writes its
samples to files there and a scrape adds them up, whichever process answers it; without it they
live in this process. Values that are state rather than events (bulk operations running, PENDING
operations per agent, realtime sessions) are read at scrape time by the collectors apps register
with `register_scrape_collector` (AppConfig.ready): deviceplatform names no app (STYLE.md §1). A
collector whose value costs a query over many rows keeps it with `cached_for_scrape`, computed at
most once per period by all processes together.

Hooks for the apps above are plain functions (`operations_created`, `bulk_ramp_advanced`, ...):
they count after the transaction commits, so a rolled-back write counts nothing."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import cache, partial
from inspect import iscoroutinefunction
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from deviceplatform.api.exceptions import error_response, method_not_allowed_response

logger = logging.getLogger(__name__)

NAMESPACE = "deviceplatform"
# Seconds. Requests range from sub-millisecond reads to held long-polls and waits (minutes).
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Seconds a bulk child was created after its due time, and realtime delivery latency.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# --- HTTP ------------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests answered, by route (the URL pattern), method and status.",
    ["route", "method", "status"],
    namespace=NAMESPACE,
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the first middleware to the response, by route, method and status.",
    ["route", "method", "status"],
    namespace=NAMESPACE,
    buckets=REQUEST_BUCKETS,
)
AUTH_FAILURES = Counter(
    "auth_failures",
    "Failed authentications: bad_credentials (no such user or a wrong password) or throttled "
    "(refused unchecked by the failed-login limit).",
    ["reason"],
    namespace=NAMESPACE,
)

# --- Operations ------------------------------------------------------------------------------------

OPERATIONS_CREATED = Counter(
    "operations_created",
    "Operations created (REST, bulk ramp, retries), by the status they were created with.",
    ["status"],
    namespace=NAMESPACE,
)
OPERATION_STATUS_CHANGES = Counter(
    "operation_status_changes",
    "Status changes of existing operations (agent updates, sweeps), by the new status.",
    ["status"],
    namespace=NAMESPACE,
)

# --- Bulk operations -------------------------------------------------------------------------------

BULK_CHILDREN_CREATED = Counter(
    "bulk_children_created",
    "Child operations the bulk ramp created (rate() of it: children per second).",
    namespace=NAMESPACE,
)
BULK_RAMP_LAG = Histogram(
    "bulk_ramp_lag_seconds",
    "Per ramp batch: when it ran minus when its first child was due.",
    namespace=NAMESPACE,
    buckets=LAG_BUCKETS,
)

# --- Realtime --------------------------------------------------------------------------------------

REALTIME_EVENTS_QUEUED = Counter(
    "realtime_events_queued",
    "Events appended to a session's queue (one per subscribed session).",
    namespace=NAMESPACE,
)
REALTIME_EVENTS_DROPPED = Counter(
    "realtime_events_dropped",
    "Events dropped from a full session queue (the oldest beyond REALTIME_QUEUE_LIMIT).",
    namespace=NAMESPACE,
)
REALTIME_DELIVERY_LATENCY = Histogram(
    "realtime_delivery_latency_seconds",
    "From the publish of events to a held connect delivering them (long-poll answer or "
    "WebSocket frame); events a client fetches with its next connect are not timed.",
    namespace=NAMESPACE,
    buckets=LAG_BUCKETS,
)

# --- Sweeps ----------------------------------------------------------------------------------------

SWEEPS = Counter(
    "sweeps",
    "Runs of the beat schedule's tasks (sweeps, purges, the ramp's beat runs), by task.",
    ["task"],
    namespace=NAMESPACE,
)
SWEEP_ROWS = Counter(
    "sweep_rows",
    "Rows those runs touched (what the task returned), by task.",
    ["task"],
    namespace=NAMESPACE,
)


# --- Hooks (one line each in the apps) -------------------------------------------------------------


def _after_commit(action: Callable[[], None]) -> None:
    """Count once the current transaction commits (at once outside one)."""
    transaction.on_commit(action)


def _count_statuses(counter: Counter, statuses: Mapping[str, int]) -> None:
    for status, count in statuses.items():
        if count:
            counter.labels(status=str(status)).inc(count)


def operations_created(statuses: Mapping[str, int]) -> None:
    """Operations were created: {status: how many} (PENDING, or FAILED for a bulk child whose
    device has no agent)."""
    _after_commit(partial(_count_statuses, OPERATIONS_CREATED, dict(statuses)))


def operation_status_changed(statuses: Mapping[str, int]) -> None:
    """Existing operations changed status: {new status: how many}."""
    _after_commit(partial(_count_statuses, OPERATION_STATUS_CHANGES, dict(statuses)))


def _ramp_advanced(lag: float, created: int) -> None:
    BULK_RAMP_LAG.observe(max(lag, 0.0))
    BULK_CHILDREN_CREATED.inc(created)


def bulk_ramp_advanced(*, lag_seconds: float, created: int) -> None:
    """A ramp batch ran `lag_seconds` after its first child was due and created `created`."""
    _after_commit(partial(_ramp_advanced, lag_seconds, created))


def auth_failed(reason: str) -> None:
    AUTH_FAILURES.labels(reason=reason).inc()


def realtime_queued(queued: int, dropped: int) -> None:
    if queued:
        REALTIME_EVENTS_QUEUED.inc(queued)
    if dropped:
        REALTIME_EVENTS_DROPPED.inc(dropped)


def realtime_delivered(latency: float) -> None:
    REALTIME_DELIVERY_LATENCY.observe(max(latency, 0.0))


def sweep_ran(task: str, rows: Any) -> None:
    SWEEPS.labels(task=task).inc()
    if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0:
        SWEEP_ROWS.labels(task=task).inc(rows)


# --- Scrape-time collectors ------------------------------------------------------------------------

# name -> function returning metric families (prometheus_client.core.*MetricFamily), called on each
# scrape. Registered by apps in AppConfig.ready; a collector that fails is skipped and logged.
ScrapeCollector = Callable[[], Iterable[Metric]]
_SCRAPE_COLLECTORS: dict[str, ScrapeCollector] = {}


def register_scrape_collector(name: str, collector: ScrapeCollector) -> None:
    _SCRAPE_COLLECTORS[name] = collector


class _ScrapeCollectors:
    def collect(self) -> Iterable[Metric]:
        for name, collector in list(_SCRAPE_COLLECTORS.items()):
            try:
                families = list(collector())
            except Exception:
                logger.warning("metrics: the %s collector failed", name, exc_info=True)
                continue
            yield from families


# Values a scrape-time collector computes at a cost (a count over many rows): shared by every
# process for `max_age` seconds, in Redis under METRICS_CACHE_PREFIX with REDIS_URL, else in this
# process (the one server process). {key: (computed at, value)}.
_LOCAL_CACHE: dict[str, tuple[float, Any]] = {}
_LOCAL_COUNTING: set[str] = set()
_LOCAL_LOCK = threading.Lock()


@cache
def _cache_client(url: str) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, socket_connect_timeout=1.0, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )


def _cache_read(key: str) -> tuple[float, Any] | None:
    if not settings.REDIS_URL:
        with _LOCAL_LOCK:
            return _LOCAL_CACHE.get(key)
    raw = _cache_client(settings.REDIS_URL).get(key)
    if raw is None:
        return None
    at, value = json.loads(raw)
    return float(at), value


def _cache_claim(key: str, seconds: float) -> bool:
    """Whether this process is the one to compute `key` again (no other is at it)."""
    if not settings.REDIS_URL:
        with _LOCAL_LOCK:
            if key in _LOCAL_COUNTING:
                return False
            _LOCAL_COUNTING.add(key)
            return True
    claimed = _cache_client(settings.REDIS_URL).set(
        f"{key}:computing", "1", nx=True, px=max(1, int(seconds * 1000))
    )
    return bool(claimed)


def _cache_write(key: str, at: float, value: Any, max_age: float) -> None:
    if not settings.REDIS_URL:
        with _LOCAL_LOCK:
            _LOCAL_CACHE[key] = (at, value)
            _LOCAL_COUNTING.discard(key)
        return
    client = _cache_client(settings.REDIS_URL)
    # Kept well past its age: a stale value is what other scrapes serve while one computes anew.
    client.set(key, json.dumps([at, value]), px=max(1, int(max_age * 10_000)))
    client.delete(f"{key}:computing")


def cached_for_scrape(
    name: str, compute: Callable[[], Any], max_age: float, *, now: float | None = None
) -> tuple[Any, float]:
    """`compute()` (a JSON-able value) at most once per `max_age` seconds across every process:
    (the value, its age in seconds). A scrape that finds the value older computes it again while
    the others meanwhile serve the older one; 0 or less: computed on every call. If Redis fails,
    computed here and then."""
    moment = time.time() if now is None else now
    if max_age <= 0:
        return compute(), 0.0
    key = f"{settings.METRICS_CACHE_PREFIX}:{name}"
    try:
        stored = _cache_read(key)
        if stored is not None and 0 <= moment - stored[0] < max_age:
            return stored[1], moment - stored[0]
        if stored is not None and not _cache_claim(key, max_age):
            return stored[1], max(0.0, moment - stored[0])
        if stored is None:
            _cache_claim(key, max_age)
    except Exception:
        logger.warning("metrics: the scrape cache is unavailable; %s computed", name, exc_info=True)
        return compute(), 0.0
    try:
        value = compute()
    except BaseException:
        with _LOCAL_LOCK:
            _LOCAL_COUNTING.discard(key)
        raise
    try:
        _cache_write(key, moment, value, max_age)
    except Exception:
        logger.warning("metrics: could not store %s in the scrape cache", name, exc_info=True)
    return value, 0.0


class _ProcessRegistry:
    """This process's own metrics (no multi-process directory)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def scrape_registry() -> CollectorRegistry:
    """A registry for one scrape: every process's samples (or this process's) plus the
    scrape-time collectors."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        MultiProcessCollector(registry, path=path)
    else:
        registry.register(_ProcessRegistry())  # type: ignore[arg-type]
    registry.register(_ScrapeCollectors())  # type: ignore[arg-type]
    return registry


def process_exited(pid: int) -> None:
    """A process writing to the multi-process directory exited: drop its live gauges' files
    (gunicorn's child_exit, Celery's worker_process_shutdown)."""
    path = multiprocess_dir()
    if path:
        mark_process_dead(pid, path)


# --- Middleware ------------------------------------------------------------------------------------

_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)")


@cache
def route_label(route: str) -> str:
    """`^inventory/managedObjects/(?P<pk>[^/]+)/?$` -> `/inventory/managedObjects/{pk}`."""
    label = _GROUP.sub(r"{\1}", route).replace("^", "").replace("/?$", "").replace("$", "")
    return "/" + label.lstrip("/")


def _observe(request: HttpRequest, response: HttpResponseBase, started: float) -> None:
    match = getattr(request, "resolver_match", None)
    route = route_label(match.route) if match is not None and match.route else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "other"
    labels = (route, method, str(response.status_code))
    HTTP_REQUESTS.labels(*labels).inc()
    HTTP_REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - started)


@sync_and_async_middleware
def request_metrics_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """Counts every request and its duration by route (the URL pattern, never the raw path, so
    IDs do not make new series), method and status. First in the chain: it times them all."""
    if iscoroutinefunction(get_response):

        async def middleware_async(request: HttpRequest) -> HttpResponseBase:
            started = time.perf_counter()
            response = await get_response(request)
            _observe(request, response, started)
            return response

        return middleware_async

    def middleware(request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response = get_response(request)
        _observe(request, response, started)
        return response

    return middleware


# --- View ------------------------------------------------------------------------------------------


@cache
def _networks(networks: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(network.strip(), strict=False) for network in networks)


def _address_allowed(address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(tuple(settings.METRICS_ALLOWED_NETWORKS)))


# Headers a proxy adds when it passes a request on: their presence says REMOTE_ADDR is the proxy's.
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


def metrics_client_address(meta: Mapping[str, Any]) -> str | None:
    """The address METRICS_ALLOWED_NETWORKS is checked against. A request that came through a proxy
    (it carries X-Forwarded-For, Forwarded or X-Real-IP) has the proxy's address as REMOTE_ADDR,
    127.0.0.1 in the production layout: it is judged by the client address the proxy appended to
    X-Forwarded-For when the proxy is trusted (USE_X_FORWARDED_FOR), and otherwise by none at all
    (None: only the token admits it), never by the proxy's own address. A request without those
    headers is judged by REMOTE_ADDR."""
    if not any(meta.get(header) for header in PROXY_HEADERS):
        return meta.get("REMOTE_ADDR") or None
    if settings.USE_X_FORWARDED_FOR:
        # The last entry, as the failed-login limit takes it (auth_throttle.client_address); an
        # empty one names no client (and falls back to nothing, unlike the limit).
        return meta.get("HTTP_X_FORWARDED_FOR", "").rpartition(",")[2].strip() or None
    return None


def _token_given(request: HttpRequest) -> bool:
    import hmac

    token = settings.METRICS_TOKEN
    scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given, token)


def _refusal_hint(meta: Mapping[str, Any]) -> str:
    if any(meta.get(header) for header in PROXY_HEADERS) and not settings.USE_X_FORWARDED_FOR:
        return (
            "; this request came through a proxy and USE_X_FORWARDED_FOR is off, so no client "
            "address is known (the proxy's own does not count)"
        )
    return ""


@csrf_exempt
def metrics_view(request: HttpRequest) -> HttpResponse:
    """`GET /metrics`: the Prometheus text format, for allowed addresses or the bearer token."""
    if not settings.METRICS_TOKEN and not settings.METRICS_ALLOWED_NETWORKS:
        return error_response(404, "general/Not Found", f"No resource at {request.path}")
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed_response(request.method, "GET, HEAD")
    if not (_token_given(request) or _address_allowed(metrics_client_address(request.META))):
        return error_response(
            403,
            "security/Forbidden",
            "Metrics are served to METRICS_ALLOWED_NETWORKS or with the METRICS_TOKEN bearer token"
            + _refusal_hint(request.META),
        )
    response = HttpResponse(
        generate_latest(scrape_registry()), content_type=CONTENT_TYPE_PLAIN_0_0_4
    )
    response["Cache-Control"] = "no-store"
    return response
