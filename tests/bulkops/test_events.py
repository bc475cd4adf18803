"""Realtime events of the bulk ramp (realtime.md §5.4: "produced for changes made by Celery tasks
exactly as for REST"): each child operation a tick creates arrives as a CREATE on its device's
channel and as the bare operation on its agent's channel, handed off once per batch transaction,
only after that transaction commits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction

from bulkops import services, tasks
from bulkops.models import BulkStatus
from devicecontrol.models import Operation
from devicecontrol.realtime import OperationEvent
from devicecontrol.services import operation_update
from deviceplatform.realtime.events import EventBatch
from tests.bulkops.conftest import (
    BULK,
    Fleet,
    advance,
    children,
    create_bulk,
    make_device,
    make_fleet,
    make_group,
    reload,
)
from tests.conftest import Subscribe
from tests.devicecontrol.conftest import (
    Abort,
    Message,
    as_get,
    call,
    changed,
    ok_json,
    rolled_back,
    to_agent,
)
from tests.factories import Clients

pytestmark = pytest.mark.django_db

Capture = Callable[..., Any]


def created(operations: list[Operation]) -> list[Message]:
    return [changed("CREATE", as_get(op)) for op in operations]


def to_agents(operations: list[Operation]) -> list[Message]:
    return [to_agent(op.agent_id, as_get(op)) for op in operations]


def in_publish_order(operations: list[Operation]) -> list[Message]:
    """What a session subscribed to both the device and the agent channels receives: each
    operation's device message, then its agent message."""
    return [m for op in operations for m in (*created([op]), *to_agents([op]))]


def hand_offs(callbacks: list[Any]) -> list[int]:
    """The number of operation events in each batch registered on commit."""
    sizes = [
        sum(isinstance(e, OperationEvent) for e in cb.events)
        for cb in callbacks
        if isinstance(cb, EventBatch)
    ]
    return [size for size in sizes if size]


def test_each_tick_sends_a_create_per_child_to_device_and_agent_channels(
    fleet5: Fleet, subscriber: Subscribe, django_capture_on_commit_callbacks: Capture
) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=1)
    every = subscriber("/operations/*")
    agent = subscriber(f"/{fleet5.agent.pk}")
    first = subscriber(f"/operations/{fleet5.device_ids[0]}")

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert advance(-0.001) == 0  # not yet due: nothing to say
    assert hand_offs(callbacks) == []
    assert every.received() == []

    sent: list[Operation] = []
    for tick, count in [(0, 1), (2, 2), (4.5, 2)]:
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            assert advance(tick) == count
        new = children(bulk)[len(sent) :]
        sent += new
        assert [op.device_id for op in new] == fleet5.device_ids[len(sent) - count : len(sent)]
        assert hand_offs(callbacks) == [count]
        assert every.received() == created(new)  # in target order
        assert agent.received() == to_agents(new)
    assert reload(bulk).status == BulkStatus.COMPLETED
    assert all(as_get(op)["bulkOperationId"] == str(bulk.pk) for op in sent)
    assert first.received() == created(sent[:1])


def test_a_ramp_zero_batch_run_hands_off_once_per_batch(
    fleet5: Fleet, subscriber: Subscribe, django_capture_on_commit_callbacks: Capture
) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=0)
    every = subscriber("/operations/*")
    agent = subscriber(f"/{fleet5.agent.pk}")

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert advance(0, batch_size=2) == 5

    assert hand_offs(callbacks) == [2, 2, 1]
    ops = children(bulk)
    assert [op.device_id for op in ops] == fleet5.device_ids
    assert every.received() == created(ops)
    assert agent.received() == to_agents(ops)


def test_a_device_without_agent_gets_its_failed_child_on_its_channel_only(
    subscriber: Subscribe, django_capture_on_commit_callbacks: Capture
) -> None:
    fleet = make_fleet(1)
    orphan = make_device("Orphan")
    bulk = create_bulk(make_group(fleet.devices[0], orphan), creationRamp=0)
    orphan_channel = subscriber(f"/operations/{orphan.pk}")
    agent = subscriber(f"/{fleet.agent.pk}")

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert advance(0) == 2

    assert hand_offs(callbacks) == [2]
    ok, failed = children(bulk)
    assert (ok.device_id, failed.device_id) == (fleet.device_ids[0], orphan.pk)
    body = as_get(failed)
    assert (body["status"], body["failureReason"]) == ("FAILED", services.NO_AGENT_REASON)
    assert orphan_channel.received() == [changed("CREATE", body)]
    assert agent.received() == to_agents([ok])


def test_a_rolled_back_tick_sends_nothing_and_its_rerun_sends_everything(
    fleet: Fleet, subscriber: Subscribe, django_capture_on_commit_callbacks: Capture
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    every = subscriber("/operations/*", f"/{fleet.agent.pk}")

    with django_capture_on_commit_callbacks(execute=True) as callbacks, pytest.raises(Abort):
        rolled_back(lambda: advance(0))
    assert hand_offs(callbacks) == []
    assert children(bulk) == []
    assert every.received() == []

    with django_capture_on_commit_callbacks(execute=True):
        assert advance(0) == 3
    assert every.received() == in_publish_order(children(bulk))


def test_cancel_and_reschedule_send_nothing_and_children_keep_their_events(
    fleet5: Fleet, subscriber: Subscribe, django_capture_on_commit_callbacks: Capture
) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=1)
    every = subscriber("/operations/*")
    with django_capture_on_commit_callbacks(execute=True):
        advance(1)
        services.bulk_operation_update(bulk_operation_id=bulk.pk, data={"creationRamp": 10})
        services.bulk_operation_cancel(bulk_operation_id=bulk.pk)
        assert advance(60) == 0
    first_two = children(bulk)
    assert every.received() == created(first_two)

    # A child moves on as any operation does: its UPDATE carries the bulk operation's ID.
    with django_capture_on_commit_callbacks(execute=True):
        operation_update(operation_id=first_two[0].pk, data={"status": "EXECUTING"})
    body = as_get(first_two[0])
    assert body["bulkOperationId"] == str(bulk.pk)
    assert every.received() == [changed("UPDATE", body)]


def test_the_beat_task_sends_the_children_of_a_bulk_operation_created_by_rest(
    bapi: Clients,
    fleet: Fleet,
    subscriber: Subscribe,
    django_capture_on_commit_callbacks: Capture,
) -> None:
    every = subscriber("/operations/*")
    agent = subscriber(f"/{fleet.agent.pk}")
    body = {
        "groupId": str(fleet.group.pk),
        "startDate": "2020-01-01T00:00:00.000Z",  # past: starts at its creation
        "creationRamp": 0,
        "operationPrototype": {"description": "Restart device", "c8y_Restart": {}},
    }
    with django_capture_on_commit_callbacks(execute=True):
        bulk = ok_json(call(bapi["bulk_admin"], "POST", BULK, body, accept="*/*"), 201)
    assert every.received() == []  # the bulk operation itself is no operation

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert tasks.advance_bulk_operations() == 3

    assert hand_offs(callbacks) == [3]
    ops = children(int(bulk["id"]))
    assert [op.device_id for op in ops] == fleet.device_ids
    assert every.received() == created(ops)
    assert agent.received() == to_agents(ops)
    assert all(op.fragments["c8y_Restart"] == {} for op in ops)


@pytest.mark.django_db(transaction=True)
def test_a_tick_sends_its_children_only_when_its_transaction_commits(
    subscriber: Subscribe,
) -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=0)
    every = subscriber("/operations/*", f"/{fleet.agent.pk}")

    with pytest.raises(Abort):
        rolled_back(lambda: advance(0))
    assert every.received() == []

    with transaction.atomic():
        assert advance(0) == 2
        assert every.received() == []  # created, not yet committed
    assert every.received() == in_publish_order(children(bulk))
