"""The embedded scheduler runs beat entries exactly when due, with time passed in (no sleeping)."""

from __future__ import annotations

import itertools
import logging
import threading
from datetime import timedelta
from typing import Any

import pytest
from celery.schedules import crontab, schedule

from deviceplatform.celery import app
from deviceplatform.scheduler import Scheduler

calls: list[tuple[str, Any]] = []


@app.task(name="tests.deviceplatform.record")
def record(label: str = "", value: Any = None) -> None:
    calls.append((label, value))


@app.task(name="tests.deviceplatform.explode")
def explode() -> None:
    raise RuntimeError("boom")


ran_in_thread = threading.Event()


@app.task(name="tests.deviceplatform.mark_thread")
def mark_thread() -> None:
    if threading.current_thread().name == "embedded-scheduler":
        ran_in_thread.set()


@pytest.fixture(autouse=True)
def clear_calls() -> None:
    calls.clear()


def entry(interval: Any, label: str, **extra: Any) -> dict[str, Any]:
    return {"task": record.name, "schedule": interval, "kwargs": {"label": label}, **extra}


def test_entry_runs_one_interval_after_first_tick_and_not_before() -> None:
    scheduler = Scheduler({"every-10s": entry(10.0, "a")})

    assert scheduler.tick(100.0) == []
    assert scheduler.tick(109.999) == []
    assert calls == []
    assert scheduler.tick(110.0) == ["every-10s"]
    assert calls == [("a", None)]


def test_several_ticks_run_each_entry_at_its_own_interval() -> None:
    scheduler = Scheduler(
        {
            "fast": entry(2, "fast"),
            "slow": entry(timedelta(seconds=5), "slow"),
            "half": entry(schedule(timedelta(milliseconds=500)), "half"),
        }
    )

    ran = {now: scheduler.tick(float(now)) for now in range(11)}

    assert ran[0] == []
    assert ran[1] == ["half"]
    assert ran[2] == ["fast", "half"]
    assert ran[5] == ["slow", "half"]
    assert ran[10] == ["fast", "slow", "half"]
    assert [label for label, _ in calls].count("fast") == 5  # at 2, 4, 6, 8, 10
    assert [label for label, _ in calls].count("slow") == 2  # at 5, 10
    assert [label for label, _ in calls].count("half") == 10  # once per tick, no catch-up


def test_late_tick_runs_once_and_keeps_the_cadence() -> None:
    scheduler = Scheduler({"every-10s": entry(timedelta(seconds=10), "a")})
    scheduler.tick(0.0)

    assert scheduler.tick(35.0) == ["every-10s"]  # 10, 20 and 30 were missed: one run, not three
    assert scheduler.tick(39.9) == []
    assert scheduler.tick(40.0) == ["every-10s"]
    assert len(calls) == 2


def test_args_and_kwargs_reach_the_task() -> None:
    scheduler = Scheduler(
        {"with-args": {"task": record.name, "schedule": 1, "args": ("x",), "kwargs": {"value": 7}}}
    )
    scheduler.tick(0.0)
    scheduler.tick(1.0)

    assert calls == [("x", 7)]


def test_failing_task_is_logged_and_other_entries_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = Scheduler(
        {"explode": {"task": explode.name, "schedule": 1.0}, "record": entry(1.0, "after")}
    )
    scheduler.tick(0.0)

    with caplog.at_level(logging.ERROR, logger="deviceplatform.scheduler"):
        assert scheduler.tick(1.0) == ["explode", "record"]

    assert calls == [("after", None)]
    assert any("explode" in message and "boom" in message for message in caplog.messages)


def test_crontab_entries_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deviceplatform.scheduler"):
        scheduler = Scheduler(
            {"nightly": entry(crontab(hour=3, minute=0), "cron"), "tick": entry(1, "tick")}
        )

    assert [e.name for e in scheduler.entries] == ["tick"]
    assert any("nightly" in message for message in caplog.messages)
    scheduler.tick(0.0)
    scheduler.tick(86_400.0)
    assert calls == [("tick", None)]


def test_unknown_task_fails_loudly() -> None:
    scheduler = Scheduler({"typo": {"task": "tests.deviceplatform.no_such_task", "schedule": 1}})

    with pytest.raises(LookupError, match="no_such_task"):
        scheduler.tick(0.0)


def test_non_positive_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-positive"):
        Scheduler({"zero": entry(0, "zero")})


def test_default_schedule_comes_from_settings(settings: Any) -> None:
    settings.CELERY_BEAT_SCHEDULE = {"from-settings": entry(3, "s")}
    scheduler = Scheduler()

    assert [(e.name, e.task, e.interval) for e in scheduler.entries] == [
        ("from-settings", record.name, 3.0)
    ]


def test_start_runs_due_entries_on_a_daemon_thread_until_stopped() -> None:
    # Each clock reading is 100 s later, so the loop finds the entry due without really waiting.
    readings = itertools.count(start=0.0, step=100.0)
    scheduler = Scheduler(
        {"mark": {"task": mark_thread.name, "schedule": 60}}, clock=lambda: next(readings)
    )
    ran_in_thread.clear()

    thread = scheduler.start()
    try:
        assert thread is not None
        assert thread.daemon
        assert ran_in_thread.wait(timeout=10)  # a bound for a stuck thread, not a timing check
    finally:
        scheduler.stop()
    assert not thread.is_alive()


def test_start_with_an_empty_schedule_starts_no_thread() -> None:
    assert Scheduler({}).start() is None
