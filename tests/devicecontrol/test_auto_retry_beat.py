"""Automatic retries end to end with a real `celery beat` and a real `celery worker` (on a private
Redis, so the beat schedule's tasks reach no one else's worker): an agent fails an operation with
a 1-second back-off, and the retry sweeper entry of the beat schedule creates attempt 2, then
attempt 3, then no more. Waits are bounded polls; they assert what happened, not how fast."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devicecontrol import services
from devicecontrol.models import Operation
from tests.devicecontrol.conftest import add_child_devices, make_device
from tests.helpers import database_url
from tests.servers import REPO, PrivateRedis, private_redis  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 60.0  # bounds a broken run; never an assertion about speed


def eventually(what: str, check: Callable[[], Any], logs: Callable[[], str]) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


@pytest.fixture
def beat_and_worker(
    private_redis: PrivateRedis,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> Iterator[Callable[[], str]]:
    """`celery beat` and `celery worker` against this test's database and a private Redis; yields
    a function returning both logs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(
        DJANGO_SETTINGS_MODULE="deviceplatform.settings",
        DATABASE_URL=database_url(),
        REDIS_URL=private_redis.url,
        OPERATION_RETRY_INTERVAL="0.5",
        BULK_RAMP_BOOKING="0",
        LOG_LEVEL="INFO",
    )
    celery = [sys.executable, "-m", "celery", "-A", "deviceplatform"]
    commands = {
        "beat": [*celery, "beat", "-s", str(tmp_path / "beat-schedule"), "--loglevel", "INFO"],
        "worker": [
            *celery,
            "worker",
            "--pool",
            "solo",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "INFO",
        ],
    }
    processes: list[subprocess.Popen[bytes]] = []
    paths = []
    for name, command in commands.items():
        path = tmp_path / f"{name}.log"
        paths.append(path)
        with path.open("wb") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def logs() -> str:
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')}" for path in paths
        )

    try:
        yield logs
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def test_beat_and_worker_create_the_retries_until_the_criteria_are_spent(
    beat_and_worker: Callable[[], str],
) -> None:
    agent = make_device("Gateway", agent=True)
    device = make_device("Pump")
    add_child_devices(agent, device)
    config = {
        "criteria": [{"failureType": "FAILED", "numberOfRetries": 2}],
        "backoffSeconds": 1,
        "backoffFactor": 1,
    }
    first = services.operation_create(
        device=device, data={"c8y_Restart": {}, "retryConfig": config}
    )
    attempts = [first]
    for number in (2, 3):
        failed = services.operation_update(
            operation_id=attempts[-1].pk, data={"status": "FAILED", "failureReason": "boom"}
        )
        assert failed.retry_at is not None

        def created(previous: int = attempts[-1].pk) -> Operation | None:
            return Operation.objects.filter(retry_of_id=previous).first()

        retry = eventually(f"attempt {number}", created, beat_and_worker)
        assert (retry.attempt, retry.status) == (number, "PENDING")
        assert retry.creation_time >= failed.retry_at
        attempts.append(retry)

    last = services.operation_update(
        operation_id=attempts[-1].pk, data={"status": "FAILED", "failureReason": "boom"}
    )
    assert last.retry_at is None  # two retries spent
    # The sweeper keeps running and creates nothing more: a later operation's retry, booked
    # after that last failure, comes; the spent one still has no successor.
    sentinel = services.operation_create(
        device=device, data={"c8y_Restart": {}, "retryConfig": config}
    )
    services.operation_update(operation_id=sentinel.pk, data={"status": "FAILED"})
    eventually(
        "the later operation's retry",
        lambda: Operation.objects.filter(retry_of=sentinel).exists(),
        beat_and_worker,
    )
    assert not Operation.objects.filter(retry_of_id=attempts[-1].pk).exists()
    assert Operation.objects.filter(attempt__gt=1).count() == 3
    assert not Operation.objects.filter(retry_at__isnull=False).exists()
