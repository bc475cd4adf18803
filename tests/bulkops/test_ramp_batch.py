"""The ramp's batch (issue 13 item 2): on PostgreSQL one query reads the targets with their devices
and direct agents and one INSERT writes the children; on SQLite devicecontrol's batched ORM create
does. Both must write the same rows, events, SMS hand-offs and progress as `operation_create` would
for each device: agents found however far up, FAILED for a device without one, SMS delivery from
the device's communication mode, deleted devices dropped, IDs in target order (FIFO per agent)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from bulkops import services
from bulkops.models import BulkProgressDelta
from devicecontrol.delivery import sms_backend
from devicecontrol.realtime import registered_events
from devicecontrol.serializers import operation_json
from inventory import services as inventory_services
from tests.bulkops.conftest import advance, children, create_bulk, make_group
from tests.devicecontrol.conftest import add_child_devices, make_device


class RecordingSmsBackend:
    sent: ClassVar[list[dict[str, Any]]] = []

    def send(self, operation: dict[str, Any]) -> None:
        self.sent.append(operation)


@pytest.fixture
def sms_outbox(settings: Any) -> Iterator[list[dict[str, Any]]]:
    settings.OPERATION_SMS_BACKEND = f"{__name__}.RecordingSmsBackend"
    sms_backend.cache_clear()
    RecordingSmsBackend.sent.clear()
    yield RecordingSmsBackend.sent
    RecordingSmsBackend.sent.clear()
    sms_backend.cache_clear()


@pytest.mark.django_db
def test_a_batch_writes_what_operation_create_would_for_each_device(
    sms_outbox: list[dict[str, Any]],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    agent = make_device("Agent", agent=True)
    hub = make_device("Hub")  # not an agent: the devices below it belong to the agent above it
    plain = make_device("Plain")
    by_sms = make_device("By SMS", c8y_CommunicationMode={"mode": "SMS"})
    deep = make_device("Deep")
    orphan = make_device("Orphan")  # under no agent
    doomed = make_device("Doomed")
    add_child_devices(agent, plain, by_sms, hub, doomed)
    add_child_devices(hub, deep)
    group = make_group(plain, by_sms, deep, orphan, doomed)
    bulk = create_bulk(group, creationRamp=0, operationPrototype={"c8y_Restart": {}, "x": None})
    inventory_services.managed_object_delete(managed_object=doomed)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert advance(0, batch_size=100) == 5

    made = children(bulk)
    by_device = {op.device_id: op for op in made}
    assert set(by_device) == {plain.pk, by_sms.pk, deep.pk, orphan.pk}
    targets = [t.device_id for t in bulk.targets.order_by("position") if t.device_id in by_device]
    assert [by_device[d].pk for d in targets] == sorted(op.pk for op in made)  # target order
    assert {d: (op.agent_id, op.status) for d, op in by_device.items()} == {
        plain.pk: (agent.pk, "PENDING"),
        by_sms.pk: (agent.pk, "PENDING"),
        deep.pk: (agent.pk, "PENDING"),
        orphan.pk: (None, "FAILED"),
    }
    assert by_device[orphan.pk].failure_reason == services.NO_AGENT_REASON
    assert by_device[orphan.pk].expires_at is None
    assert by_device[plain.pk].expires_at is not None
    assert by_device[plain.pk].fragments == {"c8y_Restart": {}}
    assert by_device[by_sms.pk].fragments == {"c8y_Restart": {}, "deliveryType": "SMS"}
    assert [sent["id"] for sent in sms_outbox] == [str(by_device[by_sms.pk].pk)]

    events = registered_events(callbacks)
    assert [(e.action, e.operation_id) for e in events] == [
        ("CREATE", by_device[d].pk) for d in targets
    ]
    for event in events:
        operation = by_device[event.device_id]
        assert event.agent_id == operation.agent_id
        assert event.data == operation_json(operation, base="")

    bulk.refresh_from_db()
    assert (bulk.next_index, bulk.dropped, bulk.status) == (5, 1, "COMPLETED")
    deltas = BulkProgressDelta.objects.filter(bulk_operation_id=bulk.pk)
    assert [(d.pending, d.failed, d.executing, d.successful) for d in deltas] == [(3, 1, 0, 0)]
