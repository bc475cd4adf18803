"""An ID in a URL path is ASCII digits and nothing else: `/%2042` names no resource (it used to be
read as 42, after trimming the space), so it is a 404 that changes nothing, on every resource.
(Bulk operations: tests/bulkops/test_cancel_pending.py.)"""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from devicecontrol.models import Operation
from devicecontrol.services import operation_create, operation_update
from inventory.models import ManagedObject
from tests.devicecontrol.conftest import add_child_devices, make_device
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db


@pytest.fixture
def failed() -> Operation:
    agent = make_device("Agent", agent=True)
    device = make_device("Pump")
    add_child_devices(agent, device)
    operation = operation_create(device=device, data={"c8y_Restart": {}})
    return operation_update(operation_id=operation.pk, data={"status": "FAILED"})


PATHS = [
    ("GET", "/inventory/managedObjects/{device}"),
    ("PUT", "/inventory/managedObjects/{device}"),
    ("GET", "/inventory/managedObjects/{agent}/childDevices/{device}"),
    ("GET", "/devicecontrol/operations/{operation}"),
    ("POST", "/devicecontrol/operations/{operation}/retry"),
    ("POST", "/devicecontrol/operations/{operation}/cancel"),
]


def state() -> tuple[int, int, list[str]]:
    return (
        Operation.objects.count(),
        ManagedObject.objects.count(),
        list(Operation.objects.order_by("pk").values_list("status", flat=True)),
    )


@pytest.mark.parametrize("padding", ["%20{}", "{}%20", "%09{}", "+{}", "{}.0", "0x{}"])
@pytest.mark.parametrize(("method", "path"), PATHS)
def test_a_path_id_that_is_not_plain_digits_is_404(
    admin_api: APIClient, failed: Operation, method: str, path: str, padding: str
) -> None:
    ids = {"device": failed.device_id, "agent": failed.agent_id, "operation": failed.pk}
    target = path.rsplit("{", 1)[1].split("}")[0]  # the last ID of the path is the padded one
    ids_shown = {key: str(value) for key, value in ids.items()}
    ids_shown[target] = padding.format(ids[target])
    before = state()

    response = admin_api.generic(
        method,
        path.format(**ids_shown),
        "{}" if method != "GET" else "",
        content_type="application/json",
    )

    assert_error(response, 404)
    assert state() == before


@pytest.mark.parametrize(("method", "path"), PATHS[:4])
def test_the_same_paths_with_plain_ids_answer(
    admin_api: APIClient, failed: Operation, method: str, path: str
) -> None:
    ids = {"device": failed.device_id, "agent": failed.agent_id, "operation": failed.pk}
    response = admin_api.generic(
        method, path.format(**ids), "{}" if method != "GET" else "", content_type="application/json"
    )
    assert response.status_code == 200, response.content
