"""Cumulocity's bootstrap flow end to end with the official Python client (c8y-api 3.7.3) against a
live server: the operator registers and accepts with `DeviceInventory.request`/`accept`, the device
waits with `CumulocityDeviceRegistry.await_credentials` logged in as `management/devicebootstrap`,
and then works with the credentials it received."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from c8y_api import CumulocityApi
from c8y_api._base_api import AccessDeniedError
from c8y_api._registry_api import CumulocityDeviceRegistry
from c8y_api.model import Device

from devicecontrol.models import NewDeviceRequest
from deviceplatform.services import bootstrap_user_ensure

pytestmark = pytest.mark.django_db(transaction=True)

BOOTSTRAP_PASSWORD = "bootstrap-e2e-pw"
# c8y-api 3.7.3 cannot parse a pause in milliseconds ("100ms": float("100ms") raises ValueError),
# so the client polls once a second, its default.
PAUSE = "1s"


def wait_for_status(device_id: str, status: str, *, limit: float = 30.0) -> None:
    """Until the request has `status` (the poller runs in another thread); `limit` only bounds a
    hang, it is no timing assertion."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if NewDeviceRequest.objects.filter(device_id=device_id, status=status).exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{device_id} never became {status}")


def test_a_device_onboards_itself_with_c8y_api(c8y: CumulocityApi, live_server: Any) -> None:
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)
    registry = CumulocityDeviceRegistry(
        live_server.url, "management", "devicebootstrap", BOOTSTRAP_PASSWORD
    )

    c8y.device_inventory.request("c8y-sn-0042")
    requested = c8y.get("/devicecontrol/newDeviceRequests/c8y-sn-0042")
    assert requested["status"] == "WAITING_FOR_CONNECTION"
    assert requested["owner"] == "admin"

    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(registry.await_credentials, "c8y-sn-0042", timeout="30s", pause=PAUSE)
        wait_for_status("c8y-sn-0042", "PENDING_ACCEPTANCE")
        assert not waiting.done()  # 404 while not accepted: the client keeps polling
        c8y.device_inventory.accept("c8y-sn-0042")
        credentials = waiting.result(timeout=60)

    assert credentials.tenant_id == "t100"
    assert credentials.username == "device_c8y-sn-0042"
    assert c8y.get("/devicecontrol/newDeviceRequests/c8y-sn-0042")["status"] == "ACCEPTED"

    # The device works with its own credentials: it creates its managed object and owns it.
    agent = CumulocityApi(
        live_server.url, credentials.tenant_id, credentials.username, credentials.password
    )
    try:
        created = Device(agent, type="c8y_Linux", name="Onboarded 42").create()
        assert created.owner == "device_c8y-sn-0042"
        listed = agent.get("/inventory/managedObjects")["managedObjects"]
        assert [item["id"] for item in listed] == [created.id]
        assert agent.inventory.get(created.id).name == "Onboarded 42"
        with pytest.raises(AccessDeniedError):  # a device, not an operator
            agent.get("/devicecontrol/newDeviceRequests")
    finally:
        agent.session.close()

    # The bootstrap login itself sees nothing but the credentials endpoint.
    bootstrap = CumulocityApi(live_server.url, "management", "devicebootstrap", BOOTSTRAP_PASSWORD)
    try:
        with pytest.raises(AccessDeniedError):
            bootstrap.get("/inventory/managedObjects")
    finally:
        bootstrap.session.close()


def test_await_credentials_times_out_while_nobody_accepts(
    c8y: CumulocityApi, live_server: Any
) -> None:
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)
    c8y.device_inventory.request("c8y-sn-idle")
    registry = CumulocityDeviceRegistry(
        live_server.url, "management", "devicebootstrap", BOOTSTRAP_PASSWORD
    )
    with pytest.raises(TimeoutError):
        registry.await_credentials("c8y-sn-idle", timeout="2s", pause=PAUSE)
    assert c8y.get("/devicecontrol/newDeviceRequests/c8y-sn-idle")["status"] == "PENDING_ACCEPTANCE"
