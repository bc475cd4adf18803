"""Operation change events: built by the services, sent after commit through one function.

The realtime issue connects `deliver` to the Bayeux/CometD consumers; until then the events go to the
Channels layer groups named here. A rolled-back change sends nothing, because events are only ever
registered with `transaction.on_commit`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)

Action = Literal["CREATE", "UPDATE", "DELETE"]


@dataclass(frozen=True)
class OperationEvent:
    """One change of one operation. `data` is the operation JSON (CREATE, UPDATE) rendered with
    relative URLs (the consumer prefixes its client's host), or the ID string (DELETE)."""

    action: Action
    operation_id: int
    device_id: int
    agent_id: int
    data: dict[str, Any] | str = field(compare=True)

    def as_message(self) -> dict[str, Any]:
        return {
            "type": "operation.changed",
            "action": self.action,
            "operationId": str(self.operation_id),
            "deviceId": str(self.device_id),
            "agentId": str(self.agent_id),
            "data": self.data,
        }


def device_group(device_id: int) -> str:
    return f"operations.device.{device_id}"


def agent_group(agent_id: int) -> str:
    return f"operations.agent.{agent_id}"


ALL_OPERATIONS_GROUP = "operations.all"


def _send_to_channel_layer(event: OperationEvent) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    message = event.as_message()
    groups = [device_group(event.device_id), ALL_OPERATIONS_GROUP]
    if event.action == "CREATE":  # only new operations go to the agent channel (realtime.md)
        groups.append(agent_group(event.agent_id))

    async def send_all() -> None:
        # One async_to_sync per event, not per group: each call starts a thread and an event loop
        # (~1 ms CPU; three of them were a third of a create's CPU, bench/operations.py).
        for group in groups:
            try:
                await layer.group_send(group, message)
            except Exception:  # a realtime outage must never fail the committed change
                logger.exception("could not publish operation event to %s", group)

    async_to_sync(send_all)()


def deliver(event: OperationEvent) -> None:
    """The one function every committed operation change goes through."""
    _send_to_channel_layer(event)


@dataclass(frozen=True)
class EventDelivery:
    """The on-commit callback; it keeps its event visible so tests can assert the exact events
    (`django_capture_on_commit_callbacks`, as Zulip's `capture_send_event_calls` does)."""

    event: OperationEvent

    def __call__(self) -> None:
        deliver(self.event)


def publish_operation_event(event: OperationEvent) -> None:
    """Register `event` to be delivered after the current transaction commits."""
    transaction.on_commit(EventDelivery(event))
