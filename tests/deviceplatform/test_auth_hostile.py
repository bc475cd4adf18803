"""Hostile credentials and paths, unauthenticated (issue 10, fault campaign item 3): a NUL in Basic
credentials or in a Bayeux handshake token, bytes outside ASCII in the Basic header, and `%00` in a
path segment are refused with 401 (Bayeux: a denied handshake) or 404, in the Cumulocity error
shape, on every endpoint, in process and through real HTTP under both servers we ship (uvicorn
through `manage.py serve`, gunicorn with the production WSGI application). PostgreSQL refuses a
NUL in a query: before the fix these were 500s there."""

from __future__ import annotations

import base64
import json
import re
import socket
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from django.urls import Resolver404, URLPattern, URLResolver, get_resolver, resolve

from tests.helpers import PASSWORD, assert_error, basic
from tests.realtime.bayeux import LpBayeux, WsBayeux, handshake_message
from tests.servers import Servers, launch  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# Authorization values as a server hands them to Django: header bytes decoded as latin-1.
HOSTILE_HEADERS = {
    "nul in the login": "Basic " + b64(b"t100/adm\x00in:x"),
    "nul in the tenant": "Basic " + b64(b"t1\x0000/admin:x"),
    "nul in the password": "Basic " + b64(b"t100/admin:" + PASSWORD.encode() + b"\x00"),
    "utf-8 bytes outside ascii": "Basic ééé".encode().decode("latin-1"),
    "latin-1 bytes outside ascii": "Basic \xe9\xe9\xe9",
    "base64 of bytes that are not utf-8": "Basic " + b64(b"t100/\xe9\xff:x"),
}
# Handshake tokens (`ext."com.cumulocity.authn".token`).
HOSTILE_TOKENS = {
    "nul in the login": b64(b"t100/adm\x00in:x"),
    "nul in the password": b64(b"t100/admin:" + PASSWORD.encode() + b"\x00"),
    "not base64": "ééé",
    "not utf-8": b64(b"t100/\xe9\xff:x"),
}

# One request per route of the API (`test_the_endpoint_list_covers_every_route` keeps it whole).
ENDPOINTS: list[tuple[str, str]] = [
    ("GET", "/platform"),
    ("GET", "/tenant/currentTenant"),
    ("GET", "/user/currentUser"),
    ("PUT", "/user/currentUser/password"),
    ("POST", "/notification/realtime"),
    ("POST", "/cep/realtime"),
    ("POST", "/notification/operations"),
    ("POST", "/devicecontrol/notifications/handshake"),
    ("GET", "/inventory"),
    ("GET", "/inventory/managedObjects"),
    ("GET", "/inventory/managedObjects/count"),
    ("GET", "/inventory/managedObjects/1"),
    ("GET", "/identity"),
    ("GET", "/identity/globalIds/1/externalIds"),
    ("GET", "/identity/externalIds/c8y_Serial/x"),
    ("GET", "/devicecontrol"),
    ("GET", "/devicecontrol/operations"),
    ("POST", "/devicecontrol/operations/wait"),
    ("GET", "/devicecontrol/operations/1"),
    ("POST", "/devicecontrol/operations/1/retry"),
    ("POST", "/devicecontrol/operations/1/cancel"),
    ("GET", "/devicecontrol/bulkoperations"),
    ("GET", "/devicecontrol/bulkoperations/1"),
    ("POST", "/devicecontrol/bulkoperations/1/pause"),
    ("POST", "/devicecontrol/bulkoperations/1/resume"),
    ("GET", "/devicecontrol/newDeviceRequests"),
    ("GET", "/devicecontrol/newDeviceRequests/x"),
    ("POST", "/devicecontrol/deviceCredentials"),
    ("POST", "/devicecontrol/bulkNewDeviceRequests"),
    *(
        ("GET", f"/inventory/managedObjects/1/{segment}")
        for segment in (
            "childDevices",
            "childAssets",
            "childAdditions",
            "deviceParents",
            "assetParents",
            "additionParents",
        )
    ),
    *(
        ("DELETE", f"/inventory/managedObjects/1/{segment}/2")
        for segment in ("childDevices", "childAssets", "childAdditions")
    ),
]
# No authentication at all (the health and metrics paths: issue 15).
PUBLIC = [
    ("GET", "/tenant/loginOptions"),
    ("GET", "/health/live"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/openapi.yaml"),
    ("GET", "/docs/"),
]
# The same, answering 200 or 503 by what it checks (no Celery worker runs here).
PUBLIC_CHECKS = [("GET", "/health/ready")]


def _routes(patterns: list[Any], prefix: str = "") -> list[str]:
    found = []
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            found += _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            found.append(prefix + str(pattern.pattern))
    return found


def test_the_endpoint_list_covers_every_route() -> None:
    routes = {r for r in _routes(get_resolver().url_patterns) if not r.startswith("admin/")}
    routes.discard("^static/(?P<path>.*)$")
    covered = set()
    for _, path in ENDPOINTS + PUBLIC + PUBLIC_CHECKS:
        match = resolve(path)
        covered.add(match.route)
    assert routes - covered == set()


def request(client: Client, method: str, path: str, **extra: Any) -> Any:
    return client.generic(method, path, data=b"[]", content_type="application/json", **extra)


@pytest.mark.parametrize("header", list(HOSTILE_HEADERS.values()), ids=list(HOSTILE_HEADERS))
def test_hostile_basic_credentials_are_401_on_every_endpoint(admin: Any, header: str) -> None:
    client = Client()
    for method, path in ENDPOINTS:
        response = request(client, method, path, HTTP_AUTHORIZATION=header)
        body = assert_error(response, 401, "security/Unauthorized")
        assert body["message"] == "Invalid credentials! : Bad credentials", path
        assert response["WWW-Authenticate"] == 'Basic realm="Cumulocity"', path
    for method, path in PUBLIC:
        assert request(client, method, path, HTTP_AUTHORIZATION=header).status_code == 200
    for method, path in PUBLIC_CHECKS:
        response = request(client, method, path, HTTP_AUTHORIZATION=header)
        assert response.status_code in (200, 503), path
        assert "checks" in response.json(), path


NUL_PATHS = [
    ("GET", "/inventory/managedObjects/%00"),
    ("PUT", "/inventory/managedObjects/%00"),
    ("DELETE", "/inventory/managedObjects/%00"),
    ("GET", "/inventory/managedObjects/%00/childDevices"),
    ("POST", "/inventory/managedObjects/1/childDevices/%00"),
    ("GET", "/identity/globalIds/%00/externalIds"),
    ("GET", "/identity/externalIds/c8y_Serial/%00"),
    ("DELETE", "/identity/externalIds/c8y_Serial/%00"),
    ("GET", "/identity/externalIds/%00/x"),
    ("GET", "/identity/externalIds/c8y_Serial/a%00b/c"),
    ("GET", "/devicecontrol/operations/%00"),
    ("PUT", "/devicecontrol/operations/%00"),
    ("POST", "/devicecontrol/operations/%00/retry"),
    ("POST", "/devicecontrol/operations/%00/cancel"),
    ("GET", "/devicecontrol/bulkoperations/%00"),
    ("DELETE", "/devicecontrol/bulkoperations/%00"),
    ("GET", "/inventory/managedObjects%00"),
]


@pytest.mark.parametrize("authenticated", [True, False], ids=["admin", "anonymous"])
def test_a_nul_in_a_path_segment_names_no_resource(
    admin: Any, authenticated: bool, row_counts: Callable[[], dict[str, int]]
) -> None:
    client = Client()
    extra = {"HTTP_AUTHORIZATION": basic("t100/admin")} if authenticated else {}
    before = row_counts()
    for method, path in NUL_PATHS:
        assert_error(request(client, method, path, **extra), 404, "general/Not Found")
    assert row_counts() == before


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@pytest.mark.parametrize("token", list(HOSTILE_TOKENS.values()), ids=list(HOSTILE_TOKENS))
async def test_hostile_handshake_tokens_are_denied_handshakes(make_user: Any, token: str) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(make_user)("admin", groups=["admins"])
    message = handshake_message(None, ext={"com.cumulocity.authn": {"token": token}})

    [polled] = await LpBayeux().request([message])
    async with WsBayeux() as ws:
        [socketed] = await ws.request([message])

    for reply in (polled, socketed):
        assert reply["successful"] is False, reply
        assert reply["error"] == "403::Handshake denied"
        assert reply["advice"] == {"reconnect": "none"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@pytest.mark.parametrize("header", list(HOSTILE_HEADERS.values()), ids=list(HOSTILE_HEADERS))
async def test_hostile_upgrade_authorization_denies_the_handshake(
    make_user: Any, header: str
) -> None:
    """A WebSocket handshake without a token falls back to the upgrade's Authorization header."""
    from channels.db import database_sync_to_async

    await database_sync_to_async(make_user)("admin", groups=["admins"])
    async with WsBayeux(headers=[(b"authorization", header.encode("latin-1"))]) as ws:
        [reply] = await ws.request([handshake_message(None)])

    assert (reply["successful"], reply["error"]) == (False, "403::Handshake denied")


# --- through real HTTP, under both servers ---------------------------------------------------------


def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send exactly these bytes; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    raw_head, _, content = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, content


def assert_error_bytes(
    answer: tuple[int, dict[str, str], bytes], status: int, error: str
) -> dict[str, Any]:
    code, headers, content = answer
    assert code == status, (code, content[:300])
    assert headers["content-type"].startswith("application/vnd.com.nsn.cumulocity.error+json")
    body = json.loads(content)
    assert body["error"] == error, body
    assert set(body) >= {"error", "message", "info"}
    return body


def head(method: str, path: bytes, *lines: bytes) -> bytes:
    return b"\r\n".join(
        [method.encode() + b" " + path + b" HTTP/1.1", b"Host: testserver", b"Connection: close"]
        + list(lines)
    )


def realtime_post(path: bytes, body: bytes, *lines: bytes) -> tuple[bytes, bytes]:
    return head(
        "POST",
        path,
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
        *lines,
    ), body


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_hostile_credentials_and_paths_through_real_http(
    launch: Servers,  # noqa: F811
    make_user: Any,
    kind: str,
) -> None:
    make_user("admin", groups=["admins"])
    server = launch.start(kind)
    port = server.port
    raw_headers = [
        b"Authorization: Basic " + b64(b"t100/adm\x00in:x").encode(),
        b"Authorization: Basic " + b64(b"t100/admin:" + PASSWORD.encode() + b"\x00").encode(),
        "Authorization: Basic ééé".encode(),  # UTF-8 bytes on the wire
        b"Authorization: Basic \xe9\xe9\xe9",  # latin-1 bytes on the wire
        b"Authorization: Basic " + b64(b"t100/\xe9\xff:x").encode(),
    ]
    for line in raw_headers:
        for method, path in ENDPOINTS:
            if method in ("GET", "DELETE"):
                answer = raw_request(port, head(method, path.encode(), line))
            else:
                answer = raw_request(port, *realtime_post(path.encode(), b"[]", line))
            assert_error_bytes(answer, 401, "security/Unauthorized")
            assert answer[1]["www-authenticate"] == 'Basic realm="Cumulocity"'

    admin_line = b"Authorization: " + basic("t100/admin").encode()
    for method, path in NUL_PATHS:
        for lines in ([admin_line], []):
            answer = raw_request(port, head(method, path.encode(), *lines))
            assert_error_bytes(answer, 404, "general/Not Found")

    for token in HOSTILE_TOKENS.values():
        message = handshake_message(None, ext={"com.cumulocity.authn": {"token": token}})
        code, _, content = raw_request(
            port, *realtime_post(b"/notification/realtime", json.dumps([message]).encode())
        )
        assert code == 200, content
        [reply] = json.loads(content)
        assert (reply["successful"], reply["error"]) == (False, "403::Handshake denied")

    assert not re.search(r"Internal Server Error|Traceback", server.log()), server.log()


def test_the_resolver_still_refuses_unknown_paths() -> None:
    with pytest.raises(Resolver404):
        resolve("/no/such/path")
