"""The device list's "operations" filter (issue 12: an operator filters the fleet by status):
devices with open operations, by their latest operation's status, or with none."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from devicecontrol.services import operation_create, operation_update
from tests.devicecontrol.test_admin import failed, new_agent, new_device

pytestmark = pytest.mark.django_db

DEVICES = reverse("admin:inventory_managedobject_changelist")


def listed(response: Any) -> set[str]:
    assert response.status_code == 200, response.status_code
    return {obj.name for obj in response.context["cl"].result_list}


def test_devices_filter_by_their_operations(admin_client: Client) -> None:
    agent = new_agent("Gateway")
    pending, failing, recovered, quiet = (
        new_device(name, agent) for name in ("Pending", "Failing", "Recovered", "Quiet")
    )
    operation_create(device=pending, data={"c8y_Restart": {}})
    failed(failing)
    failed(recovered)
    done = operation_create(device=recovered, data={"c8y_Restart": {}})
    operation_update(operation_id=done.pk, data={"status": "EXECUTING"})
    operation_update(operation_id=done.pk, data={"status": "SUCCESSFUL"})

    def devices(value: str) -> set[str]:
        return listed(admin_client.get(DEVICES, {"operations": value, "is_device__exact": "1"}))

    assert devices("open") == {"Pending"}
    assert devices("last-FAILED") == {"Failing"}
    assert "Recovered" not in devices("last-FAILED")  # failed once, then succeeded
    assert devices("none") == {"Gateway", "Quiet"}
    # A value the filter does not offer filters nothing (Django shows every device).
    assert devices("last-SUCCESSFUL") == {"Gateway", "Pending", "Failing", "Recovered", "Quiet"}


def test_the_filter_is_offered_on_the_device_list(admin_client: Client) -> None:
    response = admin_client.get(DEVICES)

    titles = [spec.title for spec in response.context["cl"].filter_specs]
    assert "operations" in titles
