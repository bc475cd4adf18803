"""Realtime events leave in commit order per device (deviceplatform/realtime/events.py): each
committing transaction numbers itself per object just before COMMIT, and the store holds back a
batch until the one before it for the same object arrived (or a timeout passed).

Real commits (`transaction=True`), writers in real threads with their own database connections,
and subscribers on the real store, Redis and the in-process one alike. A "slow publisher" is a
transaction whose on-commit work is stuck right after its commit (a descheduled process, a pause):
an on-commit callback of the test's, registered before the transaction's events, that waits."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from devicecontrol.models import Operation
from devicecontrol.services import operation_create, operation_update, operations_delete
from deviceplatform.models import EventSequence
from inventory.models import ManagedObject
from tests.conftest import Subscribe, Subscriber
from tests.devicecontrol.conftest import (
    Abort,
    add_child_devices,
    call,
    make_device,
    rolled_back,
)

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 30.0  # bounds a hang, never a timing assertion
SEQUENCE_SQL = re.compile(r'INSERT INTO "?deviceplatform_eventsequence"?', re.IGNORECASE)


@pytest.fixture(params=["redis", "memory"])
def watch(request: pytest.FixtureRequest, settings: Any, subscriber: Subscribe) -> Subscribe:
    """`watch(*channels)`: a subscriber on the Redis store, or on the in-process one (the embedded
    default) with REDIS_URL unset."""
    if request.param == "memory":
        settings.REDIS_URL = ""
    return subscriber


@dataclass(frozen=True)
class Setup:
    """A device under an agent, with an operation (committed: every thread sees them)."""

    agent: ManagedObject
    device: ManagedObject
    operation: Operation

    @property
    def pk(self) -> int:
        return self.device.pk

    @property
    def operation_path(self) -> str:
        return f"/devicecontrol/operations/{self.operation.pk}"

    @property
    def object_path(self) -> str:
        return f"/inventory/managedObjects/{self.device.pk}"


@pytest.fixture
def device(db: None) -> Setup:
    agent = make_device("Agent", agent=True)
    device = make_device("Device")
    add_child_devices(agent, device)
    return Setup(agent, device, operation_create(device=device, data={"c8y_Restart": {}}))


@contextmanager
def slow_publisher(committed: threading.Event, go_on: threading.Event) -> Iterator[None]:
    """The next transaction on this thread's connection publishes its events only once `go_on`
    is set; `committed` is set when it has committed. (The waiting callback is registered at the
    transaction's first statement, before any event, and on-commit callbacks run in order.)"""
    registered = False

    def pause() -> None:
        committed.set()
        assert go_on.wait(WAIT)

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        nonlocal registered
        if not registered and connection.in_atomic_block:
            registered = True
            transaction.on_commit(pause)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield


class Writer(threading.Thread):
    """`work()` in a thread of its own (so with a database connection of its own)."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread by outcome()
            self.result = exc
        finally:
            connection.close()

    def outcome(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def put(api: Any, path: str, body: dict[str, Any]) -> None:
    response = call(api, "PUT", path, body)
    assert response.status_code == 200, (response.status_code, response.content[:500])


def summary(message: dict[str, Any]) -> tuple[str, str, Any]:
    """(channel, action, what changed): an operation's status, a managed object's firmware."""
    data = message["data"]["data"]
    return (
        message["channel"],
        message["data"]["realtimeAction"],
        data.get("status") or data.get("c8y_Firmware"),
    )


def seq_of(pk: int) -> int:
    row = EventSequence.objects.filter(object_id=pk).first()
    return 0 if row is None else row.seq


# --- commit order end to end -------------------------------------------------------------------


def test_a_subscriber_sees_one_devices_changes_in_commit_order(
    watch: Subscribe, device: Setup, admin: Any, client_for: Callable[..., Any]
) -> None:
    """Three transactions on one device commit in a known order (each writer starts after the one
    before committed): an operation status update, a managed-object PUT and another status update.
    The first one's publisher is slow, so the second and third reach the store first: they are
    held back until it arrives, and the subscriber sees all three in commit order."""
    listener = watch(f"/operations/{device.pk}", f"/managedobjects/{device.pk}")
    committed, go_on = threading.Event(), threading.Event()

    def first() -> None:
        with slow_publisher(committed, go_on):
            return put(client_for(admin), device.operation_path, {"status": "EXECUTING"})

    writer = Writer(first)
    writer.start()
    try:
        assert committed.wait(WAIT)
        api = client_for(admin)
        put(api, device.object_path, {"c8y_Firmware": {"version": "2.0"}})
        put(api, device.operation_path, {"status": "SUCCESSFUL"})
        assert listener.received() == []  # both published, both waiting for the first
    finally:
        go_on.set()
    writer.outcome()

    assert [summary(m) for m in listener.receive(3)] == [
        (f"/operations/{device.pk}", "UPDATE", "EXECUTING"),
        (f"/managedobjects/{device.pk}", "UPDATE", {"version": "2.0"}),
        (f"/operations/{device.pk}", "UPDATE", "SUCCESSFUL"),
    ]
    assert listener.received() == []


def test_a_stuck_publisher_holds_the_device_back_only_for_the_timeout(
    watch: Subscribe, settings: Any, device: Setup, admin: Any, client_for: Callable[..., Any]
) -> None:
    """The first transaction's publisher is stuck after its commit (as if it died): the next
    change of the device goes out once REALTIME_ORDER_TIMEOUT_MS passed, and the stuck one, when
    it comes after all, at once."""
    settings.REALTIME_ORDER_TIMEOUT_MS = 1000
    listener = watch(f"/operations/{device.pk}", f"/managedobjects/{device.pk}")
    committed, go_on = threading.Event(), threading.Event()

    def first() -> None:
        with slow_publisher(committed, go_on):
            return put(client_for(admin), device.operation_path, {"status": "EXECUTING"})

    writer = Writer(first)
    writer.start()
    try:
        assert committed.wait(WAIT)
        put(client_for(admin), device.object_path, {"c8y_Firmware": {"version": "2.0"}})
        assert listener.received() == []
        # The hub releases it on its own (no later publish) once the timeout passed.
        [late] = listener.receive(1)
        assert summary(late) == (f"/managedobjects/{device.pk}", "UPDATE", {"version": "2.0"})
    finally:
        go_on.set()
    writer.outcome()
    [stuck] = listener.receive(1)
    assert summary(stuck) == (f"/operations/{device.pk}", "UPDATE", "EXECUTING")


@pytest.mark.postgresql
def test_a_transaction_numbers_itself_after_the_one_holding_the_devices_row(
    subscriber: Subscribe, device: Setup, admin: Any, client_for: Callable[..., Any]
) -> None:
    """The first transaction took its number and is about to commit; the second reaches its own
    number meanwhile and waits for the row, so it gets the next number and commits after it.
    (SQLite needs no row lock: its transactions hold the database write lock from BEGIN.)"""
    listener = subscriber(f"/operations/{device.pk}", f"/managedobjects/{device.pk}")
    before = seq_of(device.pk)
    numbered, go_on = threading.Event(), threading.Event()

    def pause_after_numbering(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        result = execute(sql, *args)
        if SEQUENCE_SQL.match(sql):
            numbered.set()
            assert go_on.wait(WAIT)
        return result

    def first() -> None:
        with connection.execute_wrapper(pause_after_numbering):
            return put(client_for(admin), device.operation_path, {"status": "EXECUTING"})

    def second() -> None:
        return put(client_for(admin), device.object_path, {"c8y_Firmware": {"version": "2.0"}})

    holder, waiter = Writer(first), Writer(second)
    holder.start()
    try:
        assert numbered.wait(WAIT)
        waiter.start()
        wait_for_lock_wait()
    finally:
        go_on.set()
    holder.outcome()
    waiter.outcome()

    assert seq_of(device.pk) == before + 2
    assert [summary(m) for m in listener.receive(2)] == [
        (f"/operations/{device.pk}", "UPDATE", "EXECUTING"),
        (f"/managedobjects/{device.pk}", "UPDATE", {"version": "2.0"}),
    ]


def wait_for_lock_wait() -> None:
    """Until a session of this database waits for a row lock in the sequence statement."""
    deadline = time.monotonic() + WAIT
    with connection.cursor() as cursor:
        while True:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO %%eventsequence%%'"
            )
            if cursor.fetchone()[0]:
                return
            assert time.monotonic() < deadline, "the second transaction never waited"
            time.sleep(0.01)


# --- what a transaction takes --------------------------------------------------------------------


def test_the_number_is_taken_last_in_one_statement_in_ascending_order(device: Setup) -> None:
    """The sequence rows are the transaction's last locks, taken in ascending ID order in one
    statement however many devices it touched (here the operations of three devices)."""
    others = [make_device(f"Device {i}") for i in range(2)]
    add_child_devices(device.agent, *others)
    for other in reversed(others):
        operation_create(device=other, data={"c8y_Restart": {}})
    devices = sorted([device.pk, *(o.pk for o in others)])

    numbering: list[tuple[str, Any]] = []

    def record(execute: Callable[..., Any], sql: str, params: Any, *args: Any) -> Any:
        if SEQUENCE_SQL.search(sql):
            numbering.append((sql, params))
        return execute(sql, params, *args)

    with CaptureQueriesContext(connection) as queries, connection.execute_wrapper(record):
        assert operations_delete(queryset=Operation.objects.filter(device_id__in=devices)) == 3

    [(sql, [_, objects])] = numbering
    *_, last, commit = (q["sql"] for q in queries)
    assert (bool(SEQUENCE_SQL.search(last)), commit) == (True, "COMMIT")
    assert json.loads(objects.replace("{", "[").replace("}", "]")) == devices
    assert re.search(r"ORDER BY (k|value) ON CONFLICT", sql)  # locked in ascending order


def test_each_committed_transaction_takes_one_number_per_object(device: Setup) -> None:
    operation = device.operation
    start = seq_of(device.pk)
    operation_update(operation_id=operation.pk, data={"status": "EXECUTING"})
    assert seq_of(device.pk) == start + 1

    with transaction.atomic():  # two services, two batches: one number, one hand-off
        operation_update(operation_id=operation.pk, data={"status": "FAILED"})
        operation_create(device=device.device, data={"c8y_Again": {}})
    assert seq_of(device.pk) == start + 2

    with pytest.raises(Abort):
        rolled_back(lambda: operation_update(operation_id=operation.pk, data={"status": "PENDING"}))
    operation_update(operation_id=operation.pk, data={"status": "PENDING"}, notify=False)
    assert seq_of(device.pk) == start + 2  # neither a rollback nor a quiet change takes one

    row = EventSequence.objects.get(object_id=device.pk)
    assert row.after_ms is not None
    assert 0 <= row.after_ms < 60_000


def test_a_zero_timeout_takes_no_number(device: Setup, settings: Any) -> None:
    """REALTIME_ORDER_TIMEOUT_MS 0 gives the order up, and with it the statement."""
    settings.REALTIME_ORDER_TIMEOUT_MS = 0
    start = seq_of(device.pk)
    with CaptureQueriesContext(connection) as queries:
        operation_update(operation_id=device.operation.pk, data={"status": "EXECUTING"})
    assert not any(SEQUENCE_SQL.search(q["sql"]) for q in queries)
    assert seq_of(device.pk) == start


def test_one_transaction_publishes_once_in_order(
    watch: Subscribe, device: Setup, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    """A transaction whose events were registered in several batches (services with savepoints of
    their own) hands them to the store once, in registration order, after the commit."""
    from deviceplatform.realtime.events import EventBatch

    listener: Subscriber = watch(f"/operations/{device.pk}")
    operation = device.operation
    with transaction.atomic():
        with django_capture_on_commit_callbacks() as callbacks:
            operation_update(operation_id=operation.pk, data={"status": "EXECUTING"})
            created = operation_create(device=device.device, data={"c8y_Second": {}})
        batches = [cb for cb in callbacks if isinstance(cb, EventBatch)]
        assert len(batches) == 2
        assert listener.received() == []
    assert [batch.lead for batch in batches] == [True, False]
    assert batches[0].joined == [batches[1]]
    assert batches[0].order == [(device.pk, seq_of(device.pk), batches[0].order[0][2])]
    assert [
        (m["data"]["realtimeAction"], m["data"]["data"]["id"]) for m in listener.receive(2)
    ] == [
        ("UPDATE", str(operation.pk)),
        ("CREATE", str(created.pk)),
    ]
