"""Live bulk operations from a real Celery worker (bulkops/live.py): the ramp runs in a worker
process (booked runs, no beat), which publishes each batch's change from its own background
thread, throttled through the Redis gate it shares with this process (which published the
CREATE). A realtime session in the shared store, subscribed to /bulkoperations/{id} as a CometD
client's would be, sees the CREATE, then UPDATEs whose last one is what GET answers.

Waits are bounded polls; they bound a broken run. The assertions are about what arrived."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from django.conf import settings
from django.utils import timezone

from bulkops import tasks
from bulkops.models import BulkOperation, BulkStatus
from deviceplatform.realtime.events import absolute
from deviceplatform.realtime.store import RedisStore
from tests.bulkops.conftest import BULK, create_bulk, make_fleet
from tests.bulkops.test_crash_safety import Workers
from tests.devicecontrol.conftest import call
from tests.factories import Clients

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 60.0  # a bound for a broken run, not a timing assertion


class Listener:
    """A session in this run's realtime store (Redis) subscribed to `channel`."""

    def __init__(self, channel: str) -> None:
        self.store = RedisStore(settings.REDIS_URL, settings.REALTIME_PREFIX, 1000)
        self.cid = f"livetest{uuid.uuid4().hex}"
        self.loop = asyncio.new_event_loop()
        record = {"family": "realtime", "uid": "t", "user": "t", "timeout": "0", "interval": "0",
                  "base": "http://testserver"}  # fmt: skip
        self.loop.run_until_complete(
            self.store.create_session(self.cid, record, ttl_ms=600_000, limit=10)
        )
        self.loop.run_until_complete(
            self.store.subscribe(self.cid, [channel], add=True, ttl_ms=600_000)
        )
        self.messages: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        attached = self.loop.run_until_complete(
            self.store.attach(
                self.cid, hub="t", token="t", requested_ms=0, max_hold_ms=0,
                max_interval_ms=600_000, immediate=True,
            )
        )  # fmt: skip
        payloads = attached.events if attached else []
        # As the protocol delivers them: with the subscriber's own base URL.
        self.messages.extend(
            orjson.loads(absolute(p, b'"http://testserver'))["data"] for p in payloads
        )
        return self.messages

    def close(self) -> None:
        self.loop.run_until_complete(self.store.remove_session(self.cid))
        self.loop.close()


def test_a_ramp_in_a_worker_process_is_published_and_ends_as_get_answers(
    tmp_path: Path, bapi: Clients
) -> None:
    assert settings.REDIS_URL, "a real worker needs the broker: bin/test sets REDIS_URL"
    bapi.prepare("bulk_reader")
    fleet = make_fleet(5)
    pool = Workers(tmp_path)
    pool.queue = f"test-live-{uuid.uuid4().hex[:12]}"
    pool.env.update(BULK_RAMP_BOOKING="1", REALTIME_PREFIX=settings.REALTIME_PREFIX)
    listener: Listener | None = None
    try:
        worker = pool.start()
        worker.wait_ready()
        now = timezone.now()
        start = (now + timedelta(seconds=1)).isoformat()
        # The ID is not known before the create: every bulk operation's channel, filtered below.
        listener = Listener("/bulkoperations/*")
        bulk = create_bulk(fleet.group, now=now, creationRamp=0.3, startDate=start)
        tasks.advance_bulk_operations.apply_async(queue=pool.queue)
        deadline = time.monotonic() + WAIT
        while BulkOperation.objects.get(pk=bulk.pk).status != BulkStatus.COMPLETED:
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
        response = call(bapi["bulk_reader"], "GET", f"{BULK}/{bulk.pk}")
        final = response.json()
        # The worker's last batch is published from its thread once its gate allows.
        while not ((got := listener.drain()) and got[-1]["data"] == final):
            assert time.monotonic() < deadline, (got, worker.log()[-3000:])
            time.sleep(0.1)
    finally:
        pool.stop_all()
        if listener is not None:
            listener.close()

    mine = [m for m in got if m["data"]["id"] == str(bulk.pk)]
    assert mine == got  # nothing about other bulk operations
    assert [m["realtimeAction"] for m in mine] == ["CREATE"] + ["UPDATE"] * (len(mine) - 1)
    assert mine[0]["data"]["generalStatus"] == "SCHEDULED"
    assert len(mine) >= 2
    assert mine[-1]["data"] == final
    assert (final["status"], final["progress"]["pending"]) == ("COMPLETED", 5)


def test_a_worker_stopping_publishes_the_last_state_it_held_back(
    tmp_path: Path, bapi: Clients
) -> None:
    """With a 60 s interval the worker's later batches wait for their trailing message; a
    graceful stop (SIGTERM) publishes it at once instead of losing it."""
    assert settings.REDIS_URL, "a real worker needs the broker: bin/test sets REDIS_URL"
    bapi.prepare("bulk_reader")
    fleet = make_fleet(4)
    pool = Workers(tmp_path)
    pool.queue = f"test-live-{uuid.uuid4().hex[:12]}"
    pool.env.update(
        BULK_RAMP_BOOKING="1",
        REALTIME_PREFIX=settings.REALTIME_PREFIX,
        BULK_LIVE_INTERVAL_MS="60000",
    )
    listener = Listener("/bulkoperations/*")
    try:
        worker = pool.start()
        worker.wait_ready()
        now = timezone.now()
        start = (now + timedelta(seconds=1)).isoformat()
        bulk = create_bulk(fleet.group, now=now, creationRamp=0.3, startDate=start)
        tasks.advance_bulk_operations.apply_async(queue=pool.queue)
        deadline = time.monotonic() + WAIT
        while BulkOperation.objects.get(pk=bulk.pk).status != BulkStatus.COMPLETED:
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
        final = call(bapi["bulk_reader"], "GET", f"{BULK}/{bulk.pk}").json()
        held_back = list(listener.drain())
        worker.process.terminate()  # a warm shutdown
        worker.process.wait(timeout=WAIT)
        got = listener.drain()
    finally:
        pool.stop_all()
        listener.close()

    # The first batch went out at once and took the gate for 60 s; the rest waited for it.
    assert [m["realtimeAction"] for m in held_back] == ["CREATE", "UPDATE"], held_back
    assert held_back[-1]["data"]["progress"]["all"] == 4
    assert held_back[-1]["data"] != final
    assert got[-1]["data"] == final, worker.log()[-3000:]
    assert final["status"] == "COMPLETED"
