"""In-process scheduler: runs `CELERY_BEAT_SCHEDULE` inside the server when there is no Redis broker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.schedules import schedule as celery_interval
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

logger = logging.getLogger(__name__)

# The scheduler `start()` ran in this process (`wake_entry`).
_running: Scheduler | None = None

# Upper bound on one sleep of the loop, so stop() is honoured and clock jumps are noticed quickly.
MAX_SLEEP_SECONDS = 1.0


@dataclass
class Entry:
    """One interval entry of the beat schedule and when it is next due (scheduler clock seconds)."""

    name: str
    task: str
    interval: float
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    due: float | None = None


def interval_seconds(value: Any) -> float | None:
    """Seconds between runs for a number, timedelta or Celery interval `schedule`; None otherwise
    (crontab and solar schedules, which the embedded scheduler does not implement)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if type(value) is celery_interval:  # crontab and solar subclass BaseSchedule, not this class
        return value.run_every.total_seconds()
    return None


def entries_from_schedule(beat_schedule: Mapping[str, Mapping[str, Any]]) -> list[Entry]:
    entries = []
    for name, spec in beat_schedule.items():
        seconds = interval_seconds(spec["schedule"])
        if seconds is None:
            logger.warning(
                "Embedded scheduler ignores %s: only interval schedules are supported, got %r; "
                "set REDIS_URL to run Celery beat",
                name,
                spec["schedule"],
            )
            continue
        if seconds <= 0:
            raise ValueError(f"Beat entry {name!r} has a non-positive interval: {seconds}")
        entries.append(
            Entry(
                name=name,
                task=spec["task"],
                interval=seconds,
                args=tuple(spec.get("args", ())),
                kwargs=dict(spec.get("kwargs", {})),
            )
        )
    return entries


def wake_entry(task: str, at: datetime, *, now: datetime | None = None) -> bool:
    """Run the beat entries of `task` at `at` in this process's embedded scheduler, if it runs
    one and that is before they are due (see `Scheduler.wake`). False if there is none to wake.
    `now` (default: the current time) is the moment the scheduler's clock reads now."""
    scheduler = _running
    if scheduler is None:
        return False
    seconds = (at - (now or timezone.now())).total_seconds()
    return scheduler.wake(task, scheduler.clock() + seconds)


class Scheduler:
    """Runs interval entries of a beat schedule by executing their Celery tasks locally.

    Like Celery beat, an entry is first due one interval after the first tick. A late tick runs a due
    entry once (no catch-up burst) and keeps its cadence: the next due time stays on the grid
    `first due + k * interval`. `wake` (any thread) makes an entry due earlier, e.g. the bulk ramp
    booking its next run for the next due child; the grid then goes on from that run.
    `tick(now)` takes the time as an argument so tests never sleep."""

    def __init__(
        self,
        beat_schedule: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        app: Celery | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if app is None:
            from deviceplatform.celery import app as celery_app

            app = celery_app
        self.app = app
        self.clock = clock
        self.entries = entries_from_schedule(
            settings.CELERY_BEAT_SCHEDULE if beat_schedule is None else beat_schedule
        )
        self._stop = threading.Event()
        self._woken = threading.Event()  # an entry's due time moved earlier (wake)
        self._lock = threading.Lock()  # entries' due times: this thread and wake()'s callers
        self._thread: threading.Thread | None = None
        self._tasks_loaded = False
        # Scheduler clock of the last tick: /health/ready reads it (deviceplatform/health.py).
        self.last_tick: float | None = None

    def _load_tasks(self) -> None:
        """Import every installed app's `tasks` module (the worker does this at start-up) and fail
        loudly on a schedule naming a task that does not exist."""
        if self._tasks_loaded:
            return
        self.app.autodiscover_tasks(force=True)
        unknown = sorted({entry.task for entry in self.entries} - set(self.app.tasks.keys()))
        if unknown:
            raise LookupError(f"Beat schedule names unregistered task(s): {', '.join(unknown)}")
        self._tasks_loaded = True

    def tick(self, now: float) -> list[str]:
        """Run every entry due at `now`; return the names of the entries that ran, in order."""
        self._load_tasks()
        self.last_tick = now
        ran = []
        for entry in self.entries:
            with self._lock:
                if entry.due is None:
                    entry.due = now + entry.interval
                    continue
                if now < entry.due:
                    continue
                missed = int((now - entry.due) // entry.interval)
                entry.due += (missed + 1) * entry.interval
            self._run(entry)
            ran.append(entry.name)
        return ran

    def wake(self, task: str, at: float) -> bool:
        """Run the entries of `task` at `at` (scheduler clock) if that is before they are due;
        they go on every interval from then. False if no entry runs `task`. Any thread."""
        entries = [entry for entry in self.entries if entry.task == task]
        with self._lock:
            for entry in entries:
                if entry.due is None or at < entry.due:
                    entry.due = at
        if entries:
            self._woken.set()
        return bool(entries)

    def _run(self, entry: Entry) -> None:
        try:
            result = self.app.tasks[entry.task].apply(args=entry.args, kwargs=entry.kwargs)
        except Exception:
            # One failing entry must not stop the others or kill the scheduler thread.
            logger.exception("Embedded scheduler: %s (%s) raised", entry.name, entry.task)
            return
        if result.failed():
            logger.error(
                "Embedded scheduler: %s (%s) failed: %r", entry.name, entry.task, result.result
            )

    def seconds_until_next_due(self, now: float) -> float:
        with self._lock:
            pending = [entry.due for entry in self.entries if entry.due is not None]
        if not pending:
            return MAX_SLEEP_SECONDS
        return max(0.0, min(pending) - now)

    def start(self) -> threading.Thread | None:
        """Run the loop on a daemon thread and return it (None for an empty schedule). Call once
        per process: the serve command does, AppConfig.ready would also run in every command."""
        if self._thread is not None:
            raise RuntimeError("Scheduler already started")
        self._load_tasks()
        if not self.entries:
            logger.info("Embedded scheduler: the beat schedule is empty, nothing to run")
            return None
        self._thread = threading.Thread(target=self._loop, name="embedded-scheduler", daemon=True)
        self._thread.start()
        global _running
        _running = self
        logger.info(
            "Embedded scheduler started: %s",
            ", ".join(f"{entry.name} every {entry.interval:g}s" for entry in self.entries),
        )
        return self._thread

    def stop(self, timeout: float | None = 10.0) -> None:
        global _running
        if _running is self:
            _running = None
        self._stop.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before the tick: a wake() during the tick or after it cuts the next wait.
            self._woken.clear()
            # Tasks run on this thread with its own database connection: drop it when it is too old
            # or broken, as the Celery worker does around each task.
            close_old_connections()
            now = self.clock()
            try:
                self.tick(now)
            except Exception:
                logger.exception("Embedded scheduler tick failed")
            finally:
                close_old_connections()
            self._woken.wait(min(MAX_SLEEP_SECONDS, self.seconds_until_next_due(self.clock())))
