"""Wire format of device control (spec devicecontrol.md); operations arrive with their own issue."""

from __future__ import annotations

from typing import Any


def devicecontrol_api_json(base: str) -> dict[str, Any]:
    """`GET /devicecontrol` (devicecontrol.md §2); the Java SDK reads `operations.self`."""
    operations = f"{base}/devicecontrol/operations"
    return {
        "self": f"{base}/devicecontrol",
        "operations": {"self": operations},
        "operationsByStatus": f"{operations}?status={{status}}",
        "operationsByAgentId": f"{operations}?agentId={{agentId}}",
        "operationsByAgentIdAndStatus": f"{operations}?agentId={{agentId}}&status={{status}}",
        "operationsByDeviceId": f"{operations}?deviceId={{deviceId}}",
        "operationsByDeviceIdAndStatus": f"{operations}?deviceId={{deviceId}}&status={{status}}",
    }
