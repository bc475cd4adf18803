"""End to end with the official Python client `c8y-api` 3.7.3 against a live server.

Every call below goes through c8y-api unchanged, so this pins the wire details it depends on:
what it sends (`$filter=(...)+$orderby=...` queries, `q=` for devices, `Accept` present or absent,
DELETE with a JSON body) and what it parses (paging until an empty page, `statistics.totalPages`,
reference collections, external-ID `managedObject.id`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from c8y_api import CumulocityApi
from c8y_api._base_api import AccessDeniedError, UnauthorizedError
from c8y_api.model import Device, DeviceGroup, ExternalId, ManagedObject

from tests.helpers import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE_COUNT = 12  # with page_size=5 every listing spans three pages plus the empty fourth


class RequestLog:
    """The (method, path, query) of every request the client sends, via a requests hook."""

    def __init__(self, c8y: CumulocityApi) -> None:
        self.entries: list[tuple[str, str, dict[str, list[str]]]] = []
        c8y.session.hooks["response"].append(self._record)

    def _record(self, response: Any, *args: Any, **kwargs: Any) -> None:
        url = urlsplit(response.request.url)
        self.entries.append((response.request.method, url.path, parse_qs(url.query)))

    def take(self) -> list[tuple[str, str, dict[str, list[str]]]]:
        entries, self.entries = self.entries, []
        return entries


def ids(objects: Any) -> list[str]:
    return [obj.id for obj in objects]


def names(objects: Any) -> list[str]:
    return [obj.name for obj in objects]


def test_session_resources(c8y: CumulocityApi) -> None:
    assert c8y.tenant_id == "t100"
    assert c8y.username == "admin"

    raw_user = c8y.get("/user/currentUser")
    assert raw_user["userName"] == "admin"
    user = c8y.users.get_current()
    assert user.username == "admin"
    assert {"ROLE_INVENTORY_ADMIN", "ROLE_IDENTITY_ADMIN"} <= user.effective_permission_ids

    raw_tenant = c8y.get("/tenant/currentTenant")
    assert raw_tenant["name"] == c8y.tenant_id
    tenant = c8y.tenants.get_current()  # parses applications.references[].application
    assert tenant.all_applications == []
    assert tenant.all_owned_applications == []


def test_inventory_and_identity_round_trip(c8y: CumulocityApi) -> None:
    log = RequestLog(c8y)

    # --- create --------------------------------------------------------------------------------
    devices = [
        Device(
            c8y,
            type="c8y_Linux" if i % 2 == 0 else "c8y_Pi",
            name=f"dev-{i:02d}",
            c8y_Hardware={"model": "RaspPi BCM2708", "serialNumber": f"sn-{i:02d}"},
        ).create()
        for i in range(DEVICE_COUNT)
    ]
    first = devices[0]
    assert first.id.isdigit()
    assert first.is_device
    assert first.owner == "admin"
    assert first.type == "c8y_Linux"
    assert first.c8y_Hardware.serialNumber == "sn-00"
    assert first.creation_time.endswith("Z")
    assert [int(i) for i in ids(devices)] == sorted(int(i) for i in ids(devices))
    # c8y-api asked for the vendor type and got the body back.
    assert log.take()[0][:2] == ("POST", "/inventory/managedObjects")

    agent = Device(c8y, type="c8y_Agent", name="agent-1", com_cumulocity_model_Agent={}).create()
    assert "com_cumulocity_model_Agent" in agent
    # An admin may name another owner (auth.md §4).
    foreign = ManagedObject(c8y, type="c8y_Thing", name="foreign", owner="someone").create()
    assert foreign.owner == "someone"
    all_devices = [*devices, agent]  # the agent is a device too

    # --- child devices -------------------------------------------------------------------------
    agent.add_child_device(devices[1])
    agent.add_child_device(devices[2])
    reloaded_agent = agent.reload()
    assert ids(reloaded_agent.child_devices) == [devices[1].id, devices[2].id]
    assert names(reloaded_agent.child_devices) == ["dev-01", "dev-02"]
    assert reloaded_agent.child_assets == []
    child = c8y.inventory.get(devices[1].id, with_parents=True)
    assert ids(child.parent_devices) == [agent.id]
    assert child.reload().parent_devices == []  # parents only on request
    assert ids(c8y.inventory.select(child_device_id=devices[1].id)) == [agent.id]

    # --- identity ------------------------------------------------------------------------------
    ExternalId(
        c8y, external_id="raspi-0001", external_type="c8y_Serial", managed_object_id=first.id
    ).create()
    ExternalId(
        c8y, external_id="raspi 0001 b", external_type="c8y_Serial", managed_object_id=first.id
    ).create()
    assert c8y.identity.get_id("raspi-0001", "c8y_Serial") == first.id
    assert c8y.identity.get_id("raspi 0001 b", "c8y_Serial") == first.id  # space: %20 in the path
    external = c8y.identity.get("raspi-0001", "c8y_Serial")
    assert (external.external_id, external.type, external.managed_object_id) == (
        "raspi-0001",
        "c8y_Serial",
        first.id,
    )
    by_external = c8y.identity.get_object("raspi-0001", "c8y_Serial")
    assert (by_external.id, by_external.name) == (first.id, "dev-00")
    listed = c8y.identity.get_all(first.id)
    assert [(x.external_id, x.type, x.managed_object_id) for x in listed] == [
        ("raspi-0001", "c8y_Serial", first.id),
        ("raspi 0001 b", "c8y_Serial", first.id),
    ]
    assert c8y.identity.get_all(devices[3].id) == []
    # Binding the same pair to another object is refused (409 -> ValueError in c8y-api).
    with pytest.raises(ValueError, match="409"):
        ExternalId(
            c8y, external_id="raspi-0001", external_type="c8y_Serial", managed_object_id=agent.id
        ).create()
    ExternalId(c8y, external_id="raspi 0001 b", external_type="c8y_Serial").delete()
    with pytest.raises(KeyError):
        c8y.identity.get_id("raspi 0001 b", "c8y_Serial")
    with pytest.raises(KeyError):
        c8y.identity.create("x-1", "c8y_Serial", "999999999")  # no such object: 404

    # --- listing and paging --------------------------------------------------------------------
    log.take()
    listed_devices = list(c8y.device_inventory.select(page_size=5))
    assert ids(listed_devices) == ids(all_devices)
    pages = log.take()
    # fragmentType=c8y_IsDevice, pages 1..4 (13 devices: 5 + 5 + 3, then the empty page 4).
    assert [entry[2]["currentPage"] for entry in pages] == [["1"], ["2"], ["3"], ["4"]]
    assert all(entry[2]["fragmentType"] == ["c8y_IsDevice"] for entry in pages)
    assert all(entry[2]["pageSize"] == ["5"] for entry in pages)
    assert all(isinstance(d, Device) for d in listed_devices)

    assert names(c8y.device_inventory.select(page_size=5, page_number=2)) == [
        f"dev-{i:02d}" for i in range(5, 10)
    ]
    assert names(c8y.device_inventory.get_all(limit=7, page_size=5)) == [
        f"dev-{i:02d}" for i in range(7)
    ]
    assert len(log.take()) == 3  # page 2 only; then pages 1 and 2 until the limit was reached

    # by type (plain type= parameter)
    assert names(c8y.device_inventory.select(type="c8y_Linux", page_size=5)) == [
        f"dev-{i:02d}" for i in range(0, DEVICE_COUNT, 2)
    ]
    assert names(c8y.inventory.select(type="c8y_Thing")) == ["foreign"]
    # by fragment (fragmentType=)
    assert ids(c8y.inventory.select(fragment="c8y_Hardware", page_size=5)) == ids(devices)
    assert ids(c8y.inventory.select(fragment="com_cumulocity_model_Agent")) == [agent.id]
    # by owner (owner=)
    assert ids(c8y.inventory.select(owner="someone")) == [foreign.id]
    assert ids(c8y.inventory.select(owner="admin", page_size=5)) == ids(all_devices)
    # by text (prefix of name)
    assert names(c8y.inventory.select(text="dev-1")) == ["dev-10", "dev-11"]
    # by ids
    wanted = [devices[7].id, devices[2].id, foreign.id, "999999999"]
    assert ids(c8y.inventory.get_all(ids=wanted)) == [devices[2].id, devices[7].id, foreign.id]

    # by name: c8y-api folds every filter into a `$filter=(...)` query
    log.take()
    assert ids(c8y.device_inventory.select(name="dev-03")) == [devices[3].id]
    (_, _, query), *_ = log.take()
    assert query["q"] == ["$filter=(has(c8y_IsDevice) and name eq 'dev-03')"]
    assert names(c8y.inventory.select(name="dev-0*", page_size=5)) == [
        f"dev-{i:02d}" for i in range(10)
    ]
    assert c8y.inventory.get_by(name="agent-1").id == agent.id
    with pytest.raises(ValueError, match="No matching"):
        c8y.inventory.get_by(name="nobody")

    # order_by: `$filter=(...)+$orderby=name desc`
    log.take()
    assert names(c8y.device_inventory.select(type="c8y_Pi", order_by="name desc", page_size=5)) == [
        f"dev-{i:02d}" for i in range(DEVICE_COUNT - 1, 0, -2)
    ]
    (_, _, query), *_ = log.take()
    assert query["q"] == ["$filter=(has(c8y_IsDevice) and type eq c8y_Pi)+$orderby=name desc"]
    assert names(c8y.inventory.select(name="dev-0*", order_by="name desc", limit=3)) == [
        "dev-09",
        "dev-08",
        "dev-07",
    ]
    by_serial = c8y.inventory.select(
        query="$filter=(c8y_Hardware.serialNumber eq 'sn-1*')+$orderby=c8y_Hardware.serialNumber desc"
    )
    assert names(by_serial) == ["dev-11", "dev-10"]

    # --- counts (pageSize=1&withTotalPages=true) ------------------------------------------------
    assert c8y.device_inventory.get_count() == DEVICE_COUNT + 1
    assert c8y.inventory.get_count() == DEVICE_COUNT + 2
    assert c8y.device_inventory.get_count(type="c8y_Linux") == DEVICE_COUNT // 2
    assert c8y.inventory.get_count(fragment="c8y_Hardware") == DEVICE_COUNT
    assert c8y.inventory.get_count(name="dev-0*") == 10
    assert c8y.inventory.get_count(owner="someone") == 1
    assert c8y.device_inventory.get_count(name="nobody") == 0
    assert c8y.group_inventory.get_count() == 0

    # --- groups --------------------------------------------------------------------------------
    group = DeviceGroup(c8y, root=True, name="Fleet A").create()
    assert group.type == DeviceGroup.ROOT_TYPE
    assert "c8y_IsDeviceGroup" in group
    group.add_child_asset(devices[4])
    c8y.group_inventory.assign_children(group.id, devices[5].id, devices[6].id)  # Accept: none
    sub = group.create_child(name="Fleet A.1")
    sub.add_child_asset(devices[7])
    assert sub.type == DeviceGroup.CHILD_TYPE

    reloaded_group = c8y.group_inventory.get(group.id)
    assert isinstance(reloaded_group, DeviceGroup)
    assert ids(reloaded_group.child_assets) == [devices[4].id, devices[5].id, devices[6].id, sub.id]
    assert ids(c8y.inventory.select(parent=group.id)) == [
        devices[4].id,
        devices[5].id,
        devices[6].id,
        sub.id,
    ]
    assert ids(c8y.device_inventory.select(parent=group.id, page_size=2)) == ids(devices[4:7])
    assert ids(c8y.group_inventory.select(parent=group.id)) == [sub.id]
    assert ids(c8y.group_inventory.select()) == [group.id, sub.id]
    assert c8y.group_inventory.get_count() == 2
    assert c8y.device_inventory.get_count(parent=group.id) == 3
    assert c8y.inventory.get(devices[5].id, with_groups=True).parent_assets[0].id == group.id

    c8y.group_inventory.unassign_children(group.id, devices[5].id, devices[6].id)  # DELETE + body
    group.unassign_child_asset(devices[4])
    assert ids(c8y.inventory.select(parent=group.id)) == [sub.id]
    assert c8y.device_inventory.get_count(parent=group.id) == 0
    with pytest.raises(KeyError):  # that edge is gone: 404
        group.unassign_child_asset(devices[4])

    # --- update --------------------------------------------------------------------------------
    target = c8y.device_inventory.get(devices[8].id)
    target.c8y_Hardware.model = "RaspPi 4"
    target["c8y_Firmware"] = {"version": "1.0.1"}
    target.name = "dev-08-renamed"
    updated = target.update()
    assert updated.name == "dev-08-renamed"
    assert updated.c8y_Hardware.model == "RaspPi 4"
    assert updated.c8y_Hardware.serialNumber == "sn-08"  # the fragment was sent whole
    assert updated.c8y_Firmware.version == "1.0.1"
    assert updated.update_time >= updated.creation_time
    c8y.inventory.apply_to({"c8y_Firmware": None}, devices[8].id)  # null removes the fragment
    final = devices[8].reload()
    assert "c8y_Firmware" not in final
    assert final.name == "dev-08-renamed"
    assert c8y.inventory.get_count(fragment="c8y_Firmware") == 0

    # --- delete --------------------------------------------------------------------------------
    devices[0].delete()  # removes its external IDs too
    with pytest.raises(KeyError):
        c8y.inventory.get(devices[0].id)
    with pytest.raises(KeyError):
        c8y.identity.get_id("raspi-0001", "c8y_Serial")
    with pytest.raises(KeyError):
        devices[0].delete()

    agent.delete_tree()  # Device.delete_tree: cascade=true takes its child devices along
    for gone in (agent, devices[1], devices[2]):
        with pytest.raises(KeyError):
            c8y.inventory.get(gone.id)

    group.delete()  # cascade=false: the subgroup goes, the device in it stays
    with pytest.raises(KeyError):
        c8y.inventory.get(sub.id)
    assert c8y.inventory.get(devices[7].id, with_parents=True).parent_assets == []

    tree = ManagedObject(c8y, type="c8y_Thing", name="tree-root").create()
    leaf = ManagedObject(c8y, type="c8y_Thing", name="tree-leaf").create()
    tree.add_child_addition(leaf)
    tree.delete_tree()  # ManagedObject.delete_tree: forceCascade=true
    with pytest.raises(KeyError):
        c8y.inventory.get(leaf.id)

    remaining = [d for d in devices if d.id not in {devices[0].id, devices[1].id, devices[2].id}]
    assert ids(c8y.device_inventory.get_all(page_size=5)) == ids(remaining)
    assert c8y.device_inventory.get_count() == len(remaining) == DEVICE_COUNT - 3
    assert c8y.inventory.get_count() == len(remaining) + 1  # plus `foreign`


def test_bulk_helpers_filters_and_refusals(c8y: CumulocityApi, live_server: Any) -> None:
    from deviceplatform.services import user_upsert

    # Inventory.create/update/delete send no vendor Accept and ignore the bodies.
    c8y.inventory.create(
        ManagedObject(type="c8y_Box", name="O'Brien box", c8y_Tags=["blue", "red"]),
        ManagedObject(type="c8y_Box", name="plain box", c8y_Tags=["green"], c8y_Extra={}),
    )
    boxes = c8y.inventory.get_all(type="c8y_Box", page_size=1)
    assert names(boxes) == ["O'Brien box", "plain box"]
    assert c8y.inventory.get_by(name="O'Brien box").id == boxes[0].id  # '' escaping
    assert names(c8y.inventory.select(text="o'brien b")) == ["O'Brien box"]  # quoted, space
    assert names(c8y.inventory.select(fragments=["c8y_Tags", "c8y_Extra"])) == ["plain box"]
    assert names(c8y.inventory.select(query="$filter=(c8y_Tags eq 'red')")) == ["O'Brien box"]

    boxes[1]["c8y_Extra"] = {"level": 2}
    c8y.inventory.update(boxes[1])
    assert c8y.inventory.get(boxes[1].id).c8y_Extra.level == 2

    group = DeviceGroup(c8y, root=True, name="Boxes").create()
    group.add_child_asset(boxes[0])
    assert names(c8y.inventory.select(type="c8y_Box", only_roots=True)) == ["plain box"]
    plain = c8y.inventory.get(group.id, with_children=False)
    assert plain.child_assets == []
    counted = c8y.inventory.get(group.id, with_children_count=True, skip_children_names=True)
    assert ids(counted.child_assets) == [boxes[0].id]
    assert counted.child_assets[0].name == ""  # skipChildrenNames: id and self only

    # Parameters c8y-api sends that change nothing here: withLatestValues, revert.
    latest = c8y.inventory.get(boxes[0].id, with_latest_values=True, with_parents=True)
    assert ids(latest.parent_assets) == [group.id]
    assert names(c8y.inventory.select(type="c8y_Box", reverse=True)) == names(boxes)
    assert list(c8y.inventory.select(type="c8y_Box", as_values=["name", "c8y_Tags"])) == [
        ("O'Brien box", ["blue", "red"]),
        ("plain box", ["green"]),
    ]
    sub = DeviceGroup(c8y, name="Boxes.1").create()
    group.assign_child_group(sub)
    assert ids(c8y.group_inventory.select(parent=group.id)) == [sub.id]
    assert names(c8y.group_inventory.select(only_roots=True)) == ["Boxes"]

    c8y.group_inventory.delete_trees(group)  # cascade=true: the member and the subgroup go too
    with pytest.raises(KeyError):
        c8y.group_inventory.get(sub.id)
    assert names(c8y.inventory.select(type="c8y_Box")) == ["plain box"]
    c8y.inventory.delete(boxes[1].id)
    assert c8y.inventory.get_count(type="c8y_Box") == 0

    # Refusals surface as c8y-api's exceptions: 401 on bad credentials, 403 on a foreign object.
    wrong = CumulocityApi(
        base_url=live_server.url, tenant_id="t100", username="admin", password="wrong"
    )
    with pytest.raises(UnauthorizedError):
        wrong.inventory.get_count()
    with pytest.raises(UnauthorizedError):
        Device(wrong, name="x").create()  # reads the error body's `message`
    user_upsert(username="device-user", password=PASSWORD, groups=["devices"])
    device_user = CumulocityApi(
        base_url=live_server.url, tenant_id="t100", username="device-user", password=PASSWORD
    )
    own = Device(device_user, type="c8y_Own", name="own").create()
    assert own.owner == "device-user"
    ExternalId(
        device_user, external_id="own-1", external_type="c8y_Serial", managed_object_id=own.id
    ).create()
    assert device_user.identity.get_id("own-1", "c8y_Serial") == own.id
    admins_device = Device(c8y, type="c8y_Admins", name="admins").create()
    with pytest.raises(AccessDeniedError):
        device_user.inventory.get(admins_device.id)
    # Collections are filtered to what the user may read (auth.md §5).
    assert ids(device_user.device_inventory.select()) == [own.id]
    assert device_user.device_inventory.get_count() == 1
    own.delete()
