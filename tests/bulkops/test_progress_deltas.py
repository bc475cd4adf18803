"""No hot parent row (issue 10, item 6): a child's status change inserts a progress delta and never
writes or locks its bulk operation's row; the beat task folds the deltas into the row, and reads
(folded counters plus unfolded deltas, one statement) stay exact and cheap throughout."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from bulkops import services
from bulkops.models import BulkOperation, BulkProgressDelta
from bulkops.selectors import bulk_operation_progress, bulk_operations_with_progress
from bulkops.tasks import advance_bulk_operations
from devicecontrol import services as dc
from devicecontrol.models import Operation
from tests.bulkops.conftest import (
    BULK,
    Fleet,
    advance,
    at,
    children,
    counted_progress,
    create_bulk,
    get_bulk,
    make_fleet,
    reload,
)
from tests.devicecontrol.conftest import call
from tests.factories import Clients

BULK_ROW = '"bulkops_bulkoperation"'  # quoted: not bulkops_bulkoperationtarget
ROW_LOCKS = (" FOR UPDATE", " FOR NO KEY UPDATE", " FOR SHARE", " FOR KEY SHARE")


def plain_read(sql: str) -> bool:
    return sql.startswith("SELECT") and not any(lock in sql for lock in ROW_LOCKS)


def exact(bulk: BulkOperation) -> dict[str, int]:
    """The counters as reads report them, without `all`."""
    return bulk_operation_progress(bulk_operations_with_progress().get(pk=bulk.pk))


def counted(bulk: BulkOperation) -> dict[str, int]:
    return {key: value for key, value in counted_progress(bulk).items() if key != "all"}


def changes(bulk: BulkOperation) -> dict[str, Callable[[], Any]]:
    """Every way a child's status changes, each on a child of `bulk` (five needed)."""
    first, second, _, fourth, fifth = children(bulk)
    dc.operation_update(operation_id=fourth.pk, data={"status": "FAILED"}, now=at(1))
    dc.operation_update(operation_id=fifth.pk, data={"status": "EXECUTING"}, now=at(1))
    return {
        "update": lambda: dc.operation_update(
            operation_id=first.pk, data={"status": "EXECUTING"}, now=at(2)
        ),
        "delete": lambda: dc.operations_delete(queryset=Operation.objects.filter(pk=second.pk)),
        "expire": lambda: dc.operations_expire(now=at(10**8)),
        "retry": lambda: dc.operation_retry(operation=Operation.objects.get(pk=fourth.pk)),
        "time out": lambda: dc.operations_time_out(now=at(10**8)),
    }


@pytest.mark.django_db
@pytest.mark.parametrize("change", ["update", "delete", "expire", "retry", "time out"])
def test_a_status_change_inserts_a_delta_and_never_touches_the_bulk_row(
    change: str, fleet5: Fleet
) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=0)
    advance(0)
    action = changes(bulk)[change]
    services.bulk_progress_fold()
    with CaptureQueriesContext(connection) as queries:
        action()
    statements = [query["sql"] for query in queries.captured_queries]
    # No write and no lock; a plain read is allowed (a child's retry policy when it fails, README
    # "Automatic retries").
    assert [sql for sql in statements if BULK_ROW in sql and not plain_read(sql)] == []
    inserts = [
        sql for sql in statements if sql.startswith('INSERT INTO "bulkops_bulkprogressdelta"')
    ]
    # One row per transaction; a retry writes the superseded attempt's and the new one's.
    assert len(inserts) == (2 if change == "retry" else 1), statements
    assert exact(bulk) == counted(bulk)


@pytest.mark.django_db
def test_the_beat_task_folds_the_deltas_and_reads_do_not_change(
    bapi: Clients, fleet5: Fleet
) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=0)
    advance(0)
    for action in changes(bulk).values():
        action()
    before = get_bulk(bapi["bulk_reader"], bulk.pk)
    assert before["progress"] == counted_progress(bulk)
    assert BulkProgressDelta.objects.filter(bulk_operation_id=bulk.pk).count() > 1
    row = reload(bulk)
    assert bulk_operation_progress(row) == counted(bulk)  # unlocked: columns + delta query
    advance_bulk_operations()
    assert not BulkProgressDelta.objects.exists()
    row = reload(bulk)
    assert {name: getattr(row, name) for name in counted(bulk)} == counted(bulk)
    assert get_bulk(bapi["bulk_reader"], bulk.pk) == before
    assert services.bulk_progress_fold() == 0  # idempotent


@pytest.mark.django_db
def test_deltas_of_a_bulk_operation_deleted_meanwhile_are_dropped(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    BulkOperation.objects.filter(pk=bulk.pk).delete()
    assert services.bulk_progress_fold() == 1
    assert not BulkProgressDelta.objects.exists()


@pytest.mark.django_db
def test_reads_cost_the_same_with_many_unfolded_deltas(
    bapi: Clients, django_assert_max_num_queries: Callable[..., Any]
) -> None:
    fleet = make_fleet(6)
    bulks = [create_bulk(fleet.group, creationRamp=0) for _ in range(4)]
    advance(0)
    for bulk in bulks:
        for operation in children(bulk):
            dc.operation_update(operation_id=operation.pk, data={"status": "EXECUTING"})
            dc.operation_update(operation_id=operation.pk, data={"status": "SUCCESSFUL"})
    assert BulkProgressDelta.objects.count() == 4 * (1 + 12)
    client = bapi["bulk_reader"]
    get_bulk(client, bulks[0].pk)  # the user exists before counting
    with django_assert_max_num_queries(4):
        body = get_bulk(client, bulks[0].pk)
    assert body["progress"]["successful"] == 6
    with django_assert_max_num_queries(5):
        response = call(client, "GET", f"{BULK}?pageSize=100&withTotalPages=true")
    assert [b["progress"]["successful"] for b in response.json()["bulkOperations"]] == [6] * 4
    with django_assert_max_num_queries(5):
        response = call(client, "GET", f"{BULK}?generalStatus=SUCCESSFUL&withTotalPages=true")
    assert [b["id"] for b in response.json()["bulkOperations"]] == [str(b.pk) for b in bulks]
    assert response.json()["statistics"]["totalPages"] == 1


@pytest.mark.postgresql  # row locks
@pytest.mark.django_db(transaction=True)
def test_status_changes_go_on_while_the_ramp_holds_the_bulk_row(fleet5: Fleet) -> None:
    """The ramp holds the bulk operation's row (FOR UPDATE) while it creates a batch. Status
    changes of its children must not wait for it: they neither update nor lock that row (a
    foreign key would lock it FOR KEY SHARE). Folding skips the held row and folds it later."""
    bulk = create_bulk(fleet5.group, creationRamp=0)
    advance(0)
    held, release = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        try:
            with transaction.atomic():
                BulkOperation.objects.select_for_update().get(pk=bulk.pk)
                held.set()
                release.wait(timeout=30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert held.wait(timeout=10)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '5s'")  # a wait on the row fails, not hangs
        for operation in children(bulk):
            dc.operation_update(operation_id=operation.pk, data={"status": "SUCCESSFUL"})
        assert services.bulk_progress_fold() == 0  # the row is held: left for later
        assert exact(bulk)["successful"] == 5
    finally:
        release.set()
        holder.join(timeout=30)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = 0")
    assert services.bulk_progress_fold() == 6  # the ramp's delta and the five changes
    assert reload(bulk).successful == 5


@pytest.mark.postgresql  # concurrent writers on real connections
@pytest.mark.django_db(transaction=True)
def test_reads_stay_exact_while_agents_change_children_and_folds_commit() -> None:
    """8 agents change the statuses of their children of one bulk operation as fast as they can
    while a folder folds in a loop; every read in the meantime sees each device exactly once
    (`all` = the targets, counters never negative), and the end state is a direct count."""
    size, agents = 48, 8
    fleet = make_fleet(size)
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    ops = [operation.pk for operation in children(bulk)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def agent(mine: list[int]) -> None:
        try:
            statuses = itertools.cycle(["EXECUTING", "SUCCESSFUL", "FAILED", "PENDING"])
            while not stop.is_set():
                status = next(statuses)
                for pk in mine:
                    dc.operation_update(operation_id=pk, data={"status": status})
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)
        finally:
            connection.close()

    def folder() -> None:
        try:
            while not stop.is_set():
                services.bulk_progress_fold()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=agent, args=(ops[i::agents],)) for i in range(agents)] + [
        threading.Thread(target=folder)
    ]
    for thread in threads:
        thread.start()
    reads = 0
    deadline = time.monotonic() + 4
    try:
        while time.monotonic() < deadline:
            counts = exact(bulk)
            assert sum(counts.values()) == size, counts
            assert min(counts.values()) >= 0, counts
            reads += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    assert reads > 10
    assert exact(bulk) == counted(bulk)
    services.bulk_progress_fold()
    row = reload(bulk)
    assert {name: getattr(row, name) for name in counted(bulk)} == counted(bulk)
