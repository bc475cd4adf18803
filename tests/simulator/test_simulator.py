"""bin/simulate's agents against a real server: onboarding through the bootstrap flow, their devices
and group, operations with their results, failures, a bulk operation over the group, a restarted
simulator and a restarted platform, and the command line's refusals."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
import requests
from aiocometd_ng import Client, ConnectionType
from aiocometd_ng.extensions import Extension

from tests.helpers import PASSWORD
from tests.servers import free_port
from tests.simulator.conftest import (
    ADMIN_LOGIN,
    GROUP,
    WAIT,
    Admin,
    Platform,
    Simulation,
    eventually,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # aiocometd-ng's own aiohttp calls (the test's CometD client)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

AGENT_OPERATIONS = [
    "c8y_Restart",
    "c8y_Firmware",
    "c8y_Command",
    "c8y_SoftwareUpdate",
    "c8y_Configuration",
]
CHILD_OPERATIONS = ["c8y_Restart", "c8y_Firmware", "c8y_Configuration"]


def group_id(operator: Admin) -> str:
    groups = operator.get(
        "/inventory/managedObjects", fragmentType="c8y_IsDeviceGroup", withChildren="false"
    )["managedObjects"]
    (group,) = [group for group in groups if group["name"] == GROUP]
    return group["id"]


def members(operator: Admin, group: str) -> set[str]:
    references = operator.get(
        f"/inventory/managedObjects/{group}/childAssets", withChildren="false", pageSize=100
    )["references"]
    return {reference["managedObject"]["id"] for reference in references}


def count(operator: Admin, type_: str) -> int:
    page = operator.get("/inventory/managedObjects", type=type_, pageSize=100)
    return len(page["managedObjects"])


def test_agents_onboard_register_their_devices_and_execute_operations(
    simulation: Simulation, operator: Admin, platform: Platform
) -> None:
    simulation.start(agents=2, children=2)
    simulation.wait_connected(2)

    # Onboarded through the bootstrap flow: accepted requests, and device users of their own.
    stored = simulation.stored()
    assert set(stored) == {"sim-0001", "sim-0002"}
    for serial, record in stored.items():
        assert operator.get(f"/devicecontrol/newDeviceRequests/{serial}")["status"] == "ACCEPTED"
        assert record["username"] == f"device_{serial}"
        login = (f"{record['tenantId']}/{record['username']}", record["password"])
        me = requests.get(platform.url + "/user/currentUser", auth=login, timeout=30)
        assert me.status_code == 200, me.text

    group = group_id(operator)
    in_group = members(operator, group)
    assert len(in_group) == 6
    for serial in stored:
        agent_id = operator.by_serial(serial)
        agent = operator.device(agent_id)
        assert agent["owner"] == f"device_{serial}"
        assert agent["type"] == "c8y_SimulatedAgent"
        assert agent["com_cumulocity_model_Agent"] == {}
        assert agent["c8y_IsDevice"] == {}
        assert agent["c8y_SupportedOperations"] == AGENT_OPERATIONS
        assert agent["c8y_Hardware"]["serialNumber"] == serial
        assert agent["c8y_Firmware"]["version"] == "1.0.0"
        references = operator.get(
            f"/inventory/managedObjects/{agent_id}/childDevices", withChildren="false"
        )["references"]
        children = {reference["managedObject"]["id"] for reference in references}
        assert children == {
            operator.by_serial(f"{serial}-c01"),
            operator.by_serial(f"{serial}-c02"),
        }
        for child_id in children:
            child = operator.device(child_id)
            assert child["owner"] == f"device_{serial}"
            assert child["c8y_IsDevice"] == {}
            assert child["c8y_SupportedOperations"] == CHILD_OPERATIONS
            assert child["c8y_Hardware"]["serialNumber"].startswith(f"{serial}-c0")
        assert {agent_id, *children} <= in_group

    agent = operator.by_serial("sim-0001")
    child = operator.by_serial("sim-0001-c01")
    firmware = {"name": "simsensor-firmware", "version": "2.0.0", "url": "http://fw/2.0.0.bin"}
    software = [
        {"name": "agentd", "version": "3.1", "url": "http://sw/agentd", "action": "install"}
    ]
    sent = {
        "command": operator.operation({"deviceId": agent, "c8y_Command": {"text": "uptime"}}),
        "firmware": operator.operation({"deviceId": child, "c8y_Firmware": firmware}),
        "restart": operator.operation({"deviceId": child, "c8y_Restart": {}}),
        "software": operator.operation({"deviceId": agent, "c8y_SoftwareUpdate": software}),
        "config": operator.operation({"deviceId": child, "c8y_Configuration": {"config": "a=5"}}),
        # c8y_Command is not among the child's supported operations; c8y_Teleport is nobody's.
        "unsupported": operator.operation({"deviceId": child, "c8y_Command": {"text": "ls"}}),
        "unknown": operator.operation({"deviceId": agent, "c8y_Teleport": {}}),
    }
    done = {name: operator.finished(operation_id) for name, operation_id in sent.items()}

    assert done["command"]["status"] == "SUCCESSFUL"
    assert done["command"]["c8y_Command"]["text"] == "uptime"
    assert "uptime" in done["command"]["c8y_Command"]["result"]
    for name in ("firmware", "restart", "software", "config"):
        assert done[name]["status"] == "SUCCESSFUL", done[name]
    child_now, agent_now = operator.device(child), operator.device(agent)
    assert child_now["c8y_Firmware"] == firmware
    assert child_now["c8y_RestartCount"] == 1
    assert child_now["c8y_Configuration"] == {"config": "a=5"}
    assert agent_now["c8y_SoftwareList"] == [
        {"name": "agentd", "version": "3.1", "url": "http://sw/agentd"}
    ]
    for name in ("unsupported", "unknown"):
        assert done[name]["status"] == "FAILED"
        assert done[name]["failureReason"].startswith("Unsupported operation"), done[name]

    assert simulation.stop() == 0
    assert "operations 7 received, 5 SUCCESSFUL, 2 FAILED" in simulation.output()


class AdminToken(Extension):
    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        token = base64.b64encode(f"{ADMIN_LOGIN}:{PASSWORD}".encode()).decode()
        for message in payload:
            if message["channel"] == "/meta/handshake":
                message.setdefault("ext", {})["com.cumulocity.authn"] = {"token": token}

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        return None


@pytest.mark.asyncio
async def test_failure_rate_one_fails_every_operation_with_a_reason(
    simulation: Simulation, operator: Admin, platform: Platform
) -> None:
    """Over long-polling; the operator watches the operation go PENDING, EXECUTING, FAILED."""
    simulation.start(agents=1, children=0, failure_rate=1, transport="long-polling")
    await asyncio.to_thread(simulation.wait_connected, 1)
    agent = await asyncio.to_thread(operator.by_serial, "sim-0001")
    async with Client(
        platform.url + "/notification/realtime",
        ConnectionType.LONG_POLLING,
        extensions=[AdminToken()],
    ) as watcher:
        await watcher.subscribe(f"/operations/{agent}")
        operation = await asyncio.to_thread(
            operator.operation, {"deviceId": agent, "c8y_Restart": {}}
        )
        statuses: list[str] = []
        while statuses[-1:] != ["FAILED"]:
            message = await asyncio.wait_for(watcher.receive(), WAIT)
            assert message["data"]["data"]["id"] == operation, message
            statuses.append(message["data"]["data"]["status"])
    assert statuses == ["PENDING", "EXECUTING", "FAILED"]
    final = await asyncio.to_thread(operator.get, f"/devicecontrol/operations/{operation}")
    assert final["failureReason"] == "Simulated failure of c8y_Restart on sim-0001"
    device = await asyncio.to_thread(operator.device, agent)
    assert "c8y_RestartCount" not in device  # a failed restart did not happen
    assert await asyncio.to_thread(simulation.stop) == 0


def test_bulk_firmware_update_over_the_simulated_group_completes(
    simulation: Simulation, operator: Admin
) -> None:
    simulation.start(agents=3, children=2)
    simulation.wait_connected(3)
    firmware = {"name": "fleet-firmware", "version": "2.1.0", "url": "http://fw/2.1.0.bin"}
    bulk = operator.call(
        "POST",
        "/devicecontrol/bulkoperations",
        201,
        {
            "groupId": group_id(operator),
            "startDate": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "creationRamp": 0,
            "operationPrototype": {"description": "Firmware 2.1.0", "c8y_Firmware": firmware},
        },
    )
    assert bulk["progress"]["all"] == 9

    def completed() -> dict[str, Any] | None:
        body = operator.get(f"/devicecontrol/bulkoperations/{bulk['id']}")
        return body if body["generalStatus"] in ("SUCCESSFUL", "FAILED") else None

    final = eventually("the bulk operation to finish", completed)
    assert final["status"] == "COMPLETED"
    assert final["generalStatus"] == "SUCCESSFUL"
    assert final["progress"] == {
        "pending": 0,
        "failed": 0,
        "executing": 0,
        "successful": 9,
        "all": 9,
    }
    children = operator.get("/devicecontrol/operations", bulkOperationId=bulk["id"], pageSize=100)[
        "operations"
    ]
    assert len(children) == 9
    assert {child["status"] for child in children} == {"SUCCESSFUL"}
    for child in children:
        assert operator.device(child["deviceId"])["c8y_Firmware"] == firmware
    assert simulation.stop() == 0


def test_a_restarted_simulator_reuses_its_devices_and_picks_up_waiting_operations(
    simulation: Simulation, operator: Admin
) -> None:
    simulation.start(agents=2, children=1)
    simulation.wait_connected(2)
    first = simulation.stored()
    assert simulation.stop() == 0

    # While it is stopped: a new operation, one a stopped run left EXECUTING, and one that
    # someone else already finished (not the simulator's to touch).
    agent, child = operator.by_serial("sim-0001"), operator.by_serial("sim-0002-c01")
    waiting = operator.operation({"deviceId": child, "c8y_Restart": {}})
    left = operator.operation({"deviceId": agent, "c8y_Command": {"text": "date"}})
    operator.call("PUT", f"/devicecontrol/operations/{left}", 200, {"status": "EXECUTING"})
    settled = operator.operation({"deviceId": agent, "c8y_Restart": {}})
    operator.call(
        "PUT",
        f"/devicecontrol/operations/{settled}",
        200,
        {"status": "FAILED", "failureReason": "cancelled by the operator"},
    )

    simulation.start(agents=2, children=1)
    assert operator.finished(waiting)["status"] == "SUCCESSFUL"
    assert operator.device(child)["c8y_RestartCount"] == 1
    resumed = operator.finished(left)
    assert resumed["status"] == "SUCCESSFUL"
    assert "date" in resumed["c8y_Command"]["result"]
    simulation.wait_connected(2)
    assert simulation.stop() == 0

    untouched = operator.get(f"/devicecontrol/operations/{settled}")
    assert (untouched["status"], untouched["failureReason"]) == (
        "FAILED",
        "cancelled by the operator",
    )
    assert "c8y_RestartCount" not in operator.device(agent)
    assert "operations 2 received, 2 SUCCESSFUL, 0 FAILED" in simulation.output()
    # The same credentials and devices: nothing onboarded or created twice.
    assert simulation.stored() == first
    assert count(operator, "c8y_SimulatedAgent") == 2
    assert count(operator, "c8y_SimulatedDevice") == 2
    requests_ = operator.get("/devicecontrol/newDeviceRequests")["newDeviceRequests"]
    assert sorted(r["id"] for r in requests_) == ["sim-0001", "sim-0002"]


def test_agents_reconnect_after_the_platform_restarts(
    simulation: Simulation, operator: Admin, platform: Platform
) -> None:
    """The embedded server keeps realtime sessions in memory: a restart loses them all."""
    simulation.start(agents=2, children=0)
    simulation.wait_connected(2)
    agent = operator.by_serial("sim-0002")
    platform.restart()

    before = operator.operation({"deviceId": agent, "c8y_Command": {"text": "first"}})
    assert operator.finished(before)["status"] == "SUCCESSFUL"
    # This one can only arrive through the new subscription.
    after = operator.operation({"deviceId": agent, "c8y_Command": {"text": "second"}})
    assert operator.finished(after)["status"] == "SUCCESSFUL"
    assert simulation.stop() == 0
    assert "operations 2 received, 2 SUCCESSFUL" in simulation.output()


def test_start_up_errors_are_clear_and_write_nothing(
    simulation: Simulation, operator: Admin, platform: Platform
) -> None:
    wrong = simulation.run(password="not-the-password")
    assert wrong.returncode == 1
    assert "refused the admin login 't100/simadmin' (401)" in wrong.stderr

    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = simulation.run(url=closed)
    assert unreachable.returncode == 1
    assert f"cannot reach the platform at {closed}" in unreachable.stderr
    assert "bin/run" in unreachable.stderr

    elsewhere = simulation.run(url=platform.url + "/not-here")
    assert elsewhere.returncode == 1
    assert "does not answer like this platform" in elsewhere.stderr

    for option, value, message in (
        ("failure_rate", "1.5", "--failure-rate must be between 0 and 1"),
        ("agents", "0", "--agents must be at least 1"),
        ("prefix", "a/b", "--prefix must be"),
        ("url", "ftp://x", "--url must be an http:// or https:// address"),
    ):
        refused = simulation.run(**{option: value})
        assert refused.returncode == 2, refused
        assert message in refused.stderr

    # Nothing was created by any of these.
    groups = operator.get("/inventory/managedObjects", fragmentType="c8y_IsDeviceGroup")
    assert groups["managedObjects"] == []

    # A wrong bootstrap password stops the simulator at the first agent's poll.
    bootstrap = simulation.run(bootstrap_password="wrong", agents=1, children=0, duration=WAIT)
    assert bootstrap.returncode == 1
    assert "refused the bootstrap login management/devicebootstrap" in bootstrap.stderr
