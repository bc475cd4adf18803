"""Exactly once through crashes and overlap (issue 4, bulkoperations.md §4): real Celery workers on
the real Redis broker run the ramp against this run's test database (PostgreSQL or SQLite); one is
killed with SIGKILL in the middle of a batch, two run it at once, and two threads race in-process.
Every device ends with exactly one child operation, and a killed worker never leaves a partial
batch behind.

Each test consumes its own uniquely named queue, so parallel runs (and xdist workers) sharing the
Redis server never take each other's tasks. Waits are bounded polls of the database; they bound a
broken run and assert nothing about speed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count, Max
from django.utils import timezone

from bulkops.models import BulkOperation, BulkStatus
from bulkops.selectors import bulk_operation_progress, bulk_operations_with_progress
from bulkops.services import bulk_operation_create, bulk_operations_advance
from bulkops.tasks import advance_bulk_operations
from devicecontrol.models import Operation, OperationStatus
from deviceplatform.db import GLOBAL_ID_SEQUENCE
from inventory import services as inventory_services
from inventory.models import ManagedObject, ManagedObjectReference, Relation
from tests.helpers import database_url

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parents[2]
WAIT = 60.0  # a bound for a broken run, not a timing assertion
FLEET = 3000  # large enough that the ramp spans many transactions in a real worker
BATCH = 20
# The ramp's own line at the end of every run that processed targets (Celery's per-task lines are
# quiet below LOG_LEVEL=DEBUG).
FINISHED_RUN = re.compile(r"Bulk ramp: (\d+) target\(s\) processed")

# A worker started with STOP_AFTER_CHILD_INSERTS=N stops itself (SIGSTOP) right after the INSERT
# of the children of its N-th batch, before that batch commits: the test then SIGKILLs it in the
# middle of a batch for certain, on any database. Everything else is the plain `celery` command.
BOOT = """
import os
import signal
import sys

from django.db.backends.signals import connection_created

stop_after = int(os.environ.get("STOP_AFTER_CHILD_INSERTS", "0"))
inserts = 0


def stop_mid_batch(execute, sql, params, many, context):
    global inserts
    result = execute(sql, params, many, context)
    if sql.startswith('INSERT INTO "devicecontrol_operation"'):
        inserts += 1
        if inserts == stop_after:
            os.kill(os.getpid(), signal.SIGSTOP)
    return result


def install(sender, connection, **kwargs):
    if stop_after and stop_mid_batch not in connection.execute_wrappers:
        connection.execute_wrappers.append(stop_mid_batch)


connection_created.connect(install)

from celery.__main__ import main

sys.argv[0] = "celery"
sys.exit(main())
"""


# --- the fleet -----------------------------------------------------------------------------------


@dataclass
class Fleet:
    agent: ManagedObject
    group: ManagedObject
    device_ids: list[int]


def build_fleet(size: int) -> Fleet:
    """An agent with `size` child devices, all assets of one group. The agent and the group go
    through the inventory service; the devices and references are bulk inserts with the flag
    columns set as `ManagedObject.refresh_flags` sets them."""
    agent = inventory_services.managed_object_create(
        owner="admin",
        data={"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )
    group = inventory_services.managed_object_create(
        owner="admin", data={"name": "Fleet", "c8y_IsDeviceGroup": {}}
    )
    devices = []
    for index in range(size):
        device = ManagedObject(
            name=f"Device {index}", type="c8y_Linux", owner="admin", fragments={"c8y_IsDevice": {}}
        )
        device.refresh_flags()
        devices.append(device)
    devices = ManagedObject.objects.bulk_create(devices, batch_size=1000)
    ManagedObjectReference.objects.bulk_create(
        [
            ManagedObjectReference(parent=parent, child=device, relation=relation)
            for device in devices
            for parent, relation in ((agent, Relation.DEVICE), (group, Relation.ASSET))
        ],
        batch_size=2000,
    )
    return Fleet(agent=agent, group=group, device_ids=sorted(device.pk for device in devices))


def create_bulk(fleet: Fleet) -> BulkOperation:
    bulk = bulk_operation_create(
        data={
            "groupId": fleet.group.pk,
            "startDate": timezone.now().isoformat(),
            "creationRamp": 0,
            "operationPrototype": {"description": "Restart", "c8y_Restart": {}},
        }
    )
    assert bulk.target_count == len(fleet.device_ids)
    return bulk


def children(bulk: BulkOperation) -> Any:
    return Operation.objects.filter(bulk_operation_id=bulk.pk)


def assert_exactly_one_child_per_device(bulk: BulkOperation, fleet: Fleet) -> None:
    duplicates = list(
        children(bulk).values("device_id").annotate(n=Count("id")).filter(n__gt=1)[:10]
    )
    assert duplicates == []
    assert sorted(children(bulk).values_list("device_id", flat=True)) == fleet.device_ids
    assert set(children(bulk).values_list("status", flat=True)) == {OperationStatus.PENDING}
    assert set(children(bulk).values_list("agent_id", flat=True)) == {fleet.agent.pk}
    bulk.refresh_from_db()
    assert (bulk.status, bulk.next_index, bulk.dropped) == (
        BulkStatus.COMPLETED,
        len(fleet.device_ids),
        0,
    )
    # The progress deltas were written in the same transactions as the children.
    assert bulk_operation_progress(bulk_operations_with_progress().get(pk=bulk.pk)) == {
        "pending": len(fleet.device_ids),
        "failed": 0,
        "executing": 0,
        "successful": 0,
    }


# --- real workers ----------------------------------------------------------------------------


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        while " ready." not in self.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def results(self) -> list[int]:
        """The targets each finished run of the ramp processed, from the log."""
        return [int(value) for value in FINISHED_RUN.findall(self.log())]

    def wait_stopped(self) -> None:
        """Until the process has stopped itself (STOP_AFTER_CHILD_INSERTS)."""
        deadline = time.monotonic() + WAIT
        while True:
            pid, status = os.waitpid(self.process.pid, os.WNOHANG | os.WUNTRACED)
            if pid and os.WIFSTOPPED(status):
                return
            assert not pid, f"the worker ended instead of stopping\n{self.log()}"
            assert time.monotonic() < deadline, f"the worker never stopped\n{self.log()}"
            time.sleep(0.01)


class Workers:
    """Starts `celery worker` processes on one queue of its own; stops them all, and removes the
    queue's keys from Redis, at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.queue = f"test-bulk-{uuid.uuid4().hex[:12]}"
        self.tmp_path = tmp_path
        self.started: list[Worker] = []
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
        env.update(
            DATABASE_URL=database_url(),
            REDIS_URL=settings.REDIS_URL,
            DJANGO_SETTINGS_MODULE="deviceplatform.settings",
        )
        self.env = env

    def start(self, *, stop_after_child_inserts: int = 0) -> Worker:
        name = f"w{len(self.started) + 1}"
        log_path = self.tmp_path / f"{self.queue}-{name}.log"
        env = dict(self.env, STOP_AFTER_CHILD_INSERTS=str(stop_after_child_inserts))
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    BOOT,
                    "-A",
                    "deviceplatform",
                    "worker",
                    "--pool",
                    "solo",
                    "--concurrency",
                    "1",
                    "--prefetch-multiplier",
                    "1",
                    "-Q",
                    self.queue,
                    "-n",
                    f"{self.queue}-{name}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel",
                    "INFO",
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(name=name, process=process, log_path=log_path)
        self.started.append(worker)
        return worker

    def send(self) -> None:
        """One beat tick of the ramp, with small batches so it spans many transactions."""
        advance_bulk_operations.apply_async(kwargs={"batch_size": BATCH}, queue=self.queue)

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait(timeout=30)
        self._forget_queue()

    def _forget_queue(self) -> None:
        """A SIGKILLed worker leaves its message unacked; drop it and the queue's keys so nothing
        is restored into a queue that nobody consumes any more."""
        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            # The queue itself and kombu's binding keys for it (names carry the queue's name).
            stale = list(client.scan_iter(match=f"*{self.queue}*"))
            if stale:
                client.delete(*stale)
            for tag, payload in client.hscan_iter("unacked"):
                try:
                    routing_key = json.loads(payload)[2]
                except (ValueError, IndexError, TypeError):
                    continue
                if routing_key == self.queue:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
        finally:
            client.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


def tick_until_completed(workers: Workers, bulk: BulkOperation, *, every: float = 0.25) -> None:
    """Send the task like beat does, every `every` seconds, until the bulk operation completes."""
    deadline = time.monotonic() + WAIT
    next_tick = 0.0
    while True:
        if BulkOperation.objects.get(pk=bulk.pk).status == BulkStatus.COMPLETED:
            return
        logs = "\n".join(worker.log()[-3000:] for worker in workers.started)
        assert time.monotonic() < deadline, f"bulk operation never completed\n{logs}"
        if time.monotonic() >= next_tick:
            workers.send()
            next_tick = time.monotonic() + every
        time.sleep(0.02)


# --- tests ---------------------------------------------------------------------------------------


def test_worker_killed_mid_ramp_leaves_no_partial_batch_and_a_restart_finishes_exactly_once(
    workers: Workers,
) -> None:
    fleet = build_fleet(FLEET)
    bulk = create_bulk(fleet)
    # Well into the ramp, the worker stops itself in the middle of a batch (its children
    # inserted, not committed), and is SIGKILLed there: no chance to commit or clean up.
    batches = FLEET // 5 // BATCH
    first = workers.start(stop_after_child_inserts=batches)
    workers.send()
    first.wait_stopped()
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=30)

    if connection.vendor == "postgresql":
        # Sequences are not transactional: the killed batch drew IDs that no row has.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT last_value FROM pg_sequences WHERE sequencename = %s",
                [GLOBAL_ID_SEQUENCE],
            )
            (last_id,) = cursor.fetchone()
        assert last_id > children(bulk).aggregate(Max("id"))["id__max"]
    bulk.refresh_from_db()
    created = children(bulk).count()
    # The batches before the killed one, and nothing of it.
    assert created == (batches - 1) * BATCH
    assert bulk.status == BulkStatus.IN_PROGRESS
    # Whole batches only: the children are exactly the processed targets.
    assert created == bulk.next_index - bulk.dropped
    assert created % BATCH == 0
    assert (
        bulk_operation_progress(bulk_operations_with_progress().get(pk=bulk.pk))["pending"]
        == created
    )
    assert first.results() == []  # the killed run never finished

    second = workers.start()
    tick_until_completed(workers, bulk)

    assert_exactly_one_child_per_device(bulk, fleet)
    # The restarted worker created exactly the rest, once, across all of its runs.
    second.process.terminate()
    second.process.wait(timeout=30)
    assert sum(second.results()) == FLEET - created


def test_two_workers_running_the_ramp_at_once_create_one_child_per_device(
    workers: Workers,
) -> None:
    fleet = build_fleet(FLEET)
    bulk = create_bulk(fleet)
    pair = [workers.start(), workers.start()]
    for worker in pair:
        worker.wait_ready()

    # Each solo worker with prefetch 1 takes one of these at once; further ticks keep both busy.
    workers.send()
    tick_until_completed(workers, bulk, every=0.05)

    assert_exactly_one_child_per_device(bulk, fleet)
    for worker in pair:
        worker.process.terminate()  # warm shutdown: the current run finishes and is logged
    for worker in pair:
        worker.process.wait(timeout=30)
    # Every target was processed by exactly one run of exactly one worker.
    assert sum(sum(worker.results()) for worker in pair) == FLEET


def test_two_threads_advancing_the_same_bulk_operation_create_one_child_per_device() -> None:
    size = 600
    fleet = build_fleet(size)
    bulk = create_bulk(fleet)
    barrier = threading.Barrier(2)
    processed: list[Any] = [None, None]

    def ramp(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            total = 0
            deadline = time.monotonic() + WAIT
            while BulkOperation.objects.get(pk=bulk.pk).status != BulkStatus.COMPLETED:
                assert time.monotonic() < deadline
                total += bulk_operations_advance(batch_size=25)
            processed[index] = total
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread below
            processed[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=ramp, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert not any(thread.is_alive() for thread in threads)

    assert not [result for result in processed if isinstance(result, BaseException)], processed
    assert sum(processed) == size
    assert_exactly_one_child_per_device(bulk, fleet)
