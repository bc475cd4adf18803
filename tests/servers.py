"""The servers we ship, started as real processes for tests that need real HTTP (bytes Django's test
client cannot send, a body that stops arriving, a Redis that goes away): uvicorn through
`manage.py serve` and gunicorn with the production WSGI application and its configuration. Each
gets this run's test database (PostgreSQL or SQLite), the environment of the test run plus what the
test passes, and the MD5 hasher the user fixtures store passwords with. Tests that use them need
`@pytest.mark.django_db(transaction=True)`: the servers only see committed rows.

Also a private `redis-server` on a free port, for tests that stop Redis: never the shared one."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import database_url

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 30.0  # bounds a broken start, asserts nothing about speed
# As in tests/conftest.py: MD5 for speed, and the device hasher that generated passwords use.
HASHERS = '["django.contrib.auth.hashers.MD5PasswordHasher", "deviceplatform.hashers.DevicePasswordHasher"]'

BOOT = {
    "uvicorn": f"""
import sys
from django.conf import settings
settings.PASSWORD_HASHERS = {HASHERS}
from django.core.management import execute_from_command_line
execute_from_command_line(["manage.py", "serve", "--host", "127.0.0.1", "--port", sys.argv[1]])
""",
    "gunicorn": f"""
import sys
from django.conf import settings
settings.PASSWORD_HASHERS = {HASHERS}
from gunicorn.app.wsgiapp import run
sys.argv = [
    "gunicorn", "deviceplatform.wsgi:application", "-c", "python:deviceplatform.gunicorn_conf",
    "--bind", "127.0.0.1:" + sys.argv[1], "--workers", "1",
]
run()
""",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    """One server process; `url` is its root."""

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def answers(self) -> bool:
        """Any HTTP answer means the application is up."""
        probe = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            probe.request("GET", "/tenant/loginOptions")
            probe.getresponse().read()
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def wait_ready(self) -> None:
        while not self.answers():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() - self.started < BOOT_TIMEOUT, self.log()
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Servers:
    """`start("uvicorn" | "gunicorn", **env)`; every process started is stopped after the test."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []

    def start(self, kind: str, **env: str) -> Process:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        environment.update(
            DJANGO_SETTINGS_MODULE="deviceplatform.settings",
            DATABASE_URL=database_url(),
            DATABASE_POOL_MIN_SIZE="1",
            AUTH_ROLES_CACHE_SECONDS="0",
            LOG_LEVEL="WARNING",
        )
        environment.update(env)
        port = free_port()
        log_path = self.log_dir / f"{kind}-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", BOOT[kind], str(port)],
                cwd=REPO,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = Process(kind, port, process, log_path)
        self.started.append(server)
        server.wait_ready()
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Servers]:
    """`launch.start("uvicorn", REDIS_URL=...)`: a server process for this test."""
    started = Servers(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@dataclass
class PrivateRedis:
    """A redis-server of the test's own, without persistence: stopping it loses everything."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for the Redis outage tests"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(free_port(), tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()
