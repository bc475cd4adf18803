"""The embedded default works end to end: SQLite, no Redis, `migrate`, `ensureadmin`, `serve`."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "embedded-admin-pw"
STARTUP_TIMEOUT = 60.0  # a bound for a broken server, not a timing assertion


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh machine: no PostgreSQL, no Redis; SQLite in a temp file."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL"} and not key.startswith("PYTEST_")
    }
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        ADMIN_USERNAME="admin",
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        LOG_LEVEL="INFO",
    )
    return env


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(
    port: int, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    credentials = base64.b64encode(f"t100/admin:{ADMIN_PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        content = response.read()
    finally:
        connection.close()
    if response.status >= 400:
        return response.status, {"body": content[:500].decode(errors="replace")}
    return response.status, json.loads(content or b"{}")


@pytest.fixture
def served(embedded_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """`manage.py serve` on a free port, after migrate and ensureadmin; yields the port and the
    server's log file."""
    manage(embedded_env, "migrate", "--noinput")
    output = manage(embedded_env, "ensureadmin")
    assert f"Admin user: admin / password: {ADMIN_PASSWORD}" in output

    port = free_port()
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=embedded_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        yield port, log_path
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_embedded_server_serves_rest_with_the_ensured_admin(served: tuple[int, Path]) -> None:
    port, log_path = served
    # Without REDIS_URL the server process runs the beat schedule itself.
    assert "Embedded scheduler" in log_path.read_text()

    status, platform = request(port, "GET", "/platform")
    assert status == 200, platform

    first_status, first = request(port, "POST", "/inventory/managedObjects", {"name": "one"})
    second_status, second = request(port, "POST", "/inventory/managedObjects", {"name": "two"})

    assert (first_status, second_status) == (201, 201), (first, second)
    assert int(second["id"]) > int(first["id"])
