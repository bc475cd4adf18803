"""The operations admin: listing, filters and search; status and failure reason changed through
`operation_update`; cancel, retry and delete through the services, each with its realtime events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import OperationEvent, registered_events
from devicecontrol.services import operation_create, operation_update
from inventory.models import ManagedObject, Relation
from inventory.services import (
    managed_object_add_children,
    managed_object_create,
    managed_object_remove_children,
)
from tests.helpers import shown_messages
from tests.inventory.test_admin import form_data

pytestmark = pytest.mark.django_db

PAST = datetime(2024, 1, 1, 12, tzinfo=UTC)
CHANGELIST = reverse("admin:devicecontrol_operation_changelist")


def change_url(operation: Operation) -> str:
    return reverse("admin:devicecontrol_operation_change", args=[operation.pk])


def listed(response: Any) -> list[int]:
    assert response.status_code == 200
    return [operation.pk for operation in response.context["cl"].result_list]


def events(callbacks: list[Callable[[], Any]]) -> list[OperationEvent]:
    return registered_events(callbacks)


def new_agent(name: str) -> ManagedObject:
    return managed_object_create(
        owner="admin",
        data={"name": name, "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
        now=PAST,
    )


def new_device(name: str, agent: ManagedObject) -> ManagedObject:
    device = managed_object_create(
        owner="admin", data={"name": name, "c8y_IsDevice": {}, "c8y_Hardware": {}}, now=PAST
    )
    managed_object_add_children(parent=agent, relation=Relation.DEVICE, children=[device])
    return device


@pytest.fixture
def agent() -> ManagedObject:
    return new_agent("Gateway")


@pytest.fixture
def device(agent: ManagedObject) -> ManagedObject:
    return new_device("Pump 7", agent)


@pytest.fixture
def operation(device: ManagedObject) -> Operation:
    return operation_create(
        device=device, data={"c8y_Restart": {}, "description": "Restart"}, now=PAST
    )


def failed(device: ManagedObject, reason: str = "boom", **fragments: Any) -> Operation:
    created = operation_create(device=device, data=fragments or {"c8y_Restart": {}}, now=PAST)
    return operation_update(
        operation_id=created.pk, data={"status": "FAILED", "failureReason": reason}, now=PAST
    )


# --- changelist ------------------------------------------------------------------------------


def test_changelist_lists_newest_first_with_links_and_fragment_names(
    admin_client: Client, agent: ManagedObject, device: ManagedObject, operation: Operation
) -> None:
    newer = operation_create(device=device, data={"c8y_Firmware": {"version": "2"}})

    response = admin_client.get(CHANGELIST)

    assert listed(response) == [newer.pk, operation.pk]
    page = response.content.decode()
    device_page = reverse("admin:inventory_managedobject_change", args=[device.pk])
    agent_page = reverse("admin:inventory_managedobject_change", args=[agent.pk])
    assert f'<a href="{device_page}">Pump 7 [{device.pk}]</a>' in page
    assert f'<a href="{agent_page}">{agent.pk}</a>' in page
    # One "operation" column: the fragment names (description apart), the description under them.
    assert '<div class="operation-fragments">c8y_Restart</div>' in page
    assert '<div class="operation-secondary">Restart</div>' in page
    assert "c8y_Firmware" in page


def test_changelist_filters_by_status_agent_fragment_and_date(
    admin_client: Client, agent: ManagedObject, device: ManagedObject, operation: Operation
) -> None:
    other_agent = new_agent("Other gateway")
    other_device = new_device("Valve 3", other_agent)
    configuration = operation_create(device=other_device, data={"c8y_Configuration": {}})
    broken = failed(device, c8y_Firmware={"version": "2"})

    assert listed(admin_client.get(CHANGELIST, {"status__exact": "FAILED"})) == [broken.pk]
    assert listed(admin_client.get(CHANGELIST, {"agent": str(other_agent.pk)})) == [
        configuration.pk
    ]
    assert listed(admin_client.get(CHANGELIST, {"agent": str(agent.pk)})) == [
        broken.pk,
        operation.pk,
    ]
    assert listed(admin_client.get(CHANGELIST, {"agent": "not-a-number"})) == []
    assert listed(admin_client.get(CHANGELIST, {"fragment": "c8y_Restart"})) == [operation.pk]
    assert listed(admin_client.get(CHANGELIST, {"fragment": "c8y_Firmware"})) == [broken.pk]
    # DateFieldListFilter's own links carry aware datetimes in this form.
    on_past_day = {
        "creation_time__gte": "2024-01-01 00:00:00+00:00",
        "creation_time__lt": "2024-01-02 00:00:00+00:00",
    }
    assert listed(admin_client.get(CHANGELIST, on_past_day)) == [broken.pk, operation.pk]
    specs = admin_client.get(CHANGELIST).context["cl"].filter_specs
    [today] = [
        params for spec in specs for title, params in getattr(spec, "links", ()) if title == "Today"
    ]
    assert listed(admin_client.get(CHANGELIST, today)) == [configuration.pk]

    # The filters offer the agents by name and the fragment names in use.
    response = admin_client.get(CHANGELIST)
    filters = {spec.title: spec for spec in response.context["cl"].filter_specs}
    assert dict(filters["agent"].lookup_choices) == {
        str(agent.pk): f"Gateway [{agent.pk}]",
        str(other_agent.pk): f"Other gateway [{other_agent.pk}]",
    }
    assert [name for name, _ in filters["fragment"].lookup_choices] == [
        "c8y_Configuration",
        "c8y_Firmware",
        "c8y_Restart",
        "description",
    ]


def test_search_by_ids_device_name_and_exact_fragment_name(
    admin_client: Client, agent: ManagedObject, device: ManagedObject, operation: Operation
) -> None:
    # No digits in the name: the device-name search would find an ID among them (SQLite's IDs
    # restart with every test, so they are small).
    other_device = new_device("Valve C", new_agent("Other gateway"))
    configuration = operation_create(device=other_device, data={"c8y_Configuration": {}})

    def search(term: str) -> list[int]:
        return listed(admin_client.get(CHANGELIST, {"q": term}))

    assert search(str(operation.pk)) == [operation.pk]
    assert search(str(device.pk)) == [operation.pk]
    assert search(str(agent.pk)) == [operation.pk]
    assert search("valve") == [configuration.pk]
    assert search("c8y_Configuration") == [configuration.pk]
    assert search("c8y_Config") == []  # fragment names match exactly
    assert search("9" * 30) == []  # too long for an ID: no database error


def test_changelist_query_count_does_not_grow_with_operations(
    admin_client: Client,
    agent: ManagedObject,
    django_assert_max_num_queries: Callable[..., Any],
) -> None:
    devices = [new_device(f"Device {n}", agent) for n in range(10)]
    for n in range(30):
        operation_create(device=devices[n % 10], data={f"c8y_Command{n % 4}": {"n": n}})

    # Session, user, the agent and fragment filters' samples and agent names, count, page, and
    # the page's retries ("retried as").
    with django_assert_max_num_queries(8):
        response = admin_client.get(CHANGELIST)

    assert len(listed(response)) == 30


# --- change form -----------------------------------------------------------------------------


def test_change_page_shows_fragments_and_read_only_links(
    admin_client: Client, agent: ManagedObject, device: ManagedObject
) -> None:
    original = failed(device)
    retry = operation_create(device=device, data={"c8y_Restart": {}}, retry_of=original)

    page = admin_client.get(change_url(original)).content.decode()

    assert "&quot;c8y_Restart&quot;: {}" in page
    assert reverse("admin:inventory_managedobject_change", args=[device.pk]) in page
    assert reverse("admin:inventory_managedobject_change", args=[agent.pk]) in page
    assert f'retried as <a href="{change_url(retry)}">{retry.pk}</a>' in page
    assert f'retry of <a href="{change_url(original)}">{original.pk}</a>' in (
        admin_client.get(change_url(retry)).content.decode()
    )


def test_status_change_goes_through_the_service_and_emits_an_update(
    admin_client: Client,
    operation: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    data = form_data(admin_client, change_url(operation))
    assert data["status"] == "PENDING"
    data["status"] = "EXECUTING"

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(change_url(operation), data)

    assert response.status_code == 302, response.context and response.context["errors"]
    operation.refresh_from_db()
    assert operation.status == OperationStatus.EXECUTING
    assert operation.status_changed_at > PAST
    assert operation.executing_since == operation.status_changed_at
    [event] = events(callbacks)
    assert (event.action, event.operation_id) == ("UPDATE", operation.pk)
    assert isinstance(event.data, dict)
    assert event.data["status"] == "EXECUTING"
    assert event.data["c8y_Restart"] == {}


def test_failing_with_a_reason_through_the_form(
    admin_client: Client,
    operation: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    data = form_data(admin_client, change_url(operation))
    data.update(status="FAILED", failure_reason="Device unreachable")

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(change_url(operation), data)

    assert response.status_code == 302, response.context and response.context["errors"]
    operation.refresh_from_db()
    assert (operation.status, operation.failure_reason) == ("FAILED", "Device unreachable")
    [event] = events(callbacks)
    assert isinstance(event.data, dict)
    assert event.data["failureReason"] == "Device unreachable"


def test_a_failure_reason_without_failed_is_a_form_error_and_writes_nothing(
    admin_client: Client,
    operation: Operation,
    row_counts: Callable[[], dict[str, int]],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    data = form_data(admin_client, change_url(operation))
    data.update(status="SUCCESSFUL", failure_reason="why not")
    before = row_counts()

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(change_url(operation), data)

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        "failure_reason": ["failureReason is only allowed when the status is FAILED"]
    }
    assert events(callbacks) == []
    assert row_counts() == before
    operation.refresh_from_db()
    assert (operation.status, operation.failure_reason) == ("PENDING", None)
    assert operation.status_changed_at == PAST


def test_leaving_failed_clears_the_reason(
    admin_client: Client,
    device: ManagedObject,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    operation = failed(device, reason="Device unreachable")
    data = form_data(admin_client, change_url(operation))
    assert data["failure_reason"] == "Device unreachable"
    data["status"] = "PENDING"  # the reason is left as shown

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(change_url(operation), data)

    assert response.status_code == 302, response.context and response.context["errors"]
    operation.refresh_from_db()
    assert (operation.status, operation.failure_reason) == ("PENDING", None)
    [event] = events(callbacks)
    assert isinstance(event.data, dict)
    assert event.data["status"] == "PENDING"
    assert "failureReason" not in event.data


def test_a_blank_reason_keeps_the_reason_of_a_failed_operation(
    admin_client: Client, device: ManagedObject
) -> None:
    operation = failed(device, reason="Device unreachable")
    data = form_data(admin_client, change_url(operation))
    data["failure_reason"] = ""  # as the API: FAILED without a reason keeps the stored one

    response = admin_client.post(change_url(operation), data)

    assert response.status_code == 302, response.context and response.context["errors"]
    operation.refresh_from_db()
    assert (operation.status, operation.failure_reason) == ("FAILED", "Device unreachable")


def test_saving_an_unchanged_form_writes_nothing(
    admin_client: Client,
    operation: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    data = form_data(admin_client, change_url(operation))

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(change_url(operation), data)

    assert response.status_code == 302
    assert events(callbacks) == []


# --- actions and delete ----------------------------------------------------------------------


def test_mark_as_failed_cancels_open_operations_only(
    admin_client: Client,
    device: ManagedObject,
    operation: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    executing = operation_create(device=device, data={"c8y_Command": {"text": "ls"}})
    operation_update(operation_id=executing.pk, data={"status": "EXECUTING"})
    done = operation_create(device=device, data={"c8y_Restart": {}})
    operation_update(operation_id=done.pk, data={"status": "SUCCESSFUL"})
    selected = [operation.pk, executing.pk, done.pk]

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(
            CHANGELIST, {"action": "mark_failed", "_selected_action": selected}
        )

    assert response.status_code == 302
    rows = Operation.objects.filter(pk__in=selected).values_list("pk", "status", "failure_reason")
    assert {pk: (status, reason) for pk, status, reason in rows} == {
        operation.pk: ("FAILED", "Cancelled by root-admin"),
        executing.pk: ("EXECUTING", None),  # its agent was asked, and decides
        done.pk: ("SUCCESSFUL", None),
    }
    request = Operation.objects.get(pk=executing.pk).fragments["c8y_CancelRequested"]
    assert request["by"] == "root-admin"
    sent = events(callbacks)
    assert [(e.action, e.operation_id, e.to_agent) for e in sent] == [
        ("UPDATE", operation.pk, False),
        ("UPDATE", executing.pk, True),
    ]
    assert [e.data["status"] for e in sent if isinstance(e.data, dict)] == ["FAILED", "EXECUTING"]
    assert shown_messages(response) == [
        "Cancelled 1 PENDING operation(s): FAILED.",
        f"Asked the agent to cancel 1 EXECUTING operation(s): {executing.pk}. The agent "
        "decides; to force an end, set the status on the operation's page.",
        f"Skipped 1 operation(s) already SUCCESSFUL or FAILED: {done.pk}.",
    ]


def test_retry_reissues_failed_operations_and_skips_the_others(
    admin_client: Client,
    device: ManagedObject,
    operation: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    broken = failed(device, c8y_Firmware={"version": "2"})

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(
            CHANGELIST, {"action": "retry_failed", "_selected_action": [operation.pk, broken.pk]}
        )

    assert response.status_code == 302
    retry = Operation.objects.get(retry_of=broken)
    assert retry.status == OperationStatus.PENDING
    assert retry.fragments == {"c8y_Firmware": {"version": "2"}}
    assert retry.device_id == device.pk
    assert not Operation.objects.filter(retry_of=operation).exists()
    assert [(e.action, e.operation_id) for e in events(callbacks)] == [("CREATE", retry.pk)]
    assert shown_messages(response) == [
        f"Retried 1 operation(s) as new PENDING ones: {broken.pk} → {retry.pk}.",
        f"Skipped 1 operation(s) that are not FAILED: {operation.pk}.",
    ]


def test_retry_refused_by_the_service_is_reported(
    admin_client: Client, agent: ManagedObject, device: ManagedObject
) -> None:
    broken = failed(device)
    # The device loses its agent: a retry can no longer be routed (422 in the API).
    managed_object_remove_children(parent=agent, relation=Relation.DEVICE, child_ids=[device.pk])

    response = admin_client.post(
        CHANGELIST, {"action": "retry_failed", "_selected_action": [broken.pk]}
    )

    assert response.status_code == 302
    assert not Operation.objects.filter(retry_of=broken).exists()
    [message] = shown_messages(response)
    assert message.startswith(f"Could not retry operation {broken.pk}: Device {device.pk} is not")


def test_delete_goes_through_the_service_and_emits_delete(
    admin_client: Client,
    operation: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    url = reverse("admin:devicecontrol_operation_delete", args=[operation.pk])
    assert admin_client.get(url).status_code == 200

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(url, {"post": "yes"})

    assert response.status_code == 302
    assert not Operation.objects.filter(pk=operation.pk).exists()
    assert events(callbacks) == [
        OperationEvent(
            action="DELETE",
            operation_id=operation.pk,
            device_id=operation.device_id,
            agent_id=operation.agent_id,
            data=str(operation.pk),
        )
    ]


def test_bulk_delete_action_emits_one_delete_per_operation(
    admin_client: Client,
    device: ManagedObject,
    operation: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    second = operation_create(device=device, data={"c8y_Restart": {}})
    kept = operation_create(device=device, data={"c8y_Restart": {}})

    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(
            CHANGELIST,
            {
                "action": "delete_selected",
                "_selected_action": [operation.pk, second.pk],
                "post": "yes",
            },
        )

    assert response.status_code == 302
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert sorted((e.action, e.operation_id) for e in events(callbacks)) == [
        ("DELETE", operation.pk),
        ("DELETE", second.pk),
    ]
