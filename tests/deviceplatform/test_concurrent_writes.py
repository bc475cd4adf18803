"""No lost update on any write endpoint (issue 10): real HTTP clients in parallel threads against a
live server, each request in its own server thread with its own database connection.

Each test sends N requests at once that change different parts of one object; every change must
survive. Then optimistic concurrency: `ETag` on single-object answers, `If-Match` on PUT/DELETE
answered 412 when the object changed meanwhile, and clients that retry on 412 all get through."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import requests

from bulkops.models import BulkOperation
from devicecontrol import services as operation_services
from devicecontrol.models import Operation
from inventory import services as inventory_services
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation
from tests.helpers import PASSWORD, run_together

pytestmark = pytest.mark.django_db(transaction=True)

CLIENTS = 8
JSON = {"Content-Type": "application/json", "Accept": "application/json"}


def together(work: Callable[[int], Any], count: int = CLIENTS) -> list[Any]:
    return run_together(work, count)


class Api:
    """A Basic-auth HTTP client of the live server, one session per thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.local = threading.local()

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
            session.auth = ("t100/admin", PASSWORD)
        headers = {**JSON, **kwargs.pop("headers", {})}
        return session.request(method, self.url + path, headers=headers, timeout=60, **kwargs)


@pytest.fixture
def api(live_server: Any, make_user: Callable[..., Any]) -> Api:
    make_user("admin", groups=["admins"])
    return Api(live_server.url)


def device(name: str, **fragments: Any) -> ManagedObject:
    return inventory_services.managed_object_create(
        owner="admin", data={"name": name, "c8y_IsDevice": {}, **fragments}
    )


def statuses(responses: list[Any]) -> list[int | str]:
    return [r.status_code if isinstance(r, requests.Response) else repr(r) for r in responses]


# --- N clients, different parts of one object, all at once -------------------------------------


def test_concurrent_puts_of_a_managed_object_keep_every_fragment(api: Api) -> None:
    target = device("Target", c8y_Keep={"a": 1})
    path = f"/inventory/managedObjects/{target.pk}"

    responses = together(lambda i: api("PUT", path, json={f"c8y_Part{i}": {"value": i}}))

    assert statuses(responses) == [200] * CLIENTS
    fragments = ManagedObject.objects.get(pk=target.pk).fragments
    assert {f"c8y_Part{i}" for i in range(CLIENTS)} <= fragments.keys()
    assert fragments["c8y_Keep"] == {"a": 1}


def test_concurrent_puts_of_an_operation_keep_every_fragment(api: Api) -> None:
    agent = device("Agent", com_cumulocity_model_Agent={})
    child = device("Device")
    inventory_services.managed_object_add_children(
        parent=agent, relation=Relation.DEVICE, children=[child]
    )
    operation = operation_services.operation_create(device=child, data={"c8y_Restart": {}})
    path = f"/devicecontrol/operations/{operation.pk}"

    responses = together(
        lambda i: api("PUT", path, json={"status": "EXECUTING", f"c8y_Step{i}": i})
    )

    assert statuses(responses) == [200] * CLIENTS
    fragments = Operation.objects.get(pk=operation.pk).fragments
    assert {f"c8y_Step{i}" for i in range(CLIENTS)} <= fragments.keys()
    assert "c8y_Restart" in fragments


def test_concurrent_puts_of_a_bulk_operation_keep_every_fragment(api: Api) -> None:
    group = inventory_services.managed_object_create(
        owner="admin", data={"name": "Fleet", "c8y_IsDeviceGroup": {}}
    )
    created = api(
        "POST",
        "/devicecontrol/bulkoperations",
        json={
            "groupId": str(group.pk),
            "startDate": "2031-01-01T00:00:00Z",
            "creationRamp": 5,
            "operationPrototype": {"c8y_Restart": {}},
        },
    )
    assert created.status_code == 201, created.text
    path = f"/devicecontrol/bulkoperations/{created.json()['id']}"

    responses = together(lambda i: api("PUT", path, json={f"c8y_Note{i}": i}))

    assert statuses(responses) == [200] * CLIENTS
    fragments = BulkOperation.objects.get(pk=created.json()["id"]).fragments
    assert {f"c8y_Note{i}" for i in range(CLIENTS)} <= fragments.keys()


def test_concurrent_child_additions_to_one_parent_all_survive(api: Api) -> None:
    parent = device("Agent", com_cumulocity_model_Agent={})
    children = [device(f"Child {i}") for i in range(CLIENTS)]
    path = f"/inventory/managedObjects/{parent.pk}/childDevices"

    responses = together(
        lambda i: api("POST", path, json={"managedObject": {"id": str(children[i].pk)}})
    )

    assert statuses(responses) == [201] * CLIENTS
    assert set(
        ManagedObjectReference.objects.filter(parent=parent, relation=Relation.DEVICE).values_list(
            "child_id", flat=True
        )
    ) == {child.pk for child in children}


def test_concurrent_external_ids_for_one_object_all_survive(api: Api) -> None:
    target = device("Target")
    path = f"/identity/globalIds/{target.pk}/externalIds"

    responses = together(
        lambda i: api("POST", path, json={"type": "c8y_Serial", "externalId": f"SN-{i}"})
    )

    assert statuses(responses) == [201] * CLIENTS
    assert sorted(
        ExternalId.objects.filter(managed_object=target).values_list("external_id", flat=True)
    ) == sorted(f"SN-{i}" for i in range(CLIENTS))


def add_edges_at_once(api: Api, pairs: list[tuple[ManagedObject, ManagedObject]]) -> list[Any]:
    """POST each (parent, child) as a childDevices reference, all at the same moment."""
    return together(
        lambda i: api(
            "POST",
            f"/inventory/managedObjects/{pairs[i][0].pk}/childDevices",
            json={"managedObject": {"id": str(pairs[i][1].pk)}},
        ),
        count=len(pairs),
    )


def test_two_clients_closing_a_child_device_cycle_at_once_never_both_succeed(api: Api) -> None:
    """A -> B and B -> A sent at the same moment: one is refused (422), no cycle is stored."""
    for _ in range(6):
        a, b = device("A"), device("B")
        assert sorted(statuses(add_edges_at_once(api, [(a, b), (b, a)]))) == [201, 422]
        assert (
            ManagedObjectReference.objects.filter(
                relation=Relation.DEVICE, parent__in=[a, b], child__in=[a, b]
            ).count()
            == 1
        )


def test_a_three_device_ring_cannot_be_closed_by_concurrent_additions(api: Api) -> None:
    """With C -> A stored, A -> B and B -> C sent at once would close A -> B -> C -> A."""
    for _ in range(4):
        a, b, c = device("A"), device("B"), device("C")
        inventory_services.managed_object_add_children(
            parent=c, relation=Relation.DEVICE, children=[a]
        )
        assert sorted(statuses(add_edges_at_once(api, [(a, b), (b, c)]))) == [201, 422]


# --- ETag and If-Match -----------------------------------------------------------------------------


def _bulk_path(api: Api) -> str:
    group = inventory_services.managed_object_create(
        owner="admin", data={"name": "Fleet", "c8y_IsDeviceGroup": {}}
    )
    body = {
        "groupId": str(group.pk),
        "startDate": "2031-01-01T00:00:00Z",
        "creationRamp": 5,
        "operationPrototype": {"c8y_Restart": {}},
    }
    return f"/devicecontrol/bulkoperations/{api('POST', '/devicecontrol/bulkoperations', json=body).json()['id']}"


def _operation_path(api: Api) -> str:
    agent = device("Agent", com_cumulocity_model_Agent={})
    child = device("Device")
    inventory_services.managed_object_add_children(
        parent=agent, relation=Relation.DEVICE, children=[child]
    )
    operation = operation_services.operation_create(device=child, data={"c8y_Restart": {}})
    return f"/devicecontrol/operations/{operation.pk}"


# resource -> (make a path, a PUT body that changes it, another one)
RESOURCES: dict[str, tuple[Callable[[Api], str], dict[str, Any], dict[str, Any]]] = {
    "managed object": (
        lambda api: f"/inventory/managedObjects/{device('Target').pk}",
        {"c8y_A": 1},
        {"c8y_B": 2},
    ),
    "operation": (_operation_path, {"status": "EXECUTING"}, {"status": "SUCCESSFUL"}),
    "bulk operation": (_bulk_path, {"creationRamp": 7}, {"creationRamp": 9}),
}


@pytest.mark.parametrize("resource", RESOURCES)
def test_if_match_with_a_stale_etag_is_412_and_changes_nothing(api: Api, resource: str) -> None:
    make_path, first, second = RESOURCES[resource]
    path = make_path(api)
    read = api("GET", path)
    etag = read.headers["ETag"]
    assert etag.startswith('"')
    assert etag.endswith('"')
    assert api("GET", path).headers["ETag"] == etag  # stable while nothing changes

    updated = api("PUT", path, json=first, headers={"If-Match": etag})
    assert updated.status_code == 200, updated.text
    new_etag = updated.headers["ETag"]
    assert new_etag != etag
    assert api("GET", path).headers["ETag"] == new_etag  # the PUT answer's tag is the GET's

    stale = api("PUT", path, json=second, headers={"If-Match": etag})
    assert stale.status_code == 412, stale.text
    assert stale.json()["error"] == "general/preconditionFailed"
    assert stale.headers["Content-Type"].startswith("application/vnd.com.nsn.cumulocity.error+json")
    assert api("GET", path).json() == updated.json()  # nothing written

    assert api("PUT", path, json=second, headers={"If-Match": "*"}).status_code == 200
    weak = api("GET", path).headers["ETag"]
    # If-Match compares strongly: a weak tag never matches (RFC 9110 §13.1.1).
    assert api("PUT", path, json=first, headers={"If-Match": f"W/{weak}"}).status_code == 412
    assert api("PUT", path, json=first, headers={"If-Match": f'"x", {weak}'}).status_code == 200
    assert api("PUT", path, json=second).status_code == 200  # without If-Match: as before


def test_delete_with_if_match(api: Api) -> None:
    target = device("Target")
    path = f"/inventory/managedObjects/{target.pk}"
    etag = api("GET", path).headers["ETag"]
    assert api("PUT", path, json={"c8y_X": 1}).status_code == 200

    assert api("DELETE", path, headers={"If-Match": etag}).status_code == 412
    assert ManagedObject.objects.filter(pk=target.pk).exists()
    current = api("GET", path).headers["ETag"]
    assert api("DELETE", path, headers={"If-Match": current}).status_code == 204
    assert not ManagedObject.objects.filter(pk=target.pk).exists()

    inventory_services.external_id_create(
        managed_object=device("Other"), type="c8y_Serial", external_id="E-1"
    )
    external = "/identity/externalIds/c8y_Serial/E-1"
    tag = api("GET", external).headers["ETag"]
    assert api("DELETE", external, headers={"If-Match": '"stale"'}).status_code == 412
    assert api("DELETE", external, headers={"If-Match": tag}).status_code == 204


def test_clients_that_retry_on_412_all_get_their_change_in(api: Api) -> None:
    """Read-modify-write of one shared fragment (a counter) with If-Match: every increment lands,
    which without If-Match would lose some."""
    target = device("Target", c8y_Counter={"value": 0})
    path = f"/inventory/managedObjects/{target.pk}"
    conflicts = []

    def increment(_: int) -> int:
        for attempt in range(200):
            read = api("GET", path)
            value = read.json()["c8y_Counter"]["value"]
            put = api(
                "PUT",
                path,
                json={"c8y_Counter": {"value": value + 1}},
                headers={"If-Match": read.headers["ETag"]},
            )
            if put.status_code == 200:
                return attempt
            assert put.status_code == 412, put.text
            conflicts.append(1)
        raise AssertionError("no success in 200 attempts")

    together(increment)
    assert ManagedObject.objects.get(pk=target.pk).fragments["c8y_Counter"] == {"value": CLIENTS}


def test_adding_a_child_while_it_is_deleted_is_201_or_404_never_500(api: Api) -> None:
    for _ in range(6):
        parent, child = device("Parent"), device("Child")
        child_path = f"/inventory/managedObjects/{child.pk}"
        responses = together(
            lambda i, child=child, parent=parent, child_path=child_path: (
                api("DELETE", child_path)
                if i == 0
                else api(
                    "POST",
                    f"/inventory/managedObjects/{parent.pk}/childDevices",
                    json={"managedObject": {"id": str(child.pk)}},
                )
            ),
            count=2,
        )
        delete, add = statuses(responses)
        assert delete == 204
        assert add in (201, 404)
        assert not ManagedObjectReference.objects.filter(child_id=child.pk).exists()


def test_two_groups_adding_each_other_as_assets_at_once_do_not_deadlock(api: Api) -> None:
    for _ in range(6):
        a, b = (
            inventory_services.managed_object_create(
                owner="admin", data={"name": name, "c8y_IsDeviceGroup": {}}
            )
            for name in ("A", "B")
        )
        pairs = [(a, b), (b, a)]
        responses = together(
            lambda i, pairs=pairs: api(
                "POST",
                f"/inventory/managedObjects/{pairs[i][0].pk}/childAssets",
                json={"managedObject": {"id": str(pairs[i][1].pk)}},
            ),
            count=2,
        )
        assert statuses(responses) == [201, 201]
