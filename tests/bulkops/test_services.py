"""The ramp (bulkoperations.md §3, §4, §9, §10) driven through the services with an injected now."""

from __future__ import annotations

import math

import pytest
from django.db import IntegrityError, transaction

from bulkops import services
from bulkops.models import BulkOperation, BulkStatus
from bulkops.serializers import bulk_operation_json
from devicecontrol.services import operation_update, operations_create_many
from inventory import services as inventory_services
from inventory.models import ManagedObject
from tests.bulkops.conftest import (
    T0,
    Fleet,
    advance,
    at,
    child_device_ids,
    children,
    counted_progress,
    create_bulk,
    make_device,
    make_fleet,
    make_group,
    reload,
)
from tests.devicecontrol.conftest import add_child_devices
from tests.factories import ManagedObjectFactory

pytestmark = pytest.mark.django_db


def progress(bulk: BulkOperation) -> dict[str, int]:
    return bulk_operation_json(reload(bulk), base="https://h")["progress"]


def general_status(bulk: BulkOperation) -> str:
    return bulk_operation_json(reload(bulk), base="https://h")["generalStatus"]


# --- the schedule ------------------------------------------------------------------------------


def test_ramp_one_second_creates_exactly_the_due_operations_per_tick(fleet5: Fleet) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=1)
    assert advance(-0.001) == 0
    assert children(bulk) == []
    for k in range(5):
        advance(k)
        assert child_device_ids(bulk) == fleet5.device_ids[: k + 1]
        advance(k + 0.999)  # nothing more until the next due time
        assert len(children(bulk)) == k + 1
    assert [op.creation_time for op in children(bulk)] == [at(k) for k in range(5)]
    assert reload(bulk).status == BulkStatus.COMPLETED


@pytest.mark.parametrize("ramp", [0.5, 0.05])
def test_fractional_ramp_holds_its_pace_with_a_coarse_one_second_tick(ramp: float) -> None:
    size = 45
    fleet = make_fleet(size)
    bulk = create_bulk(fleet.group, creationRamp=ramp)
    for tick in range(4):
        advance(tick)
        due = min(size, math.floor(tick / ramp + 1e-9) + 1)
        assert child_device_ids(bulk) == fleet.device_ids[:due], (tick, ramp)
        assert counted_progress(bulk) == progress(bulk)
    advance(size * ramp)
    assert child_device_ids(bulk) == fleet.device_ids
    assert reload(bulk).status == BulkStatus.COMPLETED


def test_ramp_zero_creates_everything_in_batches_in_one_call(fleet5: Fleet) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=0)
    assert services.bulk_operations_advance(now=T0, batch_size=2) == 5
    assert child_device_ids(bulk) == fleet5.device_ids
    assert all(op.bulk_operation_id == bulk.pk for op in children(bulk))
    assert reload(bulk).status == BulkStatus.COMPLETED
    assert progress(bulk) == {"pending": 5, "failed": 0, "executing": 0, "successful": 0, "all": 5}


def test_future_start_date_creates_nothing_before_it(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, startDate="2031-03-01T12:10:00Z", creationRamp=0)
    assert reload(bulk).effective_start == at(600)
    advance(599.999)
    assert children(bulk) == []
    assert reload(bulk).status == BulkStatus.ACTIVE
    advance(600)
    assert child_device_ids(bulk) == fleet.device_ids


def test_effective_start_is_the_creation_time_for_a_past_start_date(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, startDate="2020-01-01T00:00:00Z", creationRamp=1)
    assert reload(bulk).effective_start == T0
    advance(0)  # a start in the past does not make the whole backlog due
    assert child_device_ids(bulk) == fleet.device_ids[:1]
    advance(1)
    assert child_device_ids(bulk) == fleet.device_ids[:2]


def test_empty_group_completes_at_its_effective_start() -> None:
    bulk = create_bulk(make_group(), creationRamp=1)
    assert progress(bulk)["all"] == 0
    assert general_status(bulk) == "SCHEDULED"
    advance(0)
    assert reload(bulk).status == BulkStatus.COMPLETED
    assert general_status(bulk) == "SUCCESSFUL"


def test_device_without_agent_gets_a_failed_child_and_the_ramp_goes_on() -> None:
    fleet = make_fleet(2)
    orphan = make_device("Orphan")  # highest ID: processed last
    lonely_first = make_group(fleet.devices[0], orphan, fleet.devices[1])
    bulk = create_bulk(lonely_first, creationRamp=1)
    for k in range(3):
        advance(k)
    ops = {op.device_id: op for op in children(bulk)}
    assert set(ops) == {*fleet.device_ids, orphan.pk}
    assert ops[orphan.pk].status == "FAILED"
    assert ops[orphan.pk].failure_reason == services.NO_AGENT_REASON
    assert ops[orphan.pk].agent_id is None
    assert all(ops[pk].status == "PENDING" for pk in fleet.device_ids)
    assert reload(bulk).status == BulkStatus.COMPLETED
    assert general_status(bulk) == "EXECUTING_WITH_ERRORS"
    assert progress(bulk) == counted_progress(bulk)


def test_device_deleted_after_creation_is_dropped(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    assert progress(bulk)["all"] == 3
    inventory_services.managed_object_delete(managed_object=fleet.devices[1])
    advance(0)
    advance(1)
    assert child_device_ids(bulk) == [fleet.device_ids[0]]
    assert progress(bulk)["all"] == 2
    advance(2)
    assert child_device_ids(bulk) == [fleet.device_ids[0], fleet.device_ids[2]]
    assert progress(bulk) == {"pending": 2, "failed": 0, "executing": 0, "successful": 0, "all": 2}
    assert progress(bulk) == counted_progress(bulk)


# --- PUT reschedules ---------------------------------------------------------------------------


def test_put_on_active_reschedules_with_new_ramp_and_start(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    services.bulk_operation_update(
        bulk_operation_id=bulk.pk,
        data={"creationRamp": 10, "startDate": "2031-03-01T12:01:00Z"},
        now=at(0.5),
    )
    row = reload(bulk)
    assert (row.status, row.creation_ramp, row.effective_start) == ("ACTIVE", 10, at(60))
    advance(59.999)
    assert children(bulk) == []
    advance(60)
    advance(69.999)
    assert child_device_ids(bulk) == fleet.device_ids[:1]
    advance(70)
    assert child_device_ids(bulk) == fleet.device_ids[:2]
    advance(80)
    assert child_device_ids(bulk) == fleet.device_ids


def test_put_on_active_with_past_start_restarts_from_the_update_time(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, startDate="2031-03-01T12:05:00Z", creationRamp=1)
    services.bulk_operation_update(
        bulk_operation_id=bulk.pk, data={"startDate": "2020-01-01T00:00:00Z"}, now=at(30)
    )
    assert reload(bulk).effective_start == at(30)
    advance(29)
    assert children(bulk) == []
    advance(31)
    assert child_device_ids(bulk) == fleet.device_ids[:2]


def test_put_on_in_progress_keeps_id_and_created_children_and_restarts_k(fleet5: Fleet) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=1)
    advance(0)
    advance(1)
    first_two = children(bulk)
    assert [op.device_id for op in first_two] == fleet5.device_ids[:2]
    assert reload(bulk).status == BulkStatus.IN_PROGRESS
    updated = services.bulk_operation_update(
        bulk_operation_id=bulk.pk,
        data={"creationRamp": 10, "operationPrototype": {"c8y_Firmware": {"version": "2"}}},
        now=at(1.5),
    )
    assert updated.pk == bulk.pk
    assert reload(bulk).effective_start == at(1.5)
    assert progress(bulk)["all"] == 5
    advance(1.5)  # k = 0 of the new schedule
    assert child_device_ids(bulk) == fleet5.device_ids[:3]
    advance(11.499)
    assert len(children(bulk)) == 3
    advance(11.5)
    advance(21.5)
    ops = children(bulk)
    assert [op.device_id for op in ops] == fleet5.device_ids
    assert ops[:2] == first_two
    assert [op.creation_time for op in ops] == [at(0), at(1), at(1.5), at(11.5), at(21.5)]
    assert all("c8y_Restart" in op.fragments for op in ops[:2])
    assert all(op.fragments.get("c8y_Firmware") == {"version": "2"} for op in ops[2:])
    assert reload(bulk).status == BulkStatus.COMPLETED


def test_put_new_group_on_in_progress_targets_new_members_minus_processed(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    advance(0)  # devices[0] processed
    newcomer = make_device("Newcomer")
    add_child_devices(fleet.agent, newcomer)
    other = make_group(fleet.devices[0], fleet.devices[2], newcomer)
    services.bulk_operation_update(
        bulk_operation_id=bulk.pk, data={"groupId": str(other.pk)}, now=at(0.5)
    )
    row = reload(bulk)
    assert row.group_id == other.pk
    assert progress(bulk)["all"] == 3  # one created + devices[2] + newcomer
    advance(0.5)
    advance(1.5)
    advance(100)
    assert child_device_ids(bulk) == [fleet.device_ids[0], fleet.device_ids[2], newcomer.pk]
    assert reload(bulk).status == BulkStatus.COMPLETED


def test_put_selector_switch_clears_the_other_selector(fleet: Fleet) -> None:
    parent = create_bulk(fleet.group, creationRamp=0)
    bulk = create_bulk(fleet.group)
    services.bulk_operation_update(
        bulk_operation_id=bulk.pk, data={"failedParentId": str(parent.pk)}, now=at(0)
    )
    row = reload(bulk)
    assert (row.group_id, row.failed_parent_id) == (None, parent.pk)


def test_put_on_completed_or_deleted_is_refused(fleet: Fleet) -> None:
    done = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    cancelled = create_bulk(fleet.group)
    services.bulk_operation_cancel(bulk_operation_id=cancelled.pk, now=at(0))
    for bulk in (done, cancelled):
        with pytest.raises(services.ValidationFailed):
            services.bulk_operation_update(
                bulk_operation_id=bulk.pk, data={"creationRamp": 3}, now=at(1)
            )


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_stops_creation_and_children_keep_their_status(fleet5: Fleet) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=1)
    advance(0)
    advance(1)
    first, second = children(bulk)
    operation_update(operation_id=first.pk, data={"status": "SUCCESSFUL"}, now=at(1.2))
    services.bulk_operation_cancel(bulk_operation_id=bulk.pk, now=at(1.5))
    advance(100)
    ops = children(bulk)
    assert [op.pk for op in ops] == [first.pk, second.pk]
    assert [op.status for op in ops] == ["SUCCESSFUL", "PENDING"]
    assert general_status(bulk) == "CANCELED"
    assert progress(bulk) == counted_progress(bulk)
    with pytest.raises(services.ValidationFailed):
        services.bulk_operation_cancel(bulk_operation_id=bulk.pk)


# --- targets -----------------------------------------------------------------------------------


def test_smart_group_targets_its_query_matches_in_ascending_order(fleet: Fleet) -> None:
    agent = fleet.agent
    smart = [make_device(f"Smart {i}", type="bulk_smart_type") for i in range(3)]
    add_child_devices(agent, *smart)
    make_device("Not matching", type="other_type")
    ManagedObjectFactory(owner="alice", name="Not a device", type="bulk_smart_type")
    group = ManagedObjectFactory(
        owner="alice",
        name="Smart group",
        fragments={
            "c8y_IsDynamicGroup": {},
            "c8y_DeviceQueryString": "type eq 'bulk_smart_type'",
        },
    )
    bulk = create_bulk(group, creationRamp=0)
    assert progress(bulk)["all"] == 3
    advance(0)
    assert child_device_ids(bulk) == [device.pk for device in smart]


def test_group_targets_only_direct_device_members(fleet: Fleet) -> None:
    sub = make_group(make_device("In subgroup"))
    inventory_services.managed_object_add_children(
        parent=fleet.group, relation="asset", children=[sub]
    )
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    assert child_device_ids(bulk) == fleet.device_ids


def test_failed_parent_targets_exactly_the_failed_devices_once_each() -> None:
    fleet = make_fleet(4)
    parent = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    ops = children(parent)
    operation_update(operation_id=ops[1].pk, data={"status": "FAILED"}, now=at(1))
    operation_update(operation_id=ops[3].pk, data={"status": "FAILED"}, now=at(1))
    operation_update(operation_id=ops[0].pk, data={"status": "SUCCESSFUL"}, now=at(1))
    # A retry of a failed child is a second row for the same device in the parent, and that
    # device's latest attempt: it is not FAILED (PENDING here), so the device is not a target.
    from devicecontrol.services import operation_retry

    operation_retry(operation=reload_op(ops[1]), now=at(2))
    rerun = create_bulk(0, now=at(3), groupId=None, failedParentId=str(parent.pk), creationRamp=0)
    assert progress(rerun)["all"] == 1
    services.bulk_operations_advance(now=at(3))
    assert child_device_ids(rerun) == [fleet.device_ids[3]]
    alias = create_bulk(
        0, now=at(4), groupId=None, failedBulkOperationId=str(parent.pk), creationRamp=0
    )
    assert reload(alias).failed_parent_id == parent.pk


def reload_op(operation):  # noqa: ANN001, ANN201
    return type(operation).objects.get(pk=operation.pk)


# --- exactly once ------------------------------------------------------------------------------


def test_second_child_for_the_same_device_violates_the_unique_constraint(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    device = ManagedObject.objects.get(pk=fleet.device_ids[0])
    with pytest.raises(IntegrityError), transaction.atomic():
        operations_create_many(
            devices=[device],
            data={"c8y_Restart": {}},
            bulk_operation_id=bulk.pk,
            no_agent_reason=services.NO_AGENT_REASON,
        )
    assert child_device_ids(bulk) == fleet.device_ids
    assert progress(bulk) == counted_progress(bulk)


def test_advance_twice_at_the_same_moment_creates_nothing_twice(fleet5: Fleet) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=1)
    assert advance(2) == 3
    assert advance(2) == 0
    assert child_device_ids(bulk) == fleet5.device_ids[:3]
