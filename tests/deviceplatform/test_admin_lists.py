"""Every admin list page at fleet scale: its number of queries is pinned and does not grow with
the rows shown (a page of 5 rows and a page of 60 run the same queries), and counts stay bounded
(deviceplatform/admin_lists.py: exact up to a limit, then the planner's estimate)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from bulkops.models import BulkOperation
from devicecontrol.models import NewDeviceRequest, Operation, OperationStatus
from deviceplatform.admin_lists import EstimatedCount, EstimatedCountPaginator, estimated_count
from deviceplatform.models import DEVICES_GROUP, User
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation

pytestmark = pytest.mark.django_db

START = datetime(2026, 1, 1, tzinfo=UTC)
# Each page's number of queries with the filters of `PAGES` applied. A page may run fewer; one
# that needs more must say why here: the number may never depend on the rows shown.
PAGES: list[tuple[str, dict[str, str], int]] = [
    ("admin:inventory_managedobject_changelist", {}, 8),
    ("admin:inventory_managedobject_changelist", {"is_device__exact": "1"}, 8),
    # a search adds one probe per word and field and one for external IDs (search_candidates)
    ("admin:inventory_managedobject_changelist", {"q": "Device"}, 12),
    # the agent filter reads its two levels of device IDs first (AgentFilter)
    ("admin:inventory_managedobject_changelist", {"agent": "AGENT"}, 11),
    ("admin:inventory_managedobject_changelist", {"group": "GROUP"}, 9),
    ("admin:inventory_managedobject_changelist", {"type__exact": "c8y_Linux"}, 8),
    ("admin:inventory_externalid_changelist", {}, 6),
    ("admin:devicecontrol_operation_changelist", {}, 8),
    ("admin:devicecontrol_operation_changelist", {"status__exact": "FAILED"}, 8),
    ("admin:devicecontrol_operation_changelist", {"agent": "AGENT"}, 8),
    ("admin:devicecontrol_newdevicerequest_changelist", {}, 4),
    ("admin:bulkops_bulkoperation_changelist", {}, 4),
    ("admin:deviceplatform_user_changelist", {}, 5),
    ("admin:deviceplatform_deviceuser_changelist", {}, 6),
    ("admin:auth_group_changelist", {}, 5),
]


class Fleet:
    """Agents with one child device each, all in one group; each device with a serial, firmware
    and three operations (one failed and retried); bulk operations, registrations, device users."""

    def __init__(self) -> None:
        self.group = ManagedObject.objects.create(
            name="Fleet", owner="admin", is_group=True, fragments={"c8y_IsDeviceGroup": {}}
        )
        self.agents: list[ManagedObject] = []
        self.size = 0

    def grow(self, n: int) -> None:
        first = self.size
        agents = ManagedObject.objects.bulk_create(
            ManagedObject(
                name=f"Agent {first + i}",
                type="c8y_Agent",
                owner=f"device_agent-{first + i}",
                is_device=True,
                is_agent=True,
                fragments={"c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
            )
            for i in range(n)
        )
        devices = ManagedObject.objects.bulk_create(
            ManagedObject(
                name=f"Device {first + i}",
                type="c8y_Linux",
                owner=f"device_agent-{first + i}",
                is_device=True,
                fragments={"c8y_IsDevice": {}, "c8y_Firmware": {"name": "fw", "version": "1.0"}},
            )
            for i in range(n)
        )
        ManagedObjectReference.objects.bulk_create(
            [
                *(
                    ManagedObjectReference(parent=a, child=d, relation=Relation.DEVICE)
                    for a, d in zip(agents, devices, strict=True)
                ),
                *(
                    ManagedObjectReference(parent=self.group, child=d, relation=Relation.ASSET)
                    for d in devices
                ),
            ]
        )
        ExternalId.objects.bulk_create(
            ExternalId(type="c8y_Serial", external_id=f"SN-{d.pk}", managed_object=d)
            for d in devices
        )
        failed = Operation.objects.bulk_create(
            Operation(
                device=d,
                agent_id=a.pk,
                status=OperationStatus.FAILED,
                failure_reason="no space left",
                fragments={"description": "Restart", "c8y_Restart": {}},
            )
            for a, d in zip(agents, devices, strict=True)
        )
        Operation.objects.bulk_create(
            [
                *(
                    Operation(
                        device=op.device,
                        agent_id=op.agent_id,
                        retry_of=op,
                        fragments={"description": "Restart", "c8y_Restart": {}},
                    )
                    for op in failed
                ),
                *(
                    Operation(
                        device=d,
                        agent_id=a.pk,
                        status=OperationStatus.SUCCESSFUL,
                        fragments={"c8y_Firmware": {"name": "fw", "version": "1.0"}},
                    )
                    for a, d in zip(agents, devices, strict=True)
                ),
            ]
        )
        BulkOperation.objects.bulk_create(
            BulkOperation(
                group_id=self.group.pk,
                start_date=START,
                effective_start=START,
                creation_ramp=1.0,
                operation_prototype={"c8y_Restart": {}},
                target_count=10,
            )
            for _ in range(n)
        )
        NewDeviceRequest.objects.bulk_create(
            NewDeviceRequest(device_id=f"dev-{first + i}") for i in range(n)
        )
        devices_group, _ = Group.objects.get_or_create(name=DEVICES_GROUP)
        users = User.objects.bulk_create(
            User(
                username=f"device_agent-{first + i}",
                last_request_at=START + timedelta(minutes=i),
            )
            for i in range(n)
        )
        User.groups.through.objects.bulk_create(
            User.groups.through(user_id=user.pk, group_id=devices_group.pk) for user in users
        )
        Group.objects.bulk_create(Group(name=f"team {first + i}") for i in range(n))
        self.agents += agents
        self.size += n


def selected(page: str) -> set[int]:
    """The IDs of the rows on a list page (their action checkboxes)."""
    return {int(pk) for pk in re.findall(r'name="_selected_action" value="(\d+)"', page)}


def queries(client: Client, fleet: Fleet, name: str, params: dict[str, str]) -> int:
    params = {
        key: {"AGENT": str(fleet.agents[0].pk), "GROUP": str(fleet.group.pk)}.get(value, value)
        for key, value in params.items()
    }
    with CaptureQueriesContext(connection) as captured:
        response = client.get(reverse(name), params)
    assert response.status_code == 200, (name, params, response.status_code)
    assert "?e=1" not in response.get("Location", "")
    return len(captured)


@pytest.mark.parametrize(("name", "params", "pinned"), PAGES)
def test_list_page_queries_are_pinned_and_do_not_grow_with_rows(
    admin_client: Client, name: str, params: dict[str, str], pinned: int
) -> None:
    fleet = Fleet()
    fleet.grow(5)
    few = queries(admin_client, fleet, name, params)
    fleet.grow(55)
    many = queries(admin_client, fleet, name, params)

    assert many == few, f"{name} {params}: {few} queries for 5 rows, {many} for 60"
    assert many <= pinned, f"{name} {params}: {many} queries, pinned at {pinned}"


def test_device_list_shows_agent_serial_and_firmware_and_filters_by_agent_and_group(
    admin_client: Client,
) -> None:
    fleet = Fleet()
    fleet.grow(3)
    url = reverse("admin:inventory_managedobject_changelist")
    device = ManagedObject.objects.get(name="Device 1")

    page = admin_client.get(url).content.decode()
    by_agent = admin_client.get(url, {"agent": str(fleet.agents[1].pk)}).content.decode()
    by_group = admin_client.get(url, {"group": str(fleet.group.pk)}).content.decode()

    assert f"SN-{device.pk}" in page
    assert "_facets" not in page  # no "Show counts": a COUNT per filter choice
    types = re.findall(r'href="\?type__exact=([^"&]+)"', page)
    assert types == ["c8y_Agent", "c8y_Linux"]  # every type, in order, once
    assert "fw 1.0" in page
    assert "Agent 1</a> (agent)" in page
    assert "Device 1<" in by_agent
    assert "Agent 1<" in by_agent
    assert "Device 2<" not in by_agent
    assert selected(by_group) == {
        ManagedObject.objects.get(name=name).pk for name in ("Device 0", "Device 1", "Device 2")
    }
    assert selected(by_agent) == {device.pk, fleet.agents[1].pk}
    assert f"#{fleet.agents[1].pk} Agent 1" in by_agent  # the chosen agent, named


@pytest.mark.parametrize("value", ["abc", "-1", "99999999999999999999"])
def test_an_id_filter_with_a_bad_value_is_refused_by_the_admin(
    admin_client: Client, value: str
) -> None:
    response = admin_client.get(
        reverse("admin:inventory_managedobject_changelist"), {"agent": value}
    )

    assert response.status_code == 302
    assert response["Location"].endswith("?e=1")


def test_counts_are_exact_up_to_the_limit_then_estimated() -> None:
    ManagedObject.objects.bulk_create(ManagedObject(name=f"o{n}", owner="a") for n in range(30))
    everything = ManagedObject.objects.all()

    assert estimated_count(everything, limit=30) == 30
    assert not isinstance(estimated_count(everything, limit=30), EstimatedCount)
    over = estimated_count(everything, limit=10)
    if connection.vendor == "postgresql":
        assert isinstance(over, EstimatedCount)
        assert over >= 11
        assert str(over) == f"about {int(over):,}"
    else:  # SQLite (development) counts exactly
        assert over == 30


def test_a_page_past_an_estimate_is_empty_not_an_error() -> None:
    ManagedObject.objects.bulk_create(ManagedObject(name=f"o{n}", owner="a") for n in range(30))

    class Small(EstimatedCountPaginator):
        @property
        def count(self) -> Any:
            return EstimatedCount(12)  # an estimate far below the real 30 rows

    paginator = Small(ManagedObject.objects.order_by("id"), 10)
    assert [len(paginator.page(n).object_list) for n in (1, 2, 3, 4, 5)] == [10, 10, 10, 0, 0]


def test_a_list_over_the_limit_says_about(admin_client: Client) -> None:
    ManagedObject.objects.bulk_create(
        ManagedObject(name=f"o{n}", owner="a") for n in range(10_001 + 5)
    )

    page = admin_client.get(reverse("admin:inventory_managedobject_changelist")).content.decode()

    if connection.vendor == "postgresql":
        assert "about " in page
    else:
        assert "10006 managed objects" in page
