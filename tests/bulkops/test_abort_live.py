"""Abort thresholds end to end (issue 14 items 1 and 9): a real Celery worker and a real
`celery beat` run the ramp against this run's test database while an agent in the test fails
the children as they appear. The ramp stops, the PENDING children fail, and beat's run aborts
a bulk operation that is not due.

Worker and beat use a queue of this test's own in the shared Redis. Waits are bounded polls of
the database; they bound a broken run and assert nothing about speed (bench/rollout_abort.py
measures how fast creation stops)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from bulkops.models import BulkOperation, BulkStatus
from bulkops.services import bulk_operation_create
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import operation_update
from tests.bulkops.conftest import counted_progress
from tests.bulkops.test_crash_safety import REPO, Fleet, Worker, Workers, build_fleet

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 90.0  # a bound for a broken run, not a timing assertion

# `celery beat` with this run's schedule, every task sent to the test's own queue (argv: queue,
# schedule file). Settings are read when the app is first configured, after this override.
BEAT_BOOT = """
import sys

import django
from django.conf import settings

queue, schedule = sys.argv[1], sys.argv[2]
django.setup()
settings.CELERY_TASK_DEFAULT_QUEUE = queue

from celery.__main__ import main

sys.argv = ["celery", "-A", "deviceplatform", "beat", "--loglevel", "INFO", "-s", schedule]
sys.exit(main())
"""


class Rollout:
    """A worker and beat on one queue of the test's own (stopped at the end)."""

    def __init__(self, tmp_path: Path) -> None:
        self.pool = Workers(tmp_path)
        self.pool.env["BULK_RAMP_BOOKING"] = "1"
        self.pool.env["BULK_RAMP_INTERVAL"] = "0.5"
        self.tmp_path = tmp_path
        self.worker: Worker | None = None
        self.beat: subprocess.Popen[bytes] | None = None
        self.beat_log = tmp_path / "beat.log"

    def start(self) -> None:
        self.worker = self.pool.start()
        self.worker.wait_ready()
        with self.beat_log.open("wb") as log:
            self.beat = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    BEAT_BOOT,
                    self.pool.queue,
                    str(self.tmp_path / "beat-schedule"),
                ],
                cwd=REPO,
                env=self.pool.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def logs(self) -> str:
        worker = self.worker.log()[-3000:] if self.worker else ""
        beat = self.beat_log.read_text(errors="replace")[-1500:]
        return f"worker:\n{worker}\nbeat:\n{beat}"

    def stop(self) -> None:
        if self.beat is not None and self.beat.poll() is None:
            self.beat.kill()
            self.beat.wait(timeout=30)
        self.pool.stop_all()


@pytest.fixture
def rollout(tmp_path: Path) -> Iterator[Rollout]:
    assert settings.REDIS_URL, "a real worker and beat need the broker: bin/test sets REDIS_URL"
    running = Rollout(tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def create(fleet: Fleet, *, ramp: float, criteria: list[dict[str, Any]]) -> BulkOperation:
    return bulk_operation_create(
        data={
            "groupId": fleet.group.pk,
            "startDate": timezone.now().isoformat(),
            "creationRamp": ramp,
            "operationPrototype": {"description": "Restart", "c8y_Restart": {}},
            "abortConfig": {"criteria": criteria},
        }
    )


class MovedOn(Exception):
    """The child is no longer PENDING once locked."""


def still_pending(operation: Operation) -> None:
    if operation.status != OperationStatus.PENDING:
        raise MovedOn


def fail_children_until_aborted(bulk: BulkOperation, rollout: Rollout) -> list[datetime]:
    """The agent: fail every PENDING child as it appears, until the bulk operation is DELETED.
    Returns the moment each failure started (its commit came after)."""
    failed_at: list[datetime] = []
    deadline = time.monotonic() + WAIT
    while BulkOperation.objects.get(pk=bulk.pk).status != BulkStatus.DELETED:
        assert time.monotonic() < deadline, rollout.logs()
        pending = Operation.objects.filter(
            bulk_operation_id=bulk.pk, status=OperationStatus.PENDING
        ).order_by("pk")
        for pk in pending.values_list("pk", flat=True)[:50]:
            started = timezone.now()
            try:
                operation_update(
                    operation_id=pk,
                    data={"status": "FAILED", "failureReason": "bad"},
                    precondition=still_pending,
                )
            except MovedOn:
                continue  # the abort failed it first
            failed_at.append(started)
        time.sleep(0.02)
    return failed_at


def test_the_worker_stops_the_ramp_and_fails_the_pending_children(rollout: Rollout) -> None:
    # The whole ramp (600 × 0.2 s) takes longer than WAIT: it can only end by the abort, however
    # slowly this process (the agent) fails the first 20 children on a loaded machine.
    fleet = build_fleet(600)
    bulk = create(
        fleet,
        ramp=0.2,
        criteria=[{"failureType": "FAILED", "thresholdPercentage": 50, "minNumberOfExecuted": 20}],
    )
    failed_at = fail_children_until_aborted(bulk, rollout)
    bulk.refresh_from_db()
    reason = bulk.abort_reason
    assert reason is not None, rollout.logs()
    assert reason["finished"] >= 20
    assert reason["failed"] == reason["finished"]  # the agent fails every child
    assert reason["message"].startswith("Rollout aborted: FAILED failures reached 50%")
    children = list(Operation.objects.filter(bulk_operation_id=bulk.pk))
    assert len(children) == bulk.next_index < len(fleet.device_ids)
    aborted = datetime.fromisoformat(reason["time"].replace("Z", "+00:00"))
    # No child after the abort, none PENDING, and the failures the agent did not make are the
    # abort's own.
    assert max(child.creation_time for child in children) < aborted + timedelta(milliseconds=1)
    # Not before the 20th failure (abortReason's time is in whole milliseconds).
    assert aborted >= failed_at[19] - timedelta(milliseconds=1)
    statuses = {(child.status, child.failure_reason) for child in children}
    assert OperationStatus.PENDING not in {status for status, _ in statuses}
    ours = [c for c in children if c.failure_reason != "bad"]
    assert len(ours) == reason["pendingFailed"]
    assert all(c.failure_reason.startswith("Rollout aborted: ") for c in ours)
    assert counted_progress(bulk)["pending"] == 0


def test_beat_aborts_a_bulk_operation_that_is_not_due(rollout: Rollout) -> None:
    fleet = build_fleet(3)
    bulk = create(
        fleet,
        ramp=3600,
        criteria=[{"failureType": "ANY", "thresholdPercentage": 100}],
    )
    failed_at = fail_children_until_aborted(bulk, rollout)
    bulk.refresh_from_db()
    assert len(failed_at) == 1  # the first child; the next one is due in an hour
    assert (bulk.status, bulk.next_due_at, bulk.next_index) == (BulkStatus.DELETED, None, 1)
    assert bulk.abort_reason["finished"] == 1
    # Only beat's run can have done it: the ramp claims due bulk operations only.
    assert bulk.abort_reason["createdChildren"] == 1
