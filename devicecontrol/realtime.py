"""Operation change events: built by the services, published after commit with every app's events.

The services register `OperationEvent`s with `publish_on_commit` (deviceplatform/realtime/events.py):
nothing goes out for a rolled-back change, and a device's events go out in the order of the
transactions that changed it. Each turns into the Bayeux messages of realtime.md §5: on the
realtime family `/operations/{deviceId}` with `{realtimeAction, data}`, and for creations also the
bare operation on the agent family's `/{agentId}`, both kept in the device's order.
`register_channels` declares who may subscribe to these channels (auth.md §7).

A cancel request (README "Cancel that reaches the device") is an UPDATE that also goes to
`/{agentId}`, but only to the subscribers that opted in to `cancelRequests` there
(`"ext": {"com.deviceplatform": {"cancelRequests": true}}` on their `/meta/subscribe`): in
Cumulocity that channel carries new operations only, and a plain agent runs whatever arrives on it,
so an EXECUTING operation there could be run a second time."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from deviceplatform.api.permissions import has_any_role, is_owner
from deviceplatform.realtime.events import BASE_URL, RealtimeEvent, registered
from deviceplatform.realtime.subscriptions import Family, register
from deviceplatform.roles import Role
from inventory.models import ManagedObject

Action = Literal["CREATE", "UPDATE", "DELETE"]
# The option of the agent channel under which cancel requests arrive.
CANCEL_REQUESTS = "cancelRequests"


@dataclass(frozen=True)
class OperationEvent:
    """One change of one operation. `data` is the operation JSON (CREATE, UPDATE) rendered with
    relative URLs (each subscriber sees its own host), or the ID string (DELETE)."""

    action: Action
    operation_id: int
    device_id: int
    agent_id: int | None
    data: dict[str, Any] | str = field(compare=True)
    # An UPDATE the agent must see too (a cancel request, README "Cancel that reaches the
    # device"): it goes to the agent channel as well, to the subscribers that opted in to it.
    to_agent: bool = False

    @property
    def key(self) -> int:
        """Events about one device keep the order of its transactions."""
        return self.device_id

    def messages(self) -> list[RealtimeEvent]:
        return realtime_events(self)


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
            device_channel(event.device_id),
            {"realtimeAction": event.action, "data": data},
            key=event.device_id,
        )
    ]
    # Only new operations go to the agent channel (and cancel requests, to the subscribers that
    # asked for them); a bulk child that failed for want of an agent has none.
    if event.agent_id is not None and event.action == "CREATE":
        events.append(RealtimeEvent(agent_channel(event.agent_id), data, key=event.device_id))
    elif event.agent_id is not None and event.to_agent:
        events.append(
            RealtimeEvent(
                agent_channel(event.agent_id), data, key=event.device_id, option=CANCEL_REQUESTS
            )
        )
    return events


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
    register(Family.AGENT, r"/([1-9][0-9]{0,18})", _may_watch, options=frozenset({CANCEL_REQUESTS}))


def registered_events(callbacks: Sequence[Any]) -> list[OperationEvent]:
    """The operation events among captured on-commit callbacks, in order (for tests)."""
    return [event for event in registered(callbacks) if isinstance(event, OperationEvent)]
