"""Health endpoints (`/health/live`, `/health/ready`) and the heartbeats that ready reads.

Ready runs a few cheap checks, each timed: the database (`SELECT 1`), the migrations (the leaf
migrations of this code are recorded as applied: one query), and with REDIS_URL Redis itself and
the heartbeats that the Celery worker and beat write there (one `MGET`): a Celery ping would take
about a second. The worker writes its heartbeat from a bootstep timer every
HEALTH_WORKER_HEARTBEAT_SECONDS; beat on every tick of its scheduler (`HeartbeatScheduler`, the
`beat_scheduler` setting). Without REDIS_URL the server's own in-process scheduler stands for both:
ready reads its last tick directly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from celery import bootsteps
from celery.beat import PersistentScheduler
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from deviceplatform.api.exceptions import method_not_allowed_response

logger = logging.getLogger(__name__)

UP, DOWN = "UP", "DOWN"
WORKER_KEY = "worker"
BEAT_KEY = "beat"


class CheckFailed(Exception):
    """A check found its dependency unhealthy; the message says why."""


# --- Heartbeats ------------------------------------------------------------------------------------


@cache
def _redis(url: str) -> Any:
    """A client for the checks and heartbeats: short timeouts and no retries, so that a Redis that
    is down makes ready answer 503 at once instead of waiting."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    timeout = settings.HEALTH_CHECK_TIMEOUT_SECONDS
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def heartbeat_key(name: str) -> str:
    return f"{settings.HEALTH_HEARTBEAT_PREFIX}:{name}"


def write_heartbeat(name: str, *, now: float | None = None) -> None:
    """Record that `name` (worker or beat) is alive at `now` (seconds since the epoch). Never
    raises: a Redis outage is what ready reports, not a reason to stop the process."""
    if not settings.REDIS_URL:
        return
    moment = time.time() if now is None else now
    try:
        # Kept a minute: a key that outlives its writer still shows how long ago it stopped.
        _redis(settings.REDIS_URL).set(heartbeat_key(name), repr(moment), ex=60)
    except Exception as exc:
        logger.debug("health: could not write the %s heartbeat: %s", name, exc)


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Worker bootstep: writes the worker heartbeat from the worker's own timer, so it stops when
    the worker's main loop stops (killed, hung, shutting down)."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        write_heartbeat(WORKER_KEY)
        self.tref = worker.timer.call_repeatedly(
            settings.HEALTH_WORKER_HEARTBEAT_SECONDS, write_heartbeat, (WORKER_KEY,), priority=10
        )

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


class HeartbeatScheduler(PersistentScheduler):
    """Celery beat's default scheduler, writing the beat heartbeat on each tick (at most once per
    HEALTH_WORKER_HEARTBEAT_SECONDS: beat ticks every BULK_RAMP_INTERVAL)."""

    _last_beat = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if now - self._last_beat >= settings.HEALTH_WORKER_HEARTBEAT_SECONDS:
            self._last_beat = now
            write_heartbeat(BEAT_KEY)
        return super().tick(*args, **kwargs)


def beat_max_age() -> float:
    """How old beat's heartbeat may be: HEALTH_BEAT_MAX_AGE_SECONDS, or (0) three times the
    shortest interval of the beat schedule, at least HEALTH_WORKER_MAX_AGE_SECONDS."""
    if settings.HEALTH_BEAT_MAX_AGE_SECONDS > 0:
        return float(settings.HEALTH_BEAT_MAX_AGE_SECONDS)
    from deviceplatform.scheduler import interval_seconds

    intervals = [
        seconds
        for spec in settings.CELERY_BEAT_SCHEDULE.values()
        if (seconds := interval_seconds(spec["schedule"])) is not None
    ]
    shortest = min(intervals, default=0.0)
    return max(3 * shortest, float(settings.HEALTH_WORKER_MAX_AGE_SECONDS))


# --- Checks ----------------------------------------------------------------------------------------


@contextmanager
def _database_cursor() -> Iterator[Any]:
    """A cursor for the checks. With Django's PostgreSQL pool, a connection taken from it with a
    wait of HEALTH_CHECK_TIMEOUT_SECONDS: Django's own cursor would wait the pool's 10 s for a
    database that is down. Otherwise Django's connection of this thread."""
    connection = connections[DEFAULT_DB_ALIAS]
    pool = getattr(connection, "pool", None)
    if pool is None:
        with connection.cursor() as cursor:
            yield cursor
        return
    pool.open()  # as Django does before its first connection (a no-op once open)
    raw = pool.getconn(timeout=settings.HEALTH_CHECK_TIMEOUT_SECONDS)
    try:
        with raw.cursor() as cursor:
            yield cursor
    finally:
        pool.putconn(raw)


def _check_database() -> dict[str, Any]:
    with _database_cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {}


@cache
def expected_migrations() -> frozenset[tuple[str, str]]:
    """The leaf migration of every app of this code (loaded from disk once per process)."""
    from django.db.migrations.loader import MigrationLoader

    return frozenset(MigrationLoader(None, ignore_no_migrations=True).graph.leaf_nodes())


def _check_migrations() -> dict[str, Any]:
    expected = expected_migrations()
    with _database_cursor() as cursor:
        cursor.execute("SELECT app, name FROM django_migrations")
        applied = {(app, name) for app, name in cursor.fetchall()}
    missing = sorted(f"{app}.{name}" for app, name in expected - applied)
    if missing:
        raise CheckFailed(f"Not applied: {', '.join(missing)}")
    return {}


def _age(raw: bytes | None, now: float) -> float | None:
    if raw is None:
        return None
    try:
        return max(0.0, now - float(raw))
    except ValueError:
        return None


def _heartbeat_result(name: str, age: float | None, max_age: float) -> dict[str, Any]:
    if age is None:
        return {"status": DOWN, "error": f"No {name} heartbeat in Redis"}
    result: dict[str, Any] = {"ageSeconds": round(age, 3), "maxAgeSeconds": max_age}
    if age > max_age:
        return {"status": DOWN, "error": f"Last {name} heartbeat {age:.1f} s ago", **result}
    return {"status": UP, **result}


def _timed(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = {"status": UP, **check()}
    except Exception as exc:
        message = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        result = {"status": DOWN, "error": message}
    result["latencyMs"] = round((time.perf_counter() - started) * 1000, 2)
    return result


def _redis_checks(now: float) -> dict[str, dict[str, Any]]:
    """Redis, the worker and beat: one MGET of the two heartbeats."""
    started = time.perf_counter()
    try:
        worker, beat = _redis(settings.REDIS_URL).mget(
            [heartbeat_key(WORKER_KEY), heartbeat_key(BEAT_KEY)]
        )
    except Exception as exc:
        latency = round((time.perf_counter() - started) * 1000, 2)
        error = {"status": DOWN, "latencyMs": latency}
        return {
            "redis": {**error, "error": f"{type(exc).__name__}: {exc}"},
            "worker": {**error, "error": "Unknown: Redis is unavailable"},
            "beat": {**error, "error": "Unknown: Redis is unavailable"},
        }
    latency = round((time.perf_counter() - started) * 1000, 2)
    worker_max = float(settings.HEALTH_WORKER_MAX_AGE_SECONDS)
    return {
        "redis": {"status": UP, "latencyMs": latency},
        "worker": {**_heartbeat_result("worker", _age(worker, now), worker_max)},
        "beat": {**_heartbeat_result("beat", _age(beat, now), beat_max_age())},
    }


def _scheduler_check() -> dict[str, Any]:
    """Embedded mode: this process's in-process scheduler runs the beat schedule (and its tasks)."""
    from deviceplatform import scheduler

    running = scheduler._running
    if running is None or running.last_tick is None:
        return {"status": DOWN, "error": "No in-process scheduler runs in this process"}
    return _heartbeat_result("scheduler tick", running.clock() - running.last_tick, beat_max_age())


def readiness(*, now: float | None = None) -> dict[str, Any]:
    """Every check's result and the overall status (UP only when every check is UP)."""
    moment = time.time() if now is None else now
    checks = {"database": _timed(_check_database)}
    if checks["database"]["status"] == UP:
        checks["migrations"] = _timed(_check_migrations)
    else:
        checks["migrations"] = {"status": DOWN, "error": "Unknown: the database is unavailable"}
    if settings.REDIS_URL:
        checks.update(_redis_checks(moment))
    else:
        checks["scheduler"] = _scheduler_check()
    status = UP if all(check["status"] == UP for check in checks.values()) else DOWN
    return {"status": status, "checks": checks}


# --- Views -----------------------------------------------------------------------------------------

_ALLOWED = "GET, HEAD"


def _health_response(body: dict[str, Any]) -> HttpResponse:
    response = JsonResponse(body, status=200 if body["status"] == UP else 503)
    response["Cache-Control"] = "no-store"
    # A 503 here is an answer, not a server error: the access log has it; Django's ERROR line for
    # every 5xx would repeat it once a second while a probe polls an outage.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


@csrf_exempt
def live_view(request: HttpRequest) -> HttpResponse:
    """`GET /health/live`: the process answers HTTP. Checks nothing else, so a database or Redis
    outage never makes an orchestrator restart healthy processes."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed_response(request.method, _ALLOWED)
    return _health_response({"status": UP})


@csrf_exempt
def ready_view(request: HttpRequest) -> HttpResponse:
    """`GET /health/ready`: 200 when every check is UP, else 503; each check's status and latency."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed_response(request.method, _ALLOWED)
    return _health_response(readiness())
