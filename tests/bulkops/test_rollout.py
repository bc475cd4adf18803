"""Rollout rates, waves with gates, pause and resume (issue 14 items 2-4), driven by `now`: the
schedule a rate gives, where an exponential rate increases, how a wave's gate decides, and what
pause and resume do to the ramp. The same through REST in test_rollout_api.py; with a real worker
in test_rollout_worker.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from bulkops import rollout, services
from bulkops.abort import bulk_operations_abort_sweep
from bulkops.models import BulkOperation, BulkStatus, RolloutState
from bulkops.serializers import bulk_operation_json
from devicecontrol.models import Operation
from devicecontrol.services import operation_cancel, operation_retry, operation_update
from deviceplatform.api.exceptions import NotFound, ValidationFailed
from tests.bulkops.conftest import (
    T0,
    advance,
    at,
    child_device_ids,
    children,
    create_bulk,
    make_fleet,
    reload,
)

pytestmark = pytest.mark.django_db

EXPONENTIAL_BY_CREATED = {
    "exponentialRate": {
        "baseRatePerMinute": 6,  # one per 10 s
        "incrementFactor": 2,
        "rateIncreaseCriteria": {"numberOfNotifiedDevices": 2},
    },
    "maximumPerMinute": 24,  # one per 2.5 s
}


def created_at(bulk: BulkOperation, times: list[float]) -> list[int]:
    """Advance the ramp at each of `times` (seconds after T0), the children created after each."""
    counts = []
    for seconds in times:
        advance(seconds)
        counts.append(len(children(bulk)))
    return counts


def finish(bulk: BulkOperation, status: str, *, count: int | None = None) -> None:
    """Set the first `count` (default all) unfinished children of `bulk` to `status`."""
    open_children = [op for op in children(bulk) if op.status in ("PENDING", "EXECUTING")]
    for operation in open_children[:count]:
        operation_update(operation_id=operation.pk, data={"status": status})


def as_json(bulk: BulkOperation) -> dict[str, Any]:
    return bulk_operation_json(reload(bulk), base="")


# --- rates ---------------------------------------------------------------------------------------


def test_maximum_per_minute_alone_is_a_constant_rate_replacing_creation_ramp() -> None:
    fleet = make_fleet(5)
    bulk = create_bulk(fleet.group, creationRamp=0, rolloutConfig={"maximumPerMinute": 30})
    # One child per 2 s from T0 on.
    assert created_at(bulk, [0, 1.999, 2, 5.9, 6, 100]) == [1, 1, 2, 3, 4, 5]
    body = as_json(bulk)
    assert body["creationRamp"] == 0
    assert body["rolloutConfig"] == {"maximumPerMinute": 30}
    assert body["rollout"] == {"state": "DONE", "currentRatePerMinute": 0}


def test_a_rollout_config_needs_no_creation_ramp() -> None:
    fleet = make_fleet(2)
    data = {"rolloutConfig": {"maximumPerMinute": 60}}
    bulk = services.bulk_operation_create(
        data={
            "groupId": str(fleet.group.pk),
            "startDate": "2031-03-01T12:00:00Z",
            "operationPrototype": {"c8y_Restart": {}},
            **data,
        },
        now=T0,
    )
    assert bulk.creation_ramp == 0
    assert as_json(bulk)["rollout"] == {"state": "RUNNING", "currentRatePerMinute": 60}


def test_exponential_rate_by_created_children_follows_its_curve_and_cap() -> None:
    fleet = make_fleet(8)
    bulk = create_bulk(fleet.group, creationRamp=0, rolloutConfig=EXPONENTIAL_BY_CREATED)
    # 6/min for the first 2 (0, 10 s), 12/min for the next 2 (20, 25), then 24/min, the cap
    # (30, 32.5, 35, 37.5): each increase from the position that earned it, at the moment that
    # position was due.
    times = [0, 9.99, 10, 19.99, 20, 24.99, 25, 29.99, 30, 32.49, 32.5, 35, 37.49, 37.5]
    assert created_at(bulk, times) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 7, 8]
    assert reload(bulk).status == BulkStatus.COMPLETED
    by_device = {op.device_id: op.creation_time for op in children(bulk)}
    assert [by_device[pk] for pk in fleet.device_ids] == [
        at(s) for s in (0, 10, 20, 25, 30, 32.5, 35, 37.5)
    ]


def test_exponential_rate_reports_its_current_rate() -> None:
    fleet = make_fleet(8)
    bulk = create_bulk(fleet.group, creationRamp=0, rolloutConfig=EXPONENTIAL_BY_CREATED)
    assert as_json(bulk)["rollout"]["currentRatePerMinute"] == 6
    advance(10)
    assert as_json(bulk)["rollout"]["currentRatePerMinute"] == 12
    advance(25)
    assert as_json(bulk)["rollout"]["currentRatePerMinute"] == 24
    advance(35)
    assert reload(bulk).rate_step == 2  # capped: no further increase
    assert as_json(bulk)["rollout"]["currentRatePerMinute"] == 24


def test_a_late_ramp_catches_up_on_the_exponential_schedule_in_one_run() -> None:
    fleet = make_fleet(8)
    bulk = create_bulk(fleet.group, creationRamp=0, rolloutConfig=EXPONENTIAL_BY_CREATED)
    assert advance(33) == 6  # positions due at 0, 10, 20, 25, 30, 32.5
    assert reload(bulk).next_due_at == at(35)


def test_exponential_rate_by_successes_increases_from_the_next_due_child() -> None:
    fleet = make_fleet(6)
    config = {
        "exponentialRate": {
            "baseRatePerMinute": 6,
            "incrementFactor": 2,
            "rateIncreaseCriteria": {"numberOfSucceededDevices": 2},
        }
    }
    bulk = create_bulk(fleet.group, creationRamp=0, rolloutConfig=config)
    assert created_at(bulk, [0, 10]) == [1, 2]
    finish(bulk, "SUCCESSFUL", count=1)
    assert created_at(bulk, [20]) == [3]  # one success: still 6/min
    assert as_json(bulk)["rollout"]["currentRatePerMinute"] == 6
    finish(bulk, "SUCCESSFUL", count=1)
    # Two successes: from the next due child (30 s) on, 12/min.
    assert created_at(bulk, [29.9, 30, 34.9, 35]) == [3, 4, 4, 5]
    assert as_json(bulk)["rollout"]["currentRatePerMinute"] == 12
    assert reload(bulk).rate_step == 1


def test_beat_applies_a_success_increase_from_the_previous_childs_due_time() -> None:
    fleet = make_fleet(6)
    config = {
        "exponentialRate": {
            "baseRatePerMinute": 6,  # 10 s
            "incrementFactor": 2,
            "rateIncreaseCriteria": {"numberOfSucceededDevices": 2},
        }
    }
    bulk = create_bulk(fleet.group, creationRamp=0, rolloutConfig=config)
    assert created_at(bulk, [0, 10]) == [1, 2]
    finish(bulk, "SUCCESSFUL")
    assert services.bulk_rollout_rates_check(now=at(12)) == 1
    assert services.bulk_rollout_rates_check(now=at(12.5)) == 0  # nothing new earned
    row = reload(bulk)
    # The previous child was due at 10 s: at 12/min the next is due 5 s later, not at 20 s.
    assert (row.current_rate, row.next_due_at) == (12, at(15))
    assert created_at(bulk, [14.9, 15, 19.9, 20]) == [2, 3, 3, 4]
    # Earned after the next child's due time: it is due now.
    finish(bulk, "SUCCESSFUL")
    assert services.bulk_rollout_rates_check(now=at(24)) == 1
    assert reload(bulk).next_due_at == at(24)


def test_the_rates_check_leaves_other_bulk_operations_alone() -> None:
    fleet = make_fleet(2)
    plain = create_bulk(fleet.group, creationRamp=1)
    by_created = create_bulk(fleet.group, creationRamp=0, rolloutConfig=EXPONENTIAL_BY_CREATED)
    advance(0)
    finish(plain, "SUCCESSFUL")
    finish(by_created, "SUCCESSFUL")
    before = [reload(plain).next_due_at, reload(by_created).next_due_at]
    assert services.bulk_rollout_rates_check(now=at(1)) == 0
    assert [reload(plain).next_due_at, reload(by_created).next_due_at] == before


# --- waves ---------------------------------------------------------------------------------------


def test_a_wave_stops_the_ramp_until_its_gate_passes() -> None:
    fleet = make_fleet(6)
    bulk = create_bulk(
        fleet.group, creationRamp=0, waves=[{"size": 2}, {"percentage": 50}, {"percentage": 100}]
    )
    advance(0)
    assert child_device_ids(bulk) == fleet.device_ids[:2]
    row = reload(bulk)
    assert row.rollout_state == RolloutState.WAITING_FOR_WAVE
    assert row.next_due_at is None
    assert services.bulk_operations_next_due() is None  # neither the ramp nor a booking
    assert as_json(bulk)["rollout"] == {
        "state": "WAITING_FOR_WAVE",
        "wave": 1,
        "currentRatePerMinute": 0,
    }
    assert as_json(bulk)["generalStatus"] == "EXECUTING"
    assert advance(100) == 0
    assert services.bulk_rollout_gates_check(now=at(100)) == 0  # both pending
    finish(bulk, "SUCCESSFUL", count=1)
    assert services.bulk_rollout_gates_check(now=at(101)) == 0  # 1 of 2, threshold 100
    finish(bulk, "SUCCESSFUL")
    assert services.bulk_rollout_gates_check(now=at(102)) == 1
    row = reload(bulk)
    assert (row.rollout_state, row.wave, row.next_due_at) == ("RUNNING", 1, at(102))
    advance(102)
    assert child_device_ids(bulk) == fleet.device_ids[:3]  # 50 % of 6
    assert as_json(bulk)["rollout"]["wave"] == 2
    finish(bulk, "SUCCESSFUL")
    services.bulk_rollout_gates_check(now=at(103))
    advance(103)
    assert child_device_ids(bulk) == fleet.device_ids
    assert reload(bulk).status == BulkStatus.COMPLETED
    assert as_json(bulk)["rollout"] == {"state": "DONE", "wave": 3, "currentRatePerMinute": 0}


def test_a_wave_passes_as_soon_as_enough_succeeded() -> None:
    fleet = make_fleet(4)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        waves=[{"size": 2, "successThreshold": 50}, {"percentage": 100}],
    )
    advance(0)
    finish(bulk, "SUCCESSFUL", count=1)  # the other one still pending
    assert services.bulk_rollout_gates_check(now=at(1)) == 1
    advance(1)
    assert len(children(bulk)) == 4


def test_a_wave_that_can_no_longer_pass_pauses_with_the_reason_and_resume_goes_on() -> None:
    fleet = make_fleet(4)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        waves=[{"size": 2, "successThreshold": 100}, {"size": 2}],
    )
    advance(0)
    finish(bulk, "FAILED", count=1)
    assert services.bulk_rollout_gates_check(now=at(1)) == 1
    rollout_json = as_json(bulk)["rollout"]
    assert rollout_json["state"] == "PAUSED"
    assert rollout_json["wave"] == 1
    assert rollout_json["reason"].startswith("Wave 1 fell short: 0 of 2 succeeded (0%)")
    assert advance(100) == 0
    services.bulk_operation_resume(bulk_operation_id=bulk.pk, now=at(200))
    row = reload(bulk)
    assert (row.rollout_state, row.wave, row.rollout_reason) == ("RUNNING", 1, None)
    advance(200)
    assert len(children(bulk)) == 4


def test_a_wave_with_then_pause_waits_for_the_operator_even_when_it_passes() -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(
        fleet.group, creationRamp=0, waves=[{"size": 1, "then": "PAUSE"}, {"percentage": 100}]
    )
    advance(0)
    finish(bulk, "SUCCESSFUL")
    assert services.bulk_rollout_gates_check(now=at(1)) == 1
    reason = as_json(bulk)["rollout"]["reason"]
    assert reason.startswith("Wave 1 passed: 1 of 1 succeeded (100%)")
    assert advance(50) == 0
    assert services.bulk_rollout_gates_check(now=at(51)) == 0  # paused: no gate to decide
    services.bulk_operation_resume(bulk_operation_id=bulk.pk, by="ops", now=at(60))
    assert advance(60) == 2


def test_a_wave_counts_each_device_by_its_latest_attempt() -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(fleet.group, creationRamp=0, waves=[{"size": 2}, {"percentage": 100}])
    advance(0)
    first, second = children(bulk)
    operation_update(operation_id=first.pk, data={"status": "FAILED"})
    operation_update(operation_id=second.pk, data={"status": "SUCCESSFUL"})
    retry = operation_retry(operation=Operation.objects.get(pk=first.pk))
    assert rollout.wave_count(reload(bulk), 0) == rollout.WaveCount(
        total=2, finished=1, successful=1
    )
    assert services.bulk_rollout_gates_check(now=at(1)) == 0  # the retry may still succeed
    operation_update(operation_id=retry.pk, data={"status": "SUCCESSFUL"})
    assert services.bulk_rollout_gates_check(now=at(2)) == 1


def test_a_wave_gate_leaves_out_children_an_operator_cancelled() -> None:
    """As abort criteria do: a child cancelled by an operator ("Cancelled by ...", or failed
    after a cancel request) counts neither for nor against successThreshold; the denominator
    is the wave's other children."""
    fleet = make_fleet(5)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        waves=[{"size": 4, "successThreshold": 100}, {"percentage": 100}],
    )
    advance(0)
    first, second, third, fourth = children(bulk)
    operation_cancel(operation=first, by="ops")  # PENDING: FAILED "Cancelled by ops"
    operation_update(operation_id=second.pk, data={"status": "EXECUTING"})
    operation_cancel(operation=Operation.objects.get(pk=second.pk), by="ops")  # a request
    operation_update(operation_id=second.pk, data={"status": "FAILED"})  # the agent stops
    operation_update(operation_id=third.pk, data={"status": "SUCCESSFUL"})
    assert rollout.wave_count(reload(bulk), 0) == rollout.WaveCount(
        total=2, finished=1, successful=1, cancelled=2
    )
    assert services.bulk_rollout_gates_check(now=at(1)) == 0  # the fourth may still succeed
    operation_update(operation_id=fourth.pk, data={"status": "SUCCESSFUL"})
    assert services.bulk_rollout_gates_check(now=at(2)) == 1  # 2 of 2 counted: 100 %
    assert reload(bulk).wave == 1
    assert advance(2) == 1


def test_a_wave_gate_still_counts_a_child_the_agent_failed() -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        waves=[{"size": 2, "successThreshold": 100}, {"percentage": 100}],
    )
    advance(0)
    first, second = children(bulk)
    operation_cancel(operation=first, by="ops")
    operation_update(operation_id=second.pk, data={"status": "FAILED", "failureReason": "Boom"})
    assert services.bulk_rollout_gates_check(now=at(1)) == 1
    paused = reload(bulk)
    assert paused.rollout_state == RolloutState.PAUSED
    assert paused.rollout_reason.startswith(
        "Wave 1 fell short: 0 of 1 succeeded (0%), 1 cancelled by an operator not counted"
    )


def test_waves_go_with_a_rate() -> None:
    fleet = make_fleet(4)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        rolloutConfig={"maximumPerMinute": 60},
        waves=[{"size": 2}, {"percentage": 100}],
    )
    assert created_at(bulk, [0, 1, 50]) == [1, 2, 2]
    finish(bulk, "SUCCESSFUL")
    services.bulk_rollout_gates_check(now=at(60))
    assert created_at(bulk, [60, 60.5, 61]) == [3, 3, 4]


# --- pause and resume ----------------------------------------------------------------------------


def test_pause_stops_the_ramp_and_resume_restarts_it_from_then() -> None:
    fleet = make_fleet(5)
    bulk = create_bulk(fleet.group, creationRamp=1)
    advance(0)
    paused = services.bulk_operation_pause(bulk_operation_id=bulk.pk, by="bob", now=at(0.5))
    assert paused.next_due_at is None
    assert services.bulk_operations_next_due() is None
    assert advance(30) == 0
    body = as_json(bulk)
    assert body["rollout"] == {
        "state": "PAUSED",
        "currentRatePerMinute": 0,
        "reason": "Paused by bob",
    }
    assert (body["status"], body["generalStatus"]) == ("IN_PROGRESS", "EXECUTING")
    services.bulk_operation_resume(bulk_operation_id=bulk.pk, now=at(40))
    assert created_at(bulk, [39.9, 40, 40.9, 41]) == [1, 2, 2, 3]
    assert as_json(bulk)["rollout"] == {"state": "RUNNING", "currentRatePerMinute": 60}


def test_pause_before_the_start_keeps_it_scheduled() -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=1, startDate="2031-03-01T12:10:00Z")
    services.bulk_operation_pause(bulk_operation_id=bulk.pk, now=T0)
    assert as_json(bulk)["generalStatus"] == "SCHEDULED"
    assert advance(700) == 0
    services.bulk_operation_resume(bulk_operation_id=bulk.pk, now=T0)
    assert reload(bulk).next_due_at == at(600)  # its start date, still ahead


def test_a_put_keeps_a_paused_bulk_operation_paused() -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(fleet.group, creationRamp=1)
    services.bulk_operation_pause(bulk_operation_id=bulk.pk, now=T0)
    services.bulk_operation_update(bulk_operation_id=bulk.pk, data={"creationRamp": 2}, now=T0)
    row = reload(bulk)
    assert (row.rollout_state, row.next_due_at, row.creation_ramp) == ("PAUSED", None, 2)
    assert advance(100) == 0


def test_cancel_of_a_paused_bulk_operation_reports_aborted() -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=1)
    services.bulk_operation_pause(bulk_operation_id=bulk.pk, now=T0)
    services.bulk_operation_cancel(bulk_operation_id=bulk.pk, now=T0)
    assert as_json(bulk)["rollout"] == {
        "state": "ABORTED",
        "currentRatePerMinute": 0,
        "reason": "Cancelled",
    }


def test_an_abort_reports_aborted_with_its_message() -> None:
    """An abort (README "Abort thresholds") ends the rollout: state ABORTED, the abort's message
    as the reason, even for a bulk operation that was waiting at a wave's gate."""
    fleet = make_fleet(4)
    config = {"criteria": [{"failureType": "ANY", "thresholdPercentage": 50}]}
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        waves=[{"size": 2, "successThreshold": 100}, {"percentage": 100}],
        abortConfig=config,
    )
    advance(0)
    assert rollout.rollout_json(reload(bulk))["rollout"]["state"] == "WAITING_FOR_WAVE"
    first, _ = children(bulk)
    operation_update(operation_id=first.pk, data={"status": "FAILED"}, now=at(1))
    assert bulk_operations_abort_sweep(now=at(2)) == [bulk.pk]
    row = reload(bulk)
    info = rollout.rollout_json(row)["rollout"]
    assert (info["state"], info["reason"]) == ("ABORTED", row.abort_reason["message"])
    assert info["reason"].startswith("Rollout aborted: ")


def _state(bulk: BulkOperation) -> tuple[Any, ...]:
    row = reload(bulk)
    return (row.status, row.rollout_state, row.rollout_reason, row.next_due_at, row.last_updated)


@pytest.mark.parametrize(
    ("setup", "change", "message"),
    [
        ("running", "resume", "Only a paused bulk operation can be resumed"),
        ("waiting", "resume", "is waiting for its wave's gate"),
        ("paused", "pause", "is paused already"),
        ("completed", "pause", "can be paused; "),
        ("completed", "resume", "can be resumed; "),
        ("cancelled", "pause", "can be paused; "),
        ("cancelled", "resume", "can be resumed; "),
    ],
)
def test_pause_and_resume_refuse_with_422_and_change_nothing(
    setup: str, change: str, message: str
) -> None:
    fleet = make_fleet(2)
    waves = [{"size": 1}, {"percentage": 100}] if setup == "waiting" else None
    bulk = create_bulk(fleet.group, creationRamp=0, waves=waves)
    if setup in ("completed", "waiting"):
        advance(0)
    if setup == "paused":
        services.bulk_operation_pause(bulk_operation_id=bulk.pk, now=T0)
    if setup == "cancelled":
        services.bulk_operation_cancel(bulk_operation_id=bulk.pk, now=T0)
    before = _state(bulk)
    action = {"pause": services.bulk_operation_pause, "resume": services.bulk_operation_resume}
    with pytest.raises(ValidationFailed) as raised:
        action[change](bulk_operation_id=bulk.pk, now=at(5))
    assert message in raised.value.message
    assert raised.value.error == "devicecontrol/Invalid Data"
    assert _state(bulk) == before


def test_pause_of_an_unknown_bulk_operation_is_not_found() -> None:
    with pytest.raises(NotFound):
        services.bulk_operation_pause(bulk_operation_id=987654321)


# --- validation ----------------------------------------------------------------------------------


def test_wave_ends_mix_sizes_and_shares_of_the_fleet() -> None:
    waves = rollout.parse_waves([{"size": 5}, {"percentage": 25}, {"size": 3}, {"percentage": 100}])
    assert rollout.wave_ends(waves, 40) == [5, 10, 13, 40]
    assert rollout.wave_ends(waves, 8) == [5, 5, 8, 8]  # 25 % of 8 is within the first wave


def test_a_plain_bulk_operation_shows_none_of_the_extension() -> None:
    fleet = make_fleet(1)
    bulk = create_bulk(fleet.group)
    body = as_json(bulk)
    assert not {"rolloutConfig", "waves", "rollout"} & set(body)
    assert rollout.ramp_seconds(reload(bulk)) == 1


def test_put_may_repeat_the_extension_but_not_change_it() -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(
        fleet.group, creationRamp=0, rolloutConfig={"maximumPerMinute": 30}, waves=[{"size": 2}]
    )
    body = as_json(bulk)
    same = {key: body[key] for key in ("rolloutConfig", "waves", "rollout", "creationRamp")}
    services.bulk_operation_update(bulk_operation_id=bulk.pk, data=same, now=T0)
    for data in (
        {"rolloutConfig": {"maximumPerMinute": 31}},
        {"waves": [{"percentage": 100}]},
        {"creationRamp": 5},
    ):
        with pytest.raises(ValidationFailed):
            services.bulk_operation_update(bulk_operation_id=bulk.pk, data=data, now=T0)
    row = reload(bulk)
    assert (row.rollout_config, row.creation_ramp) == ({"maximumPerMinute": 30}, 0)


def test_rate_at_is_capped_and_never_overflows() -> None:
    config = rollout.parse_rollout_config(EXPONENTIAL_BY_CREATED)
    assert [rollout.rate_at(config, step) for step in range(4)] == [6, 12, 24, 24]
    huge = rollout.parse_rollout_config(
        {
            "exponentialRate": {
                "baseRatePerMinute": 1,
                "incrementFactor": 10,
                "rateIncreaseCriteria": {"numberOfNotifiedDevices": 1},
            }
        }
    )
    assert rollout.rate_at(huge, 10_000) == rollout.MAX_RATE_PER_MINUTE
    assert timedelta(seconds=rollout.ramp_seconds(BulkOperation(current_rate=6))) == timedelta(
        seconds=10
    )
