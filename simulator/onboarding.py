"""Cumulocity's device bootstrap flow, both sides of it: the operator registers the serial and accepts
it (as the admin), the device asks for its credentials with the shared bootstrap login until it
receives them."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from simulator.api import Api, ApiError, Login

REQUESTS = "/devicecontrol/newDeviceRequests"
# Seconds between two credential requests of one device, as c8y-api's await_credentials polls
# (the platform limits polls per device id).
POLL_INTERVAL = 1.0
ONBOARDING_TIMEOUT = 120.0


class Fatal(Exception):
    """Nothing any agent can do will work (a refused login, a platform without the API): stop."""


def refused(response: Any, who: str, hint: str) -> Fatal:
    return Fatal(f"{response.describe()}: the platform refused the {who} ({hint})")


async def obtain_credentials(
    api: Api, admin: Login, bootstrap: Login, serial: str
) -> dict[str, str]:
    """Register `serial`, let the device poll once (the request becomes PENDING_ACCEPTANCE), accept
    it, and poll until the credentials come: `{"tenantId", "username", "password"}`."""
    await register(api, admin, serial)
    deadline = asyncio.get_running_loop().time() + ONBOARDING_TIMEOUT
    accepted = False
    while True:
        answer = await api.call(
            "POST", "/devicecontrol/deviceCredentials", bootstrap, {"id": serial}
        )
        if answer.status == 201 and isinstance(answer.body, dict):
            missing = {"tenantId", "username", "password"} - set(answer.body)
            if missing:
                raise Fatal(f"{answer.describe()} without {', '.join(sorted(missing))}")
            return {key: str(answer.body[key]) for key in ("tenantId", "username", "password")}
        if answer.status in (401, 403):
            raise refused(
                answer,
                f"bootstrap login {bootstrap.login}",
                "check --bootstrap-password; by default DEVICE_BOOTSTRAP_PASSWORD or "
                ".bootstrap-password, which bin/run writes",
            )
        if answer.status != 404:
            raise ApiError(answer)
        if not accepted:
            # The device has asked once, so the request now waits for acceptance.
            acceptance = await api.call("PUT", request_path(serial), admin, {"status": "ACCEPTED"})
            check_admin(acceptance)
            if acceptance.status != 200:
                raise ApiError(acceptance)
            accepted = True
            continue
        if asyncio.get_running_loop().time() > deadline:
            raise ApiError(answer)
        await asyncio.sleep(POLL_INTERVAL)


def request_path(serial: str) -> str:
    return f"/devicecontrol/newDeviceRequests/{quote(serial, safe='')}"


async def register(api: Api, admin: Login, serial: str) -> None:
    """A new device request for `serial` in WAITING_FOR_CONNECTION or PENDING_ACCEPTANCE. One left
    ACCEPTED by an earlier run (its credentials issued once, and lost with the state file) is
    deleted and made again, so the device can receive new credentials."""
    registered = await api.call("POST", REQUESTS, admin, {"id": serial})
    check_admin(registered)
    if registered.status == 201:
        return
    if registered.status not in (409, 422):
        raise ApiError(registered)
    existing = await api.call("GET", request_path(serial), admin)
    if existing.status != 200:
        raise ApiError(registered)  # the 422 was about the id itself
    if existing.body.get("status") != "ACCEPTED":
        return
    await api.expect("DELETE", request_path(serial), admin, ok=(204, 404))
    await api.expect("POST", REQUESTS, admin, {"id": serial}, ok=(201,))


def check_admin(response: Any) -> None:
    if response.status in (401, 403):
        raise refused(
            response,
            "admin login",
            "it needs ROLE_DEVICE_CONTROL_ADMIN; check --user and --password",
        )
    # A path the platform does not serve at all (an older version) is `general/Not Found`.
    if response.status == 404 and (
        isinstance(response.body, dict) and response.body.get("error") == "general/Not Found"
    ):
        raise Fatal(f"{response.describe()}: this platform offers no device registration")
