"""The production layout's REST server (deviceplatform/gunicorn_conf.py) as gunicorn runs it."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from tests.servers import Servers, launch  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def test_gunicorn_opens_no_control_socket(launch: Servers, tmp_path: Path) -> None:  # noqa: F811
    """gunicorn 25+ opens a control socket per user ($XDG_RUNTIME_DIR or ~/.gunicorn): two
    platforms on one machine would share it, a read-only home would break the start. Off."""
    home, runtime = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    runtime.mkdir()
    server = launch.start("gunicorn", HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/health/live")
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert list(runtime.iterdir()) == []
    assert list(home.iterdir()) == []
