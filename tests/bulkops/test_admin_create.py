"""Creating a bulk operation from the admin: the add page builds the REST body from a group or a
failed bulk operation, a template or JSON prototype, start and ramp; "Preview" validates it with
the service and shows the targets and the ramp's duration without writing; "Create" (only for
what was previewed) creates it through `bulk_operation_create` with a history entry naming the
operator. Refusals are form errors and write nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from bulkops.models import BulkOperation, BulkStatus
from bulkops.services import bulk_operations_advance
from inventory.models import ManagedObject
from tests.bulkops.test_admin import T0, children, new_bulk, new_devices, new_group, new_object
from tests.helpers import shown_messages

pytestmark = pytest.mark.django_db

ADD = reverse("admin:bulkops_bulkoperation_add")
CHANGELIST = reverse("admin:bulkops_bulkoperation_changelist")
START = "2099-06-01T08:30:00Z"


@pytest.fixture
def agent() -> ManagedObject:
    return new_object("Gateway", c8y_IsDevice={}, com_cumulocity_model_Agent={})


@pytest.fixture
def group(agent: ManagedObject) -> ManagedObject:
    return new_group("Pumps", new_devices(3, agent))


@pytest.fixture
def failing() -> BulkOperation:
    """Two devices without an agent and ramp 0, advanced: both children FAILED at once."""
    bulk = new_bulk(new_group("Orphans", new_devices(2, None, prefix="Orphan")), ramp=0)
    bulk_operations_advance(now=T0)
    assert {op.status for op in children(bulk).values()} == {"FAILED"}
    return bulk


def fields(of: ManagedObject | None = None, **values: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "target": "group",
        "group": of.pk if of is not None else "",
        "template": "c8y_Restart",
        "start_date": START,
        "creation_ramp": "2",
    }
    data.update(values)
    return data


def preview(client: Client, data: dict[str, Any]) -> Any:
    response = client.post(ADD, {**data, "_preview": "Preview"})
    assert response.status_code == 200, response.status_code
    return response


def confirm(client: Client, data: dict[str, Any]) -> Any:
    """Preview, then press "Create" with the token the preview handed back."""
    shown = preview(client, data)
    assert not shown.context["form"].errors, shown.context["form"].errors
    previewed = shown.context["form"].data["previewed"]
    return client.post(ADD, {**data, "previewed": previewed, "_confirm": "Create"})


def state() -> tuple[int, int]:
    return BulkOperation.objects.count(), LogEntry.objects.count()


def test_the_changelist_offers_add_and_the_page_lists_groups_templates_and_failed_bulks(
    admin_client: Client, group: ManagedObject, failing: BulkOperation
) -> None:
    assert f'href="{ADD}"' in admin_client.get(CHANGELIST).content.decode()

    page = admin_client.get(ADD).content.decode()

    assert f'<option value="{group.pk}">Pumps</option>' in page
    # Its failures are still unfolded deltas: counted all the same.
    assert f'<option value="{failing.pk}">Restart &lt;device&gt; (2 failed)</option>' in page
    for template in (
        "c8y_Restart",
        "c8y_Firmware",
        "c8y_SoftwareUpdate",
        "c8y_Configuration",
        "c8y_Command",
        "json",
        "copy",
    ):
        assert f'<option value="{template}"' in page
    assert 'data-shown-when="template=c8y_Firmware"' in page
    assert "bulkops/bulk_add" in page  # the script that shows the chosen template's rows


def test_preview_shows_targets_and_ramp_and_writes_nothing_then_create_does(
    admin_client: Client, group: ManagedObject
) -> None:
    data = fields(
        group,
        template="c8y_Firmware",
        firmware_name="pump-fw",
        firmware_version="2.0.0",
        firmware_url="https://example.com/fw.bin",
        creation_ramp="1.5",
    )
    before = state()

    response = preview(admin_client, data)

    assert state() == before
    page = response.content.decode()
    assert '<strong class="bulk-preview-count">3</strong> device(s)' in page
    assert "one operation every 1.5 s" in page
    assert '<strong class="bulk-preview-duration">3 s</strong>' in page
    assert 'datetime="2099-06-01T08:30:00+00:00"' in page
    assert 'datetime="2099-06-01T08:30:03+00:00"' in page
    assert 'value="Create bulk operation for 3 device(s)"' in page

    created = confirm(admin_client, data)

    bulk = BulkOperation.objects.get()
    assert created.status_code == 302
    assert created["Location"] == reverse("admin:bulkops_bulkoperation_change", args=[bulk.pk])
    assert bulk.group_id == group.pk
    assert bulk.target_count == 3
    assert bulk.creation_ramp == 1.5
    assert bulk.start_date == datetime(2099, 6, 1, 8, 30, tzinfo=UTC)
    assert bulk.status == BulkStatus.ACTIVE
    assert bulk.operation_prototype == {
        "description": "Update firmware to pump-fw 2.0.0",
        "c8y_Firmware": {
            "name": "pump-fw",
            "version": "2.0.0",
            "url": "https://example.com/fw.bin",
        },
    }
    entry = LogEntry.objects.get()
    assert entry.action_flag == ADDITION
    assert entry.object_id == str(bulk.pk)
    assert entry.user.get_username() == "root-admin"
    assert entry.change_message == (
        f"Created by root-admin: c8y_Firmware, description to group {group.pk}, 3 device(s), "
        "start 2099-06-01T08:30:00.000Z, ramp 1.5 s."
    )
    page = admin_client.get(created["Location"]).content.decode()
    assert f"Created bulk operation {bulk.pk} for 3 device(s)." in page


def test_a_blank_start_is_now_and_the_ramp_runs_from_there(
    admin_client: Client, group: ManagedObject
) -> None:
    before = datetime.now(UTC)

    confirm(admin_client, fields(group, start_date="", creation_ramp="0"))

    bulk = BulkOperation.objects.get()
    assert before <= bulk.start_date <= datetime.now(UTC)
    bulk_operations_advance(now=bulk.start_date + timedelta(seconds=1))
    assert len(children(bulk)) == 3


@pytest.mark.parametrize(
    ("values", "prototype"),
    [
        ({}, {"c8y_Restart": {}, "description": "Restart"}),
        (
            {
                "template": "c8y_SoftwareUpdate",
                "description": "Agent 2.1",
                "software": '[{"name": "agent", "version": "2.1", "action": "install"}]',
            },
            {
                "c8y_SoftwareUpdate": [{"name": "agent", "version": "2.1", "action": "install"}],
                "description": "Agent 2.1",
            },
        ),
        (
            {"template": "c8y_Configuration", "configuration": "interval=5\nmode=eco\n"},
            {
                "c8y_Configuration": {"config": "interval=5\nmode=eco\n"},
                "description": "Send configuration",
            },
        ),
        (
            {"template": "c8y_Command", "command": "uptime"},
            {"c8y_Command": {"text": "uptime"}, "description": "Execute shell command"},
        ),
        (
            {"template": "json", "prototype": '{"c8y_Custom": {"x": 1}}'},
            {"c8y_Custom": {"x": 1}},
        ),
        (
            {
                "template": "json",
                "description": "Mine",
                "prototype": '{"c8y_Custom": {}, "description": "theirs"}',
            },
            {"c8y_Custom": {}, "description": "Mine"},
        ),
    ],
    ids=["restart", "software", "configuration", "command", "json", "json-description"],
)
def test_each_template_builds_its_prototype(
    admin_client: Client, group: ManagedObject, values: dict[str, Any], prototype: dict[str, Any]
) -> None:
    confirm(admin_client, fields(group, **values))

    assert BulkOperation.objects.get().operation_prototype == prototype


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"group": ""}, "group", "Pick the group whose devices get the operation."),
        ({"group": "x"}, "group", "No group or smart group is named “x”: type its ID."),
        ({"group": "Pump 1"}, "group", "No group or smart group is named “Pump 1”"),  # a device
        ({"group": "Pumps "}, "group", "Several groups are named “Pumps”"),
        ({"group": "0"}, "group", "A group ID is a whole number from 1 to"),
        ({"group": "²"}, "group", "No group or smart group is named “²”"),
        ({"group": "99999999999999999999"}, "group", "A group ID is a whole number from 1 to"),
        ({"group": "{device}"}, "group", "is not a device group"),
        ({"group": "987654321"}, "group", "Managed object 987654321 is not a device group"),
        ({"target": "failed"}, "failed_parent", "Pick the bulk operation whose failures"),
        ({"target": "failed", "failed_parent": "987654321"}, "failed_parent", "does not exist"),
        ({"template": "copy"}, "template", "Only a re-run of failures can copy a prototype."),
        ({"template": "c8y_Firmware", "firmware_name": "fw"}, "firmware_version", "Required"),
        ({"template": "c8y_SoftwareUpdate", "software": "{}"}, "software", "JSON list"),
        ({"template": "c8y_SoftwareUpdate", "software": "[{"}, "software", "Enter valid JSON"),
        ({"template": "c8y_SoftwareUpdate", "software": "[{}]"}, "software", "with a name"),
        ({"template": "c8y_Configuration"}, "configuration", "Enter the configuration"),
        ({"template": "c8y_Command", "command": "  "}, "command", "Enter the command"),
        ({"template": "json", "prototype": "[1]"}, "prototype", "JSON object"),
        ({"template": "json", "prototype": "{"}, "prototype", "Enter valid JSON"),
        ({"template": "json", "prototype": '{"bad name": {}}'}, "prototype", "fragment name"),
        ({"template": "other"}, "template", "Select a valid choice."),
        ({"creation_ramp": "-1"}, "creation_ramp", "greater than or equal to 0"),
        ({"creation_ramp": ""}, "creation_ramp", "This field is required."),
        ({"start_date": "tomorrow"}, "start_date", "not an ISO 8601 date-time"),
        ({"target": "everything"}, "target", "Select a valid choice."),
    ],
)
def test_bad_choices_are_form_errors_and_write_nothing(
    admin_client: Client,
    group: ManagedObject,
    values: dict[str, Any],
    field: str,
    message: str,
) -> None:
    device = ManagedObject.objects.filter(is_device=True, is_group=False).first()
    assert device is not None
    values = {key: str(value).replace("{device}", str(device.pk)) for key, value in values.items()}
    if values.get("group") == "Pumps ":
        new_group("Pumps", [])  # a second group of that name (the typed name is trimmed)
    before = state()

    for button in ("_preview", "_confirm"):
        response = admin_client.post(ADD, {**fields(group, **values), button: "x"})

        assert response.status_code == 200
        errors = response.context["form"].errors
        assert any(message in error for error in errors.get(field, [])), errors
        assert "_confirm" not in response.content.decode()
        assert state() == before


def test_a_group_is_picked_by_its_exact_name_too(
    admin_client: Client, group: ManagedObject
) -> None:
    """README "See it work": the operator types the group's name (the pick list offers it); a
    smart group by name as well."""
    confirm(admin_client, fields(None, group="Pumps"))
    assert BulkOperation.objects.get().group_id == group.pk

    smart = new_object(
        "Smart pumps", c8y_IsDynamicGroup={"invisible": {}}, c8y_DeviceQueryString="name eq 'Pump*'"
    )
    response = preview(admin_client, fields(None, group="Smart pumps"))
    assert response.context["form"].cleaned_data["group"] == smart.pk


def test_create_only_what_was_previewed(admin_client: Client, group: ManagedObject) -> None:
    shown = preview(admin_client, fields(group))
    previewed = shown.context["form"].data["previewed"]
    other = new_group("Other", new_devices(1, None, prefix="Fan"))

    # Another group than the one previewed: shown again, with its own count, not created.
    response = admin_client.post(
        ADD, {**fields(other), "previewed": previewed, "_confirm": "Create"}
    )

    assert BulkOperation.objects.count() == 0
    assert "The choices changed since the preview: check them and confirm." in shown_messages(
        response
    )
    assert '<strong class="bulk-preview-count">1</strong>' in response.content.decode()
    assert not LogEntry.objects.exists()


def test_re_run_the_failures_of_a_bulk_operation_with_its_prototype(
    admin_client: Client, failing: BulkOperation
) -> None:
    change = reverse("admin:bulkops_bulkoperation_change", args=[failing.pk])
    page = admin_client.get(change).content.decode()
    rerun = f"{ADD}?target=failed&amp;failed_parent={failing.pk}&amp;template=copy"
    assert f'href="{rerun}"' in page
    assert "_addanother" not in page
    form = admin_client.get(rerun.replace("&amp;", "&")).context["form"]
    assert form["target"].value() == "failed"
    assert form["failed_parent"].value() == str(failing.pk)
    assert form["template"].value() == "copy"

    data = fields(target="failed", failed_parent=failing.pk, template="copy")
    shown = preview(admin_client, data).content.decode()
    assert '<strong class="bulk-preview-count">2</strong>' in shown

    confirm(admin_client, data)

    rerun_bulk = BulkOperation.objects.exclude(pk=failing.pk).get()
    assert rerun_bulk.failed_parent_id == failing.pk
    assert rerun_bulk.group_id is None
    assert rerun_bulk.target_count == 2
    assert rerun_bulk.operation_prototype == failing.operation_prototype
    [entry] = LogEntry.objects.all()
    assert f"to the failures of bulk operation {failing.pk}, 2 device(s)" in entry.change_message


def test_only_a_bulk_operation_with_failures_offers_a_re_run(
    admin_client: Client, group: ManagedObject
) -> None:
    healthy = new_bulk(group, ramp=0)
    bulk_operations_advance(now=T0)

    page = admin_client.get(
        reverse("admin:bulkops_bulkoperation_change", args=[healthy.pk])
    ).content.decode()

    assert "Re-run failures" not in page


def test_a_group_without_devices_is_previewed_as_such(
    admin_client: Client, agent: ManagedObject
) -> None:
    empty = new_group("Empty", [])

    page = preview(admin_client, fields(empty)).content.decode()

    assert '<strong class="bulk-preview-count">0</strong> device(s).' in page
    assert "No device would get the operation." in page


def test_adding_needs_the_add_permission(client: Client, group: ManagedObject) -> None:
    viewer = get_user_model().objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_bulkoperation"))
    client.force_login(viewer)

    assert client.get(ADD).status_code == 403
    assert client.post(ADD, {**fields(group), "_preview": "x"}).status_code == 403
    assert f'href="{ADD}"' not in client.get(CHANGELIST).content.decode()
    assert BulkOperation.objects.count() == 0

    client.logout()
    anonymous = client.get(ADD)
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("admin:login"))


def test_the_add_page_costs_the_same_for_many_groups_and_bulk_operations(
    admin_client: Client,
    agent: ManagedObject,
    failing: BulkOperation,
    django_assert_max_num_queries: Any,
) -> None:
    devices = new_devices(2, agent, prefix="Fan")
    for i in range(30):
        new_bulk(new_group(f"Group {i}", devices), ramp=0)
    admin_client.get(ADD)

    # Session, user, the groups, the bulk operations with failures.
    with django_assert_max_num_queries(4):
        page = admin_client.get(ADD).content.decode()
    assert page.count("<option value=") >= 32 + 1

    # The same, plus the group's check and its members (the preview).
    chosen = fields(ManagedObject.objects.get(name="Group 0"))
    with django_assert_max_num_queries(6):
        preview(admin_client, chosen)
