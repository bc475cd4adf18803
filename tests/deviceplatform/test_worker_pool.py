"""A Celery prefork child keeps its PostgreSQL connection pool from task to task, like the server
processes do: around each task its connections go back to the pool, the pool stays open.

Celery's own Django fix-up closed the whole pool before and after every task in a prefork child
(deviceplatform/celery_fixup.py): every task opened a new pool and new PostgreSQL sessions, and a
thread of the child using the database meanwhile (bulkops/live.py's publisher) had the pool closed
under it (PoolClosed, or a PoolTimeout after the pool's 10 s, as the CI user journey logged). A real
worker (prefork, one child) runs probe tasks (tests/deviceplatform/worker_probe.py) that report
what they see to the test's private Redis. Waits are bounded; they assert what happened, not how
fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tests.deviceplatform.worker_probe import RESULTS
from tests.helpers import database_url
from tests.servers import REPO, PrivateRedis, private_redis  # noqa: F401 (fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgresql]

WAIT = 60  # seconds; bounds a broken run, never an assertion about speed


@pytest.fixture
def worker(
    private_redis: PrivateRedis,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> Iterator[tuple[Celery, redis.Redis, Path]]:
    """A prefork worker with one child on this test's database and a private Redis; yields a
    client app to send tasks with, the Redis client and the worker's log."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(
        DJANGO_SETTINGS_MODULE="deviceplatform.settings",
        DATABASE_URL=database_url(),
        DATABASE_POOL_MIN_SIZE="1",
        REDIS_URL=private_redis.url,
        BULK_RAMP_BOOKING="0",
        LOG_LEVEL="INFO",
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "deviceplatform", "worker"]
            + [
                "--pool",
                "prefork",
                "--concurrency",
                "1",
                "--include",
                "tests.deviceplatform.worker_probe",
            ]
            + ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # Not Celery's current app: shared tasks (the platform's) would go to this private broker
    # in every later test of this process, after the broker is gone.
    client = Celery(broker=private_redis.url, set_as_current=False)
    store = redis.Redis.from_url(private_redis.url)
    try:
        yield client, store, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)  # the main process and its child
        process.wait(timeout=30)
        client.close()


def results(store: redis.Redis, count: int, log: Path) -> list[dict[str, Any]]:
    found = []
    for _ in range(count):
        item = store.blpop([RESULTS], timeout=WAIT)
        assert item is not None, log.read_text(errors="replace")[-3000:]
        found.append(json.loads(item[1]))
    return found


def test_a_prefork_child_keeps_its_pool_from_task_to_task(
    worker: tuple[Celery, redis.Redis, Path],
) -> None:
    client, store, log = worker
    for _ in range(5):
        client.send_task("worker_probe.pool")
    seen = results(store, 5, log)
    assert len({probe["pid"] for probe in seen}) == 1, seen  # one child ran them all
    assert len({probe["pool"] for probe in seen}) == 1, seen  # Celery's fix-up: 5 pools
    assert seen[0]["pool"] is not None, seen


def test_a_thread_of_the_child_keeps_its_database_while_tasks_run(
    worker: tuple[Celery, redis.Redis, Path],
) -> None:
    client, store, log = worker
    client.send_task("worker_probe.background", args=[300])
    for _ in range(30):
        client.send_task("worker_probe.pool")
    seen = results(store, 31, log)
    (thread,) = [probe for probe in seen if "errors" in probe]
    assert thread["errors"] == [], thread["errors"][:5]
