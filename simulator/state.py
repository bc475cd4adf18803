"""The state file: each agent's device credentials and managed-object IDs, per platform URL, so a
restarted simulator logs in as the same devices instead of onboarding and creating them again.

It holds passwords: written with mode 0600, atomically (a temporary file renamed over the old)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

VERSION = 1


class StateError(Exception):
    pass


class State:
    """`agent(serial)` is the stored record of one agent on this platform (a dict, changed in
    place); `save()` writes the file when something changed."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url
        self.data: dict[str, Any] = {"version": VERSION, "platforms": {}}
        self.dirty = False

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise StateError(
                f"the state file {self.path} is not one this simulator wrote (remove it to start "
                "afresh)"
            )
        data.setdefault("platforms", {})
        self.data = data

    def agents(self) -> dict[str, dict[str, Any]]:
        return self.data["platforms"].setdefault(self.url, {}).setdefault("agents", {})

    def agent(self, serial: str) -> dict[str, Any]:
        return self.agents().setdefault(serial, {})

    def changed(self) -> None:
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.data, handle, indent=1, sort_keys=True)
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            self.dirty = True
            raise


async def save_periodically(state: State, interval: float = 1.0) -> None:
    """Writes the state file at most once per `interval` while agents change it."""
    while True:
        await asyncio.sleep(interval)
        state.save()
