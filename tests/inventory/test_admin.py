"""The operator admin: managed objects, references and external IDs written through the services;
users and groups offered only the role permissions."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.urls import reverse

from deviceplatform.models import User
from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation
from inventory.services import (
    external_id_create,
    managed_object_add_children,
    managed_object_create,
)
from tests.helpers import shown_messages

pytestmark = pytest.mark.django_db

PAST = datetime(2024, 1, 1, tzinfo=UTC)


class _FormInputs(HTMLParser):
    """The values a browser would submit from the page's main form (the changelist and the
    empty `__prefix__` inline templates excluded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.data: dict[str, Any] = {}
        self._textarea: str | None = None
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        name = attributes.get("name")
        if tag == "input" and name and attributes.get("type") not in {"submit", "button"}:
            if attributes.get("type") in {"checkbox", "radio"} and "checked" not in attributes:
                return
            self.data[name] = attributes.get("value") or ""
        elif tag == "textarea" and name:
            self._textarea = name
            self.data[name] = ""
        elif tag == "select" and name:
            self._select = name
            self.data[name] = [] if "multiple" in attributes else ""
        elif tag == "option" and self._select and "selected" in attributes:
            value = attributes.get("value") or ""
            if isinstance(self.data[self._select], list):
                self.data[self._select].append(value)
            else:
                self.data[self._select] = value

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self._textarea = None
        elif tag == "select":
            self._select = None

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.data[self._textarea] += data


def form_values(response: Any) -> dict[str, Any]:
    """What submitting the page's form unchanged would POST."""
    parser = _FormInputs()
    parser.feed(response.content.decode())
    data = {key: value for key, value in parser.data.items() if "__prefix__" not in key}
    for key, value in data.items():
        if isinstance(value, str) and value.startswith("\n"):
            data[key] = value[1:]  # browsers drop the newline Django writes after <textarea>
    data.pop("q", None)
    return data


def form_data(client: Client, url: str) -> dict[str, Any]:
    """GET an admin form and return what submitting it unchanged would POST."""
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    return form_values(response)


def change_url(managed_object: ManagedObject) -> str:
    return reverse("admin:inventory_managedobject_change", args=[managed_object.pk])


@pytest.fixture
def device() -> ManagedObject:
    device = managed_object_create(
        owner="device_sensor-1",
        data={
            "name": "Sensor 1",
            "type": "c8y_Sensor",
            "c8y_IsDevice": {},
            "c8y_Hardware": {"model": "X-1", "serialNumber": "0042"},
        },
        now=PAST,
    )
    external_id_create(managed_object=device, type="c8y_Serial", external_id="SN-0042")
    return device


def new_object(name: str, **fragments: Any) -> ManagedObject:
    return managed_object_create(owner="alice", data={"name": name, **fragments}, now=PAST)


# --- managed objects -------------------------------------------------------------------------


def test_changelist_loads_and_searches_by_name_and_external_id(
    admin_client: Client, device: ManagedObject
) -> None:
    other = new_object("Gateway")
    url = reverse("admin:inventory_managedobject_changelist")

    listing = admin_client.get(url)
    assert listing.status_code == 200
    assert list(listing.context["cl"].result_list) == [other, device]  # newest first

    by_name = admin_client.get(url, {"q": "sensor"})
    assert list(by_name.context["cl"].result_list) == [device]
    by_external_id = admin_client.get(url, {"q": "SN-00"})
    assert list(by_external_id.context["cl"].result_list) == [device]
    by_id = admin_client.get(url, {"q": str(other.pk)})
    assert other in by_id.context["cl"].result_list
    too_long = admin_client.get(url, {"q": "9" * 30})
    assert list(too_long.context["cl"].result_list) == []
    devices_only = admin_client.get(url, {"is_device__exact": "1"})
    assert list(devices_only.context["cl"].result_list) == [device]


def test_child_autocomplete_finds_objects_by_external_id(
    admin_client: Client, device: ManagedObject
) -> None:
    response = admin_client.get(
        reverse("admin:autocomplete"),
        {
            "app_label": "inventory",
            "model_name": "managedobjectreference",
            "field_name": "child",
            "term": "sn-0042",
        },
    )

    assert response.status_code == 200
    assert response.json()["results"] == [{"id": str(device.pk), "text": str(device)}]


def test_change_page_renders_fragments_as_indented_json(
    admin_client: Client, device: ManagedObject
) -> None:
    reference_parent = new_object("Site A", c8y_IsDeviceGroup={})
    managed_object_add_children(parent=reference_parent, relation=Relation.ASSET, children=[device])

    data = form_data(admin_client, change_url(device))

    device.refresh_from_db()  # jsonb orders the keys
    assert data["fragments"] == json.dumps(device.fragments, indent=2)
    assert '\n  "c8y_Hardware": {\n    "model": "X-1",' in data["fragments"]
    page = admin_client.get(change_url(device)).content.decode()
    assert "assetParents" in page
    assert change_url(reference_parent) in page  # the read-only parent list links to it
    assert data["external_ids-0-external_id"] == "SN-0042"


def test_edited_fragments_are_saved_through_the_service(
    admin_client: Client, device: ManagedObject
) -> None:
    data = form_data(admin_client, change_url(device))
    data["fragments"] = json.dumps(
        {"c8y_Hardware": {"model": "X-2"}, "com_cumulocity_model_Agent": {}}, indent=2
    )
    data["name"] = "Sensor 1 (renamed)"

    response = admin_client.post(change_url(device), data)

    assert response.status_code == 302, response.context and response.context["errors"]
    device.refresh_from_db()
    assert device.name == "Sensor 1 (renamed)"
    # The form's document is authoritative: the removed c8y_IsDevice key is gone.
    assert device.fragments == {"c8y_Hardware": {"model": "X-2"}, "com_cumulocity_model_Agent": {}}
    assert (device.is_device, device.is_agent) == (False, True)
    assert device.last_updated > PAST
    assert device.creation_time == PAST
    assert device.owner == "device_sensor-1"


def test_adding_an_object_goes_through_the_service_and_defaults_the_owner(
    admin_client: Client, superuser: User
) -> None:
    url = reverse("admin:inventory_managedobject_add")
    data = form_data(admin_client, url)
    data.update(
        {
            "name": "New device",
            "fragments": '{"c8y_IsDevice": {}}',
            "external_ids-0-type": "c8y_Serial",
            "external_ids-0-external_id": "NEW-1",
        }
    )

    response = admin_client.post(url, data)

    assert response.status_code == 302, response.context and response.context["errors"]
    created = ManagedObject.objects.get(name="New device")
    assert created.owner == superuser.username
    assert created.is_device
    assert list(created.external_ids.values_list("external_id", flat=True)) == ["NEW-1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"c8y_IsDevice": {}', "Enter valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"c8y_Value": NaN}', "Enter valid JSON"),
        ('{"bad.name": 1}', "Invalid fragment name"),
        ('{"owner": "mallory"}', "standard property"),
        ('{"c8y_Text": "nul \\u0000"}', "NUL"),
    ],
)
def test_invalid_fragments_are_a_form_error_and_write_nothing(
    admin_client: Client,
    device: ManagedObject,
    row_counts: Callable[[], dict[str, int]],
    text: str,
    message: str,
) -> None:
    data = form_data(admin_client, change_url(device))
    data["fragments"] = text
    data["name"] = "changed"
    before = row_counts()

    response = admin_client.post(change_url(device), data)

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert message in " ".join(errors["fragments"])
    shown = form_values(response)["fragments"]  # kept for correction (reformatted if JSON)
    assert shown == text or json.loads(shown) == json.loads(text)
    assert row_counts() == before
    device.refresh_from_db()
    assert (device.name, device.last_updated) == ("Sensor 1", PAST)


def children_url(managed_object: ManagedObject) -> str:
    return reverse("admin:inventory_managedobject_children", args=[managed_object.pk])


def references() -> list[tuple[int, str, int]]:
    return list(
        ManagedObjectReference.objects.order_by("id").values_list(
            "parent_id", "relation", "child_id"
        )
    )


def test_adding_a_child_device_by_id_creates_the_reference_with_a_history_entry(
    admin_client: Client, superuser: User, device: ManagedObject
) -> None:
    agent = new_object("Agent", com_cumulocity_model_Agent={}, c8y_IsDevice={})

    response = admin_client.post(
        children_url(agent), {"relation": Relation.DEVICE.value, "ids": f" {device.pk}, "}
    )

    assert response.status_code == 302
    assert response["Location"] == change_url(agent) + "#children"
    assert references() == [(agent.pk, "device", device.pk)]
    agent.refresh_from_db()
    assert agent.last_updated > PAST
    entry = LogEntry.objects.get(object_id=str(agent.pk))
    assert entry.user_id == superuser.pk
    assert entry.get_change_message() == f"Added childDevices: {device.pk}."
    page = admin_client.get(change_url(agent)).content.decode()
    assert f'name="reference" value="{ManagedObjectReference.objects.get().pk}"' in page
    assert "Sensor 1" in page


def test_found_objects_are_offered_and_ticked_ones_added(
    admin_client: Client, device: ManagedObject
) -> None:
    group = new_object("Group", c8y_IsDeviceGroup={})

    page = admin_client.get(change_url(group), {"find": "SN-0042"}).content.decode()
    assert f'name="child" value="{device.pk}"' in page
    response = admin_client.post(
        children_url(group), {"relation": Relation.ASSET.value, "child": [str(device.pk)]}
    )

    assert response.status_code == 302
    assert references() == [(group.pk, "asset", device.pk)]


def test_removing_ticked_children_goes_through_the_service(
    admin_client: Client, device: ManagedObject
) -> None:
    parent = new_object("Parent")
    other = new_object("Other")
    managed_object_add_children(parent=parent, relation=Relation.DEVICE, children=[device])
    (kept,) = managed_object_add_children(parent=parent, relation=Relation.ASSET, children=[other])
    gone = ManagedObjectReference.objects.get(relation=Relation.DEVICE)

    response = admin_client.post(children_url(parent), {"remove": "1", "reference": [gone.pk]})

    assert response.status_code == 302
    assert references() == [(parent.pk, "asset", other.pk)]
    assert LogEntry.objects.get().get_change_message() == f"Removed childDevices: {device.pk}."
    assert kept.pk == ManagedObjectReference.objects.get().pk


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"relation": "device", "ids": "12x"}, "Not IDs: 12x."),
        ({"relation": "device", "ids": "999999"}, "No managed object with ID 999999."),
        ({"relation": "nope", "ids": "1"}, "Choose a relation"),
        ({"relation": "device"}, "Give the IDs"),
        ({"remove": "1"}, "Tick the children to remove."),
        ({"remove": "1", "reference": ["999999"]}, "no longer children"),
    ],
)
def test_bad_child_edits_are_refused_with_a_message_and_write_nothing(
    admin_client: Client,
    row_counts: Callable[[], dict[str, int]],
    body: dict[str, Any],
    message: str,
) -> None:
    parent = new_object("Parent", c8y_IsDevice={})
    before = row_counts()

    response = admin_client.post(children_url(parent), body, follow=True)

    assert message in " ".join(shown_messages(response))
    assert row_counts() == before
    assert not LogEntry.objects.exists()


def test_a_child_devices_cycle_is_refused_and_nothing_is_written(
    admin_client: Client, row_counts: Callable[[], dict[str, int]]
) -> None:
    top = new_object("Top", c8y_IsDevice={})
    middle = new_object("Middle", c8y_IsDevice={})
    bottom = new_object("Bottom", c8y_IsDevice={})
    managed_object_add_children(parent=top, relation=Relation.DEVICE, children=[middle])
    managed_object_add_children(parent=middle, relation=Relation.DEVICE, children=[bottom])
    before = row_counts()

    response = admin_client.post(
        children_url(bottom), {"relation": Relation.DEVICE.value, "ids": str(top.pk)}, follow=True
    )

    assert "would create a cycle" in " ".join(shown_messages(response))
    assert row_counts() == before
    bottom.refresh_from_db()
    assert bottom.last_updated == PAST


def test_a_thousand_children_are_a_paged_list_without_form_fields(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    agent = new_object("Agent", com_cumulocity_model_Agent={}, c8y_IsDevice={})
    children = ManagedObject.objects.bulk_create(
        ManagedObject(name=f"child {n}", owner="alice", is_device=True) for n in range(1000)
    )
    ManagedObjectReference.objects.bulk_create(
        ManagedObjectReference(parent=agent, child=child, relation=Relation.DEVICE)
        for child in children
    )

    with django_assert_max_num_queries(20):
        response = admin_client.get(change_url(agent))

    page = response.content.decode()
    assert page.count('name="reference"') == 50
    assert "child 999" in page
    assert "child 949" not in page
    assert "1000 references" in page
    older = admin_client.get(change_url(agent), {"children_page": 20}).content.decode()
    assert "child 0<" in older
    assert "newer" in older
    # The form an operator saves holds no field per child.
    assert not any(key.startswith("child_refs-") for key in form_values(response))


def test_an_identity_bound_elsewhere_is_a_form_error(
    admin_client: Client, device: ManagedObject, row_counts: Callable[[], dict[str, int]]
) -> None:
    other = new_object("Other")
    data = form_data(admin_client, change_url(other))
    data["external_ids-0-type"] = "c8y_Serial"
    data["external_ids-0-external_id"] = "SN-0042"
    before = row_counts()

    response = admin_client.post(change_url(other), data)

    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert row_counts() == before


def test_editing_an_external_id_in_the_inline_rebinds_it(
    admin_client: Client, device: ManagedObject
) -> None:
    data = form_data(admin_client, change_url(device))
    data["external_ids-0-external_id"] = "SN-0043"

    response = admin_client.post(change_url(device), data)

    assert response.status_code == 302, response.context and response.context["errors"]
    assert list(ExternalId.objects.values_list("type", "external_id", "managed_object_id")) == [
        ("c8y_Serial", "SN-0043", device.pk)
    ]


def test_deleting_through_the_admin_deletes_external_ids(
    admin_client: Client, device: ManagedObject
) -> None:
    url = reverse("admin:inventory_managedobject_delete", args=[device.pk])
    assert admin_client.get(url).status_code == 200

    response = admin_client.post(url, {"post": "yes"})

    assert response.status_code == 302
    assert not ManagedObject.objects.filter(pk=device.pk).exists()
    assert not ExternalId.objects.exists()


def test_bulk_delete_action_deletes_group_with_its_subgroups(
    admin_client: Client, device: ManagedObject
) -> None:
    group = new_object("Group", c8y_IsDeviceGroup={})
    subgroup = new_object("Subgroup", c8y_IsDeviceGroup={})
    managed_object_add_children(parent=group, relation=Relation.ASSET, children=[subgroup])

    response = admin_client.post(
        reverse("admin:inventory_managedobject_changelist"),
        {"action": "delete_selected", "_selected_action": [group.pk, subgroup.pk], "post": "yes"},
    )

    assert response.status_code == 302
    assert list(ManagedObject.objects.all()) == [device]


# --- external IDs ----------------------------------------------------------------------------


def test_external_id_admin_lists_searches_and_creates_through_the_service(
    admin_client: Client, device: ManagedObject
) -> None:
    url = reverse("admin:inventory_externalid_changelist")
    assert list(admin_client.get(url, {"q": "SN-0042"}).context["cl"].result_list) == list(
        device.external_ids.all()
    )
    assert admin_client.get(url, {"q": str(device.pk)}).context["cl"].result_count == 1
    assert admin_client.get(url, {"q": "nothing"}).context["cl"].result_count == 0

    add = reverse("admin:inventory_externalid_add")
    refused = admin_client.post(
        add, {"type": "c8y_Serial", "external_id": "SN-0042", "managed_object": device.pk}
    )
    assert refused.status_code == 200
    assert refused.context["adminform"].form.errors
    slash = admin_client.post(add, {"type": "a/b", "external_id": "x", "managed_object": device.pk})
    assert "may not contain" in slash.content.decode()

    created = admin_client.post(
        add, {"type": "c8y_Imei", "external_id": "3567", "managed_object": device.pk}
    )
    assert created.status_code == 302
    assert device.external_ids.filter(type="c8y_Imei", external_id="3567").exists()


# --- users and groups ------------------------------------------------------------------------


ROLE_NAMES = sorted(role.value for role in Role)


def test_user_admin_offers_only_role_permissions(
    admin_client: Client, make_user: Callable[..., Any]
) -> None:
    reader = make_user("reader", roles=[Role.INVENTORY_ADMIN], groups=["readers"])
    response = admin_client.get(reverse("admin:deviceplatform_user_change", args=[reader.pk]))

    form = response.context["adminform"].form
    offered = form.fields["user_permissions"].queryset
    assert sorted(offered.values_list("codename", flat=True)) == ROLE_NAMES
    labels = [label for _, label in form.fields["user_permissions"].choices]
    assert "ROLE_INVENTORY_READ: Read any managed object and its references" in labels
    page = response.content.decode()
    assert "Effective roles" in page
    assert "ROLE_BULK_OPERATION_READ" in page  # from the readers group
    assert "Device platform admin" in page

    group = Group.objects.get(name="devices")
    group_page = admin_client.get(reverse("admin:auth_group_change", args=[group.pk]))
    group_field = group_page.context["adminform"].form.fields["permissions"]
    assert sorted(group_field.queryset.values_list("codename", flat=True)) == ROLE_NAMES


def test_user_and_group_lists_load(admin_client: Client, admin: User) -> None:
    users = admin_client.get(reverse("admin:deviceplatform_user_changelist"))
    assert users.status_code == 200
    assert admin in users.context["cl"].result_list
    groups = admin_client.get(reverse("admin:auth_group_changelist"))
    assert groups.status_code == 200
    assert "ROLE_IDENTITY_READ, ROLE_INVENTORY_CREATE" in groups.content.decode()  # devices


def test_saving_a_user_keeps_permissions_outside_the_role_selector(
    admin_client: Client, make_user: Callable[..., Any]
) -> None:
    operator = make_user("operator", roles=[Role.INVENTORY_READ])
    view_objects = Permission.objects.get(codename="view_managedobject")
    operator.user_permissions.add(view_objects)
    url = reverse("admin:deviceplatform_user_change", args=[operator.pk])
    data = form_data(admin_client, url)
    data["user_permissions"] = [
        Permission.objects.get(codename=Role.IDENTITY_READ.value).pk,
    ]

    response = admin_client.post(url, data)

    assert response.status_code == 302, response.context and response.context["errors"]
    assert set(operator.user_permissions.values_list("codename", flat=True)) == {
        Role.IDENTITY_READ.value,
        "view_managedobject",
    }


def test_add_user_form_refuses_a_username_that_differs_only_in_case(
    admin_client: Client, admin: User, row_counts: Callable[[], dict[str, int]]
) -> None:
    url = reverse("admin:deviceplatform_user_add")
    data = {
        "username": "ADMIN",
        "usable_password": "true",
        "password1": "a-long-Passw0rd!",
        "password2": "a-long-Passw0rd!",
    }
    before = row_counts()

    response = admin_client.post(url, data)

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["username"] == [
        "The username admin is taken; usernames are not case-sensitive."
    ]
    assert row_counts() == before

    data["username"] = "someone-new"
    assert admin_client.post(url, data).status_code == 302
    assert User.objects.filter(username="someone-new").exists()


def test_change_user_form_refuses_a_rename_onto_another_user(
    admin_client: Client, admin: User, make_user: Callable[..., Any]
) -> None:
    bob = make_user("bob")
    url = reverse("admin:deviceplatform_user_change", args=[bob.pk])
    data = form_data(admin_client, url)
    data["username"] = "Admin"

    response = admin_client.post(url, data)

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        "username": ["The username admin is taken; usernames are not case-sensitive."]
    }
    data["username"] = "BOB"  # a case change of one's own name is fine
    assert admin_client.post(url, data).status_code == 302


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("sensor", {"Sensor 1"}),
        ("SN-0042", {"Sensor 1"}),
        ("Plain 2", {"Plain 2"}),  # words anywhere, each in some field
        ('"plain 1"', {"Plain 1"}),  # a quoted phrase is one word
        ("alice 3", {"Plain 3"}),  # owner and name
        ("nothing-like-this", set()),
    ],
)
def test_search_finds_by_words_in_name_type_owner_external_id_or_id(
    admin_client: Client, device: ManagedObject, search: str, expected: set[str]
) -> None:
    for n in range(1, 4):
        new_object(f"Plain {n}")

    page = admin_client.get(
        reverse("admin:inventory_managedobject_changelist"), {"q": search}
    ).content.decode()

    names = {mo.name for mo in ManagedObject.objects.all() if f">{mo.name}</a>" in page}
    assert names == expected
    by_id = admin_client.get(
        reverse("admin:inventory_managedobject_changelist"), {"q": str(device.pk)}
    ).content.decode()
    assert ">Sensor 1</a>" in by_id
