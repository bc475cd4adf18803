"""`POST /devicecontrol/operations/wait?timeout=SECONDS` (extension, README "Beyond Cumulocity"):
create an operation and wait for its final state; 200 when it got there in time, 202 otherwise."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from django.db import connection
from rest_framework.test import APIClient

from devicecontrol import services
from devicecontrol.models import Operation
from deviceplatform.roles import Role
from inventory.models import ManagedObject
from inventory.services import managed_object_create
from tests.factories import Clients
from tests.helpers import PASSWORD, assert_error

BASE = "http://testserver"
WAIT = "/devicecontrol/operations/wait"
COLLECTION = "/devicecontrol/operations"
OPERATION_TYPE = "application/vnd.com.nsn.cumulocity.operation+json"

USERS: dict[str, list[Role]] = {
    "admin": [Role.DEVICE_CONTROL_ADMIN],
    "reader": [Role.DEVICE_CONTROL_READ],
    "owner": [],
}


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS, usernames={"admin": "dc_admin"})


def post(client: APIClient, path: str, body: Any, *, raw: str | None = None, **extra: Any) -> Any:
    data = raw if raw is not None else json.dumps(body)
    return client.generic("POST", path, data, content_type="application/json", **extra)


# --- answered without waiting, through the Django test client ------------------------------------


@pytest.mark.django_db
def test_timeout_zero_answers_202_with_the_pending_operation(
    api: Clients, device: ManagedObject, agent: ManagedObject
) -> None:
    response = post(
        api["admin"],
        f"{WAIT}?timeout=0",
        {"deviceId": str(device.pk), "c8y_Restart": {}},
        HTTP_ACCEPT=OPERATION_TYPE,
    )

    assert response.status_code == 202, response.content
    assert response["Content-Type"].startswith(OPERATION_TYPE)
    operation = Operation.objects.get()
    assert response["Location"] == f"{BASE}/devicecontrol/operations/{operation.pk}"
    body = response.json()
    assert body["id"] == str(operation.pk)
    assert body["self"] == response["Location"]
    assert body["status"] == "PENDING"
    assert body["deviceId"] == str(device.pk)
    assert body["c8y_Restart"] == {}
    assert operation.agent_id == agent.pk


@pytest.mark.django_db
def test_wait_always_answers_with_a_body(api: Clients, device: ManagedObject) -> None:
    """Unlike a plain POST without Accept, the point of waiting is the body: plain JSON then."""
    response = post(api["admin"], f"{WAIT}?timeout=0", {"deviceId": device.pk, "c8y_Restart": {}})

    assert response.status_code == 202
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["status"] == "PENDING"


@pytest.mark.django_db
def test_wait_registers_the_same_create_event_as_a_plain_post(
    api: Clients,
    device: ManagedObject,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    from devicecontrol.realtime import registered_events

    with django_capture_on_commit_callbacks() as callbacks:
        response = post(api["admin"], f"{WAIT}?timeout=0", {"deviceId": device.pk, "x": {}})

    assert response.status_code == 202
    events = registered_events(callbacks)
    assert [(event.action, event.operation_id) for event in events] == [
        ("CREATE", Operation.objects.get().pk)
    ]


@pytest.mark.django_db
def test_owner_without_roles_may_create_and_wait(api: Clients, device: ManagedObject) -> None:
    response = post(api["owner"], f"{WAIT}?timeout=0", {"deviceId": device.pk, "c8y_Restart": {}})

    assert response.status_code == 202
    assert Operation.objects.count() == 1


@pytest.mark.django_db
def test_wait_that_runs_out_answers_202_with_the_current_state(
    api: Clients, device: ManagedObject
) -> None:
    response = post(api["admin"], f"{WAIT}?timeout=0.2", {"deviceId": device.pk, "c8y_Restart": {}})

    assert response.status_code == 202
    assert response.json()["status"] == "PENDING"


@pytest.mark.django_db
@pytest.mark.parametrize("timeout", ["x", "-1", "", "nan", "inf", "6", "5.5", None])
def test_bad_timeout_is_422_and_writes_nothing(
    api: Clients,
    device: ManagedObject,
    settings: Any,
    row_counts: Callable[[], dict[str, int]],
    timeout: str | None,
) -> None:
    settings.OPERATION_MAX_WAIT_SECONDS = 5
    client = api["admin"]
    before = row_counts()
    path = WAIT if timeout is None else f"{WAIT}?timeout={timeout}"

    response = post(client, path, {"deviceId": device.pk, "c8y_Restart": {}})

    body = assert_error(response, 422)
    assert "timeout" in body["message"]
    assert row_counts() == before


@pytest.fixture
def no_agent_device(db: None) -> ManagedObject:
    return managed_object_create(owner="owner", data={"name": "Lonely", "c8y_IsDevice": {}})


INVALID_CREATES: dict[str, tuple[str, Callable[[ManagedObject, ManagedObject], Any]]] = {
    "no deviceId": ("admin", lambda device, lonely: {"c8y_Restart": {}}),
    "unknown device": ("admin", lambda device, lonely: {"deviceId": "999999999"}),
    "bad deviceId": ("admin", lambda device, lonely: {"deviceId": "abc"}),
    "device without agent": ("admin", lambda device, lonely: {"deviceId": lonely.pk}),
    "no role": ("reader", lambda device, lonely: {"deviceId": device.pk}),
    "no credentials": ("anon", lambda device, lonely: {"deviceId": device.pk}),
    "wrong password": ("bad_password", lambda device, lonely: {"deviceId": device.pk}),
    "bad fragment name": ("admin", lambda device, lonely: {"deviceId": device.pk, "a.b": 1}),
    "bad pendingTimeout": (
        "admin",
        lambda device, lonely: {"deviceId": device.pk, "pendingTimeout": "soon"},
    ),
    "not an object": ("admin", lambda device, lonely: [device.pk]),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", list(INVALID_CREATES))
def test_invalid_create_answers_exactly_like_a_plain_post_and_writes_nothing(
    api: Clients,
    device: ManagedObject,
    no_agent_device: ManagedObject,
    row_counts: Callable[[], dict[str, int]],
    case: str,
) -> None:
    user, make_body = INVALID_CREATES[case]
    client = api[user]
    body = make_body(device, no_agent_device)
    before = row_counts()

    plain = post(client, COLLECTION, body, HTTP_ACCEPT=OPERATION_TYPE)
    waiting = post(client, f"{WAIT}?timeout=0", body, HTTP_ACCEPT=OPERATION_TYPE)

    assert 400 <= plain.status_code < 500
    expected = assert_error(plain, plain.status_code)
    actual = assert_error(waiting, plain.status_code)
    assert (actual["error"], actual["message"]) == (expected["error"], expected["message"])
    assert row_counts() == before


@pytest.mark.django_db
def test_malformed_json_answers_like_a_plain_post(
    api: Clients, device: ManagedObject, row_counts: Callable[[], dict[str, int]]
) -> None:
    client = api["admin"]
    before = row_counts()

    plain = post(client, COLLECTION, None, raw='{"deviceId": ')
    waiting = post(client, f"{WAIT}?timeout=0", None, raw='{"deviceId": ')

    expected = assert_error(plain, plain.status_code)
    actual = assert_error(waiting, plain.status_code)
    assert actual["error"] == expected["error"]
    assert row_counts() == before


@pytest.mark.django_db
def test_quiescent_wait_creates_without_an_event(
    api: Clients,
    device: ManagedObject,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    from devicecontrol.realtime import registered_events

    with django_capture_on_commit_callbacks() as callbacks:
        response = post(
            api["admin"],
            f"{WAIT}?timeout=0",
            {"deviceId": device.pk},
            HTTP_X_CUMULOCITY_PROCESSING_MODE="QUIESCENT",
        )

    assert response.status_code == 202
    assert registered_events(callbacks) == []


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_on_the_wait_path_are_405(
    api: Clients, device: ManagedObject, method: str, row_counts: Callable[[], dict[str, int]]
) -> None:
    client = api["admin"]
    before = row_counts()

    response = client.generic(
        method,
        f"{WAIT}?timeout=0",
        json.dumps({"deviceId": device.pk, "status": "SUCCESSFUL"}),
        content_type="application/json",
    )

    assert_error(response, 405)
    assert row_counts() == before


# --- a real wait against a live server ----------------------------------------------------------


class Waiter:
    """Sends the waiting POST on a thread, so the test can act as the agent meanwhile."""

    def __init__(self, url: str, body: dict[str, Any], auth: tuple[str, str]) -> None:
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(url, body, auth), name="waiting-client"
        )
        self._thread.start()

    def _run(self, url: str, body: dict[str, Any], auth: tuple[str, str]) -> None:
        try:
            self.response = requests.post(
                url, json=body, auth=auth, headers={"Accept": OPERATION_TYPE}, timeout=30
            )
        except BaseException as error:  # reported by the main thread
            self.error = error
        finally:
            self.finished.set()

    def poll_until(self, condition: Callable[[], Any], *, limit: float = 10.0) -> Any:
        """Check `condition` every 20 ms until it is truthy (at most `limit` seconds); stop early
        if the waiting request already returned."""
        deadline = time.monotonic() + limit
        while True:
            value = condition()
            if value:
                return value
            assert not self.finished.is_set(), (self.error, self.response)
            assert time.monotonic() < deadline, "condition not reached"
            self.finished.wait(0.02)

    def result(self) -> requests.Response:
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()
        assert self.error is None, self.error
        assert self.response is not None
        return self.response


@pytest.fixture
def live_admin(make_user: Callable[..., Any]) -> tuple[str, str]:
    make_user("dc_admin", [Role.DEVICE_CONTROL_ADMIN])
    return ("t100/dc_admin", PASSWORD)


def operation_of(device: ManagedObject) -> Operation | None:
    return Operation.objects.filter(device=device).first()


@pytest.fixture
def waiter(
    live_server: Any, live_admin: tuple[str, str], device: ManagedObject
) -> Iterator[Callable[[], Waiter]]:
    started: list[Waiter] = []

    def start() -> Waiter:
        waiter = Waiter(
            f"{live_server.url}{WAIT}?timeout=10",
            {"deviceId": str(device.pk), "c8y_Command": {"text": "uptime"}},
            live_admin,
        )
        started.append(waiter)
        return waiter

    yield start
    for waiter in started:  # never leave a request running into the next test
        waiter.finished.wait(30)


def put(live_server: Any, auth: tuple[str, str], pk: int, body: dict[str, Any]) -> Any:
    return requests.put(
        f"{live_server.url}{COLLECTION}/{pk}",
        json=body,
        auth=auth,
        headers={"Accept": "application/json"},
        timeout=30,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "final",
    [
        {"status": "SUCCESSFUL", "c8y_Command": {"text": "uptime", "result": "up 3 days"}},
        {"status": "FAILED", "failureReason": "command not found"},
    ],
    ids=["SUCCESSFUL", "FAILED"],
)
def test_wait_returns_200_when_the_agent_finishes_in_time(
    live_server: Any,
    live_admin: tuple[str, str],
    device: ManagedObject,
    waiter: Callable[[], Waiter],
    final: dict[str, Any],
) -> None:
    client = waiter()
    operation = client.poll_until(lambda: operation_of(device))

    executing = put(live_server, live_admin, operation.pk, {"status": "EXECUTING"})
    assert executing.status_code == 200
    done = put(live_server, live_admin, operation.pk, final)
    assert done.status_code == 200

    response = client.result()
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith(OPERATION_TYPE)
    assert response.headers["Location"] == f"{live_server.url}{COLLECTION}/{operation.pk}"
    body = response.json()
    assert body["id"] == str(operation.pk)
    for key, value in final.items():
        assert body[key] == value


def connections_in_use() -> int:
    """Connections handed out by the pool (every thread of the live server shares it)."""
    stats = connection.pool.get_stats()
    return stats["pool_size"] - stats["pool_available"]


# The connection pool is PostgreSQL's (settings.py); SQLite connections are per thread, unpooled.
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_waiting_request_holds_no_database_connection(
    live_server: Any,
    live_admin: tuple[str, str],
    device: ManagedObject,
    waiter: Callable[[], Waiter],
) -> None:
    assert connection.pool is not None, "the test settings use the connection pool"
    client = waiter()
    operation = client.poll_until(lambda: operation_of(device))

    def released() -> bool:
        connection.close()  # this thread's own connection goes back to the pool first
        return connections_in_use() == 0

    # While the POST waits for the agent, no connection is checked out of the pool.
    client.poll_until(released, limit=5.0)
    assert not client.finished.is_set()

    assert (
        services.operation_update(operation_id=operation.pk, data={"status": "SUCCESSFUL"}).status
        == "SUCCESSFUL"
    )
    response = client.result()
    assert response.status_code == 200
    assert response.json()["status"] == "SUCCESSFUL"


@pytest.mark.django_db(transaction=True)
def test_operation_deleted_while_waiting_answers_404(
    live_server: Any,
    live_admin: tuple[str, str],
    device: ManagedObject,
    waiter: Callable[[], Waiter],
) -> None:
    client = waiter()
    operation = client.poll_until(lambda: operation_of(device))

    deleted = requests.delete(
        f"{live_server.url}{COLLECTION}",
        params={"deviceId": device.pk},
        auth=live_admin,
        timeout=30,
    )
    assert deleted.status_code == 204

    response = client.result()
    assert response.status_code == 404, response.text
    assert response.headers["Content-Type"].startswith(
        "application/vnd.com.nsn.cumulocity.error+json"
    )
    body = response.json()
    assert body["error"] == "devicecontrol/Not Found"
    assert str(operation.pk) in body["message"]


@pytest.mark.parametrize(
    ("method", "query"), [("get", "?timeout=1"), ("post", "?timeout=x"), ("post", "?timeout=1")]
)
def test_wait_authenticates_before_anything_else(
    db: None, anon_api: APIClient, row_counts: Any, method: str, query: str
) -> None:
    """auth.md §6: 401 precedes 405 and 422, also on the extension endpoint."""
    before = row_counts()
    response = getattr(anon_api, method)(f"/devicecontrol/operations/wait{query}")
    assert_error(response, 401, "security/Unauthorized")
    assert response["WWW-Authenticate"]
    assert row_counts() == before
