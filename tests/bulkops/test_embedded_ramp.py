"""The embedded default runs the bulk ramp in-process (issue 4): `manage.py serve` on SQLite with no
Redis runs the beat schedule itself, so a bulk operation created over HTTP completes with one child
operation per device without any Celery worker or beat process."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from tests.deviceplatform import test_embedded as embedded

# The embedded server fixtures (fresh SQLite, migrate, ensureadmin, serve on a free port).
embedded_env = embedded.embedded_env
served = embedded.served
request = embedded.request

WAIT = 60.0  # a bound for a broken server, not a timing assertion


def create(port: int, path: str, body: dict[str, object]) -> dict[str, object]:
    status, created = request(port, "POST", path, body)
    assert status == 201, (path, status, created)
    return created


def test_embedded_server_ramps_a_bulk_operation_to_completion(served: tuple[int, Path]) -> None:
    port, log_path = served
    agent = create(
        port,
        "/inventory/managedObjects",
        {"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )
    devices = [
        create(port, "/inventory/managedObjects", {"name": f"Device {i}", "c8y_IsDevice": {}})
        for i in range(3)
    ]
    group = create(port, "/inventory/managedObjects", {"name": "Fleet", "c8y_IsDeviceGroup": {}})
    for device in devices:
        reference = {"managedObject": {"id": device["id"]}}
        create(port, f"/inventory/managedObjects/{agent['id']}/childDevices", reference)
        create(port, f"/inventory/managedObjects/{group['id']}/childAssets", reference)

    bulk = create(
        port,
        "/devicecontrol/bulkoperations",
        {
            "groupId": group["id"],
            "startDate": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "creationRamp": 0,
            "operationPrototype": {"description": "Restart", "c8y_Restart": {}},
        },
    )

    # The in-process scheduler's `advance-bulk-operations` entry (every BULK_RAMP_INTERVAL, default 0.5 s)
    # creates the children; nothing else in this process would.
    deadline = time.monotonic() + WAIT
    while True:
        status, current = request(port, "GET", f"/devicecontrol/bulkoperations/{bulk['id']}")
        assert status == 200, current
        if current["status"] == "COMPLETED":
            break
        assert time.monotonic() < deadline, (current, log_path.read_text()[-3000:])
        time.sleep(0.2)

    assert current["progress"]["all"] == 3, current
    status, listed = request(
        port, "GET", f"/devicecontrol/operations?bulkOperationId={bulk['id']}&pageSize=100"
    )
    assert status == 200, listed
    operations = listed["operations"]
    assert sorted(op["deviceId"] for op in operations) == sorted(d["id"] for d in devices)
    assert {op["status"] for op in operations} == {"PENDING"}
    assert {op["bulkOperationId"] for op in operations} == {bulk["id"]}
    assert all("c8y_Restart" in op for op in operations)
    # Routed to the agent, as `POST /devicecontrol/operations` would have routed them.
    status, for_agent = request(
        port,
        "GET",
        f"/devicecontrol/operations?agentId={agent['id']}&bulkOperationId={bulk['id']}",
    )
    assert status == 200, for_agent
    assert sorted(op["id"] for op in for_agent["operations"]) == sorted(
        op["id"] for op in operations
    )
