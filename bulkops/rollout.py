"""Rollout extensions of a bulk operation (issue 14 items 2-4): rates, waves with gates, pause.

All optional: a bulk operation created without `rolloutConfig` or `waves` runs on its
`creationRamp` exactly as Cumulocity's does, and its JSON carries none of these keys.

- Rates. `rolloutConfig.maximumPerMinute` alone: a constant rate. `rolloutConfig.exponentialRate`:
  the rate starts at `baseRatePerMinute` and is multiplied by `incrementFactor` each time another
  `numberOfNotifiedDevices` children were created (or `numberOfSucceededDevices` succeeded: the
  beat task checks those every tick, `success_increase`),
  capped by `maximumPerMinute` (AWS IoT Jobs' job executions rollout). A rate of R per minute is a
  ramp of 60/R s: the schedule (`bulkops.services._due_offset`) runs on `ramp_seconds`, and a rate
  change restarts it at `next_index`, from the moment the next child was due at the old rate.
- Waves. Each wave ends at a position: a `size` adds that many targets to the previous end, a
  `percentage` reaches that share of all targets (rounded up). When the ramp reaches a wave's end
  it stops (WAITING_FOR_WAVE, no due time, so neither the ramp nor its booking sees it) until the
  beat task's gate check (`gate_check`) finds the wave's children reached `successThreshold`
  percent successful: then the next wave starts, or, with `then: "PAUSE"`, the bulk operation
  pauses for an operator. A wave that can no longer reach its threshold pauses it with a reason.
  (hawkBit's rollout groups: successCondition / successAction / errorCondition.)
- Pause / resume: a paused bulk operation has no due time; resume restarts its schedule at
  `next_index` from now. Resuming at the end of a wave starts the next wave: the operator's
  decision replaces the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Q

from bulkops.models import BulkOperation, BulkOperationTarget, BulkStatus, RolloutState
from bulkops.selectors import bulk_operation_progress
from devicecontrol.models import Operation, OperationStatus
from deviceplatform.api.exceptions import ValidationFailed

INVALID = "devicecontrol/Invalid Data"
# Body keys of the extension: what is given (and echoed), and what is only ever read.
INPUT_KEYS = ("rolloutConfig", "waves")
READ_ONLY_KEY = "rollout"
MAX_RATE_PER_MINUTE = 1_000_000
MAX_INCREMENT_FACTOR = 10
RATE_CRITERIA = ("numberOfNotifiedDevices", "numberOfSucceededDevices")
WAVE_THEN = ("CONTINUE", "PAUSE")
# The columns these rules write on the ramp's save (besides the ramp's own).
RAMP_FIELDS = (
    "first_index",
    "effective_start",
    "current_rate",
    "rate_step",
    "rollout_state",
    "rollout_reason",
)


def _invalid(message: str) -> ValidationFailed:
    return ValidationFailed(message, error=INVALID)


# --- validation --------------------------------------------------------------------------------


def _number(value: Any, field: str, *, low: float, high: float, low_open: bool = False) -> float:
    """A JSON number in [low, high] (or (low, high] with `low_open`); 422 otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"{field} must be a number")
    if value > high or value < low or (low_open and value == low):
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise _invalid(f"{field} must be {bound} and at most {high:g}, not {value:g}")
    return float(value)


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 10**9:
        raise _invalid(f"{field} must be a whole number from 1 to 1000000000")
    return value


def _object(value: Any, field: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{field} must be a JSON object")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise _invalid(
            f"{field} has unknown key(s) {', '.join(unknown)}; known: {', '.join(allowed)}"
        )
    return value


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def parse_rollout_config(value: Any) -> dict[str, Any]:
    """`rolloutConfig` normalised (numbers as given); 422 for anything malformed."""
    given = _object(value, "rolloutConfig", ("maximumPerMinute", "exponentialRate"))
    config: dict[str, Any] = {}
    if given.get("maximumPerMinute") is not None:
        config["maximumPerMinute"] = _plain(
            _number(
                given["maximumPerMinute"],
                "rolloutConfig.maximumPerMinute",
                low=0,
                high=MAX_RATE_PER_MINUTE,
                low_open=True,
            )
        )
    if given.get("exponentialRate") is not None:
        field = "rolloutConfig.exponentialRate"
        rate = _object(
            given["exponentialRate"],
            field,
            ("baseRatePerMinute", "incrementFactor", "rateIncreaseCriteria"),
        )
        missing = [
            key
            for key in ("baseRatePerMinute", "incrementFactor", "rateIncreaseCriteria")
            if rate.get(key) is None
        ]
        if missing:
            raise _invalid(f"{field} needs {', '.join(missing)}")
        base = _number(
            rate["baseRatePerMinute"],
            f"{field}.baseRatePerMinute",
            low=0,
            high=MAX_RATE_PER_MINUTE,
            low_open=True,
        )
        factor = _number(
            rate["incrementFactor"],
            f"{field}.incrementFactor",
            low=1,
            high=MAX_INCREMENT_FACTOR,
            low_open=True,
        )
        criteria = _object(
            rate["rateIncreaseCriteria"], f"{field}.rateIncreaseCriteria", RATE_CRITERIA
        )
        named = [key for key in RATE_CRITERIA if criteria.get(key) is not None]
        if len(named) != 1:
            raise _invalid(
                f"{field}.rateIncreaseCriteria must give exactly one of numberOfNotifiedDevices "
                "and numberOfSucceededDevices"
            )
        key = named[0]
        config["exponentialRate"] = {
            "baseRatePerMinute": _plain(base),
            "incrementFactor": _plain(factor),
            "rateIncreaseCriteria": {
                key: _count(criteria[key], f"{field}.rateIncreaseCriteria.{key}")
            },
        }
        maximum = config.get("maximumPerMinute")
        if maximum is not None and base > maximum:
            raise _invalid(
                f"{field}.baseRatePerMinute ({base:g}) must not exceed "
                f"rolloutConfig.maximumPerMinute ({maximum:g})"
            )
    if not config:
        raise _invalid("rolloutConfig must give maximumPerMinute or exponentialRate")
    return config


def parse_waves(value: Any) -> list[dict[str, Any]]:
    """`waves` normalised (each with its successThreshold and then); 422 for anything malformed.
    Whether they cover the fleet is checked once the targets are known (`check_coverage`)."""
    if not isinstance(value, list) or not value:
        raise _invalid("waves must be a non-empty JSON array of waves")
    if len(value) > 100:
        raise _invalid("waves may hold at most 100 waves")
    waves = []
    last_percentage = 0.0
    for number, item in enumerate(value, start=1):
        field = f"waves[{number - 1}]"
        given = _object(item, field, ("size", "percentage", "successThreshold", "then"))
        wave: dict[str, Any] = {}
        if (given.get("size") is None) == (given.get("percentage") is None):
            raise _invalid(f"{field} must give exactly one of size and percentage")
        if given.get("size") is not None:
            wave["size"] = _count(given["size"], f"{field}.size")
        else:
            percentage = _number(
                given["percentage"], f"{field}.percentage", low=0, high=100, low_open=True
            )
            if percentage <= last_percentage:
                raise _invalid(
                    f"{field}.percentage ({percentage:g}) must be above the previous wave's "
                    f"({last_percentage:g}): percentages are shares of the whole fleet"
                )
            last_percentage = percentage
            wave["percentage"] = _plain(percentage)
        threshold = given.get("successThreshold")
        wave["successThreshold"] = (
            100
            if threshold is None
            else _plain(_number(threshold, f"{field}.successThreshold", low=0, high=100))
        )
        then = given.get("then", "CONTINUE")
        if then not in WAVE_THEN:
            raise _invalid(f"{field}.then must be CONTINUE or PAUSE, not {then!r}")
        wave["then"] = then
        waves.append(wave)
    return waves


@dataclass(frozen=True)
class RolloutInput:
    """The extension's part of a create body, validated."""

    config: dict[str, Any] | None = None
    waves: list[dict[str, Any]] | None = None


def replaces_ramp(data: dict[str, Any]) -> bool:
    """A body with a rolloutConfig needs no creationRamp (the rate replaces it)."""
    return data.get("rolloutConfig") is not None


def rollout_input(data: dict[str, Any], *, ramp: float) -> RolloutInput:
    """Validate the extension's keys of a create body; `ramp` is its creationRamp (0 if absent).
    A rolloutConfig replaces creationRamp: with one, creationRamp must be absent or 0."""
    config = parse_rollout_config(data["rolloutConfig"]) if replaces_ramp(data) else None
    waves = parse_waves(data["waves"]) if data.get("waves") is not None else None
    if config is not None and ramp:
        raise _invalid(
            "creationRamp conflicts with rolloutConfig: give creationRamp 0 (or none) with a "
            "rolloutConfig, whose rate replaces it"
        )
    return RolloutInput(config=config, waves=waves)


def wave_ends(waves: list[dict[str, Any]], target_count: int) -> list[int]:
    """One past the last position of each wave; the last wave always reaches the last target."""
    ends = []
    end = 0
    for wave in waves:
        if "size" in wave:
            end = end + wave["size"]
        else:
            end = max(end, math.ceil(wave["percentage"] * target_count / 100))
        ends.append(min(end, target_count))
    ends[-1] = target_count
    return ends


def check_coverage(waves: list[dict[str, Any]] | None, target_count: int) -> None:
    """422 unless the waves reach the whole fleet: the last one is 100 percent, or the sizes add
    up to at least the number of targets."""
    if not waves:
        return
    last = waves[-1]
    if last.get("percentage") == 100:
        return
    end = 0
    for wave in waves:
        if "size" in wave:
            end += wave["size"]
        else:
            end = max(end, math.ceil(wave["percentage"] * target_count / 100))
    if end < target_count:
        raise _invalid(
            f"waves cover {end} of the {target_count} target devices: the last wave must have "
            "percentage 100 or the sizes must add up to the whole fleet"
        )


def check_update(bulk: BulkOperation, data: dict[str, Any], *, ramp: float | None) -> None:
    """A PUT may repeat the extension's keys as they are (a client that GETs and PUTs back), not
    change them; nor give a nonzero creationRamp where a rate governs."""
    if "rolloutConfig" in data:
        given = parse_rollout_config(data["rolloutConfig"]) if data["rolloutConfig"] else None
        if given != bulk.rollout_config:
            raise _invalid("rolloutConfig cannot be changed after creation")
    if "waves" in data:
        waves = parse_waves(data["waves"]) if data["waves"] else None
        if waves != bulk.waves:
            raise _invalid("waves cannot be changed after creation")
    if bulk.rollout_config is not None and ramp:
        raise _invalid("creationRamp conflicts with rolloutConfig: its rate governs this ramp")


# --- rates ---------------------------------------------------------------------------------------


def _exponential(config: dict[str, Any] | None) -> dict[str, Any] | None:
    return (config or {}).get("exponentialRate")


def rate_at(config: dict[str, Any], step: int) -> float:
    """Children per minute after `step` increases: base * factor^step, capped by the maximum."""
    maximum = config.get("maximumPerMinute", MAX_RATE_PER_MINUTE)
    exponential = _exponential(config)
    if exponential is None:
        return float(maximum)
    try:
        # In floats: an int factor to a large step would build a huge integer first.
        rate = exponential["baseRatePerMinute"] * float(exponential["incrementFactor"]) ** step
    except OverflowError:
        return float(maximum)
    return float(min(rate, maximum))


def _at_maximum(bulk: BulkOperation) -> bool:
    config = bulk.rollout_config or {}
    return rate_at(config, bulk.rate_step) >= config.get("maximumPerMinute", MAX_RATE_PER_MINUTE)


def ramp_seconds(bulk: BulkOperation) -> float:
    """Seconds between two children: 60 / the current rate when a rate governs, else creationRamp."""
    if bulk.current_rate:
        return 60.0 / bulk.current_rate
    return bulk.creation_ramp


def current_rate_per_minute(bulk: BulkOperation) -> float | None:
    """The rate the schedule runs at, per minute (None for a creationRamp of 0: all at once)."""
    seconds = ramp_seconds(bulk)
    return 60.0 / seconds if seconds > 0 else None


def rollout_init(bulk: BulkOperation, given: RolloutInput) -> None:
    """Set a new bulk operation's rollout columns from its validated input."""
    bulk.rollout_config = given.config
    bulk.waves = given.waves
    if given.config is not None or given.waves is not None:
        bulk.rollout_state = RolloutState.RUNNING
    bulk.rate_step = 0
    bulk.current_rate = rate_at(given.config, 0) if given.config is not None else None


def _restart(bulk: BulkOperation, at: datetime) -> None:
    """The schedule restarts at `next_index`, which is due at `at` (as services._schedule)."""
    bulk.first_index = bulk.next_index
    bulk.effective_start = at
    bulk.next_due_at = at


def _set_step(bulk: BulkOperation, step: int) -> None:
    bulk.rate_step = step
    bulk.current_rate = rate_at(bulk.rollout_config or {}, step)


def _criterion(bulk: BulkOperation) -> tuple[str, int] | None:
    exponential = _exponential(bulk.rollout_config)
    if exponential is None:
        return None
    ((key, every),) = exponential["rateIncreaseCriteria"].items()
    return key, every


def success_increase(bulk: BulkOperation, now: datetime) -> bool:
    """On a running rate that increases with successes (`bulk` locked): apply the increases earned
    so far. The next child is then due one new step after the previous child's due time (at the
    earliest now), so an increase counts from when it was earned, not from the old rate's next
    child. Returns whether the rate changed."""
    criterion = _criterion(bulk)
    if (
        criterion is None
        or criterion[0] != "numberOfSucceededDevices"
        or bulk.next_due_at is None
        or _at_maximum(bulk)
    ):
        return False
    step = bulk_operation_progress(bulk)["successful"] // criterion[1]
    if step <= bulk.rate_step:
        return False
    previous_due = bulk.next_due_at - timedelta(seconds=ramp_seconds(bulk))
    _set_step(bulk, step)
    due = previous_due + timedelta(seconds=ramp_seconds(bulk))
    _restart(bulk, max(due, now, bulk.start_date))
    return True


def before_advance(bulk: BulkOperation, now: datetime) -> None:
    """The ramp is about to create due children of `bulk` (locked): apply the rate increases
    earned by successes since (the beat task's `success_increase` may not have seen them yet)."""
    success_increase(bulk, now)


def advance_limit(bulk: BulkOperation) -> int:
    """How far this batch may go: to the end of the current wave, and to the next rate increase
    by created children (so each increase applies from its exact position)."""
    limit = bulk.target_count
    if bulk.waves:
        ends = wave_ends(bulk.waves, bulk.target_count)
        limit = min(limit, ends[min(bulk.wave, len(ends) - 1)])
    criterion = _criterion(bulk)
    if (
        criterion is not None
        and criterion[0] == "numberOfNotifiedDevices"
        and not _at_maximum(bulk)
    ):
        every = criterion[1]
        limit = min(limit, (bulk.next_index // every + 1) * every)
    return limit


def _at_wave_end(bulk: BulkOperation) -> bool:
    """Whether the ramp reached the end of the current wave, and another wave follows."""
    return (
        bool(bulk.waves)
        and bulk.wave < len(bulk.waves) - 1
        and bulk.next_index >= wave_ends(bulk.waves, bulk.target_count)[bulk.wave]
    )


def after_advance(bulk: BulkOperation) -> None:
    """The ramp moved `next_index` (not to the end) and set `next_due_at` at the old rate: apply a
    rate increase earned by the children created, and stop at the end of a wave."""
    criterion = _criterion(bulk)
    if (
        criterion is not None
        and criterion[0] == "numberOfNotifiedDevices"
        and not _at_maximum(bulk)
    ):
        step = bulk.next_index // criterion[1]
        if step > bulk.rate_step and bulk.next_due_at is not None:
            _set_step(bulk, step)
            _restart(bulk, bulk.next_due_at)
    if _at_wave_end(bulk):
        bulk.rollout_state = RolloutState.WAITING_FOR_WAVE
        bulk.rollout_reason = None
        bulk.next_due_at = None


def hold(bulk: BulkOperation) -> None:
    """After a reschedule (PUT): a paused or wave-waiting bulk operation stays without a due time."""
    if bulk.rollout_state in (RolloutState.PAUSED, RolloutState.WAITING_FOR_WAVE):
        bulk.next_due_at = None


# --- waves -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveCount:
    """A wave's children (one per device: its latest attempt) that count for its gate, finished
    ones, successful ones; and `cancelled`, the FAILED ones an operator cancelled, which are left
    out of the other three (as abort criteria leave them out)."""

    total: int
    finished: int
    successful: int
    cancelled: int = 0


def wave_count(bulk: BulkOperation, wave: int) -> WaveCount:
    """The one count of a wave's children that the gates decide on: the latest attempt
    (`superseded=False`) of each device at the wave's positions; a device deleted before its
    child was created has none and does not count. A FAILED attempt with a booked automatic retry
    (`retry_at`, README "Automatic retries") is not finished yet: its retry may still succeed.
    A child an operator cancelled (FAILED "Cancelled by ...", or failed after a cancel request:
    bulkops.abort `cancelled_q`) is not counted at all: the denominator of `successThreshold`
    is the wave's other children."""
    from bulkops.abort import cancelled_q  # abort -> live -> serializers -> this module

    ends = wave_ends(bulk.waves or [{"percentage": 100}], bulk.target_count)
    start = ends[wave - 1] if wave > 0 else 0
    devices = BulkOperationTarget.objects.filter(
        bulk_operation_id=bulk.pk, position__gte=start, position__lt=ends[wave]
    ).values("device_id")
    cancelled = Q(status=OperationStatus.FAILED) & cancelled_q()
    counted = ~cancelled
    counts = Operation.objects.filter(
        bulk_operation_id=bulk.pk, superseded=False, device_id__in=devices
    ).aggregate(
        total=Count("pk", filter=counted),
        finished=Count(
            "pk",
            filter=Q(status__in=[OperationStatus.SUCCESSFUL, OperationStatus.FAILED])
            & Q(retry_at__isnull=True)
            & counted,
        ),
        successful=Count("pk", filter=Q(status=OperationStatus.SUCCESSFUL)),
        cancelled=Count("pk", filter=cancelled),
    )
    return WaveCount(**counts)


def _share(count: WaveCount) -> str:
    percent = 100.0 if not count.total else 100.0 * count.successful / count.total
    share = f"{count.successful} of {count.total} succeeded ({percent:.4g}%)"
    if count.cancelled:
        share += f", {count.cancelled} cancelled by an operator not counted"
    return share


def _start_next_wave(bulk: BulkOperation, now: datetime) -> None:
    bulk.wave += 1
    bulk.rollout_state = RolloutState.RUNNING
    bulk.rollout_reason = None
    _restart(bulk, max(now, bulk.start_date))


def gate_check(bulk: BulkOperation, now: datetime) -> bool:
    """Decide the gate of a WAITING_FOR_WAVE bulk operation (locked): passed, it starts the next
    wave (or pauses, with then PAUSE); unable to pass any more, it pauses with the reason.
    Returns whether anything changed."""
    if bulk.rollout_state != RolloutState.WAITING_FOR_WAVE or not bulk.waves:
        return False
    spec = bulk.waves[bulk.wave]
    threshold = spec["successThreshold"]
    count = wave_count(bulk, bulk.wave)
    number = bulk.wave + 1
    if count.successful * 100 >= threshold * count.total:
        if spec["then"] == "PAUSE":
            bulk.rollout_state = RolloutState.PAUSED
            bulk.rollout_reason = (
                f"Wave {number} passed: {_share(count)}, successThreshold {threshold}%; "
                "its then is PAUSE: resume to start the next wave"
            )
        else:
            _start_next_wave(bulk, now)
        return True
    unfinished = count.total - count.finished
    if (count.successful + unfinished) * 100 < threshold * count.total:
        bulk.rollout_state = RolloutState.PAUSED
        bulk.rollout_reason = (
            f"Wave {number} fell short: {_share(count)} with {unfinished} unfinished, below "
            f"successThreshold {threshold}%; resume to start the next wave anyway"
        )
        return True
    return False


# --- pause and resume --------------------------------------------------------------------------


def pause(bulk: BulkOperation, *, by: str | None) -> None:
    """Pause a running bulk operation (locked, ACTIVE or IN_PROGRESS); 422 if it is paused."""
    if bulk.rollout_state == RolloutState.PAUSED:
        raise _invalid(f"Bulk operation {bulk.pk} is paused already")
    bulk.rollout_state = RolloutState.PAUSED
    bulk.rollout_reason = f"Paused by {by}" if by else "Paused"
    bulk.next_due_at = None


def resume(bulk: BulkOperation, now: datetime) -> None:
    """Resume a paused bulk operation (locked): its schedule restarts at `next_index` from now (or
    its start date); at the end of a wave the next wave starts. 422 unless paused."""
    if bulk.rollout_state != RolloutState.PAUSED:
        state = (
            "waiting for its wave's gate"
            if bulk.rollout_state == RolloutState.WAITING_FOR_WAVE
            else "running"
        )
        raise _invalid(f"Only a paused bulk operation can be resumed; {bulk.pk} is {state}")
    if _at_wave_end(bulk):
        _start_next_wave(bulk, now)
        return
    bulk.rollout_state = RolloutState.RUNNING
    bulk.rollout_reason = None
    _restart(bulk, max(now, bulk.start_date))


# --- wire format -------------------------------------------------------------------------------


def rollout_state(bulk: BulkOperation) -> str:
    """RUNNING, PAUSED, WAITING_FOR_WAVE, ABORTED (cancelled or aborted) or DONE (all created)."""
    if bulk.abort_reason or bulk.status == BulkStatus.DELETED:
        return "ABORTED"
    if bulk.status == BulkStatus.COMPLETED:
        return "DONE"
    return bulk.rollout_state or RolloutState.RUNNING


def rollout_json(bulk: BulkOperation) -> dict[str, Any]:
    """The extension's keys of a bulk operation's JSON: none for a plain one (never configured,
    paused or aborted), else rolloutConfig / waves as given and the read-only `rollout`."""
    abort_reason = bulk.abort_reason["message"] if bulk.abort_reason else None
    if (
        bulk.rollout_config is None
        and bulk.waves is None
        and bulk.rollout_state is None
        and not abort_reason
    ):
        return {}
    body: dict[str, Any] = {}
    if bulk.rollout_config is not None:
        body["rolloutConfig"] = bulk.rollout_config
    if bulk.waves is not None:
        body["waves"] = bulk.waves
    state = rollout_state(bulk)
    info: dict[str, Any] = {"state": state}
    if bulk.waves:
        info["wave"] = min(bulk.wave, len(bulk.waves) - 1) + 1
    rate = current_rate_per_minute(bulk) if state == RolloutState.RUNNING else 0
    if rate is not None:
        info["currentRatePerMinute"] = _plain(round(rate, 3))
    reason = abort_reason or (
        "Cancelled" if state == "ABORTED" else bulk.rollout_reason if state == "PAUSED" else None
    )
    if reason:
        info["reason"] = reason
    body[READ_ONLY_KEY] = info
    return body
