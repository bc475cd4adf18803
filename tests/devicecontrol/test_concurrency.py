"""Concurrent updates of one operation (devicecontrol.md §7, STYLE.md §4): `operation_update` locks
the row, so parallel agents never lose each other's fragments, the end state is one a writer wrote,
and every successful update sends exactly one UPDATE event, delivered to realtime subscribers after
its own commit and in commit order. Real threads, each with its own
database connection, started together by a barrier (SQLite serializes their writes; the end states
must be the same)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import TestCase

from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import OperationEvent, registered_events
from devicecontrol.serializers import operation_json
from devicecontrol.services import operation_create, operation_update, operations_delete
from deviceplatform.api.exceptions import NotFound
from inventory.services import managed_object_lock
from tests.conftest import Subscribe
from tests.devicecontrol.conftest import (
    BASE_URL,
    Hierarchy,
    add_child_devices,
    as_get,
    changed,
    deleted,
    make_device,
)
from tests.helpers import run_together

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 8


@pytest.fixture
def committed_hierarchy() -> Hierarchy:
    """The agent hierarchy, committed so that every thread's connection sees it."""
    agent = make_device("Agent A", agent=True)
    device = make_device("Device D")
    grandchild = make_device("Sensor G")
    add_child_devices(agent, device)
    add_child_devices(device, grandchild)
    return Hierarchy(agent=agent, device=device, grandchild=grandchild)


def absolute(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "self": BASE_URL + data["self"]}


def thread_count(message: dict[str, Any]) -> int:
    return sum(key.startswith("c8y_Thread") for key in message["data"]["data"])


def update_capturing_events(operation_id: int, data: dict[str, Any]) -> list[OperationEvent]:
    """`operation_update` in an outer transaction, returning the events it registered; the
    commit at the end of the block then delivers them to the real realtime store."""
    with transaction.atomic(), TestCase.captureOnCommitCallbacks() as callbacks:
        operation_update(operation_id=operation_id, data=data)
    return registered_events(callbacks)


def test_parallel_updates_lose_no_fragment_and_send_one_event_each(
    committed_hierarchy: Hierarchy, subscriber: Subscribe
) -> None:
    operation = operation_create(
        device=committed_hierarchy.device, data={"c8y_Initial": {"kept": True}}
    )
    listener = subscriber(f"/operations/{committed_hierarchy.device.pk}", "/operations/*")
    agent = subscriber(f"/{committed_hierarchy.agent.pk}")
    statuses = ["EXECUTING", "SUCCESSFUL", "FAILED", "PENDING"]
    writes = [
        {
            "status": statuses[i % len(statuses)],
            f"c8y_Thread{i}": {"thread": i},
            **({"failureReason": f"reason {i}"} if statuses[i % len(statuses)] == "FAILED" else {}),
        }
        for i in range(THREADS)
    ]

    results = run_together(lambda i: update_capturing_events(operation.pk, writes[i]), THREADS)

    errors = [result for result in results if isinstance(result, BaseException)]
    assert errors == []
    final = Operation.objects.get(pk=operation.pk)
    assert final.fragments == {
        "c8y_Initial": {"kept": True},
        **{f"c8y_Thread{i}": {"thread": i} for i in range(THREADS)},
    }
    # Exactly one UPDATE per successful update, each showing the state its writer committed.
    events = [event for result in results for event in result]
    assert len(events) == THREADS
    assert all(len(result) == 1 for result in results)
    assert all(
        (e.action, e.operation_id, e.device_id, e.agent_id)
        == ("UPDATE", operation.pk, committed_hierarchy.device.pk, committed_hierarchy.agent.pk)
        for e in events
    )
    # Updates were serialised: the k-th committer saw the k-1 fragments before it, so the event
    # data hold 1..THREADS thread fragments, and the last one is the final state.
    thread_keys = [
        {key for key in e.data if key.startswith("c8y_Thread")}  # type: ignore[union-attr]
        for e in events
    ]
    assert sorted(len(keys) for keys in thread_keys) == list(range(1, THREADS + 1))
    for index, (result, keys) in enumerate(zip(results, thread_keys, strict=True)):
        assert f"c8y_Thread{index}" in keys
        assert result[0].data["status"] == writes[index]["status"]

    # ...and each was delivered once, in commit order, to a session subscribed to the device twice
    # over (each writer publishes after its own commit, so the next writer may publish before it
    # does: the store holds that one back, deviceplatform/realtime/events.py).
    received = listener.received()
    assert [thread_count(message) for message in received] == list(range(1, THREADS + 1))
    assert received == sorted(
        (changed("UPDATE", absolute(e.data)) for e in events),  # type: ignore[arg-type]
        key=thread_count,
    )
    assert agent.received() == []
    last_writer = next(i for i, keys in enumerate(thread_keys) if len(keys) == THREADS)
    assert events[last_writer].data == operation_json(final, base="")
    assert received[-1] == changed("UPDATE", as_get(final))  # the most fragments: the last
    assert final.status == writes[last_writer]["status"]
    if final.status == OperationStatus.FAILED:
        assert final.failure_reason == writes[last_writer]["failureReason"]
    else:
        assert final.failure_reason is None


@pytest.mark.parametrize("round_", range(3))
def test_executing_and_successful_race_ends_in_one_of_them(
    committed_hierarchy: Hierarchy, subscriber: Subscribe, round_: int
) -> None:
    operation = operation_create(device=committed_hierarchy.device, data={})
    operation_update(
        operation_id=operation.pk, data={"status": "FAILED", "failureReason": "earlier try"}
    )
    listener = subscriber("/operations/*")
    writes = [
        {"status": "EXECUTING", "c8y_Executing": {"round": round_}},
        {"status": "SUCCESSFUL", "c8y_Result": {"round": round_}},
    ]

    results = run_together(lambda i: update_capturing_events(operation.pk, writes[i]), 2)

    assert [type(result) for result in results] == [list, list]
    final = Operation.objects.get(pk=operation.pk)
    assert final.status in {OperationStatus.EXECUTING, OperationStatus.SUCCESSFUL}
    assert final.failure_reason is None  # both left FAILED, so the old reason is gone
    assert final.fragments == {"c8y_Executing": {"round": round_}, "c8y_Result": {"round": round_}}
    events = [event for result in results for event in result]
    assert sorted(e.data["status"] for e in events) == ["EXECUTING", "SUCCESSFUL"]  # type: ignore[index]
    last = next(e for e in events if {"c8y_Executing", "c8y_Result"} <= set(e.data))
    assert last.data == operation_json(final, base="")
    assert final.status == last.data["status"]  # type: ignore[index]
    received = listener.received()
    assert sorted(received, key=lambda m: m["data"]["data"]["status"]) == sorted(
        (changed("UPDATE", absolute(e.data)) for e in events),  # type: ignore[arg-type]
        key=lambda m: m["data"]["data"]["status"],
    )
    assert changed("UPDATE", as_get(final)) in received


def delete_capturing_events(queryset: Any) -> list[OperationEvent]:
    with transaction.atomic(), TestCase.captureOnCommitCallbacks() as callbacks:
        operations_delete(queryset=queryset)
    return registered_events(callbacks)


@pytest.mark.parametrize("round_", range(3))
def test_update_racing_a_delete_by_status_is_one_or_the_other(
    committed_hierarchy: Hierarchy, subscriber: Subscribe, round_: int
) -> None:
    operation = operation_create(device=committed_hierarchy.device, data={})
    listener = subscriber(f"/operations/{committed_hierarchy.device.pk}")
    work = [
        lambda: update_capturing_events(operation.pk, {"status": "EXECUTING"}),
        lambda: delete_capturing_events(
            Operation.objects.filter(pk=operation.pk, status=OperationStatus.PENDING)
        ),
    ]

    updated, removed = run_together(lambda i: work[i](), 2)

    assert not isinstance(removed, BaseException), removed
    remaining = Operation.objects.filter(pk=operation.pk).first()
    if isinstance(updated, NotFound):  # the delete came first
        assert remaining is None
        assert [(e.action, e.data) for e in removed] == [("DELETE", str(operation.pk))]
        assert listener.received() == [deleted(operation)]
    else:  # the update came first, so the row no longer matches the delete's filter
        assert remaining is not None
        assert remaining.status == OperationStatus.EXECUTING
        assert [(e.action, e.data["status"]) for e in updated] == [("UPDATE", "EXECUTING")]  # type: ignore[index]
        assert removed == []
        assert listener.received() == [changed("UPDATE", as_get(remaining))]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks are PostgreSQL's")
def test_an_operation_for_a_device_being_updated_commits_without_waiting_for_it(
    committed_hierarchy: Hierarchy,
) -> None:
    """A writer of the device holds its row lock (managed_object_lock) while an operation for the
    device is created in another transaction: the operation's foreign-key check (FOR KEY SHARE at
    COMMIT) must not wait for it. With FOR UPDATE it did, and together with the event-order lock
    that made a deadlock between an agent's device PUT and an operation POST."""
    device = committed_hierarchy.device
    locked, release = threading.Event(), threading.Event()

    def writer() -> None:
        try:
            with transaction.atomic():
                managed_object_lock(device.pk)
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert locked.wait(30)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")  # fails instead of waiting
            operation = operation_create(device=device, data={"c8y_Restart": {}})
        assert Operation.objects.filter(pk=operation.pk).exists()
    finally:
        release.set()
        thread.join(30)
