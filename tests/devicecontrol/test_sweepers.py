"""Expiry, execution timeout and retention sweepers, driven by an injected `now` (never sleeping)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connections, transaction

from devicecontrol import services
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import OperationEvent, registered_events
from devicecontrol.serializers import operation_json
from inventory.models import ManagedObject, Relation
from inventory.services import managed_object_add_children, managed_object_create

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
HOUR = 3600
DAY = 24 * HOUR


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def device(db: None) -> ManagedObject:
    """A device under an agent, so operations for it resolve (devicecontrol.md §4)."""
    agent = managed_object_create(
        owner="admin",
        data={"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )
    child = managed_object_create(owner="admin", data={"name": "Device", "c8y_IsDevice": {}})
    managed_object_add_children(parent=agent, relation=Relation.DEVICE, children=[child])
    return child


@pytest.fixture
def timeouts(settings: Any) -> Any:
    """Fixed defaults for the tests, independent of the environment."""
    settings.OPERATION_PENDING_TIMEOUT = HOUR
    settings.OPERATION_EXECUTION_TIMEOUT = 600
    settings.OPERATION_RETENTION_DAYS = 30
    return settings


def create(device: ManagedObject, *, now: datetime = T0, **fragments: Any) -> Operation:
    return services.operation_create(device=device, data={"c8y_Restart": {}, **fragments}, now=now)


def update(operation: Operation, now: datetime, **data: Any) -> Operation:
    return services.operation_update(operation_id=operation.pk, data=data, now=now)


def reload(operation: Operation) -> Operation:
    return Operation.objects.get(pk=operation.pk)


def update_event(operation: Operation) -> OperationEvent:
    operation = reload(operation)
    return OperationEvent(
        action="UPDATE",
        operation_id=operation.pk,
        device_id=operation.device_id,
        agent_id=operation.agent_id,
        data=operation_json(operation, base=""),
    )


@pytest.fixture
def events(
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> Callable[[Callable[[], Any]], tuple[Any, list[OperationEvent]]]:
    """Run `action` and return its result and the realtime events it registered on commit."""

    def run(action: Callable[[], Any]) -> tuple[Any, list[OperationEvent]]:
        with django_capture_on_commit_callbacks() as callbacks:
            result = action()
        return result, registered_events(callbacks)

    return run


# --- expiry of PENDING operations -----------------------------------------------------------------


def test_pending_operation_expires_after_the_default_timeout(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    operation = create(device)
    assert reload(operation).expires_at == at(HOUR)

    assert services.operations_expire(now=at(HOUR - 1)) == 0
    assert reload(operation).status == OperationStatus.PENDING

    count, emitted = events(lambda: services.operations_expire(now=at(HOUR)))

    assert count == 1
    expired = reload(operation)
    assert expired.status == OperationStatus.FAILED
    assert expired.failure_reason == "Operation expired: it was still PENDING after 3600 seconds"
    assert expired.status_changed_at == at(HOUR)
    assert emitted == [update_event(operation)]
    assert emitted[0].data["status"] == "FAILED"
    assert "expired" in emitted[0].data["failureReason"]


def test_default_pending_timeout_comes_from_the_setting(
    device: ManagedObject, timeouts: Any
) -> None:
    timeouts.OPERATION_PENDING_TIMEOUT = 120
    operation = create(device)

    assert services.operations_expire(now=at(119)) == 0
    assert services.operations_expire(now=at(120)) == 1
    assert reload(operation).failure_reason == (
        "Operation expired: it was still PENDING after 120 seconds"
    )


def test_per_operation_pending_timeout_overrides_the_setting(
    device: ManagedObject, timeouts: Any
) -> None:
    shorter = create(device, pendingTimeout=60)
    longer = create(device, pendingTimeout=2 * HOUR)
    default = create(device)

    assert services.operations_expire(now=at(60)) == 1
    assert reload(shorter).status == OperationStatus.FAILED
    assert reload(shorter).failure_reason == (
        "Operation expired: it was still PENDING after 60 seconds"
    )
    assert services.operations_expire(now=at(HOUR)) == 1
    assert reload(default).status == OperationStatus.FAILED
    assert reload(longer).status == OperationStatus.PENDING
    assert services.operations_expire(now=at(2 * HOUR)) == 1
    assert reload(longer).status == OperationStatus.FAILED
    # The field stays on the operation as an ordinary, documented fragment.
    assert operation_json(reload(longer), base="")["pendingTimeout"] == 2 * HOUR


def test_setting_zero_disables_default_expiry_but_not_per_operation_timeouts(
    device: ManagedObject, timeouts: Any
) -> None:
    timeouts.OPERATION_PENDING_TIMEOUT = 0
    forever = create(device)
    own = create(device, pendingTimeout=60)

    assert reload(forever).expires_at is None
    assert services.operations_expire(now=at(10 * 365 * DAY)) == 1
    assert reload(forever).status == OperationStatus.PENDING
    assert reload(own).status == OperationStatus.FAILED


@pytest.mark.parametrize("value", [0, -5, 1.5, "60", True])
def test_invalid_pending_timeout_is_refused(
    device: ManagedObject, timeouts: Any, value: Any
) -> None:
    from deviceplatform.api.exceptions import ValidationFailed

    with pytest.raises(ValidationFailed):
        create(device, pendingTimeout=value)
    assert not Operation.objects.exists()


def test_only_pending_operations_expire(device: ManagedObject, timeouts: Any) -> None:
    pending = create(device)
    executing = update(create(device), at(1), status="EXECUTING")
    successful = update(create(device), at(1), status="SUCCESSFUL")
    failed = update(create(device), at(1), status="FAILED", failureReason="agent said no")
    timeouts.OPERATION_EXECUTION_TIMEOUT = 0  # only expiry is under test here

    assert services.operations_expire(now=at(100 * DAY)) == 1

    assert reload(pending).status == OperationStatus.FAILED
    assert reload(executing).status == OperationStatus.EXECUTING
    assert reload(successful).status == OperationStatus.SUCCESSFUL
    assert reload(failed).failure_reason == "agent said no"
    assert reload(failed).status_changed_at == at(1)


def test_expiry_is_idempotent(device: ManagedObject, timeouts: Any, events: Any) -> None:
    first = create(device)
    second = create(device)

    count, emitted = events(lambda: services.operations_expire(now=at(HOUR)))
    assert count == 2
    assert emitted == [update_event(first), update_event(second)]
    snapshot = list(Operation.objects.order_by("pk").values())

    count, emitted = events(lambda: services.operations_expire(now=at(2 * HOUR)))

    assert count == 0
    assert emitted == []
    assert list(Operation.objects.order_by("pk").values()) == snapshot


def test_expiry_works_through_every_batch(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    operations = [create(device) for _ in range(5)]
    not_due = create(device, now=at(HOUR))

    count, emitted = events(lambda: services.operations_expire(now=at(HOUR), batch_size=2))

    assert count == 5
    assert emitted == [update_event(operation) for operation in operations]
    assert {reload(operation).status for operation in operations} == {OperationStatus.FAILED}
    assert reload(not_due).status == OperationStatus.PENDING


def test_operation_moved_back_to_pending_gets_a_fresh_deadline(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    operation = create(device)
    assert services.operations_expire(now=at(HOUR)) == 1

    # Retrying in place (FAILED -> PENDING, devicecontrol.md §7) restarts the clock at the change.
    update(operation, at(5 * HOUR), status="PENDING")
    assert reload(operation).expires_at == at(6 * HOUR)
    assert reload(operation).failure_reason is None

    assert services.operations_expire(now=at(6 * HOUR - 1)) == 0
    assert reload(operation).status == OperationStatus.PENDING
    count, emitted = events(lambda: services.operations_expire(now=at(6 * HOUR)))
    assert count == 1
    assert emitted == [update_event(operation)]
    assert reload(operation).failure_reason == (
        "Operation expired: it was still PENDING after 3600 seconds"
    )


def test_pending_after_executing_gets_a_fresh_deadline(
    device: ManagedObject, timeouts: Any
) -> None:
    operation = create(device)
    update(operation, at(10), status="EXECUTING")
    update(operation, at(2 * HOUR), status="PENDING")

    assert services.operations_expire(now=at(3 * HOUR - 1)) == 0
    assert services.operations_expire(now=at(3 * HOUR)) == 1


def test_pending_to_pending_keeps_the_deadline(device: ManagedObject, timeouts: Any) -> None:
    operation = create(device)

    update(operation, at(HOUR - 10), status="PENDING", note={"text": "still queued"})

    assert reload(operation).expires_at == at(HOUR)
    assert services.operations_expire(now=at(HOUR)) == 1


def test_pending_timeout_set_by_put_counts_from_when_the_operation_became_pending(
    device: ManagedObject, timeouts: Any
) -> None:
    operation = create(device)
    update(operation, at(30), status="PENDING", pendingTimeout=60)
    assert reload(operation).expires_at == at(60)

    update(operation, at(60), status="FAILED")
    update(operation, at(5 * HOUR), status="PENDING", pendingTimeout=120)

    assert reload(operation).expires_at == at(5 * HOUR + 120)
    assert services.operations_expire(now=at(5 * HOUR + 119)) == 0
    assert services.operations_expire(now=at(5 * HOUR + 120)) == 1
    assert reload(operation).failure_reason == (
        "Operation expired: it was still PENDING after 120 seconds"
    )


def test_removing_the_pending_timeout_falls_back_to_the_default(
    device: ManagedObject, timeouts: Any
) -> None:
    operation = create(device, pendingTimeout=60)

    update(operation, at(30), status="PENDING", pendingTimeout=None)

    assert "pendingTimeout" not in reload(operation).fragments
    assert reload(operation).expires_at == at(HOUR)


# --- execution timeout ----------------------------------------------------------------------------


def test_executing_operation_times_out_after_the_default_measured_from_executing(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    timeouts.OPERATION_PENDING_TIMEOUT = 0
    operation = create(device)
    update(operation, at(100), status="EXECUTING")
    assert reload(operation).executing_since == at(100)

    # 600 s after creation is not enough: the clock starts when the agent set EXECUTING.
    assert services.operations_time_out(now=at(699)) == 0
    count, emitted = events(lambda: services.operations_time_out(now=at(700)))

    assert count == 1
    timed_out = reload(operation)
    assert timed_out.status == OperationStatus.FAILED
    assert timed_out.failure_reason == (
        "Operation timed out: it was EXECUTING for more than 600 seconds"
    )
    assert timed_out.status_changed_at == at(700)
    assert emitted == [update_event(operation)]


def test_per_operation_execution_timeout_overrides_the_setting(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    short = create(device, executionTimeout=30)
    long = create(device, executionTimeout=1200)
    default = create(device)
    for operation in (short, long, default):
        update(operation, at(100), status="EXECUTING")

    assert services.operations_time_out(now=at(129)) == 0
    count, emitted = events(lambda: services.operations_time_out(now=at(130)))
    assert count == 1
    assert emitted == [update_event(short)]
    assert reload(short).failure_reason == (
        "Operation timed out: it was EXECUTING for more than 30 seconds"
    )

    assert services.operations_time_out(now=at(700)) == 1
    assert reload(default).status == OperationStatus.FAILED
    assert reload(long).status == OperationStatus.EXECUTING
    assert services.operations_time_out(now=at(1300)) == 1
    assert reload(long).failure_reason == (
        "Operation timed out: it was EXECUTING for more than 1200 seconds"
    )


def test_agent_can_set_the_execution_timeout_with_executing(
    device: ManagedObject, timeouts: Any
) -> None:
    operation = create(device)
    update(operation, at(100), status="EXECUTING", executionTimeout=50)

    assert reload(operation).execution_timeout == 50
    assert services.operations_time_out(now=at(149)) == 0
    assert services.operations_time_out(now=at(150)) == 1


def test_setting_zero_disables_default_timeout_but_not_per_operation_ones(
    device: ManagedObject, timeouts: Any
) -> None:
    timeouts.OPERATION_EXECUTION_TIMEOUT = 0
    forever = update(create(device), at(1), status="EXECUTING")
    own = update(create(device, executionTimeout=60), at(1), status="EXECUTING")

    assert services.operations_time_out(now=at(10 * 365 * DAY)) == 1

    assert reload(forever).status == OperationStatus.EXECUTING
    assert reload(own).status == OperationStatus.FAILED


def test_only_executing_operations_time_out(device: ManagedObject, timeouts: Any) -> None:
    timeouts.OPERATION_PENDING_TIMEOUT = 0
    pending = create(device, executionTimeout=1)
    executing = update(create(device, executionTimeout=1), at(1), status="EXECUTING")
    successful = create(device, executionTimeout=1)
    update(successful, at(1), status="EXECUTING")
    update(successful, at(2), status="SUCCESSFUL")
    failed = update(create(device), at(1), status="FAILED", failureReason="no")

    assert services.operations_time_out(now=at(100 * DAY)) == 1

    assert reload(executing).status == OperationStatus.FAILED
    assert reload(pending).status == OperationStatus.PENDING
    assert reload(successful).status == OperationStatus.SUCCESSFUL
    assert reload(failed).failure_reason == "no"


def test_executing_again_restarts_the_clock_but_repeating_executing_does_not(
    device: ManagedObject, timeouts: Any
) -> None:
    timeouts.OPERATION_PENDING_TIMEOUT = 0
    operation = update(create(device), at(0), status="EXECUTING")
    update(operation, at(300), status="EXECUTING", progress={"percent": 50})
    assert reload(operation).executing_since == at(0)

    update(operation, at(500), status="PENDING")
    update(operation, at(1000), status="EXECUTING")

    assert services.operations_time_out(now=at(1599)) == 0
    assert services.operations_time_out(now=at(1600)) == 1


def test_execution_timeout_is_idempotent_and_batched(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    defaults = [update(create(device), at(0), status="EXECUTING") for _ in range(3)]
    own = [update(create(device, executionTimeout=10), at(0), status="EXECUTING") for _ in range(3)]

    count, emitted = events(lambda: services.operations_time_out(now=at(600), batch_size=2))

    assert count == 6
    assert sorted(emitted, key=lambda e: e.operation_id) == [
        update_event(operation) for operation in defaults + own
    ]
    count, emitted = events(lambda: services.operations_time_out(now=at(1200), batch_size=2))
    assert count == 0
    assert emitted == []


# --- retention ------------------------------------------------------------------------------------


def delete_event(operation: Operation) -> OperationEvent:
    return OperationEvent(
        action="DELETE",
        operation_id=operation.pk,
        device_id=operation.device_id,
        agent_id=operation.agent_id,
        data=str(operation.pk),
    )


def test_final_operations_older_than_the_retention_are_deleted(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    successful = update(create(device), at(0), status="SUCCESSFUL")
    failed = update(create(device), at(0), status="FAILED", failureReason="no")
    recent = update(create(device), at(DAY), status="SUCCESSFUL")

    assert services.operations_purge(now=at(30 * DAY)) == 0
    count, emitted = events(lambda: services.operations_purge(now=at(30 * DAY + 1)))

    assert count == 2
    assert emitted == [delete_event(successful), delete_event(failed)]
    assert list(Operation.objects.values_list("pk", flat=True)) == [recent.pk]


def test_retention_counts_from_the_last_status_change_not_creation(
    device: ManagedObject, timeouts: Any
) -> None:
    old = create(device)
    update(old, at(29 * DAY), status="EXECUTING")
    update(old, at(29 * DAY + 1), status="SUCCESSFUL")

    assert services.operations_purge(now=at(31 * DAY)) == 0
    assert services.operations_purge(now=at(59 * DAY + 2)) == 1
    assert not Operation.objects.exists()


def test_retention_never_deletes_pending_or_executing(device: ManagedObject, timeouts: Any) -> None:
    timeouts.OPERATION_PENDING_TIMEOUT = 0
    timeouts.OPERATION_EXECUTION_TIMEOUT = 0
    pending = create(device)
    executing = update(create(device), at(0), status="EXECUTING")

    assert services.operations_purge(now=at(10 * 365 * DAY)) == 0
    assert set(Operation.objects.values_list("pk", flat=True)) == {pending.pk, executing.pk}


def test_retention_zero_keeps_everything(device: ManagedObject, timeouts: Any) -> None:
    timeouts.OPERATION_RETENTION_DAYS = 0
    update(create(device), at(0), status="SUCCESSFUL")

    assert services.operations_purge(now=at(10 * 365 * DAY)) == 0
    assert Operation.objects.count() == 1


def test_retention_is_batched_and_idempotent(
    device: ManagedObject, timeouts: Any, events: Any
) -> None:
    operations = [update(create(device), at(0), status="SUCCESSFUL") for _ in range(5)]

    count, emitted = events(lambda: services.operations_purge(now=at(31 * DAY), batch_size=2))

    assert count == 5
    assert emitted == [delete_event(operation) for operation in operations]
    count, emitted = events(lambda: services.operations_purge(now=at(31 * DAY)))
    assert (count, emitted) == (0, [])


def test_purging_an_original_keeps_its_retry(device: ManagedObject, timeouts: Any) -> None:
    original = update(create(device), at(0), status="FAILED", failureReason="no")
    retry = services.operation_retry(operation=reload(original), now=at(1))

    assert services.operations_purge(now=at(31 * DAY)) == 1

    assert reload(retry).retry_of_id is None
    assert reload(retry).status == OperationStatus.PENDING


# --- sweepers skip rows another transaction holds -------------------------------------------------


@pytest.fixture
def lock_row() -> Iterator[Callable[[Operation], Callable[[], None]]]:
    """`lock_row(operation)` locks the row in another thread's open transaction and returns a
    function that commits it; whatever is still held is released when the test ends."""
    releases: list[Callable[[], None]] = []

    def lock(operation: Operation) -> Callable[[], None]:
        locked = threading.Event()
        release = threading.Event()
        failure: list[BaseException] = []

        def hold() -> None:
            try:
                with transaction.atomic():
                    Operation.objects.select_for_update().get(pk=operation.pk)
                    locked.set()
                    release.wait(timeout=30)
            except BaseException as error:  # reported by the main thread
                failure.append(error)
                locked.set()
            finally:
                connections.close_all()

        thread = threading.Thread(target=hold, name="row-lock-holder")
        thread.start()

        def unlock() -> None:
            release.set()
            thread.join(timeout=10)
            assert not thread.is_alive()

        releases.append(unlock)
        assert locked.wait(timeout=10), "the lock holder did not start"
        assert not failure, failure
        return unlock

    yield lock
    for unlock in releases:
        unlock()


def expire_due(device: ManagedObject, settings: Any) -> tuple[list[Operation], Callable[[], int]]:
    operations = [create(device) for _ in range(3)]
    return operations, lambda: services.operations_expire(now=at(HOUR), batch_size=1)


def time_out_due(device: ManagedObject, settings: Any) -> tuple[list[Operation], Callable[[], int]]:
    settings.OPERATION_PENDING_TIMEOUT = 0
    operations = [update(create(device), at(0), status="EXECUTING") for _ in range(3)]
    return operations, lambda: services.operations_time_out(now=at(600), batch_size=1)


# SQLite has no row locks: a writer locks the whole database, and the sweep waits for it.
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("prepare", [expire_due, time_out_due], ids=["expire", "time_out"])
def test_sweeper_skips_a_row_locked_by_another_transaction(
    device: ManagedObject,
    timeouts: Any,
    lock_row: Callable[[Operation], Callable[[], None]],
    prepare: Callable[..., tuple[list[Operation], Callable[[], int]]],
) -> None:
    operations, sweep = prepare(device, timeouts)
    first, locked, last = operations
    unlock = lock_row(locked)

    # SKIP LOCKED: the sweeper neither waits for the lock nor touches the row.
    assert sweep() == 2

    assert reload(first).status == OperationStatus.FAILED
    assert reload(last).status == OperationStatus.FAILED
    assert reload(locked).status in {OperationStatus.PENDING, OperationStatus.EXECUTING}
    assert reload(locked).failure_reason is None

    unlock()
    assert sweep() == 1
    assert reload(locked).status == OperationStatus.FAILED
