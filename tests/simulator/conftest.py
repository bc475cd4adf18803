"""The fleet simulator end to end: the real `python -m simulator` process against a real server
process (uvicorn through `manage.py serve`, the embedded layout: no REDIS_URL, so the bulk ramp and
the sweeps run on the server's own scheduler thread and realtime sessions live in its memory).
The test talks to the same server over REST as the admin, the way an operator would.

Tests using these fixtures need `@pytest.mark.django_db(transaction=True)`: the server only sees
committed rows (the admin and the bootstrap login are made here, in the test database)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from deviceplatform.services import bootstrap_user_ensure
from tests.helpers import PASSWORD, database_url
from tests.servers import BOOT, REPO, Process, free_port

ADMIN = "simadmin"
ADMIN_LOGIN = f"t100/{ADMIN}"
BOOTSTRAP_PASSWORD = "bootstrap-pw-for-the-simulator-tests"
WAIT = 60.0  # bounds a hang; never an assertion about speed
GROUP = "Simulated fleet"


def eventually(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Platform:
    """One server on a port of its own; `restart()` brings it back on the same port."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = free_port()
        self.server: Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        environment.update(
            DJANGO_SETTINGS_MODULE="deviceplatform.settings",
            DATABASE_URL=database_url(),
            DATABASE_POOL_MIN_SIZE="1",
            REDIS_URL="",  # the embedded layout: scheduler thread, in-process realtime
            AUTH_ROLES_CACHE_SECONDS="0",
            BULK_RAMP_INTERVAL="0.2",
            LOG_LEVEL="WARNING",
        )
        self.starts += 1
        log_path = self.log_dir / f"server-{self.port}-{self.starts}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", BOOT["uvicorn"], str(self.port)],
                cwd=REPO,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.server = Process("uvicorn", self.port, process, log_path)
        self.server.wait_ready()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


class Admin:
    """The operator's REST calls, with real Basic credentials."""

    def __init__(self, url: str, server_log: Callable[[], str] | None = None) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.auth = (ADMIN_LOGIN, PASSWORD)
        self.server_log = server_log  # shown when an answer is not the expected one
        self.http.headers["Accept"] = "application/json"

    def call(
        self, method: str, path: str, expect: int = 200, body: Any = None, **params: Any
    ) -> Any:
        response = self.http.request(
            method, self.url + path, json=body, params=params or None, timeout=30
        )
        if response.status_code != expect:
            log = self.server_log()[-6000:] if self.server_log else ""
            raise AssertionError(
                f"{method} {path}: {response.status_code} (expected {expect}): {response.text}"
                f"\n--- end of the server's log ---\n{log}"
            )
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, **params)

    def operation(self, body: dict[str, Any]) -> str:
        return self.call("POST", "/devicecontrol/operations", 201, body)["id"]

    def finished(self, operation_id: str) -> dict[str, Any]:
        """The operation once it is SUCCESSFUL or FAILED."""

        def done() -> dict[str, Any] | None:
            body = self.get(f"/devicecontrol/operations/{operation_id}")
            return body if body["status"] in ("SUCCESSFUL", "FAILED") else None

        return eventually(f"operation {operation_id} to finish", done)

    def device(self, device_id: str) -> dict[str, Any]:
        return self.get(f"/inventory/managedObjects/{device_id}", withChildren="false")

    def by_serial(self, serial: str) -> str:
        return self.get(f"/identity/externalIds/c8y_Serial/{serial}")["managedObject"]["id"]


class Simulation:
    """`python -m simulator` as a user runs it, its output in a file."""

    def __init__(self, platform: Platform, directory: Path) -> None:
        self.platform = platform
        self.directory = directory
        self.state = directory / "state.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = directory / "simulator-0.log"

    def command(self, *args: str, **options: Any) -> list[str]:
        defaults = {
            "url": self.platform.url,
            "user": ADMIN_LOGIN,
            "password": PASSWORD,
            "bootstrap_password": BOOTSTRAP_PASSWORD,
            "state": str(self.state),
            "delay": "0.1",
            "failure_rate": "0",
        }
        defaults.update({key: str(value) for key, value in options.items()})
        argv = [sys.executable, "-m", "simulator", *args]
        for key, value in defaults.items():
            argv += [f"--{key.replace('_', '-')}", value]
        return argv

    def start(self, *args: str, **options: Any) -> Simulation:
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        self.log_path = self.directory / f"simulator-{self.runs}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(*args, **options),
                cwd=REPO,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of `pattern` in the output; the process must still be running."""

        def seen() -> re.Match[str] | None:
            assert self.process is not None
            found = re.search(pattern, self.output())
            if found is None:
                assert self.process.poll() is None, self.output()
            return found

        return eventually(f"{pattern!r} in the simulator's output", seen)

    def wait_connected(self, agents: int) -> None:
        self.wait_for(rf"agents {agents}/{agents} onboarded, {agents} connected")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Ctrl-C (by default); the exit status."""
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=WAIT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stored(self) -> dict[str, Any]:
        """The agents' records in the state file, for this platform."""
        data = json.loads(self.state.read_text())
        return data["platforms"][self.platform.url]["agents"]

    def run(self, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
        """Run to the end (start-up errors), with a bound."""
        return subprocess.run(
            self.command(*args, **options),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )


@pytest.fixture
def platform(
    tmp_path: Path, make_user: Callable[..., Any], transactional_db: None
) -> Iterator[Platform]:
    """A running server, its admin (`admins` group) and the bootstrap login."""
    make_user(ADMIN, groups=["admins"])
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)
    server = Platform(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def operator(platform: Platform) -> Admin:
    return Admin(platform.url, server_log=lambda: platform.server.log() if platform.server else "")


@pytest.fixture
def simulation(platform: Platform, tmp_path: Path) -> Iterator[Simulation]:
    simulation = Simulation(platform, tmp_path)
    try:
        yield simulation
    finally:
        simulation.kill()
