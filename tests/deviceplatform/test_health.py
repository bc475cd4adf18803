"""Health endpoints (issue 15 item 2): /health/live answers while the process does; /health/ready
checks the database, the migrations and, with REDIS_URL, Redis and the heartbeats of the Celery
worker and beat (without it, the in-process scheduler's last tick), each with its latency, and
answers 200 or 503. The end-to-end test runs a real worker and beat against a private Redis, stops
each and starts it again."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from redis.exceptions import ConnectionError as RedisConnectionError

from deviceplatform import health
from deviceplatform import scheduler as scheduler_module
from deviceplatform.scheduler import Scheduler
from tests.helpers import database_url
from tests.servers import (  # noqa: F401 (fixtures)
    REPO,
    PrivateRedis,
    Servers,
    free_port,
    launch,
    private_redis,
)

WAIT = 60.0  # bounds a broken run, asserts nothing about speed
IDLE_ENTRY = {"idle": {"task": "deviceplatform.tasks.purge_idempotency_keys", "schedule": 3600.0}}


@pytest.fixture(autouse=True)
def heartbeat_prefix(settings: Any) -> Iterator[str]:
    """Heartbeats of this test alone: the suite's Redis is shared with other runs and workers."""
    prefix = f"test:health:{uuid.uuid4().hex[:12]}"
    settings.HEALTH_HEARTBEAT_PREFIX = prefix
    yield prefix
    if settings.REDIS_URL:
        client = health._redis(settings.REDIS_URL)
        with contextlib.suppress(RedisConnectionError):  # a private Redis may be gone already
            client.delete(health.heartbeat_key("worker"), health.heartbeat_key("beat"))


def statuses(body: dict[str, Any]) -> dict[str, str]:
    return {name: check["status"] for name, check in body["checks"].items()}


# --- live --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health/live", "/health/live/"])
def test_live_answers_without_credentials_and_checks_nothing(client: Any, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json() == {"status": "UP"}
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics"])
def test_other_methods_are_405_in_the_error_shape(client: Any, path: str) -> None:
    response = client.post(path, data="{}", content_type="application/json")
    assert response.status_code == 405
    assert response.json()["error"] == "general/methodNotAllowed"
    assert response["Allow"] == "GET, HEAD"


# --- ready with Redis -------------------------------------------------------------------------


@pytest.mark.django_db
def test_ready_is_503_until_worker_and_beat_have_written_heartbeats(
    client: Any, settings: Any
) -> None:
    assert settings.REDIS_URL, "bin/test sets REDIS_URL"
    response = client.get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "DOWN"
    assert statuses(body) == {
        "database": "UP",
        "migrations": "UP",
        "redis": "UP",
        "worker": "DOWN",
        "beat": "DOWN",
    }
    assert body["checks"]["worker"]["error"] == "No worker heartbeat in Redis"
    for name in ("database", "migrations", "redis"):
        assert body["checks"][name]["latencyMs"] >= 0

    health.write_heartbeat("worker")
    health.write_heartbeat("beat")
    response = client.get("/health/ready/")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "UP"
    assert set(statuses(body).values()) == {"UP"}
    assert 0 <= body["checks"]["worker"]["ageSeconds"] < body["checks"]["worker"]["maxAgeSeconds"]


@pytest.mark.django_db
def test_a_stale_heartbeat_is_down_with_its_age(client: Any, settings: Any) -> None:
    settings.HEALTH_WORKER_MAX_AGE_SECONDS = 3.0
    health.write_heartbeat("worker", now=time.time() - 10)
    health.write_heartbeat("beat")
    response = client.get("/health/ready")
    assert response.status_code == 503
    worker = response.json()["checks"]["worker"]
    assert worker["status"] == "DOWN"
    assert worker["ageSeconds"] >= 10
    assert worker["maxAgeSeconds"] == 3.0
    assert response.json()["checks"]["beat"]["status"] == "UP"


def test_beat_may_be_as_old_as_three_of_its_shortest_intervals(settings: Any) -> None:
    settings.HEALTH_BEAT_MAX_AGE_SECONDS = 0
    settings.HEALTH_WORKER_MAX_AGE_SECONDS = 3.0
    settings.CELERY_BEAT_SCHEDULE = {"a": {"task": "x", "schedule": 10.0}, **IDLE_ENTRY}
    assert health.beat_max_age() == 30.0
    settings.CELERY_BEAT_SCHEDULE = {"a": {"task": "x", "schedule": 0.5}}
    assert health.beat_max_age() == 3.0  # never below the worker's limit
    settings.HEALTH_BEAT_MAX_AGE_SECONDS = 7.5
    assert health.beat_max_age() == 7.5


@pytest.mark.django_db
def test_a_redis_outage_is_503_naming_redis_and_heals(
    client: Any,
    settings: Any,
    private_redis: PrivateRedis,  # noqa: F811
) -> None:
    settings.REDIS_URL = private_redis.url
    health.write_heartbeat("worker")
    health.write_heartbeat("beat")
    assert client.get("/health/ready").status_code == 200
    private_redis.stop()
    response = client.get("/health/ready")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["redis"]["status"] == "DOWN"
    assert "ConnectionError" in checks["redis"]["error"]
    assert checks["worker"]["error"] == "Unknown: Redis is unavailable"
    assert checks["database"]["status"] == "UP"
    private_redis.start()  # empty: no heartbeats until they are written again
    assert client.get("/health/ready").json()["checks"]["redis"]["status"] == "UP"
    health.write_heartbeat("worker")
    health.write_heartbeat("beat")
    assert client.get("/health/ready").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_an_unapplied_migration_is_503_naming_it(client: Any, settings: Any) -> None:
    health.write_heartbeat("worker")
    health.write_heartbeat("beat")
    app, name = sorted(health.expected_migrations())[0]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT applied FROM django_migrations WHERE app = %s AND name = %s", [app, name]
        )
        [applied] = cursor.fetchone()
        cursor.execute("DELETE FROM django_migrations WHERE app = %s AND name = %s", [app, name])
    try:
        response = client.get("/health/ready")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO django_migrations (app, name, applied) VALUES (%s, %s, %s)",
                [app, name, applied],
            )
    assert response.status_code == 503
    migrations = response.json()["checks"]["migrations"]
    assert migrations == {
        "status": "DOWN",
        "error": f"Not applied: {app}.{name}",
        "latencyMs": migrations["latencyMs"],
    }
    assert client.get("/health/ready").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_database_that_is_down_is_503_within_the_check_timeout(
    launch: Servers,  # noqa: F811
    heartbeat_prefix: str,
) -> None:
    """A server whose PostgreSQL does not answer: live stays 200, ready says so after at most
    HEALTH_CHECK_TIMEOUT_SECONDS of waiting for a connection (not the pool's 10 s)."""
    server = launch.start(
        "uvicorn",
        DATABASE_URL=f"postgres://root@127.0.0.1:{free_port()}/nothing_listens_here",
        HEALTH_HEARTBEAT_PREFIX=heartbeat_prefix,
        HEALTH_CHECK_TIMEOUT_SECONDS="0.5",
    )
    assert http_get(server.port, "/health/live")[0] == 200
    status, body = http_get(server.port, "/health/ready")
    assert status == 503
    checks = json.loads(body)["checks"]
    assert checks["database"]["status"] == "DOWN"
    # The wait was the check's own, not the pool's 10 s.
    assert checks["database"]["error"] == "PoolTimeout: couldn't get a connection after 0.50 sec"
    assert checks["migrations"] == {
        "status": "DOWN",
        "error": "Unknown: the database is unavailable",
    }


def http_get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# --- ready without Redis: the in-process scheduler ---------------------------------------------


@pytest.mark.django_db
def test_embedded_ready_reports_the_in_process_schedulers_tick(
    client: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.REDIS_URL = ""
    settings.HEALTH_BEAT_MAX_AGE_SECONDS = 3.0
    response = client.get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert statuses(body) == {"database": "UP", "migrations": "UP", "scheduler": "DOWN"}
    assert body["checks"]["scheduler"]["error"] == "No in-process scheduler runs in this process"

    clock = [1000.0]
    scheduler = Scheduler(IDLE_ENTRY, clock=lambda: clock[0])
    monkeypatch.setattr(scheduler_module, "_running", scheduler)
    scheduler.tick(clock[0])
    assert client.get("/health/ready").status_code == 200
    clock[0] += 2.5
    assert client.get("/health/ready").status_code == 200
    clock[0] += 1.0  # 3.5 s since the last tick: the scheduler thread is stuck
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["scheduler"]["ageSeconds"] == 3.5
    scheduler.tick(clock[0])
    assert client.get("/health/ready").status_code == 200


@pytest.mark.django_db
def test_the_embedded_schedulers_loop_keeps_ready_up(client: Any, settings: Any) -> None:
    settings.REDIS_URL = ""
    scheduler = Scheduler(IDLE_ENTRY)
    scheduler.start()
    try:
        assert client.get("/health/ready").status_code == 200
    finally:
        scheduler.stop()
    assert client.get("/health/ready").status_code == 503  # stopped: no scheduler any more


# --- end to end: a real worker and beat ----------------------------------------------------------


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log_path = name, args, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "deviceplatform", *self.args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def wait_for(check: str, status: str, *processes: Process) -> float:
    """Seconds until ready reports `check` as `status` (bounded by WAIT)."""
    started = time.monotonic()
    while health.readiness()["checks"][check]["status"] != status:
        elapsed = time.monotonic() - started
        assert elapsed < WAIT, "\n".join(f"{p.name}: {p.log()}" for p in processes)
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.django_db(transaction=True)
def test_ready_follows_a_real_worker_and_beat_going_away_and_coming_back(
    settings: Any,
    tmp_path: Path,
    heartbeat_prefix: str,
    private_redis: PrivateRedis,  # noqa: F811
) -> None:
    settings.REDIS_URL = private_redis.url
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(
        DJANGO_SETTINGS_MODULE="deviceplatform.settings",
        DATABASE_URL=database_url(),
        REDIS_URL=private_redis.url,
        HEALTH_HEARTBEAT_PREFIX=heartbeat_prefix,
        LOG_LEVEL="WARNING",
    )
    worker = Process(
        "worker",
        ["worker", "--pool", "solo", "--without-gossip", "--without-mingle", "-Q", "health-test"],
        env,
        tmp_path / "worker.log",
    )
    beat = Process(
        "beat", ["beat", "--schedule", str(tmp_path / "beat-schedule")], env, tmp_path / "beat.log"
    )
    worker.start()
    beat.start()
    try:
        wait_for("worker", "UP", worker, beat)
        wait_for("beat", "UP", worker, beat)
        assert health.readiness()["status"] == "UP"

        worker.kill()
        down = wait_for("worker", "DOWN", worker, beat)
        assert health.readiness()["status"] == "DOWN"
        worker.start()
        wait_for("worker", "UP", worker, beat)

        beat.kill()
        wait_for("beat", "DOWN", worker, beat)
        beat.start()
        wait_for("beat", "UP", worker, beat)
        assert health.readiness()["status"] == "UP"

        private_redis.stop()
        assert health.readiness()["checks"]["redis"]["status"] == "DOWN"
        private_redis.start()
        # Both reconnect and write again (Celery retries its broker connection).
        wait_for("worker", "UP", worker, beat)
        wait_for("beat", "UP", worker, beat)
        assert health.readiness()["status"] == "UP", (worker.log(), beat.log())
    finally:
        worker.kill()
        beat.kill()
    print(f"worker DOWN {down:.1f} s after it was killed")
