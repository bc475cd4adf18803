"""What the simulator counts, the progress line it prints once a second (stderr; rewritten in place
on a terminal, one line each time otherwise) and the summary at exit."""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

RATE_WINDOW = 10.0  # seconds of finished operations the ops/s figure covers


@dataclass
class Stats:
    agents: int = 0
    onboarded: int = 0
    connected: int = 0
    received: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    finished_at: collections.deque[float] = field(default_factory=collections.deque)

    def finished(self, *, successful: bool) -> None:
        if successful:
            self.done += 1
        else:
            self.failed += 1
        self.finished_at.append(time.monotonic())

    def rate(self) -> float:
        """Operations finished per second over the last RATE_WINDOW seconds (or since start)."""
        now = time.monotonic()
        while self.finished_at and self.finished_at[0] < now - RATE_WINDOW:
            self.finished_at.popleft()
        span = min(RATE_WINDOW, max(now - self.started, 1e-3))
        return len(self.finished_at) / span

    def line(self) -> str:
        return (
            f"agents {self.onboarded}/{self.agents} onboarded, {self.connected} connected"
            f" | operations {self.received} received, {self.done} done, {self.failed} failed"
            f", {self.skipped} skipped | {self.rate():.1f} ops/s | errors {self.errors}"
        )

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        finished = self.done + self.failed
        average = finished / elapsed if elapsed > 0 else 0.0
        return (
            f"simulator ran {elapsed:.1f} s: {self.onboarded} of {self.agents} agents onboarded;"
            f" operations {self.received} received, {self.done} SUCCESSFUL, {self.failed} FAILED,"
            f" {self.skipped} skipped (already taken); {average:.1f} ops/s on average;"
            f" {self.errors} errors"
        )


class Console:
    """Writes the progress line and messages to one stream without mixing them up."""

    def __init__(self, stream: TextIO = sys.stderr, *, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self._line_shown = False

    def _clear(self) -> None:
        if self._line_shown:
            self.stream.write("\r\033[K")
            self._line_shown = False

    def message(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, line: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._line_shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        self._clear()
        self.stream.flush()


async def report_progress(stats: Stats, console: Console, interval: float = 1.0) -> None:
    """Prints the progress line every `interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        console.progress(stats.line())
