"""Operation change events: built by the services, published after commit through one function.

`deliver` turns each `OperationEvent` into the Bayeux messages of realtime.md §5: on the realtime
family `/operations/{deviceId}` with `{realtimeAction, data}`, and for creations also the bare
operation on the agent family's `/{agentId}`. A rolled-back change sends nothing, because events
are only ever registered with `transaction.on_commit`. `register_channels` declares who may
subscribe to these channels (auth.md §7)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from django.db import transaction

from deviceplatform.api.permissions import has_any_role, is_owner
from deviceplatform.realtime.events import BASE_URL, RealtimeEvent, publish
from deviceplatform.realtime.subscriptions import Family, register
from deviceplatform.roles import Role
from inventory.models import ManagedObject

Action = Literal["CREATE", "UPDATE", "DELETE"]


@dataclass(frozen=True)
class OperationEvent:
    """One change of one operation. `data` is the operation JSON (CREATE, UPDATE) rendered with
    relative URLs (each subscriber sees its own host), or the ID string (DELETE)."""

    action: Action
    operation_id: int
    device_id: int
    agent_id: int | None
    data: dict[str, Any] | str = field(compare=True)


def device_channel(device_id: int) -> str:
    return f"/operations/{device_id}"


def agent_channel(agent_id: int) -> str:
    return f"/{agent_id}"


def realtime_events(event: OperationEvent) -> list[RealtimeEvent]:
    """The Bayeux messages for one change (realtime.md §5.1, §5.2)."""
    data = event.data
    if isinstance(data, dict):
        data = {**data, "self": BASE_URL + data["self"]}
    events = [
        RealtimeEvent(
            device_channel(event.device_id), {"realtimeAction": event.action, "data": data}
        )
    ]
    # Only new operations go to the agent channel; a bulk child that failed for want of an agent
    # has none.
    if event.action == "CREATE" and event.agent_id is not None:
        events.append(RealtimeEvent(agent_channel(event.agent_id), data))
    return events


def deliver(events: list[OperationEvent]) -> None:
    """The one function every committed operation change goes through: one store round trip."""
    publish([message for event in events for message in realtime_events(event)])


def _may_watch(user: Any, match: re.Match[str]) -> bool:
    """ROLE_DEVICE_CONTROL_READ, or owner of the device (agent) in the channel: a device that does
    not exist has no owner, so only the role may watch it."""
    if has_any_role(user, {Role.DEVICE_CONTROL_READ}):
        return True
    owner = ManagedObject.objects.filter(pk=int(match[1])).values_list("owner", flat=True).first()
    return is_owner(user, owner)


def _may_watch_all(user: Any, match: re.Match[str]) -> bool:
    return has_any_role(user, {Role.DEVICE_CONTROL_READ})


def register_channels() -> None:
    register(Family.REALTIME, r"/operations/\*", _may_watch_all)
    register(Family.REALTIME, r"/operations/([1-9][0-9]{0,18})", _may_watch)
    register(Family.AGENT, r"/([1-9][0-9]{0,18})", _may_watch)


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


def registered_events(callbacks: list[Any]) -> list[OperationEvent]:
    """The operation events among captured on-commit callbacks, in order (for tests)."""
    events: list[OperationEvent] = []
    for callback in callbacks:
        if isinstance(callback, EventDelivery):
            events.append(callback.event)
        elif isinstance(callback, EventBatchDelivery):
            events.extend(callback.events)
    return events


def publish_operation_event(event: OperationEvent) -> None:
    """Register `event` to be delivered after the current transaction commits."""
    transaction.on_commit(EventDelivery(event))


def publish_operation_events(events: list[OperationEvent]) -> None:
    """Register a batch of events to be delivered, in order, after the transaction commits."""
    if events:
        transaction.on_commit(EventBatchDelivery(tuple(events)))
