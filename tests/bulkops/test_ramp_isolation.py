"""The ramp isolates failures (issue 10, item 3): a bulk operation whose batch fails, for whatever
reason, is rolled back, recorded on the bulk operation (`c8y_RampError`: reason, time, attempts;
REST and admin), retried with back-off and cleared when it advances again; it never stops the
others. Real commits (`transaction=True`): the failures are real rows, not injected exceptions."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from bulkops import services
from bulkops.models import BulkOperation, BulkStatus
from deviceplatform.services import user_upsert
from inventory import services as inventory_services
from tests.bulkops.conftest import (
    BULK,
    PROTOTYPE,
    T0,
    advance,
    at,
    child_device_ids,
    children,
    create_bulk,
    get_bulk,
    make_fleet,
    reload,
)
from tests.devicecontrol.conftest import call
from tests.factories import Clients

pytestmark = pytest.mark.django_db(transaction=True)

BAD_PROTOTYPE = {"c8y.Restart": {}}  # '.' in a fragment name: today's validation refuses it
BAD_REASON = "Invalid fragment name 'c8y.Restart': names may not contain '.', '$' or whitespace"


def store_bad_prototype(bulk: BulkOperation) -> None:
    """A prototype stored before validation refused it (written directly, as an old row is)."""
    BulkOperation.objects.filter(pk=bulk.pk).update(operation_prototype=BAD_PROTOTYPE)


def test_a_failing_bulk_operation_is_recorded_retried_with_back_off_and_blocks_nobody(
    bapi: Clients,
) -> None:
    broken_fleet, fleet = make_fleet(2), make_fleet(3)
    broken = create_bulk(broken_fleet.group, creationRamp=0)  # due first, claimed first
    healthy = create_bulk(fleet.group, creationRamp=1)
    store_bad_prototype(broken)

    assert advance(0) == 1  # the healthy one's first child; the broken one failed
    assert children(broken) == []
    assert child_device_ids(healthy) == fleet.device_ids[:1]
    row = reload(broken)
    assert (row.status, row.next_index) == (BulkStatus.ACTIVE, 0)
    assert (row.ramp_error, row.ramp_error_at, row.ramp_error_count) == (BAD_REASON, T0, 1)
    assert row.next_due_at == at(services.RAMP_RETRY_FIRST_SECONDS)

    # Left alone until its back-off is over; the other one goes on at its pace.
    advance(2)
    assert reload(broken).ramp_error_count == 1
    assert child_device_ids(healthy) == fleet.device_ids
    advance(5)
    row = reload(broken)
    assert (row.ramp_error_count, row.ramp_error_at) == (2, at(5))
    assert row.next_due_at == at(5 + 2 * services.RAMP_RETRY_FIRST_SECONDS)

    body = get_bulk(bapi["bulk_reader"], broken.pk)
    assert body["c8y_RampError"] == {
        "reason": BAD_REASON,
        "time": "2031-03-01T12:00:05.000Z",
        "attempts": 2,
    }
    assert body["status"] == "ACTIVE"
    assert "c8y_RampError" not in get_bulk(bapi["bulk_reader"], healthy.pk)

    # The operator fixes the prototype with a PUT of what GET returned (c8y_RampError is
    # read-only and ignored); the PUT reschedules it now and the next run clears the error.
    body["operationPrototype"] = PROTOTYPE
    response = call(bapi["bulk_admin"], "PUT", f"{BULK}/{broken.pk}", body)
    assert response.status_code == 200, response.content
    assert reload(broken).fragments == {}
    advance(6)
    assert child_device_ids(broken) == broken_fleet.device_ids
    row = reload(broken)
    assert (row.status, row.ramp_error, row.ramp_error_at, row.ramp_error_count) == (
        BulkStatus.COMPLETED,
        None,
        None,
        0,
    )
    assert "c8y_RampError" not in get_bulk(bapi["bulk_reader"], broken.pk)


def test_the_admin_shows_and_filters_the_ramp_error(client: Client) -> None:
    fleet = make_fleet(1)
    broken = create_bulk(fleet.group, creationRamp=0)
    fine = create_bulk(fleet.group, creationRamp=0)
    store_bad_prototype(broken)
    advance(0)
    client.force_login(user_upsert(username="root-admin", password="x", is_superuser=True))
    changelist = reverse("admin:bulkops_bulkoperation_changelist")

    page = client.get(changelist).content.decode()
    assert "bulk-ramp-error" in page
    assert "Invalid fragment name &#x27;c8y.Restart&#x27;" in page
    failing = client.get(changelist, {"ramp_error": "yes"})
    assert [bulk.pk for bulk in failing.context["cl"].result_list] == [broken.pk]
    healthy = client.get(changelist, {"ramp_error": "no"})
    assert [bulk.pk for bulk in healthy.context["cl"].result_list] == [fine.pk]
    form = client.get(reverse("admin:bulkops_bulkoperation_change", args=[broken.pk]))
    assert "failed 1 time(s) in a row" in form.content.decode()


def test_every_bulk_operation_failing_still_ends_the_run_at_a_fixed_now() -> None:
    fleets = [make_fleet(1) for _ in range(3)]
    bulks = [create_bulk(fleet.group, creationRamp=0) for fleet in fleets]
    for bulk in bulks:
        store_bad_prototype(bulk)
    assert services.bulk_operations_advance(now=T0) == 0
    assert [reload(bulk).ramp_error_count for bulk in bulks] == [1, 1, 1]
    assert services.bulk_operations_advance(now=T0) == 0  # nothing due before the back-off
    assert [reload(bulk).ramp_error_count for bulk in bulks] == [1, 1, 1]


def test_the_back_off_doubles_up_to_its_ceiling() -> None:
    delays = [services.ramp_retry_delay(n).total_seconds() for n in (1, 2, 3, 7, 8, 9, 1000)]
    assert delays == [5, 10, 20, 320, 600, 600, 600]


@pytest.mark.postgresql  # a date PostgreSQL stores and Python cannot hold
def test_a_row_that_cannot_even_be_loaded_is_set_aside_too(bapi: Clients) -> None:
    """A start date stored before today's validation refused it: 0001-01-01T00:00+01:00 is in
    the year 1 BC in UTC, which PostgreSQL keeps and Python's datetime cannot represent. Loading
    the row fails; the ramp records that on the row (without loading it) and goes on."""
    broken_fleet, fleet = make_fleet(1), make_fleet(2)
    broken = create_bulk(broken_fleet.group, creationRamp=0)
    healthy = create_bulk(fleet.group, creationRamp=0)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE bulkops_bulkoperation SET start_date = '0001-01-01T00:00:00+01:00'"
            " WHERE id = %s",
            [broken.pk],
        )
    assert advance(0) == 2
    assert child_device_ids(healthy) == fleet.device_ids
    assert children(broken) == []
    count, next_due, reason = (
        BulkOperation.objects.filter(pk=broken.pk)
        .values_list("ramp_error_count", "next_due_at", "ramp_error")
        .get()
    )
    assert (count, next_due) == (1, at(services.RAMP_RETRY_FIRST_SECONDS))
    assert reason.startswith("DataError: "), reason  # psycopg: the date is out of Python's range


@pytest.mark.postgresql  # SQLite's IMMEDIATE transactions keep the deleting writer out
def test_a_device_deleted_while_its_child_is_being_inserted_fails_only_its_bulk_operation(
    bapi: Clients,
) -> None:
    """The ramp read the targets' devices; before its batch commits, another transaction deletes
    one of them and commits. The batch's child for it then violates the foreign key at COMMIT
    (PostgreSQL checks it there): that bulk operation is rolled back and recorded, the other one
    is processed, and on the retry the deleted device is dropped."""
    fleet, other = make_fleet(3), make_fleet(2)
    victim_bulk = create_bulk(fleet.group, creationRamp=0)
    other_bulk = create_bulk(other.group, creationRamp=0)
    victim = fleet.devices[1]
    deleted: list[Any] = []

    def delete(device: Any) -> None:
        try:
            deleted.extend(inventory_services.managed_object_delete(managed_object=device))
        finally:
            connection.close()

    def delete_victim_after_the_ramp_read_it(execute, sql, params, many, context):  # noqa: ANN001, ANN202
        result = execute(sql, params, many, context)
        # The ramp's batch reads its targets' devices in one query (bulkops.services).
        reads_devices = (
            sql.startswith("SELECT")
            and '"bulkops_bulkoperationtarget"' in sql
            and '"inventory_managedobject"' in sql
        )
        if reads_devices and not deleted and victim_bulk.pk in (params or ()):
            thread = threading.Thread(target=delete, args=(victim,))
            thread.start()
            thread.join(timeout=30)
            assert deleted == [victim.pk]
        return result

    with connection.execute_wrapper(delete_victim_after_the_ramp_read_it):
        assert advance(0) == 2  # the other bulk operation's two children
    assert deleted == [victim.pk]
    assert children(victim_bulk) == []
    assert child_device_ids(other_bulk) == other.device_ids
    row = reload(victim_bulk)
    assert row.ramp_error_count == 1
    assert row.ramp_error.startswith("IntegrityError: ")
    assert "devicecontrol_operation" in row.ramp_error
    assert get_bulk(bapi["bulk_reader"], victim_bulk.pk)["c8y_RampError"]["attempts"] == 1

    advance(services.RAMP_RETRY_FIRST_SECONDS)
    row = reload(victim_bulk)
    assert child_device_ids(victim_bulk) == [fleet.device_ids[0], fleet.device_ids[2]]
    assert (row.status, row.dropped, row.ramp_error_count) == (BulkStatus.COMPLETED, 1, 0)
    body = get_bulk(bapi["bulk_reader"], victim_bulk.pk)
    assert body["progress"]["all"] == 2
    assert "c8y_RampError" not in body
