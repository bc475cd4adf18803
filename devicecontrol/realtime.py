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
    agent_id: int | None
    data: dict[str, Any] | str = field(compare=True)

    def as_message(self) -> dict[str, Any]:
        return {
            "type": "operation.changed",
            "action": self.action,
            "operationId": str(self.operation_id),
            "deviceId": str(self.device_id),
            "agentId": str(self.agent_id) if self.agent_id is not None else None,
            "data": self.data,
        }


def device_group(device_id: int) -> str:
    return f"operations.device.{device_id}"


def agent_group(agent_id: int) -> str:
    return f"operations.agent.{agent_id}"


ALL_OPERATIONS_GROUP = "operations.all"


def _groups(event: OperationEvent) -> list[str]:
    groups = [device_group(event.device_id), ALL_OPERATIONS_GROUP]
    # Only new operations go to the agent channel (realtime.md); a bulk child that failed for want
    # of an agent has none.
    if event.action == "CREATE" and event.agent_id is not None:
        groups.append(agent_group(event.agent_id))
    return groups


def _send_to_channel_layer(events: list[OperationEvent]) -> None:
    layer = get_channel_layer()
    if layer is None or not events:
        return

    async def send_all() -> None:
        # One async_to_sync per batch, not per group or event: each call starts a thread and an
        # event loop (~1 ms CPU; three of them were a third of a create's CPU, bench/operations.py).
        for event in events:
            message = event.as_message()
            for group in _groups(event):
                try:
                    await layer.group_send(group, message)
                except Exception:  # a realtime outage must never fail the committed change
                    logger.exception("could not publish operation event to %s", group)

    async_to_sync(send_all)()


def deliver(events: list[OperationEvent]) -> None:
    """The one function every committed operation change goes through."""
    _send_to_channel_layer(events)


@dataclass(frozen=True)
class EventDelivery:
    """The on-commit callback; it keeps its event visible so tests can assert the exact events
    (`django_capture_on_commit_callbacks`, as Zulip's `capture_send_event_calls` does)."""

    event: OperationEvent

    def __call__(self) -> None:
        deliver([self.event])


@dataclass(frozen=True)
class EventBatchDelivery:
    """One on-commit callback for many events (a bulk ramp batch): one hand-off for all of them."""

    events: tuple[OperationEvent, ...]

    def __call__(self) -> None:
        deliver(list(self.events))


def publish_operation_event(event: OperationEvent) -> None:
    """Register `event` to be delivered after the current transaction commits."""
    transaction.on_commit(EventDelivery(event))


def publish_operation_events(events: list[OperationEvent]) -> None:
    """Register a batch of events to be delivered, in order, after the transaction commits."""
    if events:
        transaction.on_commit(EventBatchDelivery(tuple(events)))
