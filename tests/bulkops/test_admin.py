"""The bulk operations admin: progress bars from the counters, filters and search, the prototype and
the drill-down to the child operations, rescheduling through `bulk_operation_update` (refusals are
form errors), cancel and reschedule-now actions through the services, no delete. Creating
(tests/bulkops/test_admin_create.py) and live progress (test_admin_live.py) have their own."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.test import Client
from django.urls import reverse

from bulkops.models import BulkOperation, BulkStatus
from bulkops.services import bulk_operation_create, bulk_operations_advance
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import operation_update
from deviceplatform.api.dates import format_datetime
from inventory.models import ManagedObject, Relation
from inventory.services import managed_object_add_children, managed_object_create
from tests.helpers import shown_messages
from tests.inventory.test_admin import form_data

pytestmark = pytest.mark.django_db

T0 = datetime(2024, 1, 1, 12, tzinfo=UTC)
FUTURE = datetime(2099, 6, 1, 8, 30, tzinfo=UTC)
CHANGELIST = reverse("admin:bulkops_bulkoperation_changelist")
OPERATIONS = reverse("admin:devicecontrol_operation_changelist")
PROTOTYPE = {"description": "Restart <device>", "c8y_Restart": {"delay": 5}}


def change_url(bulk: BulkOperation) -> str:
    return reverse("admin:bulkops_bulkoperation_change", args=[bulk.pk])


def listed(response: Any) -> list[int]:
    assert response.status_code == 200, response.status_code
    return [bulk.pk for bulk in response.context["cl"].result_list]


def bar(page: str, bulk: BulkOperation) -> str:
    """The progress bar of `bulk`'s changelist row."""
    row = re.search(
        rf'<tr[^>]*>(?:(?!</tr>).)*?value="{bulk.pk}"(?:(?!</tr>).)*</tr>', page, flags=re.S
    )
    assert row is not None, f"no row for {bulk.pk}"
    return row.group(0)


def segments(fragment: str) -> dict[str, tuple[int, float]]:
    """{label: (count, width %)} of the bar's segments."""
    found = re.findall(
        r'class="bulk-progress-[a-z-]+" title="([a-z ]+): (\d+)" '
        r'style="display: inline-block; height: 100%; width: ([\d.]+)%',
        fragment,
    )
    return {label: (int(count), float(width)) for label, count, width in found}


def new_object(name: str, **fragments: Any) -> ManagedObject:
    return managed_object_create(owner="admin", data={"name": name, **fragments}, now=T0)


@pytest.fixture
def agent() -> ManagedObject:
    return new_object("Gateway", c8y_IsDevice={}, com_cumulocity_model_Agent={})


def new_group(name: str, devices: list[ManagedObject]) -> ManagedObject:
    group = new_object(name, c8y_IsDeviceGroup={})
    if devices:
        managed_object_add_children(parent=group, relation=Relation.ASSET, children=devices)
    return group


def new_devices(count: int, agent: ManagedObject | None, prefix: str = "Pump") -> list:
    devices = [new_object(f"{prefix} {i}", c8y_IsDevice={}) for i in range(count)]
    if agent is not None and devices:
        managed_object_add_children(parent=agent, relation=Relation.DEVICE, children=devices)
    return devices


def new_bulk(group: ManagedObject, *, ramp: float = 10, start: datetime = T0) -> BulkOperation:
    return bulk_operation_create(
        data={
            "groupId": str(group.pk),
            "startDate": format_datetime(start),
            "creationRamp": ramp,
            "operationPrototype": PROTOTYPE,
        },
        now=T0,
    )


def children(bulk: BulkOperation) -> dict[int, Operation]:
    """The child operations by device ID."""
    return {op.device_id: op for op in Operation.objects.filter(bulk_operation_id=bulk.pk)}


def set_status(operation: Operation, status: str) -> None:
    operation_update(operation_id=operation.pk, data={"status": status}, now=T0)


@pytest.fixture
def running(agent: ManagedObject) -> BulkOperation:
    """Five targets, ramp 10 s, advanced to T0+35 s: four children exist. The first device has no
    agent (FAILED child), then one EXECUTING, one SUCCESSFUL, one PENDING; one not yet created."""
    orphan = new_devices(1, None, prefix="Orphan")
    devices = orphan + new_devices(4, agent)
    group = new_group("Fleet", devices)
    bulk = new_bulk(group)
    bulk_operations_advance(now=T0 + timedelta(seconds=35))
    made = children(bulk)
    assert len(made) == 4
    assert made[devices[0].pk].status == OperationStatus.FAILED
    set_status(made[devices[1].pk], OperationStatus.EXECUTING)
    set_status(made[devices[2].pk], OperationStatus.EXECUTING)
    set_status(made[devices[2].pk], OperationStatus.SUCCESSFUL)
    bulk.refresh_from_db()
    assert bulk.status == BulkStatus.IN_PROGRESS
    return bulk


@pytest.fixture
def completed(agent: ManagedObject) -> BulkOperation:
    """Two targets with ramp 0, both created and SUCCESSFUL."""
    devices = new_devices(2, agent, prefix="Valve")
    bulk = new_bulk(new_group("Valves", devices), ramp=0)
    bulk_operations_advance(now=T0)
    for operation in children(bulk).values():
        set_status(operation, OperationStatus.SUCCESSFUL)
    bulk.refresh_from_db()
    assert bulk.status == BulkStatus.COMPLETED
    return bulk


@pytest.fixture
def scheduled(agent: ManagedObject) -> BulkOperation:
    """Three targets starting in the future: ACTIVE, nothing created."""
    return new_bulk(new_group("Later", new_devices(3, agent, prefix="Fan")), start=FUTURE)


# --- changelist ------------------------------------------------------------------------------


def test_changelist_shows_columns_and_progress_bars_with_the_right_counts(
    admin_client: Client,
    running: BulkOperation,
    completed: BulkOperation,
    scheduled: BulkOperation,
) -> None:
    response = admin_client.get(CHANGELIST)

    assert listed(response) == [scheduled.pk, completed.pk, running.pk]
    page = response.content.decode()

    row = bar(page, running)
    group_page = reverse("admin:inventory_managedobject_change", args=[running.group_id])
    assert f'<a href="{group_page}">Fleet [{running.group_id}]</a>' in row
    assert "IN_PROGRESS" in row
    assert "EXECUTING_WITH_ERRORS" in row
    assert segments(row) == {
        "successful": (1, 20.0),
        "failed": (1, 20.0),
        "executing": (1, 20.0),
        "pending": (1, 20.0),
        "not yet created": (1, 20.0),
    }
    tooltip = "successful: 1, failed: 1, executing: 1, pending: 1, not yet created: 1 (all: 5)"
    assert f'title="{tooltip}"' in row
    assert ">2/5<" in row  # finished (successful + failed) of all

    done = bar(page, completed)
    assert "SUCCESSFUL" in done
    assert "COMPLETED" in done
    assert segments(done) == {"successful": (2, 100.0)}
    assert ">2/2<" in done

    waiting = bar(page, scheduled)
    assert "SCHEDULED" in waiting
    assert "ACTIVE" in waiting
    assert segments(waiting) == {"not yet created": (3, 100.0)}
    assert ">0/3<" in waiting


def test_progress_bar_follows_the_children_on_every_load(
    admin_client: Client, running: BulkOperation
) -> None:
    pending = Operation.objects.get(bulk_operation_id=running.pk, status=OperationStatus.PENDING)
    set_status(pending, OperationStatus.FAILED)
    bulk_operations_advance(now=T0 + timedelta(seconds=45))  # the last target is created

    row = bar(admin_client.get(CHANGELIST).content.decode(), running)

    assert segments(row) == {
        "successful": (1, 20.0),
        "failed": (2, 40.0),
        "executing": (1, 20.0),
        "pending": (1, 20.0),
    }


def test_an_empty_group_shows_no_targets(admin_client: Client, agent: ManagedObject) -> None:
    bulk = new_bulk(new_group("Empty", []))

    row = bar(admin_client.get(CHANGELIST).content.decode(), bulk)

    assert "no targets" in row
    assert ">0/0<" in row


def test_filters_by_status_and_general_status(
    admin_client: Client,
    running: BulkOperation,
    completed: BulkOperation,
    scheduled: BulkOperation,
) -> None:
    assert listed(admin_client.get(CHANGELIST, {"status__exact": "ACTIVE"})) == [scheduled.pk]
    assert listed(admin_client.get(CHANGELIST, {"status__exact": "COMPLETED"})) == [completed.pk]
    by_general = {
        "SCHEDULED": [scheduled.pk],
        "EXECUTING_WITH_ERRORS": [running.pk],
        "SUCCESSFUL": [completed.pk],
        "FAILED": [],
        "CANCELED": [],
    }
    for value, expected in by_general.items():
        assert listed(admin_client.get(CHANGELIST, {"general_status": value})) == expected, value


def test_search_by_id_group_id_and_failed_parent(
    admin_client: Client, running: BulkOperation, completed: BulkOperation
) -> None:
    retry = bulk_operation_create(
        data={
            "failedParentId": str(running.pk),
            "startDate": format_datetime(FUTURE),
            "creationRamp": 1,
            "operationPrototype": PROTOTYPE,
        },
        now=T0,
    )

    assert listed(admin_client.get(CHANGELIST, {"q": str(completed.pk)})) == [completed.pk]
    assert listed(admin_client.get(CHANGELIST, {"q": str(running.group_id)})) == [running.pk]
    # A bulk operation's ID also finds the retries of its failures.
    assert listed(admin_client.get(CHANGELIST, {"q": str(running.pk)})) == [retry.pk, running.pk]
    assert listed(admin_client.get(CHANGELIST, {"q": "Fleet"})) == []
    assert listed(admin_client.get(CHANGELIST, {"q": "9" * 30})) == []

    page = admin_client.get(CHANGELIST, {"q": str(retry.pk)}).content.decode()
    assert f'<a href="{change_url(running)}">{running.pk}</a>' in page  # the failed parent


def test_changelist_query_count_does_not_grow_with_rows(
    admin_client: Client,
    agent: ManagedObject,
    django_assert_max_num_queries: Any,
) -> None:
    devices = new_devices(3, agent)
    groups = [new_group(f"Group {i}", devices) for i in range(3)]
    for i in range(30):
        new_bulk(groups[i % 3], ramp=i % 2)
    bulk_operations_advance(now=T0 + timedelta(seconds=1))

    # Session, user, two counts, the page (the group names come in it as a subquery).
    with django_assert_max_num_queries(5):
        response = admin_client.get(CHANGELIST)

    assert len(listed(response)) == 30
    assert response.content.decode().count('class="bulk-progress"') == 30


# --- change page -----------------------------------------------------------------------------


def test_change_page_shows_prototype_counters_and_drill_down_links(
    admin_client: Client, running: BulkOperation
) -> None:
    page = admin_client.get(change_url(running)).content.decode()

    assert "&quot;description&quot;: &quot;Restart &lt;device&gt;&quot;" in page
    assert "&quot;c8y_Restart&quot;: {\n    &quot;delay&quot;: 5\n  }" in page
    assert "<tr><th>not yet created</th><td>1</td></tr>" in page
    assert "<tr><th>all</th><td>5</td></tr>" in page
    for status in ("PENDING", "EXECUTING", "SUCCESSFUL", "FAILED"):
        url = f"{OPERATIONS}?bulk_operation_id__exact={running.pk}&amp;status__exact={status}"
        assert f'<a href="{url}">{status} (1)</a>' in page
    assert f'<a href="{OPERATIONS}?bulk_operation_id__exact={running.pk}">all (4)</a>' in page


def test_drill_down_links_list_exactly_the_children(
    admin_client: Client, running: BulkOperation, completed: BulkOperation
) -> None:
    mine = children(running)
    failed = [op.pk for op in mine.values() if op.status == OperationStatus.FAILED]

    by_bulk = admin_client.get(OPERATIONS, {"bulk_operation_id__exact": running.pk})
    by_status = admin_client.get(
        OPERATIONS, {"bulk_operation_id__exact": running.pk, "status__exact": "FAILED"}
    )

    assert by_bulk.status_code == 200
    assert sorted(op.pk for op in by_bulk.context["cl"].result_list) == sorted(
        op.pk for op in mine.values()
    )
    assert [op.pk for op in by_status.context["cl"].result_list] == failed


def test_rescheduling_through_the_form_goes_through_the_service(
    admin_client: Client, running: BulkOperation
) -> None:
    data = form_data(admin_client, change_url(running))
    data.update({"start_date_0": "2099-06-01", "start_date_1": "08:30:00", "creation_ramp": "2.5"})

    response = admin_client.post(change_url(running), data)

    assert response.status_code == 302, response.context["adminform"].form.errors
    running.refresh_from_db()
    assert running.start_date == FUTURE
    assert running.effective_start == FUTURE
    assert running.next_due_at == FUTURE
    assert running.creation_ramp == 2.5
    assert running.first_index == running.next_index == 4  # the rest restarts from the new start
    assert running.status == BulkStatus.IN_PROGRESS


@pytest.mark.parametrize(
    ("ramp", "message"),
    [
        ("-1", "creationRamp must be from 0 to 10000000 seconds"),
        ("1e9", "creationRamp must be from 0 to 10000000 seconds"),
        ("soon", "Enter a number."),
    ],
)
def test_an_invalid_ramp_is_a_form_error_and_writes_nothing(
    admin_client: Client, running: BulkOperation, row_counts: Any, ramp: str, message: str
) -> None:
    before = BulkOperation.objects.filter(pk=running.pk).values().get()
    counts = row_counts()
    data = form_data(admin_client, change_url(running))
    data.update({"start_date_0": "2099-06-01", "creation_ramp": ramp})

    response = admin_client.post(change_url(running), data)

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {"creation_ramp": [message]}
    assert BulkOperation.objects.filter(pk=running.pk).values().get() == before
    assert row_counts() == counts


def test_unchanged_form_writes_nothing(admin_client: Client, scheduled: BulkOperation) -> None:
    before = BulkOperation.objects.filter(pk=scheduled.pk).values().get()

    response = admin_client.post(
        change_url(scheduled), form_data(admin_client, change_url(scheduled))
    )

    assert response.status_code == 302
    assert BulkOperation.objects.filter(pk=scheduled.pk).values().get() == before


def test_a_finished_bulk_operation_is_read_only(
    admin_client: Client, completed: BulkOperation
) -> None:
    response = admin_client.get(change_url(completed))

    form = response.context["adminform"].form
    assert "start_date" not in form.fields
    assert "creation_ramp" not in form.fields
    assert 'name="creation_ramp"' not in response.content.decode()


# --- actions and delete -----------------------------------------------------------------------


def test_cancel_action_cancels_running_ones_and_skips_finished_ones(
    admin_client: Client,
    running: BulkOperation,
    completed: BulkOperation,
    scheduled: BulkOperation,
) -> None:
    response = admin_client.post(
        CHANGELIST,
        {
            "action": "cancel",
            "_selected_action": [running.pk, completed.pk, scheduled.pk],
        },
        follow=True,
    )

    statuses = dict(BulkOperation.objects.values_list("pk", "status"))
    assert statuses == {
        running.pk: BulkStatus.DELETED,
        completed.pk: BulkStatus.COMPLETED,
        scheduled.pk: BulkStatus.DELETED,
    }
    shown = shown_messages(response)
    assert f"Cancelled 2 bulk operation(s): {running.pk}, {scheduled.pk}." in shown
    assert any(m.startswith(f"Skipped 1 bulk operation(s): {completed.pk} (") for m in shown)
    # Existing children keep their status; no more are created.
    bulk_operations_advance(now=T0 + timedelta(hours=1))
    assert len(children(running)) == 4
    assert "CANCELED" in bar(response.content.decode(), running)


def test_reschedule_now_action(
    admin_client: Client, scheduled: BulkOperation, completed: BulkOperation
) -> None:
    response = admin_client.post(
        CHANGELIST,
        {"action": "reschedule_now", "_selected_action": [scheduled.pk, completed.pk]},
        follow=True,
    )

    scheduled.refresh_from_db()
    assert scheduled.start_date < FUTURE
    assert abs(scheduled.effective_start - datetime.now(UTC)) < timedelta(minutes=1)
    assert scheduled.next_due_at == scheduled.effective_start
    shown = shown_messages(response)
    assert f"Rescheduled 1 bulk operation(s): {scheduled.pk}." in shown
    assert any(m.startswith(f"Skipped 1 bulk operation(s): {completed.pk} (") for m in shown)
    # Now due: the ramp creates the first child at once.
    bulk_operations_advance()
    assert len(children(scheduled)) == 1


def test_no_delete(admin_client: Client, scheduled: BulkOperation) -> None:
    changelist = admin_client.get(CHANGELIST)
    page = changelist.content.decode()
    assert 'value="delete_selected"' not in page
    delete = reverse("admin:bulkops_bulkoperation_delete", args=[scheduled.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert BulkOperation.objects.filter(pk=scheduled.pk, status=BulkStatus.ACTIVE).exists()


# --- history: every change names the operator and what changed -------------------------------


def history(bulk: BulkOperation) -> list[tuple[int, str, str]]:
    return [
        (entry.action_flag, entry.user.get_username(), entry.change_message)
        for entry in LogEntry.objects.filter(object_id=str(bulk.pk)).order_by("pk")
    ]


def test_rescheduling_through_the_form_writes_what_changed_to_the_history(
    admin_client: Client, running: BulkOperation
) -> None:
    data = form_data(admin_client, change_url(running))
    data.update({"start_date_0": "2099-06-01", "start_date_1": "08:30:00", "creation_ramp": "2.5"})

    admin_client.post(change_url(running), data)

    assert history(running) == [
        (
            CHANGE,
            "root-admin",
            "Rescheduled by root-admin: start 2024-01-01T12:00:00.000Z -> "
            "2099-06-01T08:30:00.000Z, ramp 10 s -> 2.5 s.",
        )
    ]
    page = admin_client.get(reverse("admin:bulkops_bulkoperation_history", args=[running.pk]))
    assert "Rescheduled by root-admin: start" in page.content.decode()


def test_saving_an_unchanged_or_refused_form_writes_no_history(
    admin_client: Client, running: BulkOperation, scheduled: BulkOperation
) -> None:
    admin_client.post(change_url(scheduled), form_data(admin_client, change_url(scheduled)))
    data = form_data(admin_client, change_url(running))
    data.update({"creation_ramp": "-1"})
    admin_client.post(change_url(running), data)

    assert history(scheduled) == []
    assert history(running) == []


def test_the_actions_write_a_history_entry_for_each_bulk_operation_they_changed(
    admin_client: Client,
    running: BulkOperation,
    completed: BulkOperation,
    scheduled: BulkOperation,
) -> None:
    admin_client.post(
        CHANGELIST, {"action": "reschedule_now", "_selected_action": [scheduled.pk, completed.pk]}
    )
    admin_client.post(
        CHANGELIST,
        {"action": "cancel", "_selected_action": [running.pk, completed.pk, scheduled.pk]},
    )

    scheduled.refresh_from_db()
    [rescheduled, cancelled] = history(scheduled)
    assert rescheduled == (
        CHANGE,
        "root-admin",
        f"Rescheduled by root-admin: start {format_datetime(FUTURE)} -> "
        f"{format_datetime(scheduled.start_date)} (reschedule now).",
    )
    assert cancelled == (
        CHANGE,
        "root-admin",
        "Cancelled by root-admin: status DELETED, 3 device(s) not yet created will get no "
        "operation.",
    )
    assert history(running) == [
        (
            CHANGE,
            "root-admin",
            "Cancelled by root-admin: status DELETED, 1 device(s) not yet created will get no "
            "operation.",
        )
    ]
    assert history(completed) == []  # skipped both times: nothing changed


def test_the_change_page_shows_its_times_as_the_admins_dates(
    admin_client: Client, scheduled: BulkOperation
) -> None:
    """Next due and the ramp error's times in the admin's format (which dates.js shows in the
    browser's zone), not the API's ISO text."""
    BulkOperation.objects.filter(pk=scheduled.pk).update(
        ramp_error="IntegrityError: boom", ramp_error_count=2, ramp_error_at=FUTURE
    )
    page = admin_client.get(change_url(scheduled)).content.decode()

    assert "2099-06-01T08:30:00.000Z" not in page
    assert "last at 2099-06-01 08:30:00 UTC; retried at 2099-06-01 08:30:00 UTC" in page
    assert '<div class="readonly">2099-06-01 08:30:00 UTC</div>' in page  # next due at
