"""Accountability: every change an operator makes from the admin leaves an admin history entry
(LogEntry) naming the operator, the object and what changed, on that object's "History" page;
a change the services refuse, or an object an action skips, leaves none.

One test per way of changing state, across every admin: operations (sent from a device's page
or the list, status form, mark failed and retry actions, retry and cancel buttons, delete), bulk
operations (created after a preview, schedule form, cancel, reschedule now), children of a group
(add, remove), new device requests (register, accept, reject), managed objects (change, delete)
and device users (revoke, restore, rotate)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db.models import Model
from django.test import Client
from django.urls import reverse

from bulkops.models import BulkOperation, BulkStatus
from bulkops.services import bulk_operation_cancel, bulk_operation_create
from devicecontrol import services as devicecontrol_services
from devicecontrol.models import NewDeviceRequest, Operation, OperationStatus
from devicecontrol.services import operation_create, operation_update
from deviceplatform.api.dates import format_datetime
from deviceplatform.models import User
from deviceplatform.services import device_user_provision
from inventory.models import ManagedObject, Relation
from inventory.services import managed_object_add_children, managed_object_create
from tests.helpers import shown_messages

pytestmark = pytest.mark.django_db

OPERATOR = "root-admin"  # the `superuser` fixture behind `admin_client`
FUTURE = datetime.now(UTC) + timedelta(days=30)


def entries(obj: Model, flag: int | None = None) -> list[LogEntry]:
    """The history of `obj`, oldest first (what its admin "History" page lists)."""
    found = LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(type(obj), for_concrete_model=False),
        object_id=str(obj.pk),
    )
    if flag is not None:
        found = found.filter(action_flag=flag)
    return list(found.order_by("pk"))


def assert_logged(obj: Model, flag: int, *words: str) -> LogEntry:
    """Exactly one entry of kind `flag` about `obj`, by the operator, whose message (as the
    History page shows it) names each of `words` (case-insensitive)."""
    found = entries(obj, flag)
    assert len(found) == 1, [(e.action_flag, e.get_change_message()) for e in entries(obj)]
    [entry] = found
    assert entry.user.username == OPERATOR
    message = entry.get_change_message() if flag != DELETION else entry.object_repr
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return entry


def assert_history_page_shows(client: Client, obj: Model, admin_name: str, text: str) -> None:
    page = client.get(reverse(f"admin:{admin_name}_history", args=[obj.pk]))
    assert page.status_code == 200
    content = page.content.decode()
    assert OPERATOR in content
    assert text in content, content[-3000:]


def post_action(client: Client, changelist: str, action: str, selected: Iterable[Any]) -> Any:
    return client.post(
        reverse(changelist),
        {"action": action, "_selected_action": [obj.pk for obj in selected]},
        follow=True,
    )


# --- objects ---------------------------------------------------------------------------------


def agent_with_device(name: str = "Gateway") -> tuple[ManagedObject, ManagedObject]:
    agent = managed_object_create(
        owner="admin", data={"name": name, "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}}
    )
    device = managed_object_create(owner="admin", data={"name": f"{name} pump", "c8y_IsDevice": {}})
    managed_object_add_children(parent=agent, relation=Relation.DEVICE, children=[device])
    return agent, device


def failed_operation(device: ManagedObject) -> Operation:
    operation = operation_create(device=device, data={"c8y_Restart": {}})
    return operation_update(
        operation_id=operation.pk, data={"status": "FAILED", "failureReason": "boom"}
    )


def group_of(devices: list[ManagedObject], name: str = "Fleet") -> ManagedObject:
    group = managed_object_create(owner="admin", data={"name": name, "c8y_IsDeviceGroup": {}})
    managed_object_add_children(parent=group, relation=Relation.ASSET, children=devices)
    return group


def bulk_over(group: ManagedObject, start: datetime = FUTURE) -> BulkOperation:
    return bulk_operation_create(
        data={
            "groupId": str(group.pk),
            "startDate": format_datetime(start),
            "creationRamp": 5,
            "operationPrototype": {"c8y_Restart": {}},
        }
    )


# --- operations ------------------------------------------------------------------------------


def test_operation_status_form(admin_client: Client) -> None:
    _, device = agent_with_device()
    operation = operation_create(device=device, data={"c8y_Restart": {}})
    url = reverse("admin:devicecontrol_operation_change", args=[operation.pk])

    refused = admin_client.post(url, {"status": "PENDING", "failure_reason": "not failed"})
    assert refused.status_code == 200  # a failure reason needs FAILED: a form error
    assert entries(operation) == []

    response = admin_client.post(url, {"status": "FAILED", "failure_reason": "stuck"})

    assert response.status_code == 302
    assert_logged(operation, CHANGE, "status", "FAILED", "failure reason", "stuck")
    assert_history_page_shows(admin_client, operation, "devicecontrol_operation", "FAILED")


def test_operation_mark_failed_action(admin_client: Client) -> None:
    _, device = agent_with_device()
    pending = operation_create(device=device, data={"c8y_Restart": {}})
    done = failed_operation(device)

    post_action(
        admin_client, "admin:devicecontrol_operation_changelist", "mark_failed", [pending, done]
    )

    assert Operation.objects.get(pk=pending.pk).status == OperationStatus.FAILED
    assert_logged(pending, CHANGE, "FAILED", OPERATOR)
    assert entries(done) == []  # skipped: already finished


def test_operation_retry_action(admin_client: Client) -> None:
    _, device = agent_with_device()
    broken = failed_operation(device)
    pending = operation_create(device=device, data={"c8y_Restart": {}})

    post_action(
        admin_client, "admin:devicecontrol_operation_changelist", "retry_failed", [broken, pending]
    )

    [retry] = Operation.objects.filter(retry_of_id=broken.pk)
    assert_logged(broken, CHANGE, "retr", str(retry.pk))
    assert_logged(retry, ADDITION, "retry", str(broken.pk))
    assert entries(pending) == []  # skipped: not FAILED


def test_operation_sent_from_a_device_page_and_from_the_list(admin_client: Client) -> None:
    agent, device = agent_with_device()
    orphan = managed_object_create(owner="admin", data={"name": "Orphan", "c8y_IsDevice": {}})
    from_device = reverse("admin:inventory_managedobject_send_operation", args=[device.pk])
    from_list = reverse("admin:devicecontrol_operation_add")

    refused = admin_client.post(from_list, {"device": orphan.pk, "template": "c8y_Restart"})
    assert refused.status_code == 200  # no agent above it: the service refuses
    assert not Operation.objects.exists()
    assert LogEntry.objects.count() == 0

    sent = admin_client.post(
        from_device,
        {"template": "c8y_Firmware", "firmware_name": "fw", "firmware_version": "9.9.9"},
    )
    assert sent.status_code == 302, sent.content[:2000]
    firmware = Operation.objects.get(device=device)
    assert_logged(firmware, ADDITION, str(device.pk), str(agent.pk), "c8y_Firmware", "9.9.9")

    listed = admin_client.post(
        from_list, {"device": device.pk, "template": "c8y_Command", "command": "uptime"}
    )
    assert listed.status_code == 302, listed.content[:2000]
    command = Operation.objects.exclude(pk=firmware.pk).get(device=device)
    assert_logged(command, ADDITION, str(device.pk), "c8y_Command", "uptime")


def test_operation_retry_and_cancel_buttons(admin_client: Client) -> None:
    _, device = agent_with_device()
    broken = failed_operation(device)
    pending = operation_create(device=device, data={"c8y_Restart": {}})
    back = reverse("admin:inventory_managedobject_change", args=[device.pk])

    def press(button: str, operation: Operation) -> None:
        url = reverse(f"admin:devicecontrol_operation_{button}", args=[operation.pk])
        assert admin_client.post(url, {"next": back}).status_code == 302

    press("cancel", pending)
    assert Operation.objects.get(pk=pending.pk).status == OperationStatus.FAILED
    assert_logged(pending, CHANGE, "FAILED", OPERATOR)
    press("cancel", pending)  # finished by now: skipped, no second entry
    assert len(entries(pending)) == 1

    press("retry", broken)
    [retry] = Operation.objects.filter(retry_of_id=broken.pk)
    assert_logged(broken, CHANGE, "retr", str(retry.pk))
    assert_logged(retry, ADDITION, str(broken.pk))
    press("retry", retry)  # PENDING: not retried, no entry
    assert entries(retry, CHANGE) == []


def test_operation_delete(admin_client: Client) -> None:
    _, device = agent_with_device()
    operation = operation_create(device=device, data={"c8y_Restart": {}})

    response = admin_client.post(
        reverse("admin:devicecontrol_operation_delete", args=[operation.pk]), {"post": "yes"}
    )

    assert response.status_code == 302
    assert not Operation.objects.filter(pk=operation.pk).exists()
    assert_logged(operation, DELETION)


# --- bulk operations -------------------------------------------------------------------------


def test_bulk_operation_created_after_its_preview(admin_client: Client) -> None:
    _, device = agent_with_device()
    group = group_of([device])
    add = reverse("admin:bulkops_bulkoperation_add")
    choices = {"target": "group", "group": group.pk, "template": "c8y_Restart"}
    choices["creation_ramp"] = "3"

    preview = admin_client.post(add, {**choices, "_preview": "Preview"})
    assert preview.status_code == 200
    assert not BulkOperation.objects.exists()
    assert LogEntry.objects.count() == 0  # a preview writes nothing
    [digest] = re.findall(r'name="previewed" value="([^"]+)"', preview.content.decode())

    created = admin_client.post(add, {**choices, "previewed": digest, "_confirm": "Create"})

    assert created.status_code == 302, created.content[:2000]
    bulk = BulkOperation.objects.get()
    assert_logged(bulk, ADDITION, OPERATOR, "c8y_Restart", f"group {group.pk}", "ramp 3")


def test_bulk_operation_schedule_form(admin_client: Client) -> None:
    _, device = agent_with_device()
    bulk = bulk_over(group_of([device]))
    url = reverse("admin:bulkops_bulkoperation_change", args=[bulk.pk])
    when = FUTURE + timedelta(days=1)
    form = {"start_date_0": when.strftime("%Y-%m-%d"), "start_date_1": "12:00:00"}

    refused = admin_client.post(url, {**form, "creation_ramp": "-1"})
    assert refused.status_code == 200
    assert entries(bulk) == []

    response = admin_client.post(url, {**form, "creation_ramp": "2"})

    assert response.status_code == 302, response.content[:2000]
    assert_logged(bulk, CHANGE, "start", "ramp")


def test_bulk_operation_cancel_action(admin_client: Client) -> None:
    _, device = agent_with_device()
    group = group_of([device])
    running = bulk_over(group)
    cancelled = bulk_over(group)
    bulk_operation_cancel(bulk_operation_id=cancelled.pk)

    post_action(
        admin_client, "admin:bulkops_bulkoperation_changelist", "cancel", [running, cancelled]
    )

    assert BulkOperation.objects.get(pk=running.pk).status == BulkStatus.DELETED
    assert_logged(running, CHANGE, "cancel")
    assert entries(cancelled) == []  # skipped: cancelled already


def test_bulk_operation_reschedule_now_action(admin_client: Client) -> None:
    _, device = agent_with_device()
    bulk = bulk_over(group_of([device]))

    post_action(admin_client, "admin:bulkops_bulkoperation_changelist", "reschedule_now", [bulk])

    assert BulkOperation.objects.get(pk=bulk.pk).start_date < FUTURE
    assert_logged(bulk, CHANGE, "start")


def test_bulk_operation_pause_and_resume_actions(admin_client: Client) -> None:
    _, device = agent_with_device()
    bulk = bulk_over(group_of([device]))

    post_action(admin_client, "admin:bulkops_bulkoperation_changelist", "pause", [bulk])
    assert_logged(bulk, CHANGE, "paused by")
    post_action(admin_client, "admin:bulkops_bulkoperation_changelist", "resume", [bulk])
    assert [e.get_change_message() for e in entries(bulk, CHANGE)][1].startswith("Resumed by")


def test_bulk_operation_rollout_buttons(admin_client: Client) -> None:
    _, device = agent_with_device()
    bulk = bulk_over(group_of([device]))

    admin_client.post(reverse("admin:bulkops_bulkoperation_pause", args=[bulk.pk]))
    assert_logged(bulk, CHANGE, "paused by")
    admin_client.post(reverse("admin:bulkops_bulkoperation_resume", args=[bulk.pk]))
    admin_client.post(reverse("admin:bulkops_bulkoperation_abort", args=[bulk.pk]))
    messages = [e.get_change_message() for e in entries(bulk, CHANGE)]
    assert [m.split(" by ")[0] for m in messages] == ["Paused", "Resumed", "Aborted"]
    assert BulkOperation.objects.get(pk=bulk.pk).status == BulkStatus.DELETED
    # Refused (cancelled already): no entry.
    admin_client.post(reverse("admin:bulkops_bulkoperation_pause", args=[bulk.pk]))
    assert len(entries(bulk, CHANGE)) == 3


# --- children of agents and groups ------------------------------------------------------------


def test_children_added_and_removed_on_a_group_page(admin_client: Client) -> None:
    agent, device = agent_with_device()
    group = group_of([device])
    url = reverse("admin:inventory_managedobject_children", args=[group.pk])

    admin_client.post(url, {"relation": "asset", "ids": "999999999", "add": "Add children"})
    assert entries(group) == []  # no such object: refused

    admin_client.post(url, {"relation": "asset", "ids": str(agent.pk), "add": "Add children"})
    assert_logged(group, CHANGE, "Added", str(agent.pk))

    reference = group.child_refs.get(child_id=agent.pk)
    admin_client.post(url, {"reference": str(reference.pk), "remove": "Remove ticked children"})
    assert [e.get_change_message() for e in entries(group, CHANGE)][-1].startswith("Removed")
    assert str(agent.pk) in entries(group, CHANGE)[-1].get_change_message()
    assert all(e.user.username == OPERATOR for e in entries(group))


# --- new device requests ---------------------------------------------------------------------


def test_new_device_request_register_accept_and_reject(admin_client: Client) -> None:
    changelist = reverse("admin:devicecontrol_newdevicerequest_changelist")

    added = admin_client.post(
        reverse("admin:devicecontrol_newdevicerequest_add"), {"device_id": "audit-1"}
    )
    assert added.status_code == 302
    request = NewDeviceRequest.objects.get(device_id="audit-1")
    assert_logged(request, ADDITION)

    accepted = admin_client.post(
        changelist, {"action": "accept_requests", "_selected_action": [request.pk]}, follow=True
    )
    assert any("Could not accept" in m for m in shown_messages(accepted))
    assert entries(request, CHANGE) == []  # refused: it has not polled yet

    devicecontrol_services.device_credentials_poll(device_id="audit-1", security_token=None)
    admin_client.post(changelist, {"action": "accept_requests", "_selected_action": [request.pk]})
    assert_logged(request, CHANGE, "Accepted", OPERATOR)

    rejected = admin_client.post(
        reverse("admin:devicecontrol_newdevicerequest_delete", args=[request.pk]), {"post": "yes"}
    )
    assert rejected.status_code == 302
    assert_logged(request, DELETION, "audit-1")


# --- managed objects -------------------------------------------------------------------------


def test_managed_object_change_and_delete(admin_client: Client) -> None:
    from tests.inventory.test_admin import form_data

    agent, device = agent_with_device()
    url = reverse("admin:inventory_managedobject_change", args=[device.pk])
    data = form_data(admin_client, url)
    data["name"] = "Renamed pump"

    changed = admin_client.post(url, data)

    assert changed.status_code == 302, changed.content[:2000]
    assert_logged(device, CHANGE, "name")

    deleted = admin_client.post(
        reverse("admin:inventory_managedobject_delete", args=[device.pk]), {"post": "yes"}
    )
    assert deleted.status_code == 302
    assert_logged(device, DELETION, "Renamed pump")


# --- device users ----------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["revoke", "restore", "rotate"])
def test_device_user_credential_changes(admin_client: Client, change: str) -> None:
    user, _, _ = device_user_provision("audit-serial")
    if change == "restore":
        admin_client.post(
            reverse("admin:deviceplatform_deviceuser_credentials", args=[user.pk, "revoke"]),
            {"post": "yes"},
        )
        LogEntry.objects.all().delete()

    admin_client.post(
        reverse("admin:deviceplatform_deviceuser_credentials", args=[user.pk, change]),
        {"post": "yes"},
    )

    proxy = User.objects.get(pk=user.pk)
    found = LogEntry.objects.filter(object_id=str(proxy.pk), action_flag=CHANGE)
    assert found.count() == 1, list(found.values_list("change_message", flat=True))
    assert found.get().user.username == OPERATOR


# --- nothing left out ------------------------------------------------------------------------

# Every admin action and every view an admin adds to Django's own (add, change, delete, history),
# with the test above that shows its history entry, or why it writes none.
AUDITED = {
    ("devicecontrol.Operation", "mark_failed"): "test_operation_mark_failed_action",
    ("devicecontrol.Operation", "retry_failed"): "test_operation_retry_action",
    (
        "devicecontrol.Operation",
        "devicecontrol_operation_retry",
    ): "test_operation_retry_and_cancel_buttons",
    (
        "devicecontrol.Operation",
        "devicecontrol_operation_cancel",
    ): "test_operation_retry_and_cancel_buttons",
    ("devicecontrol.Operation", "devicecontrol_operation_live"): "read-only (JSON for live.js)",
    (
        "devicecontrol.NewDeviceRequest",
        "accept_requests",
    ): "test_new_device_request_register_accept_and_reject",
    (
        "inventory.ManagedObject",
        "inventory_managedobject_send_operation",
    ): "test_operation_sent_from_a_device_page_and_from_the_list",
    (
        "inventory.ManagedObject",
        "inventory_managedobject_children",
    ): "test_children_added_and_removed_on_a_group_page",
    ("bulkops.BulkOperation", "cancel"): "test_bulk_operation_cancel_action",
    ("bulkops.BulkOperation", "reschedule_now"): "test_bulk_operation_reschedule_now_action",
    ("bulkops.BulkOperation", "bulkops_bulkoperation_live"): "read-only (JSON for live.js)",
    ("bulkops.BulkOperation", "pause"): "test_bulk_operation_pause_and_resume_actions",
    ("bulkops.BulkOperation", "resume"): "test_bulk_operation_pause_and_resume_actions",
    ("bulkops.BulkOperation", "bulkops_bulkoperation_pause"): "test_bulk_operation_rollout_buttons",
    (
        "bulkops.BulkOperation",
        "bulkops_bulkoperation_resume",
    ): "test_bulk_operation_rollout_buttons",
    ("bulkops.BulkOperation", "bulkops_bulkoperation_abort"): "test_bulk_operation_rollout_buttons",
    # The list actions and the page's buttons share DeviceUserAdmin.change_credentials.
    ("deviceplatform.DeviceUser", "revoke_credentials"): "test_device_user_credential_changes",
    ("deviceplatform.DeviceUser", "restore_credentials"): "test_device_user_credential_changes",
    ("deviceplatform.DeviceUser", "rotate_credentials"): "test_device_user_credential_changes",
    (
        "deviceplatform.DeviceUser",
        "deviceplatform_deviceuser_credentials",
    ): "test_device_user_credential_changes",
}
DJANGOS_OWN = ("_changelist", "_add", "_history", "_delete", "_change", "_autocomplete")


def test_every_admin_action_and_extra_view_is_audited_here() -> None:
    from django.contrib import admin

    found = set()
    for model, model_admin in admin.site._registry.items():
        for action in model_admin.actions or ():
            name = action if isinstance(action, str) else action.__name__
            found.add((model._meta.label, name))
        for url in model_admin.get_urls():
            if url.name and not url.name.endswith(DJANGOS_OWN):
                found.add((model._meta.label, url.name))
    # delete_selected is Django's, which writes a deletion entry per object.
    assert list(admin.site._actions) == ["delete_selected"]
    assert found == set(AUDITED), (
        "An admin action or view was added or removed: test its history entry here and list it "
        f"in AUDITED. New: {sorted(found - set(AUDITED))}; gone: {sorted(set(AUDITED) - found)}"
    )
