"""Revoke, restore and rotate reach every server process at their next request (issue 11 item 3):
a uvicorn and a gunicorn process that both verified the device's password before (each holds it
in its verified-password cache) refuse it as soon as the change commits in this process, with no
restart and no wait, because each reads the user row on every request and the cache is keyed by
the stored password hash."""

from __future__ import annotations

import http.client
from typing import Any

import pytest

from deviceplatform.models import User
from deviceplatform.services import device_user_provision, device_user_rotate, user_set_active
from tests.helpers import basic
from tests.servers import Process, Servers, launch  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def status(server: Process, login: str, password: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(
            "GET", "/user/currentUser", headers={"Authorization": basic(login, password)}
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_revoke_restore_and_rotate_apply_at_the_next_request_of_every_process(
    launch: Servers,  # noqa: F811
) -> None:
    user, password, _ = device_user_provision("xproc-1")
    login = "t100/device_xproc-1"
    # The roles cache is on (its default); only credentials must apply at once.
    servers = [
        launch.start("uvicorn", AUTH_ROLES_CACHE_SECONDS="5"),
        launch.start("gunicorn", AUTH_ROLES_CACHE_SECONDS="5"),
    ]

    def everywhere(secret: str) -> list[int]:
        return [status(server, login, secret) for server in servers]

    assert everywhere(password) == [200, 200]  # each process has now verified it

    user_set_active(user.pk, active=False)
    assert everywhere(password) == [401, 401]

    user_set_active(user.pk, active=True)
    assert everywhere(password) == [200, 200]

    _, new_password = device_user_rotate(user.pk)
    assert everywhere(password) == [401, 401]
    assert everywhere(new_password) == [200, 200]

    stored: Any = User.objects.get(pk=user.pk)
    assert stored.last_request_at is not None  # written by the servers, at most once a minute
