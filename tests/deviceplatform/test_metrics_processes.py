"""Metrics across real processes (issue 15 item 3, "correct in gunicorn's multi-process mode and from
Celery workers"): with one PROMETHEUS_MULTIPROC_DIR, a scrape of a gunicorn or uvicorn server adds
up what every process counted, including a prefork Celery worker's pool process running a beat
task. Waits are bounded polls: they bound a broken run, not a speed."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import database_url
from tests.servers import REPO, PrivateRedis, Servers, launch, private_redis  # noqa: F401

WAIT = 60.0

COUNT_ELSEWHERE = """
import django
django.setup()
from deviceplatform import metrics
for _ in range(5):
    metrics.auth_failed("throttled")
"""


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(DJANGO_SETTINGS_MODULE="deviceplatform.settings", DATABASE_URL=database_url())
    env.update(extra)
    return env


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["gunicorn", "uvicorn"])
def test_a_server_scrape_adds_up_its_own_requests_and_other_processes(
    launch: Servers,  # noqa: F811
    tmp_path: Path,
    kind: str,
) -> None:
    server = launch.start(kind, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for _ in range(3):
        assert get(server.port, "/health/live")[0] == 200
    done = subprocess.run(
        [sys.executable, "-c", COUNT_ELSEWHERE],
        cwd=REPO,
        env=environment(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    status, text = get(server.port, "/metrics")
    assert status == 200
    live = {"route": "/health/live", "method": "GET", "status": "200"}
    assert sample(text, "deviceplatform_http_requests_total", **live) == 3
    assert sample(text, "deviceplatform_auth_failures_total", reason="throttled") == 5
    # A scrape from another process of the same directory sees the same (no per-process view).
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from prometheus_client.exposition import "
            "generate_latest; from deviceplatform.metrics import scrape_registry; "
            "print(generate_latest(scrape_registry()).decode())",
        ],
        cwd=REPO,
        env=environment(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
        capture_output=True,
        timeout=120,
    )
    assert sample(done.stdout.decode(), "deviceplatform_http_requests_total", **live) == 3


@pytest.mark.django_db(transaction=True)
def test_a_prefork_celery_workers_beat_task_shows_in_a_scrape(
    launch: Servers,  # noqa: F811
    private_redis: PrivateRedis,  # noqa: F811
    tmp_path: Path,
    settings: Any,
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = environment(
        REDIS_URL=private_redis.url, PROMETHEUS_MULTIPROC_DIR=str(directory), LOG_LEVEL="WARNING"
    )
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "deviceplatform", "worker", "--pool", "prefork"]
        + ["--concurrency", "1", "--without-gossip", "--without-mingle"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        settings.REDIS_URL = private_redis.url
        from deviceplatform.celery import app

        with app.connection_for_write(private_redis.url) as connection:
            app.send_task("deviceplatform.tasks.purge_idempotency_keys", connection=connection)
        server = launch.start("gunicorn", PROMETHEUS_MULTIPROC_DIR=str(directory))
        started = time.monotonic()
        task = {"task": "purge_idempotency_keys"}
        while sample(get(server.port, "/metrics")[1], "deviceplatform_sweeps_total", **task) != 1:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() - started < WAIT, (tmp_path / "worker.log").read_text()
            time.sleep(0.2)
    finally:
        worker.kill()
        worker.wait(timeout=30)
        log.close()
