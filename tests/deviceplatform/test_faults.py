"""Smaller findings of the fault campaign, REST side (issue 10, item 8): a request whose body stops
arriving is answered with 408 under the ASGI server (it held the connection with no answer), and
the 409 for an external ID bound elsewhere names that object only to a caller who may read the
binding (it told anyone its global ID)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from deviceplatform.roles import Role
from tests.factories import DeviceFactory, ExternalIdFactory
from tests.helpers import assert_error, basic
from tests.servers import Servers, launch  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

WAIT = 30.0  # bounds a hang; an answer is expected within about a second


# --- a body that stops arriving ------------------------------------------------------------------


def send_partial(port: int, path: str, declared: int, pieces: list[bytes], pause: float) -> bytes:
    """POST declaring `declared` bytes and sending `pieces` `pause` seconds apart; everything the
    server answered until it closed the connection (or WAIT passed)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: testserver\r\nContent-Type: application/json\r\n"
        f"Authorization: {basic('t100/admin')}\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(head)
        for piece in pieces:
            time.sleep(pause)
            sock.sendall(piece)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            data += b"<no answer>"
    return data


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.django_db(transaction=True)
def test_a_body_shorter_than_its_content_length_gets_408_under_uvicorn(
    launch: Servers,  # noqa: F811
    make_user: Callable[..., Any],
    row_counts: Callable[[], dict[str, int]],
) -> None:
    make_user("admin", groups=["admins"])
    server = launch.start("uvicorn", REQUEST_BODY_TIMEOUT_SECONDS="1")
    before = row_counts()
    body = json.dumps({"name": "slow"}).encode()

    started = time.monotonic()
    stalled = send_partial(server.port, "/inventory/managedObjects", 100, [b'{"name":'], 0)
    waited = time.monotonic() - started
    realtime = send_partial(server.port, "/notification/realtime", 50, [b"[{"], 0)
    # Pieces that keep coming, each within the timeout, make a whole request.
    trickled = send_partial(
        server.port, "/inventory/managedObjects", len(body), [body[:5], body[5:10], body[10:]], 0.5
    )

    for answer in (stalled, realtime):
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        status, headers, content = parse(answer)
        assert headers["content-type"].startswith("application/vnd.com.nsn.cumulocity.error+json")
        assert headers["connection"] == "close"
        assert json.loads(content)["error"] == "general/requestTimeout"
        assert json.loads(content)["requestId"] == headers["x-request-id"]  # made up: none sent
        assert len(headers["x-request-id"]) == 32
    assert waited < WAIT / 2
    assert parse(trickled)[0] == 201, trickled[:300]
    assert row_counts()["inventory.ManagedObject"] == before["inventory.ManagedObject"] + 1


# --- the 409 of an external ID bound elsewhere ----------------------------------------------------


@pytest.fixture
def taken(make_user: Callable[..., Any]) -> tuple[Any, Any]:
    """c8y_Serial/SN-1 bound to a device of `owner-a`; `creator` (ROLE_INVENTORY_CREATE only)
    owns another device."""
    make_user("owner-a")
    bound = ExternalIdFactory(
        managed_object=DeviceFactory(owner="owner-a"), type="c8y_Serial", external_id="SN-1"
    )
    return bound, DeviceFactory(owner="creator")


def bind(client: APIClient, device: Any) -> Any:
    return client.post(
        f"/identity/globalIds/{device.pk}/externalIds",
        {"type": "c8y_Serial", "externalId": "SN-1"},
        format="json",
    )


def test_the_conflict_does_not_name_an_object_the_caller_may_not_read(
    make_user: Callable[..., Any],
    client_for: Callable[..., APIClient],
    taken: tuple[Any, Any],
    row_counts: Callable[[], dict[str, int]],
) -> None:
    _, mine = taken
    creator = client_for(make_user("creator", [Role.INVENTORY_CREATE]))
    before = row_counts()

    body = assert_error(bind(creator, mine), 409, "identity/Conflict")
    read = creator.get("/identity/externalIds/c8y_Serial/SN-1")

    assert "belongs to" not in body["message"]
    assert body["message"] == (
        "Identity already bound to a different Global ID: ID [type=c8y_Serial, value=SN-1]"
    )
    assert_error(read, 403)  # the binding itself is not theirs to read either
    assert row_counts() == before


@pytest.mark.parametrize(
    ("name", "roles"),
    [
        ("identity-admin", [Role.IDENTITY_ADMIN]),  # binds to any object, reads any binding
        ("identity-reader", [Role.IDENTITY_READ]),  # binds to its own device, reads any binding
        ("owner-a", []),  # owns the object the pair is bound to
    ],
)
def test_the_conflict_names_the_object_to_a_caller_who_may_read_the_binding(
    make_user: Callable[..., Any],
    client_for: Callable[..., APIClient],
    taken: tuple[Any, Any],
    name: str,
    roles: list[Role],
) -> None:
    bound, _ = taken
    client = client_for(make_user(name, roles))
    own_device = DeviceFactory(owner=name)

    body = assert_error(bind(client, own_device), 409, "identity/Conflict")
    read = client.get("/identity/externalIds/c8y_Serial/SN-1")

    assert body["message"].endswith(f"belongs to {bound.managed_object_id}")
    assert read.status_code == 200
    assert read.json()["managedObject"]["id"] == str(bound.managed_object_id)
