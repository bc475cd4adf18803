"""The simulator honours a cancel request (README "Cancel that reaches the device"): an operation
it is working on that gets `c8y_CancelRequested` stops and ends FAILED "Cancelled on request",
whether the request arrives on its realtime subscription or is found when it lists its EXECUTING
operations (here: a simulator restarted after the request was sent)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.simulator.conftest import Admin, Simulation, eventually

pytestmark = pytest.mark.django_db(transaction=True)

# Each operation's simulated work takes 0.5 to 1.5 times this: far longer than any wait below,
# so an operation that ends did so because it was cancelled.
SLOW = 600


def executing(operator: Admin, operation_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = operator.get(f"/devicecontrol/operations/{operation_id}")
        return body if body["status"] == "EXECUTING" else None

    return eventually(f"operation {operation_id} to be EXECUTING", check)


def cancel(operator: Admin, operation_id: str) -> dict[str, Any]:
    return operator.call("POST", f"/devicecontrol/operations/{operation_id}/cancel", 200)


def test_a_cancel_request_on_the_subscription_stops_the_work(
    simulation: Simulation, operator: Admin
) -> None:
    simulation.start(agents=1, children=1, delay=SLOW)
    simulation.wait_connected(1)
    agent, child = operator.by_serial("sim-0001"), operator.by_serial("sim-0001-c01")
    cancelled = operator.operation({"deviceId": agent, "c8y_Restart": {}})
    other = operator.operation({"deviceId": child, "c8y_Restart": {}})
    executing(operator, cancelled)
    executing(operator, other)

    requested = cancel(operator, cancelled)

    assert requested["status"] == "EXECUTING"
    assert requested["c8y_CancelRequested"]["by"] == "simadmin"
    final = operator.finished(cancelled)
    assert (final["status"], final["failureReason"]) == ("FAILED", "Cancelled on request")
    assert final["c8y_CancelRequested"] == requested["c8y_CancelRequested"]
    assert "c8y_RestartCount" not in operator.device(agent)  # the restart never happened
    # Only the cancelled one stopped.
    assert operator.get(f"/devicecontrol/operations/{other}")["status"] == "EXECUTING"
    simulation.kill()


def test_a_cancel_request_sent_while_the_agent_was_away_is_found_by_its_poll(
    simulation: Simulation, operator: Admin
) -> None:
    simulation.start(agents=1, children=0, delay=SLOW)
    simulation.wait_connected(1)
    agent = operator.by_serial("sim-0001")
    operation = operator.operation({"deviceId": agent, "c8y_Command": {"text": "sleep 600"}})
    executing(operator, operation)
    simulation.kill()  # gone mid-work: nobody listens when the request is sent

    cancel(operator, operation)
    simulation.start(agents=1, children=0, delay=SLOW)

    final = operator.finished(operation)
    assert (final["status"], final["failureReason"]) == ("FAILED", "Cancelled on request")
    assert "result" not in final["c8y_Command"]
    simulation.wait_connected(1)
    assert simulation.stop() == 0
    assert "operations 1 received, 0 SUCCESSFUL, 1 FAILED" in simulation.output()
