"""Sending operations from the admin (a device's page and the operations list), a device's
operations and an agent's queue on their pages with retry and cancel buttons, the device list's
operation columns, and the admin history every one of these writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import registered_events
from devicecontrol.services import operation_create, operation_update
from inventory.models import ManagedObject
from inventory.services import managed_object_create
from tests.devicecontrol.test_admin import failed, new_agent, new_device
from tests.helpers import run_together, shown_messages

pytestmark = pytest.mark.django_db

ADD = reverse("admin:devicecontrol_operation_add")
DEVICES = reverse("admin:inventory_managedobject_changelist")


def send_url(device: ManagedObject) -> str:
    return reverse("admin:inventory_managedobject_send_operation", args=[device.pk])


def device_page(device: ManagedObject) -> str:
    return reverse("admin:inventory_managedobject_change", args=[device.pk])


def entries(obj: Any) -> list[tuple[str, int, str]]:
    return [
        (entry.user.username, entry.action_flag, entry.change_message)
        for entry in LogEntry.objects.filter(object_id=str(obj.pk)).order_by("id")
    ]


@pytest.fixture
def agent() -> ManagedObject:
    return new_agent("Gateway")


@pytest.fixture
def device(agent: ManagedObject) -> ManagedObject:
    return new_device("Pump 7", agent)


# --- sending ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"template": "c8y_Restart"}, {"c8y_Restart": {}, "description": "Restart device"}),
        (
            {
                "template": "c8y_Firmware",
                "firmware_name": "core",
                "firmware_version": "2.1",
                "firmware_url": "http://files/core-2.1.bin",
            },
            {
                "c8y_Firmware": {
                    "name": "core",
                    "version": "2.1",
                    "url": "http://files/core-2.1.bin",
                },
                "description": "Update firmware to: core (2.1)",
            },
        ),
        (
            {
                "template": "c8y_SoftwareUpdate",
                "software": "nginx, 1.24, http://files/nginx.deb\n\nold-tool, 0.9, , delete\n",
                "description": "Web server",
            },
            {
                "c8y_SoftwareUpdate": [
                    {
                        "name": "nginx",
                        "version": "1.24",
                        "url": "http://files/nginx.deb",
                        "action": "install",
                    },
                    {"name": "old-tool", "version": "0.9", "action": "delete"},
                ],
                "description": "Web server",
            },
        ),
        (
            {"template": "c8y_Configuration", "configuration": "  interval=10\n"},
            {
                "c8y_Configuration": {"config": "  interval=10\n"},
                "description": "Send configuration",
            },
        ),
        (
            {"template": "c8y_Command", "command": "uptime"},
            {"c8y_Command": {"text": "uptime"}, "description": "Execute shell command"},
        ),
        (  # what a browser posts: every field, the hidden ones as rendered or as left
            {"template": "c8y_Restart", "body": "{}", "software": "bad", "firmware_name": "x"},
            {"c8y_Restart": {}, "description": "Restart device"},
        ),
        (
            {"template": "json", "body": '{"c8y_Custom": {"x": 1}, "status": "SUCCESSFUL"}'},
            {"c8y_Custom": {"x": 1}},
        ),
    ],
)
def test_send_from_a_device_page_creates_the_operation_through_the_service(
    admin_client: Client,
    agent: ManagedObject,
    device: ManagedObject,
    fields: dict[str, str],
    expected: dict[str, Any],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = admin_client.post(send_url(device), fields)

    assert response.status_code == 302
    assert response["Location"] == device_page(device) + "#operations"
    operation = Operation.objects.get()
    assert operation.device_id == device.pk
    assert operation.agent_id == agent.pk
    assert operation.status == OperationStatus.PENDING  # read-only keys in JSON are ignored
    assert operation.fragments == expected
    assert [(e.action, e.operation_id) for e in registered_events(callbacks)] == [
        ("CREATE", operation.pk)
    ]
    [(user, flag, message)] = entries(operation)
    assert (user, flag) == ("root-admin", ADDITION)
    assert message.startswith(f"Sent to device {device.pk} through agent {agent.pk}: ")
    assert json.loads(message.split(": ", 1)[1]) == expected
    assert any(
        "Sent operation <a" in m and f">{operation.pk}</a>" in m for m in shown_messages(response)
    )


def test_send_page_offers_the_supported_operations_first(
    admin_client: Client, agent: ManagedObject
) -> None:
    device = new_device("Meter", agent)
    from inventory.services import managed_object_update

    managed_object_update(
        managed_object_id=device.pk,
        data={"c8y_SupportedOperations": ["c8y_Command", "c8y_LogfileRequest", 7]},
    )

    response = admin_client.get(send_url(device))

    assert response.status_code == 200
    choices = [value for value, _ in response.context["form"].fields["template"].choices]
    assert choices == [
        "c8y_Command",
        "c8y_LogfileRequest",
        "c8y_Restart",
        "c8y_Firmware",
        "c8y_SoftwareUpdate",
        "c8y_Configuration",
        "json",
    ]
    form = response.context["form"]
    assert form.fields["template"].initial == "c8y_Command"
    assert form.fields["template"].choices[0][1] == "c8y_Command: run a shell command (supported)"
    assert form["body"].value() == "{}"  # rendered so, and a hidden JSON field posts it back
    page = response.content.decode()
    assert "It supports: c8y_Command, c8y_LogfileRequest." in page
    assert "devicecontrol/send_operation" in page  # the script that shows one template's fields

    admin_client.post(send_url(device), {"template": "c8y_LogfileRequest"})
    assert Operation.objects.get().fragments == {"c8y_LogfileRequest": {}}


@pytest.mark.parametrize(
    ("fields", "field", "error"),
    [
        ({"template": "c8y_Firmware", "firmware_name": "core"}, "firmware_version", "Required"),
        ({"template": "c8y_SoftwareUpdate", "software": ""}, "software", "at least one"),
        ({"template": "c8y_SoftwareUpdate", "software": "a, 1, , upgrade"}, "software", "Line 1"),
        ({"template": "c8y_SoftwareUpdate", "software": "a"}, "software", "Line 1"),
        ({"template": "c8y_Command", "command": "  "}, "command", "Required"),
        ({"template": "c8y_Configuration"}, "configuration", "Required"),
        ({"template": "json", "body": ""}, "body", "JSON object"),
        ({"template": "json", "body": "[1]"}, "body", "not an array"),
        ({"template": "json", "body": "{nope"}, "body", "valid JSON"),
        ({"template": "json", "body": '{"a.b": {}}'}, None, "Invalid fragment name"),
        ({"template": "json", "body": '{"executionTimeout": 0}'}, None, "executionTimeout"),
        ({"template": "c8y_Nothing"}, "template", "Select a valid choice"),
    ],
)
def test_send_refusals_show_on_the_form_and_write_nothing(
    admin_client: Client,
    device: ManagedObject,
    fields: dict[str, str],
    field: str | None,
    error: str,
) -> None:
    response = admin_client.post(send_url(device), fields)

    assert response.status_code == 200
    errors = response.context["form"].errors.get(field or "__all__")
    assert errors, response.context["form"].errors
    assert any(error in message for message in errors), errors
    assert not Operation.objects.exists()
    assert not LogEntry.objects.exists()


def test_send_to_a_device_without_agent_is_refused_by_the_service(admin_client: Client) -> None:
    lonely = managed_object_create(owner="admin", data={"name": "Lonely", "c8y_IsDevice": {}})

    page = admin_client.get(send_url(lonely)).content.decode()
    assert "no agent is above it" in page
    response = admin_client.post(send_url(lonely), {"template": "c8y_Restart"})

    assert response.status_code == 200
    [error] = response.context["form"].non_field_errors()
    assert "is not in the childDevices hierarchy of any agent" in error
    assert not Operation.objects.exists()


def test_send_from_the_operations_list_takes_a_device_id(
    admin_client: Client, agent: ManagedObject, device: ManagedObject
) -> None:
    changelist = admin_client.get(reverse("admin:devicecontrol_operation_changelist"))
    assert ADD in changelist.content.decode()  # the list's "add" button is "send"
    assert admin_client.get(ADD, {"device": device.pk}).context["form"]["device"].value() == str(
        device.pk
    )

    missing = admin_client.post(ADD, {"device": "999999999", "template": "c8y_Restart"})
    assert (
        "There is no managed object with ID 999999999." in missing.context["form"].errors["device"]
    )

    response = admin_client.post(ADD, {"device": str(device.pk), "template": "c8y_Restart"})

    operation = Operation.objects.get()
    assert response["Location"] == reverse(
        "admin:devicecontrol_operation_change", args=[operation.pk]
    )
    assert operation.fragments == {"c8y_Restart": {}, "description": "Restart device"}
    assert entries(operation)[0][:2] == ("root-admin", ADDITION)


def test_sending_needs_the_add_permission(
    client: Client, make_user: Callable[..., Any], device: ManagedObject
) -> None:
    viewer = make_user("viewer")
    viewer.is_staff = True
    viewer.save()
    viewer.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["view_managedobject", "view_operation", "change_operation"]
        )
    )
    client.force_login(viewer)

    assert client.get(send_url(device)).status_code == 403
    assert client.post(send_url(device), {"template": "c8y_Restart"}).status_code == 403
    assert client.post(ADD, {"device": device.pk, "template": "c8y_Restart"}).status_code == 403
    page = client.get(device_page(device)).content.decode()
    assert send_url(device) not in page
    assert not Operation.objects.exists()


# --- a device's operations and an agent's queue ----------------------------------------------


def test_device_page_shows_its_operations_newest_first_with_buttons(
    admin_client: Client, agent: ManagedObject, device: ManagedObject
) -> None:
    pending = operation_create(device=device, data={"c8y_Restart": {}, "description": "Reboot"})
    broken = failed(device, "disk full")
    retried = failed(device, "first try")
    admin_client.post(
        reverse("admin:devicecontrol_operation_retry", args=[retried.pk]), {"next": "/"}
    )
    retry = Operation.objects.get(retry_of=retried)

    response = admin_client.get(device_page(device))

    assert response.status_code == 200
    rows = response.context["device_operations"]["rows"]
    assert [op.pk for op in rows] == [retry.pk, retried.pk, broken.pk, pending.pk]
    page = response.content.decode()
    assert 'class="operation-status status-failed"' in page
    assert "disk full" in page
    assert "Reboot (c8y_Restart)" in page
    retry_link = reverse("admin:devicecontrol_operation_change", args=[retry.pk])
    assert f'retried as <a href="{retry_link}">{retry.pk}</a>' in page
    for op, button in [(broken, "retry"), (pending, "cancel"), (retry, "cancel")]:
        assert reverse(f"admin:devicecontrol_operation_{button}", args=[op.pk]) in page
    # The buttons belong to their own form, not to the page's form (its Enter key stays Save).
    assert 'form="operation-actions"' in page
    assert '<form id="operation-actions" method="post">' in page
    assert response.context.get("agent_queue") is None  # a device, not an agent


def test_device_page_pages_its_operations_without_counting(
    admin_client: Client, device: ManagedObject
) -> None:
    created = [operation_create(device=device, data={"c8y_Restart": {}}).pk for _ in range(23)]

    first = admin_client.get(device_page(device)).context["device_operations"]
    second = admin_client.get(device_page(device), {"operations_page": "2"}).context[
        "device_operations"
    ]

    assert [op.pk for op in first["rows"]] == created[::-1][:20]
    assert first["previous_url"] is None
    assert first["next_url"] == "?operations_page=2"
    assert [op.pk for op in second["rows"]] == created[::-1][20:]
    assert second["previous_url"] == "?operations_page=1"
    assert second["next_url"] is None
    assert admin_client.get(device_page(device), {"operations_page": "x"}).status_code == 200
    page = admin_client.get(device_page(device)).content.decode()
    assert 'href="?operations_page=2#operations"' in page  # back to the panel, not the top


def test_agent_page_shows_its_queue_in_the_order_it_receives_it(
    admin_client: Client, agent: ManagedObject, device: ManagedObject
) -> None:
    other = new_device("Valve", agent)
    first = operation_create(device=other, data={"c8y_Restart": {}})
    running = operation_create(device=device, data={"c8y_Restart": {}})
    operation_update(operation_id=running.pk, data={"status": "EXECUTING"})
    done = operation_create(device=device, data={"c8y_Restart": {}})
    operation_update(operation_id=done.pk, data={"status": "SUCCESSFUL"})

    response = admin_client.get(device_page(agent))

    assert [op.pk for op in response.context["agent_queue"]["rows"]] == [first.pk, running.pk]
    page = response.content.decode()
    assert "Agent&#x27;s queue" in page or "Agent's queue" in page
    assert f">{other}</a>" in page


def test_retry_and_cancel_buttons_go_through_the_services_with_history(
    admin_client: Client, device: ManagedObject
) -> None:
    broken = failed(device, "boom")
    pending = operation_create(device=device, data={"c8y_Restart": {}})
    back = device_page(device) + "?operations_page=1"

    retried = admin_client.post(
        reverse("admin:devicecontrol_operation_retry", args=[broken.pk]), {"next": back}
    )
    cancelled = admin_client.post(
        reverse("admin:devicecontrol_operation_cancel", args=[pending.pk]), {"next": back}
    )

    assert retried["Location"] == back
    assert cancelled["Location"] == back
    retry = Operation.objects.get(retry_of=broken)
    assert retry.status == OperationStatus.PENDING
    pending.refresh_from_db()
    assert pending.status == OperationStatus.FAILED
    assert pending.failure_reason == "Cancelled by root-admin"
    assert entries(broken) == [("root-admin", CHANGE, f"Retried as operation {retry.pk}")]
    assert entries(retry) == [("root-admin", ADDITION, f"Retry of operation {broken.pk}")]
    assert entries(pending) == [
        (
            "root-admin",
            CHANGE,
            "Cancelled: PENDING → FAILED (Cancelled by root-admin)",
        )
    ]


def test_buttons_refuse_get_foreign_redirects_and_unknown_operations(
    admin_client: Client, device: ManagedObject
) -> None:
    pending = operation_create(device=device, data={"c8y_Restart": {}})
    cancel = reverse("admin:devicecontrol_operation_cancel", args=[pending.pk])

    assert admin_client.get(cancel).status_code == 405
    response = admin_client.post(cancel, {"next": "https://evil.example/"})
    assert response["Location"] == reverse(
        "admin:devicecontrol_operation_change", args=[pending.pk]
    )
    assert (
        admin_client.post(
            reverse("admin:devicecontrol_operation_retry", args=["999999999"])
        ).status_code
        == 404
    )
    # Cancelling a finished operation changes nothing and says so.
    again = admin_client.post(cancel, follow=True)
    assert any("already SUCCESSFUL or FAILED" in m for m in shown_messages(again))
    assert len(entries(pending)) == 1


def test_buttons_need_the_change_permission(
    client: Client, make_user: Callable[..., Any], device: ManagedObject
) -> None:
    viewer = make_user("viewer")
    viewer.is_staff = True
    viewer.save()
    viewer.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_managedobject", "view_operation"])
    )
    client.force_login(viewer)
    pending = operation_create(device=device, data={"c8y_Restart": {}})

    page = client.get(device_page(device)).content.decode()
    assert str(pending.pk) in page
    assert reverse("admin:devicecontrol_operation_cancel", args=[pending.pk]) not in page
    cancel = reverse("admin:devicecontrol_operation_cancel", args=[pending.pk])
    assert client.post(cancel).status_code == 403
    pending.refresh_from_db()
    assert pending.status == OperationStatus.PENDING


def test_device_page_query_count_does_not_grow_with_operations(
    admin_client: Client,
    agent: ManagedObject,
    device: ManagedObject,
    django_assert_max_num_queries: Callable[..., Any],
) -> None:
    for _ in range(3):
        operation_create(device=device, data={"c8y_Restart": {}})
    admin_client.get(device_page(agent))  # warm caches (content types, sessions)
    with django_assert_max_num_queries(30) as few:
        admin_client.get(device_page(agent))
    for _ in range(40):  # more operations than a page, on the same devices (their children
        failed(device)  # are inventory's part of the page)
        operation_create(device=device, data={"c8y_Restart": {}})
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = admin_client.get(device_page(agent))
    assert len(response.context["agent_queue"]["rows"]) == 20
    assert response.context["agent_queue"]["next_url"] == "?queue_page=2"


# --- the device list's operation columns -------------------------------------------------------


def test_device_list_shows_open_operations_and_the_last_operation(
    admin_client: Client,
    agent: ManagedObject,
    device: ManagedObject,
    django_assert_max_num_queries: Callable[..., Any],
) -> None:
    operation_create(device=device, data={"c8y_Restart": {}})
    operation_create(device=device, data={"c8y_Restart": {}})
    last = failed(device, "boom")

    response = admin_client.get(DEVICES)

    rows = {obj.pk: obj for obj in response.context["cl"].result_list}
    assert rows[device.pk].open_operation_count == 2
    assert rows[device.pk].last_operation_status == "FAILED"
    assert rows[device.pk].last_operation_at == last.status_changed_at
    assert rows[agent.pk].open_operation_count is None
    page = response.content.decode()
    assert f'<a href="{device_page(device)}#operations">2</a>' in page
    assert 'class="operation-status status-failed"' in page

    before = len(_queries(admin_client))
    for _ in range(30):
        failed(new_device("More", agent))
    with django_assert_max_num_queries(before):
        assert len(admin_client.get(DEVICES).context["cl"].result_list) == 32


def _queries(client: Client) -> list[Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        client.get(DEVICES)
    return captured.captured_queries


# --- live status -----------------------------------------------------------------------------

LIVE = reverse("admin:devicecontrol_operation_live")


def test_live_endpoint_answers_status_failure_and_time_and_says_when_done(
    admin_client: Client, device: ManagedObject, django_assert_max_num_queries: Callable[..., Any]
) -> None:
    pending = operation_create(device=device, data={"c8y_Restart": {}})
    broken = failed(device, "disk <full>")

    with django_assert_max_num_queries(3):  # session, user, the operations
        body = admin_client.get(LIVE, {"ids": f"{pending.pk},{broken.pk},999999"}).json()

    assert body["done"] is False
    values = body["values"]
    assert 'status-pending">PENDING' in values[f"operation-{pending.pk}-status"]["html"]
    assert values[f"operation-{broken.pk}-failure"] == {"text": "disk <full>"}
    assert "<time datetime=" in values[f"operation-{broken.pk}-changed"]["html"]
    assert not any(key.startswith("operation-999999") for key in values)

    assert f"operation-{pending.pk}-actions" not in values  # its Cancel button stays

    operation_update(operation_id=pending.pk, data={"status": "SUCCESSFUL"})
    body = admin_client.get(LIVE, {"ids": f"{pending.pk},{broken.pk}"}).json()
    assert body["done"] is True
    assert "SUCCESSFUL" in body["values"][f"operation-{pending.pk}-status"]["html"]
    # Finished: the Cancel shown while it was open goes.
    assert body["values"][f"operation-{pending.pk}-actions"] == {"html": ""}


@pytest.mark.parametrize("ids", ["", "1,x", "0", ",".join(["1"] * 201)])
def test_live_endpoint_refuses_bad_ids(admin_client: Client, ids: str) -> None:
    response = admin_client.get(LIVE, {"ids": ids})
    assert response.status_code == 422
    assert set(response.json()) == {"error", "message", "info"}


def test_pages_with_operations_poll_the_live_endpoint(
    admin_client: Client, device: ManagedObject
) -> None:
    first = operation_create(device=device, data={"c8y_Restart": {}})
    second = failed(device)

    listing = admin_client.get(reverse("admin:devicecontrol_operation_changelist"))
    assert listing.context["operations_live_url"] == f"{LIVE}?ids={second.pk},{first.pk}"
    page = listing.content.decode()
    assert f'data-live-src="{LIVE}?ids={second.pk},{first.pk}"' in page
    assert f'data-live-key="operation-{first.pk}-status"' in page
    assert "deviceplatform/live" in page

    device_page_html = admin_client.get(device_page(device)).content.decode()
    assert f'data-live-src="{LIVE}?ids={second.pk},{first.pk}"' in device_page_html
    assert f'data-live-key="operation-{second.pk}-failure"' in device_page_html
    # The open one's buttons are live (a Cancel goes once it finishes); the failed one's are not.
    assert f'data-live-key="operation-{first.pk}-actions"' in device_page_html
    assert f'data-live-key="operation-{second.pk}-actions"' not in device_page_html

    assert Client().get(LIVE, {"ids": str(first.pk)}).status_code == 302  # to the login page


def test_operations_list_offers_send_and_marks_retried_originals(
    admin_client: Client, device: ManagedObject
) -> None:
    original = failed(device, "first try")
    admin_client.post(reverse("admin:devicecontrol_operation_retry", args=[original.pk]))
    retry = Operation.objects.get(retry_of=original)

    page = admin_client.get(reverse("admin:devicecontrol_operation_changelist")).content.decode()

    assert f'<a href="{ADD}" class="addlink">Send operation</a>' in page
    operation_page = admin_client.get(
        reverse("admin:devicecontrol_operation_change", args=[retry.pk])
    )
    assert "_addanother" not in operation_page.content.decode()
    retry_link = reverse("admin:devicecontrol_operation_change", args=[retry.pk])
    original_link = reverse("admin:devicecontrol_operation_change", args=[original.pk])
    assert f'↻ retried as <a href="{retry_link}">{retry.pk}</a>' in page
    assert f'retry of <a href="{original_link}">{original.pk}</a>' in page
    assert "first try" in page  # the failure reason column


def test_finished_operation_page_hides_its_expiry(
    admin_client: Client, device: ManagedObject
) -> None:
    pending = operation_create(device=device, data={"c8y_Restart": {}})
    done = failed(device)

    def fields(operation: Operation) -> list[str]:
        url = reverse("admin:devicecontrol_operation_change", args=[operation.pk])
        form = admin_client.get(url).context["adminform"]
        return [name for fieldset in form.fieldsets for name in _flat(fieldset[1]["fields"])]

    assert "expires_at" in fields(pending)
    assert "expires_at" not in fields(done)
    assert "executing_since" in fields(done)


def _flat(rows: list[Any]) -> list[str]:
    return [name for row in rows for name in (row if isinstance(row, tuple | list) else [row])]


def test_a_status_edit_on_the_operation_page_writes_old_and_new_values(
    admin_client: Client, device: ManagedObject
) -> None:
    from tests.inventory.test_admin import form_data

    pending = operation_create(device=device, data={"c8y_Restart": {}})
    url = reverse("admin:devicecontrol_operation_change", args=[pending.pk])
    data = form_data(admin_client, url)
    data.update(status="FAILED", failure_reason="stuck")

    assert admin_client.post(url, data).status_code == 302

    assert entries(pending) == [
        (
            "root-admin",
            CHANGE,
            "Changed status: 'PENDING' → 'FAILED'; failure reason: None → 'stuck'",
        )
    ]


def test_an_operation_retried_before_is_not_retried_again(
    admin_client: Client, device: ManagedObject
) -> None:
    original = failed(device, "first try")
    retry_url = reverse("admin:devicecontrol_operation_retry", args=[original.pk])
    admin_client.post(retry_url)
    retry = Operation.objects.get(retry_of=original)

    again = admin_client.post(retry_url, follow=True)

    assert Operation.objects.filter(retry_of=original).count() == 1
    assert any(
        f"already retried: {original.pk} (as {retry.pk})" in m for m in shown_messages(again)
    )
    page = admin_client.get(device_page(device)).content.decode()
    assert retry_url not in page  # no Retry button on the original any more


@pytest.mark.django_db(transaction=True)
def test_two_retry_clicks_at_once_make_one_retry(superuser: Any) -> None:
    agent = new_agent("Gateway")
    original = failed(new_device("Pump", agent), "boom")
    retry_url = reverse("admin:devicecontrol_operation_retry", args=[original.pk])

    def click(_: int) -> int:
        client = Client()
        client.force_login(superuser)
        return client.post(retry_url).status_code

    assert run_together(click, 2) == [302, 302]
    assert Operation.objects.filter(retry_of=original).count() == 1
    assert LogEntry.objects.filter(object_id=str(original.pk)).count() == 1


@pytest.mark.django_db(transaction=True)
def test_cancel_racing_the_agent_either_cancels_or_leaves_its_result(superuser: Any) -> None:
    agent = new_agent("Gateway")
    pending = operation_create(device=new_device("Pump", agent), data={"c8y_Restart": {}})
    cancel_url = reverse("admin:devicecontrol_operation_cancel", args=[pending.pk])

    def work(index: int) -> Any:
        if index == 0:
            client = Client()
            client.force_login(superuser)
            return client.post(cancel_url).status_code
        return operation_update(operation_id=pending.pk, data={"status": "SUCCESSFUL"}).status

    results = run_together(work, 2)

    assert results[0] == 302
    pending.refresh_from_db()
    # Either the agent finished first (the cancel skipped it: a finished operation is never
    # marked FAILED) or the cancel went first and the agent's later report wins, as the API
    # allows; a history entry exists only for a cancel that happened.
    assert pending.status == OperationStatus.SUCCESSFUL
    assert pending.failure_reason is None
    assert set(
        LogEntry.objects.filter(object_id=str(pending.pk)).values_list("change_message", flat=True)
    ) <= {"Cancelled: PENDING → FAILED (Cancelled by root-admin)"}
