"""Device registration (`/devicecontrol/newDeviceRequests`) and device credentials
(`/devicecontrol/deviceCredentials`): Cumulocity's bootstrap flow, its state machine, its roles and
its refusals, through the REST API with real Basic credentials."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from devicecontrol.models import NewDeviceRequest
from deviceplatform.api.authentication import authenticate_credentials
from deviceplatform.models import User
from deviceplatform.roles import Role
from deviceplatform.services import bootstrap_user_ensure
from tests.devicecontrol.conftest import call, ok_json
from tests.helpers import assert_error, basic

pytestmark = pytest.mark.django_db

REQUESTS = "/devicecontrol/newDeviceRequests"
CREDENTIALS = "/devicecontrol/deviceCredentials"
BOOTSTRAP_PASSWORD = "bootstrap-secret"
NO_CREDENTIALS = "devicecontrol/Not Found"
VENDOR = "application/vnd.com.nsn.cumulocity."


@pytest.fixture
def dc_admin(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    return client_for(make_user("operator", [Role.DEVICE_CONTROL_ADMIN]))


def bootstrap_client(login: str = "management/devicebootstrap") -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=basic(login, BOOTSTRAP_PASSWORD))
    return client


@pytest.fixture
def device(db: None) -> APIClient:
    """The device side: the bootstrap login, as Cumulocity's devices send it."""
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)
    return bootstrap_client()


def request_path(device_id: str) -> str:
    return f"{REQUESTS}/{device_id}"


def register(client: APIClient, device_id: str, **extra: Any) -> Any:
    return ok_json(
        call(client, "POST", REQUESTS, {"id": device_id, **extra}, accept="application/json"),
        201,
    )


def poll(client: APIClient, device_id: str, **extra: Any) -> Any:
    return call(client, "POST", CREDENTIALS, {"id": device_id, **extra}, accept="application/json")


def accept(
    client: APIClient, device_id: str, body: dict[str, Any] | None = None, **headers: Any
) -> Any:
    return call(
        client,
        "PUT",
        request_path(device_id),
        {"status": "ACCEPTED", **(body or {})},
        accept="application/json",
        **headers,
    )


def status_of(device_id: str) -> str:
    return NewDeviceRequest.objects.get(device_id=device_id).status


# --- the state machine ---------------------------------------------------------------------------


def test_register_poll_accept_poll_gives_credentials_once(
    dc_admin: APIClient, device: APIClient
) -> None:
    created = register(dc_admin, "sn-4711")
    assert created["id"] == "sn-4711"
    assert created["status"] == "WAITING_FOR_CONNECTION"
    assert created["owner"] == "operator"
    assert created["tenantId"] == "t100"
    assert created["self"] == "http://testserver/devicecontrol/newDeviceRequests/sn-4711"
    assert created["creationTime"].endswith("Z")

    # Accepting before the device asked is refused, as on Cumulocity.
    body = assert_error(accept(dc_admin, "sn-4711"), 422, "devicecontrol/Invalid Data")
    assert "has not asked for credentials yet" in body["message"]
    assert status_of("sn-4711") == "WAITING_FOR_CONNECTION"

    # The first poll moves the request on; it still answers 404.
    assert_error(poll(device, "sn-4711"), 404, NO_CREDENTIALS)
    assert status_of("sn-4711") == "PENDING_ACCEPTANCE"
    assert NewDeviceRequest.objects.get().last_polled_at is not None
    assert_error(poll(device, "sn-4711"), 404, NO_CREDENTIALS)
    assert status_of("sn-4711") == "PENDING_ACCEPTANCE"

    accepted = ok_json(accept(dc_admin, "sn-4711"))
    assert accepted["status"] == "ACCEPTED"
    assert accepted["acceptedBy"] == "operator"
    assert not User.objects.filter(username="device_sn-4711").exists()  # not before the poll

    response = poll(device, "sn-4711")
    credentials = ok_json(response, 201)
    assert response["Cache-Control"] == "no-store"
    assert set(credentials) == {"id", "self", "tenantId", "username", "password"}
    assert credentials["id"] == "sn-4711"
    assert credentials["tenantId"] == "t100"
    assert credentials["username"] == "device_sn-4711"
    user = User.objects.get(username="device_sn-4711")
    assert list(user.groups.values_list("name", flat=True)) == ["devices"]
    assert user.password != credentials["password"]  # only the hash is stored
    assert authenticate_credentials("device_sn-4711", credentials["password"]) is not None

    # Shown exactly once: the next poll is the same 404 as for an unknown id.
    again = assert_error(poll(device, "sn-4711"), 404, NO_CREDENTIALS)
    unknown = assert_error(poll(device, "never-registered"), 404, NO_CREDENTIALS)
    assert again == unknown
    read = ok_json(call(dc_admin, "GET", request_path("sn-4711")))
    assert read["status"] == "ACCEPTED"
    assert "credentialsIssuedTime" in read
    assert "password" not in str(read)


def test_plain_and_tenant_logins_of_the_bootstrap_user_work(
    dc_admin: APIClient, device: Any
) -> None:
    register(dc_admin, "sn-1")
    for login in ("devicebootstrap", "t100/devicebootstrap", "management/devicebootstrap"):
        assert_error(poll(bootstrap_client(login), "sn-1"), 404, NO_CREDENTIALS)
    assert_error(poll(bootstrap_client("management/operator"), "sn-1"), 401)


def test_security_token_given_at_registration_must_be_presented(
    dc_admin: APIClient, device: APIClient
) -> None:
    register(dc_admin, "sn-tok", securityToken="s3cr3t-token")
    stored = NewDeviceRequest.objects.get()
    assert stored.security_token_digest
    assert "s3cr3t-token" not in stored.security_token_digest
    read = ok_json(call(dc_admin, "GET", request_path("sn-tok")))
    assert read["securityTokenSet"] is True
    assert "s3cr3t-token" not in str(read)

    # Without the token, or with a wrong one, a poll changes nothing and answers the usual 404.
    no_token = assert_error(poll(device, "sn-tok"), 404, NO_CREDENTIALS)
    assert_error(poll(device, "sn-tok", securityToken="wrong"), 404, NO_CREDENTIALS)
    assert no_token == assert_error(poll(device, "unknown-id"), 404, NO_CREDENTIALS)
    assert status_of("sn-tok") == "WAITING_FOR_CONNECTION"
    assert NewDeviceRequest.objects.get().last_polled_at is None

    assert_error(poll(device, "sn-tok", securityToken="s3cr3t-token"), 404, NO_CREDENTIALS)
    assert status_of("sn-tok") == "PENDING_ACCEPTANCE"
    ok_json(accept(dc_admin, "sn-tok"))
    assert_error(poll(device, "sn-tok"), 404, NO_CREDENTIALS)
    assert not User.objects.filter(username="device_sn-tok").exists()
    ok_json(poll(device, "sn-tok", securityToken="s3cr3t-token"), 201)


def test_security_token_given_at_acceptance_replaces_the_old_one(
    dc_admin: APIClient, device: APIClient
) -> None:
    register(dc_admin, "sn-acc")
    assert_error(poll(device, "sn-acc"), 404, NO_CREDENTIALS)
    assert ok_json(accept(dc_admin, "sn-acc", {"securityToken": "given-at-accept"}))[
        "securityTokenSet"
    ]

    assert_error(poll(device, "sn-acc"), 404, NO_CREDENTIALS)
    assert_error(poll(device, "sn-acc", securityToken="other"), 404, NO_CREDENTIALS)
    assert NewDeviceRequest.objects.get().credentials_issued_at is None
    ok_json(poll(device, "sn-acc", securityToken="given-at-accept"), 201)


def test_transitions_other_than_accepting_a_polled_request_are_refused(
    dc_admin: APIClient, device: APIClient, row_counts: Callable[[], dict[str, int]]
) -> None:
    register(dc_admin, "sn-2")
    for status in ("WAITING_FOR_CONNECTION", "PENDING_ACCEPTANCE", "REJECTED", "accepted", 1):
        response = call(dc_admin, "PUT", request_path("sn-2"), {"status": status})
        assert_error(response, 422, "devicecontrol/Invalid Data")
    assert_error(poll(device, "sn-2"), 404, NO_CREDENTIALS)
    for status in ("WAITING_FOR_CONNECTION", "PENDING_ACCEPTANCE"):
        response = call(dc_admin, "PUT", request_path("sn-2"), {"status": status})
        assert_error(response, 422, "devicecontrol/Invalid Data")
    assert status_of("sn-2") == "PENDING_ACCEPTANCE"
    ok_json(accept(dc_admin, "sn-2"))
    before = row_counts()
    body = assert_error(accept(dc_admin, "sn-2"), 422, "devicecontrol/Invalid Data")
    assert "ACCEPTED already" in body["message"]
    response = call(dc_admin, "PUT", request_path("sn-2"), {"status": "PENDING_ACCEPTANCE"})
    assert_error(response, 422, "devicecontrol/Invalid Data")
    assert row_counts() == before
    assert status_of("sn-2") == "ACCEPTED"


def test_delete_rejects_a_request_and_polls_then_find_nothing(
    dc_admin: APIClient, device: APIClient
) -> None:
    register(dc_admin, "sn-del")
    assert_error(poll(device, "sn-del"), 404, NO_CREDENTIALS)
    ok_json(accept(dc_admin, "sn-del"))
    response = call(dc_admin, "DELETE", request_path("sn-del"))
    assert response.status_code == 204
    assert not NewDeviceRequest.objects.exists()
    assert_error(poll(device, "sn-del"), 404, NO_CREDENTIALS)
    assert not User.objects.filter(username="device_sn-del").exists()
    assert_error(call(dc_admin, "DELETE", request_path("sn-del")), 404, "devicecontrol/Not Found")
    assert_error(call(dc_admin, "GET", request_path("sn-del")), 404, "devicecontrol/Not Found")
    assert_error(accept(dc_admin, "sn-del"), 404, "devicecontrol/Not Found")

    # The id can be registered again, and a device onboarding again gets a new password.
    register(dc_admin, "sn-del")
    assert status_of("sn-del") == "WAITING_FOR_CONNECTION"


def test_onboarding_again_re_keys_the_device_user(dc_admin: APIClient, device: APIClient) -> None:
    def onboard() -> str:
        register(dc_admin, "sn-again")
        assert_error(poll(device, "sn-again"), 404, NO_CREDENTIALS)
        ok_json(accept(dc_admin, "sn-again"))
        return ok_json(poll(device, "sn-again"), 201)["password"]

    first = onboard()
    assert call(dc_admin, "DELETE", request_path("sn-again")).status_code == 204
    second = onboard()
    assert first != second
    assert User.objects.filter(username__iexact="device_sn-again").count() == 1
    assert authenticate_credentials("device_sn-again", second) is not None
    assert authenticate_credentials("device_sn-again", first) is None


# --- the collection ------------------------------------------------------------------------------


def test_list_pages_and_filters_by_status(
    dc_admin: APIClient,
    device: APIClient,
    django_assert_max_num_queries: Any,
) -> None:
    for index in range(7):
        register(dc_admin, f"list-{index}")
    for index in (1, 3):
        poll(device, f"list-{index}")
    ok_json(accept(dc_admin, "list-3"))

    page = ok_json(
        call(
            dc_admin,
            "GET",
            f"{REQUESTS}?pageSize=3&withTotalPages=true",
            accept=f"{VENDOR}newDeviceRequestCollection+json",
        )
    )
    assert [item["id"] for item in page["newDeviceRequests"]] == ["list-0", "list-1", "list-2"]
    assert page["statistics"] == {"pageSize": 3, "currentPage": 1, "totalPages": 3}
    assert "pageSize=3&currentPage=2" in page["next"]
    second = ok_json(call(dc_admin, "GET", page["next"].replace("http://testserver", "")))
    assert [item["id"] for item in second["newDeviceRequests"]] == ["list-3", "list-4", "list-5"]
    assert "prev" in second

    pending = ok_json(call(dc_admin, "GET", f"{REQUESTS}?status=PENDING_ACCEPTANCE"))
    assert [item["id"] for item in pending["newDeviceRequests"]] == ["list-1"]
    accepted = ok_json(call(dc_admin, "GET", f"{REQUESTS}?status=ACCEPTED"))
    assert [item["status"] for item in accepted["newDeviceRequests"]] == ["ACCEPTED"]
    waiting = ok_json(call(dc_admin, "GET", f"{REQUESTS}?status=WAITING_FOR_CONNECTION"))
    assert len(waiting["newDeviceRequests"]) == 5
    body = assert_error(call(dc_admin, "GET", f"{REQUESTS}?status=NOPE"), 422)
    assert "NOPE" in body["message"]
    assert_error(call(dc_admin, "GET", f"{REQUESTS}?pageSize=x"), 422)

    with django_assert_max_num_queries(6):
        ok_json(call(dc_admin, "GET", f"{REQUESTS}?pageSize=2000&withTotalPages=true"))


def test_media_types_and_location(dc_admin: APIClient, device: APIClient) -> None:
    response = call(
        dc_admin,
        "POST",
        REQUESTS,
        {"id": "mt-1"},
        accept=f"{VENDOR}newDeviceRequest+json",
        content_type=f"{VENDOR}newDeviceRequest+json",
    )
    assert response.status_code == 201
    assert response["Content-Type"].startswith(f"{VENDOR}newdevicerequest+json")
    assert response["Location"] == "http://testserver/devicecontrol/newDeviceRequests/mt-1"
    read = call(dc_admin, "GET", request_path("mt-1"), accept=f"{VENDOR}newDeviceRequest+json")
    assert read["Content-Type"].startswith(f"{VENDOR}newdevicerequest+json")
    assert read["ETag"] == response["ETag"]
    listed = call(dc_admin, "GET", REQUESTS, accept=f"{VENDOR}newDeviceRequestCollection+json")
    assert listed["Content-Type"].startswith(f"{VENDOR}newdevicerequestcollection+json")
    assert call(dc_admin, "GET", f"{request_path('mt-1')}/").status_code == 200

    # Without Accept, a POST answers without a body (spec README §2), the row is there.
    bare = call(dc_admin, "POST", REQUESTS, {"id": "mt-2"})
    assert bare.status_code == 201
    assert bare.content == b""
    assert NewDeviceRequest.objects.filter(device_id="mt-2").exists()

    poll(device, "mt-1")
    ok_json(accept(dc_admin, "mt-1"))
    credentials = call(
        device, "POST", CREDENTIALS, {"id": "mt-1"}, accept=f"{VENDOR}deviceCredentials+json"
    )
    assert credentials.status_code == 201
    assert credentials["Content-Type"].startswith(f"{VENDOR}devicecredentials+json")
    assert "ETag" not in credentials


def test_credentials_come_with_a_body_even_without_accept(
    dc_admin: APIClient, device: APIClient
) -> None:
    register(dc_admin, "no-accept")
    call(device, "POST", CREDENTIALS, {"id": "no-accept"})
    ok_json(accept(dc_admin, "no-accept"))
    response = call(device, "POST", CREDENTIALS, {"id": "no-accept"})
    assert response.status_code == 201
    assert response.json()["username"] == "device_no-accept"


def test_if_match_on_accept_and_delete(dc_admin: APIClient, device: APIClient) -> None:
    register(dc_admin, "etag-1")
    stale = call(dc_admin, "GET", request_path("etag-1"))["ETag"]
    poll(device, "etag-1")  # the status changes: the tag read before is stale
    current = call(dc_admin, "GET", request_path("etag-1"))["ETag"]
    assert current != stale
    poll(device, "etag-1")  # another poll changes nothing shown
    assert call(dc_admin, "GET", request_path("etag-1"))["ETag"] == current

    assert_error(accept(dc_admin, "etag-1", HTTP_IF_MATCH=stale), 412)
    assert status_of("etag-1") == "PENDING_ACCEPTANCE"
    response = accept(dc_admin, "etag-1", HTTP_IF_MATCH=current)
    assert response.status_code == 200
    accepted_tag = response["ETag"]
    assert_error(call(dc_admin, "DELETE", request_path("etag-1"), HTTP_IF_MATCH=current), 412)
    assert NewDeviceRequest.objects.exists()
    deleted = call(dc_admin, "DELETE", request_path("etag-1"), HTTP_IF_MATCH=accepted_tag)
    assert deleted.status_code == 204


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "Following mandatory fields should be included: id"),
        ({"id": ""}, "Following mandatory fields should be included: id"),
        ({"id": 4711}, "a non-empty string is required"),
        ({"id": ["a"]}, "a non-empty string is required"),
        ({"id": "has space"}, "must contain no whitespace"),
        ({"id": "a/b"}, "'/'"),
        ({"id": "a:b"}, "':'"),
        ({"id": ".."}, "'..'"),
        ({"id": "x" * 144}, "at most 143 characters"),
        ({"id": "ok", "securityToken": 5}, "securityToken"),
        ({"id": "ok", "securityToken": ""}, "securityToken"),
        ({"id": "ok", "securityToken": "t" * 1025}, "at most 1024"),
        ({"id": "ok", "groupId": "42"}, "Unknown field 'groupId'"),
        ({"id": "ok", "type": "x", "c8y_X": {}}, "Unknown fields 'c8y_X', 'type'"),
    ],
)
def test_bad_registration_bodies_are_422_and_write_nothing(
    dc_admin: APIClient,
    row_counts: Callable[[], dict[str, int]],
    body: dict[str, Any],
    fragment: str,
) -> None:
    before = row_counts()
    response = assert_error(call(dc_admin, "POST", REQUESTS, body), 422)
    assert fragment in response["message"]
    assert row_counts() == before


def test_server_owned_keys_are_ignored_on_registration(dc_admin: APIClient) -> None:
    created = register(
        dc_admin,
        "owned-1",
        status="ACCEPTED",
        owner="someone",
        tenantId="t999",
        creationTime="2000-01-01T00:00:00Z",
        self="http://x",
    )
    assert created["status"] == "WAITING_FOR_CONNECTION"
    assert created["owner"] == "operator"
    assert created["tenantId"] == "t100"
    assert not created["creationTime"].startswith("2000")


def test_duplicate_id_is_422_non_unique_regardless_of_case(
    dc_admin: APIClient, row_counts: Callable[[], dict[str, int]]
) -> None:
    register(dc_admin, "Dup-1")
    before = row_counts()
    for device_id in ("Dup-1", "dup-1", "DUP-1"):
        body = assert_error(
            call(dc_admin, "POST", REQUESTS, {"id": device_id}),
            422,
            "devicecontrol/Non Unique Result",
        )
        assert device_id in body["message"]
    assert row_counts() == before


def test_an_id_whose_device_user_name_is_a_person_is_refused(
    dc_admin: APIClient, make_user: Callable[..., Any], device: APIClient
) -> None:
    make_user("device_boss", [Role.INVENTORY_ADMIN])
    body = assert_error(call(dc_admin, "POST", REQUESTS, {"id": "boss"}), 409, "general/Conflict")
    assert "not a device user" in body["message"]
    assert not NewDeviceRequest.objects.exists()

    # The person appears after the registration: the accept is refused, the account untouched.
    register(dc_admin, "late")
    poll(device, "late")
    make_user("device_late", [Role.INVENTORY_READ])
    assert_error(accept(dc_admin, "late"), 409)
    assert status_of("late") == "PENDING_ACCEPTANCE"


def test_a_person_appearing_after_the_accept_gets_no_credentials_handed_out(
    dc_admin: APIClient, make_user: Callable[..., Any], device: APIClient
) -> None:
    register(dc_admin, "later")
    poll(device, "later")
    ok_json(accept(dc_admin, "later"))
    person = make_user("device_later", [Role.INVENTORY_READ])
    password_hash = person.password
    assert_error(poll(device, "later"), 404, NO_CREDENTIALS)
    person.refresh_from_db()
    assert person.password == password_hash
    assert NewDeviceRequest.objects.get().credentials_issued_at is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"id": ""}, 422),
        ({"id": 12}, 422),
        ({"id": "a b"}, 422),
        ({"id": "x" * 144}, 422),
        ({"id": "ok", "securityToken": ["x"]}, 422),
    ],
)
def test_bad_poll_bodies(
    device: APIClient, row_counts: Callable[[], dict[str, int]], body: dict[str, Any], status: int
) -> None:
    before = row_counts()
    assert_error(call(device, "POST", CREDENTIALS, body), status)
    assert row_counts() == before


@pytest.mark.parametrize("path", [REQUESTS, CREDENTIALS, f"{REQUESTS}/sn-x"])
def test_malformed_json_and_wrong_media_type(
    dc_admin: APIClient, device: APIClient, path: str, row_counts: Callable[[], dict[str, int]]
) -> None:
    register(dc_admin, "sn-x")
    client = device if path == CREDENTIALS else dc_admin
    method = "PUT" if path.endswith("sn-x") else "POST"
    before = row_counts()
    assert_error(call(client, method, path, raw='{"id": '), 400, "general/badRequest")
    assert_error(call(client, method, path, raw="[1, 2]"), 422)
    assert_error(call(client, method, path, raw=""), 422)
    response = call(client, method, path, raw="id=sn-x", content_type="text/plain")
    assert_error(response, 415, "general/unsupportedMediaType")
    response = call(
        client, method, path, raw="--b\r\n\r\n--b--", content_type="multipart/form-data; boundary=b"
    )
    assert_error(response, 415, "general/unsupportedMediaType")
    assert row_counts() == before


def test_put_needs_a_status(dc_admin: APIClient, device: APIClient) -> None:
    register(dc_admin, "st-1")
    poll(device, "st-1")
    body = assert_error(call(dc_admin, "PUT", request_path("st-1"), {}), 422)
    assert "status" in body["message"]
    body = assert_error(
        call(dc_admin, "PUT", request_path("st-1"), {"status": "ACCEPTED", "name": "x"}), 422
    )
    assert "'name'" in body["message"]
    assert status_of("st-1") == "PENDING_ACCEPTANCE"
    # The id in a PUT body is ignored: the path names the request.
    response = call(dc_admin, "PUT", request_path("st-1"), {"id": "other", "status": "ACCEPTED"})
    assert response.status_code == 200
    assert status_of("st-1") == "ACCEPTED"


def test_unknown_ids_in_paths(dc_admin: APIClient) -> None:
    for method in ("GET", "PUT", "DELETE"):
        body = assert_error(
            call(dc_admin, method, request_path("nobody"), {"status": "ACCEPTED"}),
            404,
            "devicecontrol/Not Found",
        )
        assert "nobody" in body["message"]
    assert_error(call(dc_admin, "GET", f"{REQUESTS}/a%2Fb"), 404)


def test_methods_not_served_are_405(dc_admin: APIClient, device: APIClient) -> None:
    assert_error(call(dc_admin, "DELETE", REQUESTS), 405)
    assert_error(call(dc_admin, "PUT", REQUESTS, {}), 405)
    assert_error(call(dc_admin, "POST", request_path("x"), {}), 405)
    for method in ("GET", "PUT", "DELETE"):
        assert_error(call(device, method, CREDENTIALS, {}), 405)
