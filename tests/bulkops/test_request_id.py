"""A request's story reaches the Celery worker (issue 15 item 4): creating a bulk operation books
its first ramp run (a Celery task); a real worker runs it, and the runs that run books in turn,
with the creating request's id on their log lines."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from bulkops.models import BulkOperation, BulkStatus
from deviceplatform.celery import app
from deviceplatform.logs import REQUEST_ID_HEADER
from tests.bulkops.conftest import BULK, bulk_data, make_fleet
from tests.bulkops.test_crash_safety import Workers
from tests.factories import Clients

WAIT = 60.0  # a bound for a broken run, not a timing assertion


def json_lines(log: str) -> list[dict[str, Any]]:
    """The complete JSON lines (a killed worker may leave its last line half written)."""
    return [json.loads(line) for line in log.split("\n")[:-1] if line.startswith("{")]


@pytest.mark.django_db(transaction=True)
def test_the_ramp_runs_a_request_booked_log_its_request_id_in_the_worker(
    tmp_path: Path, bapi: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings.REDIS_URL, "a real worker needs the broker: bin/test sets REDIS_URL"
    fleet = make_fleet(3)
    pool = Workers(tmp_path)
    pool.queue = f"test-request-id-{uuid.uuid4().hex[:12]}"
    pool.env.update(BULK_RAMP_BOOKING="1", LOG_FORMAT="json")
    # This process books as production does (on the default queue): here that is the worker's,
    # and the booking is that queue's (bulkops:ramp:booked:<queue>), no other test's or process's.
    monkeypatch.setattr(settings, "BULK_RAMP_BOOKING", True)
    monkeypatch.setitem(app.conf, "task_default_queue", pool.queue)
    try:
        worker = pool.start()
        worker.wait_ready()
        now = timezone.now()
        response = bapi["bulk_admin"].post(
            BULK,
            bulk_data(fleet.group, startDate=now.isoformat(), creationRamp=0.5),
            format="json",
            HTTP_X_REQUEST_ID="story-bulk-1",
        )
        assert response.status_code == 201, response.content
        assert response[REQUEST_ID_HEADER] == "story-bulk-1"
        bulk = BulkOperation.objects.get()  # the only one
        deadline = time.monotonic() + WAIT
        # Completed, and the run that completed it has logged its line (after its commit).
        while (
            BulkOperation.objects.get(pk=bulk.pk).status != BulkStatus.COMPLETED
            or sum(worker.results()) < 3
        ):
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
    finally:
        pool.stop_all()
    runs = [line for line in json_lines(worker.log()) if line["message"].startswith("Bulk ramp:")]
    # Booked runs only (no beat here): the one the request booked, then those it booked.
    assert sum(worker.results()) == 3, worker.log()[-3000:]
    assert runs, worker.log()[-3000:]
    assert {line.get("request_id") for line in runs} == {"story-bulk-1"}, runs
