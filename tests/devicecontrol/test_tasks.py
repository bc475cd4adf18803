"""The sweeper tasks run for real through Celery and the beat schedule (embedded scheduler)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from devicecontrol import services, tasks
from devicecontrol.models import Operation, OperationStatus
from deviceplatform.celery import app
from deviceplatform.scheduler import Scheduler
from inventory.models import ManagedObject, Relation
from inventory.services import managed_object_add_children, managed_object_create

SWEEPER_TASKS = {
    "devicecontrol.tasks.expire_pending_operations",
    "devicecontrol.tasks.time_out_executing_operations",
    "devicecontrol.tasks.purge_old_operations",
}


@pytest.fixture
def device(db: None) -> ManagedObject:
    agent = managed_object_create(
        owner="admin",
        data={"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )
    child = managed_object_create(owner="admin", data={"name": "Device", "c8y_IsDevice": {}})
    managed_object_add_children(parent=agent, relation=Relation.DEVICE, children=[child])
    return child


@pytest.fixture
def timeouts(settings: Any) -> Any:
    settings.OPERATION_PENDING_TIMEOUT = 3600
    settings.OPERATION_EXECUTION_TIMEOUT = 600
    settings.OPERATION_RETENTION_DAYS = 30
    return settings


def ago(**delta: float) -> Any:
    return timezone.now() - timedelta(**delta)


def status_of(operation: Operation) -> str:
    return Operation.objects.get(pk=operation.pk).status


def due_operations(device: ManagedObject) -> dict[str, Operation]:
    """One operation due for each sweeper (relative to the real clock), plus one that is not."""
    expired = services.operation_create(device=device, data={"a": {}}, now=ago(hours=2))
    timed_out = services.operation_create(device=device, data={"b": {}}, now=ago(hours=2))
    services.operation_update(
        operation_id=timed_out.pk, data={"status": "EXECUTING"}, now=ago(hours=1)
    )
    old = services.operation_create(device=device, data={"c": {}}, now=ago(days=40))
    services.operation_update(operation_id=old.pk, data={"status": "SUCCESSFUL"}, now=ago(days=31))
    fresh = services.operation_create(device=device, data={"d": {}})
    return {"expired": expired, "timed_out": timed_out, "old": old, "fresh": fresh}


def test_sweeper_tasks_are_registered_and_acknowledged_late() -> None:
    assert set(app.tasks.keys()) >= SWEEPER_TASKS
    for name in SWEEPER_TASKS:
        assert app.tasks[name].acks_late is True  # idempotent, so redelivery is harmless


def test_expire_task_fails_due_pending_operations_and_returns_the_count(
    device: ManagedObject, timeouts: Any
) -> None:
    operations = due_operations(device)

    result = tasks.expire_pending_operations.apply()

    assert result.successful()
    assert result.get() == 1
    assert status_of(operations["expired"]) == OperationStatus.FAILED
    assert status_of(operations["fresh"]) == OperationStatus.PENDING
    assert tasks.expire_pending_operations.apply().get() == 0


def test_time_out_task_fails_overdue_executing_operations(
    device: ManagedObject, timeouts: Any
) -> None:
    operations = due_operations(device)

    assert tasks.time_out_executing_operations.apply().get() == 1

    timed_out = Operation.objects.get(pk=operations["timed_out"].pk)
    assert timed_out.status == OperationStatus.FAILED
    assert "timed out" in timed_out.failure_reason
    assert tasks.time_out_executing_operations.apply().get() == 0


def test_purge_task_deletes_old_final_operations(device: ManagedObject, timeouts: Any) -> None:
    operations = due_operations(device)

    assert tasks.purge_old_operations.apply().get() == 1

    assert not Operation.objects.filter(pk=operations["old"].pk).exists()
    assert Operation.objects.count() == 3
    assert tasks.purge_old_operations.apply().get() == 0


@pytest.fixture
def eager() -> Iterator[None]:
    """The configuration without REDIS_URL (CELERY_TASK_ALWAYS_EAGER), whatever this run uses."""
    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = previous


@pytest.mark.usefixtures("eager")
def test_tasks_run_through_delay_when_eager(device: ManagedObject, timeouts: Any) -> None:
    """Without a broker (no REDIS_URL) tasks run eagerly; delay() then executes in process."""
    due_operations(device)

    assert tasks.expire_pending_operations.delay().get() == 1
    assert tasks.time_out_executing_operations.delay().get() == 1
    assert tasks.purge_old_operations.delay().get() == 1


def test_beat_schedule_names_existing_tasks_with_positive_intervals() -> None:
    app.autodiscover_tasks(force=True)
    schedule = django_settings.CELERY_BEAT_SCHEDULE

    scheduled = {entry["task"] for entry in schedule.values()}
    assert scheduled >= SWEEPER_TASKS
    assert scheduled <= set(app.tasks.keys())
    for entry in schedule.values():
        assert float(entry["schedule"]) > 0


def test_embedded_scheduler_runs_the_sweepers(device: ManagedObject, timeouts: Any) -> None:
    operations = due_operations(device)
    scheduler = Scheduler(django_settings.CELERY_BEAT_SCHEDULE)
    sweepers = [entry for entry in scheduler.entries if entry.task in SWEEPER_TASKS]
    assert {entry.task for entry in sweepers} == SWEEPER_TASKS
    longest = max(entry.interval for entry in sweepers)

    scheduler.tick(0.0)  # like Celery beat: first due one interval after start
    assert status_of(operations["expired"]) == OperationStatus.PENDING

    ran = scheduler.tick(longest)

    assert {entry.name for entry in sweepers} <= set(ran)
    assert status_of(operations["expired"]) == OperationStatus.FAILED
    assert status_of(operations["timed_out"]) == OperationStatus.FAILED
    assert not Operation.objects.filter(pk=operations["old"].pk).exists()
    assert status_of(operations["fresh"]) == OperationStatus.PENDING
