"""One due-time function in integer microseconds (issue 10, item 3): the due time the ramp stores
(`next_due_at`) and the due count it advances to come from the same integer schedule, so an
advance at a fixed `now` always ends with exactly the due children, whatever the ramp."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bulkops import services
from bulkops.models import BulkStatus
from tests.bulkops.conftest import T0, child_device_ids, children, create_bulk, make_fleet, reload

pytestmark = pytest.mark.django_db

MICROSECOND = timedelta(microseconds=1)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Turn a run that never ends (the bug this file is about) into a failure."""

    def expired(signum: int, frame: Any) -> None:
        raise AssertionError(f"bulk_operations_advance did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def due_count(ramp: float, elapsed: timedelta, size: int) -> int:
    """How many of `size` targets are due `elapsed` after the start: target k at k ramps, the
    ramp in whole microseconds."""
    step = round(ramp * 1_000_000)
    if step == 0:
        return size
    return min(size, elapsed // MICROSECOND // step + 1)


@pytest.mark.parametrize(
    ("ramp", "moments"),
    [
        # 1/3 s: due times 333333 µs apart; at exactly each due time, one microsecond before it,
        # and in between.
        (1 / 3, [k * 333_333 + d for k in range(7) for d in (-1, 0, 1, 100_000)]),
        (0.001, [0, 999, 1000, 1001, 2_500, 6_000, 6_999, 7_000]),
        (0, [0, 1, 10**6]),
        (10**7, [0, 10**13 - 1, 10**13, 2 * 10**13, 10**15]),
    ],
    ids=["one-third", "millisecond", "zero", "ten-million-seconds"],
)
def test_an_advance_at_a_fixed_now_ends_with_exactly_the_due_children(
    ramp: float, moments: list[int]
) -> None:
    size = 8
    fleet = make_fleet(size)
    bulk = create_bulk(fleet.group, creationRamp=ramp)
    for micros in sorted(m for m in moments if m >= 0):
        now = T0 + micros * MICROSECOND
        with deadline(20):
            services.bulk_operations_advance(now=now)
            services.bulk_operations_advance(now=now)  # again at the same instant: nothing
        due = due_count(ramp, now - T0, size)
        assert child_device_ids(bulk) == fleet.device_ids[:due], (ramp, micros)
        row = reload(bulk)
        assert row.next_index == due
        if due < size:
            # The stored due time is exactly that of the next target, and it is after `now`.
            assert row.next_due_at == T0 + due * round(ramp * 1_000_000) * MICROSECOND
            assert row.next_due_at > now
        else:
            assert (row.status, row.next_due_at) == (BulkStatus.COMPLETED, None)
    # Each child was created by the run at (or after) its due time, never before it.
    step = round(ramp * 1_000_000) * MICROSECOND
    for k, operation in enumerate(children(bulk)):
        assert operation.creation_time >= T0 + k * step


def test_a_schedule_beyond_year_9999_never_makes_those_targets_due() -> None:
    """creationRamp 10^7 s from a start late in 9999: the third target would be due in year
    10000. It is never due (the run ends, the first two are created), instead of the date-time
    arithmetic failing on every run."""
    fleet = make_fleet(3)
    start = datetime(9999, 6, 1, tzinfo=UTC)
    bulk = create_bulk(fleet.group, startDate="9999-06-01T00:00:00Z", creationRamp=10**7)
    last = datetime(9999, 12, 20, tzinfo=UTC)  # (a child's 7-day pending deadline still fits)
    with deadline(20):
        assert services.bulk_operations_advance(now=start) == 1
        assert services.bulk_operations_advance(now=last) == 1
        assert services.bulk_operations_advance(now=last) == 0
    assert child_device_ids(bulk) == fleet.device_ids[:2]
    row = reload(bulk)
    assert (row.status, row.next_index, row.ramp_error_count) == (BulkStatus.IN_PROGRESS, 2, 0)
    assert row.next_due_at == services.NEVER
