"""The common HTTP conventions of spec README §1–§7, driven through the inventory endpoints and the
session resources: routing, media types, the empty-body rule, errors, paging, IDs, dates, headers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.test import AsyncClient
from django.test.client import FakePayload
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from inventory.models import ManagedObject, ManagedObjectReference, Relation
from tests.factories import (
    DeviceFactory,
    ExternalIdFactory,
    GroupFactory,
    ManagedObjectFactory,
    link,
)
from tests.helpers import PASSWORD, assert_error, basic

pytestmark = pytest.mark.django_db

MO = "/inventory/managedObjects"
BASE = "http://testserver"
VENDOR_MO = "application/vnd.com.nsn.cumulocity.managedobject+json;charset=UTF-8;ver=0.9"
PLAIN_JSON = "application/json;charset=UTF-8"
ERROR_TYPE = "application/vnd.com.nsn.cumulocity.error+json;charset=UTF-8;ver=0.9"
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
JSON = {"HTTP_ACCEPT": "application/json"}

# The ceiling measured for listing managed objects with references, parents and totals: one query
# each for the user, their roles, the page, the count, the child references, the parent references.
LIST_QUERY_CEILING = 6


def send(
    client: APIClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    **extra: Any,
) -> Any:
    """A request with a raw body: bytes as given, anything else as JSON, None as no body."""
    if body is None:
        data = b""
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
    return client.generic(method, path, data, content_type=content_type, **extra)


def links(value: Any) -> Iterator[str]:
    """Every `self`, `next` and `prev` URL anywhere in a JSON body."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("self", "next", "prev") and isinstance(item, str):
                yield item
            else:
                yield from links(item)
    elif isinstance(value, list):
        for item in value:
            yield from links(item)


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def assert_content_length(response: Any) -> None:
    assert response.has_header("Content-Length"), response.status_code
    assert int(response["Content-Length"]) == len(response.content)
    assert not response.has_header("Transfer-Encoding")


@pytest.fixture
def nobody_api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    """An authenticated user without any role."""
    return client_for(make_user("nobody"))


# --- §1 routing: every path with and without a trailing slash, no redirect ------------------------


@pytest.mark.parametrize("slash", ["", "/"])
def test_every_path_answers_with_and_without_trailing_slash(
    admin_api: APIClient, slash: str
) -> None:
    device = DeviceFactory()
    doomed = DeviceFactory()
    child = DeviceFactory()
    ExternalIdFactory(managed_object=device, external_id="slash-1")
    one = f"{MO}/{device.pk}"
    reference = {"managedObject": {"id": str(child.pk)}}
    serial = {"type": "c8y_Serial", "externalId": "slash-2"}
    cases: list[tuple[str, str, Any, int]] = [
        ("GET", "/inventory", None, 200),
        ("GET", MO, None, 200),
        ("POST", MO, {"name": "new"}, 201),
        ("GET", one, None, 200),
        ("PUT", one, {"name": "renamed"}, 200),
        ("POST", f"{one}/childDevices", reference, 201),
        ("GET", f"{one}/childDevices", None, 200),
        ("GET", f"{one}/childDevices/{child.pk}", None, 200),
        ("DELETE", f"{one}/childDevices/{child.pk}", None, 204),
        ("POST", f"{one}/childDevices", reference, 201),
        ("DELETE", f"{one}/childDevices", {"references": [reference]}, 204),
        ("GET", f"{one}/deviceParents", None, 200),
        ("GET", "/identity", None, 200),
        ("GET", f"/identity/globalIds/{device.pk}/externalIds", None, 200),
        ("POST", f"/identity/globalIds/{device.pk}/externalIds", serial, 201),
        ("GET", "/identity/externalIds/c8y_Serial/slash-1", None, 200),
        ("DELETE", "/identity/externalIds/c8y_Serial/slash-1", None, 204),
        ("DELETE", f"{MO}/{doomed.pk}", None, 204),
        ("GET", "/platform", None, 200),
        ("GET", "/tenant/currentTenant", None, 200),
        ("GET", "/user/currentUser", None, 200),
        ("GET", "/devicecontrol", None, 200),
    ]
    not_allowed = {
        "/inventory": ("POST", "PUT", "DELETE"),
        MO: ("PUT", "DELETE"),
        one: ("POST",),
        f"{one}/childDevices": ("PUT",),
        "/identity": ("POST", "PUT", "DELETE"),
        f"/identity/globalIds/{device.pk}/externalIds": ("PUT", "DELETE"),
        "/identity/externalIds/c8y_Serial/slash-2": ("POST", "PUT"),
        "/platform": ("POST", "PUT", "DELETE"),
        "/tenant/currentTenant": ("POST", "PUT", "DELETE"),
        "/user/currentUser": ("POST", "PUT", "DELETE"),
        "/devicecontrol": ("POST", "PUT", "DELETE"),
    }
    cases += [
        (method, path, {"name": "x"}, 405)
        for path, methods in not_allowed.items()
        for method in methods
    ]

    for method, path, body, expected in cases:
        response = send(admin_api, method, path + slash, body, **JSON)
        assert response.status_code == expected, (method, path + slash, response.content[:300])
        if expected == 405:
            assert_error(response, 405, "general/methodNotAllowed")
            assert method not in response["Allow"]
        if expected == 201:
            assert response["Location"].startswith(f"{BASE}/")
            assert not response["Location"].endswith("/")
        else:
            assert not response.has_header("Location")


# --- §2 media types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accept",
    [
        "application/vnd.com.nsn.cumulocity.managedobject+json",
        "application/vnd.com.nsn.cumulocity.managedObject+json",
        "APPLICATION/VND.COM.NSN.CUMULOCITY.MANAGEDOBJECT+JSON",
        "application/vnd.com.nsn.cumulocity.managedObject+json;charset=UTF-8;ver=0.9",
        "application/vnd.com.nsn.cumulocity.managedobject+json; ver=0.9 ; charset=utf-8",
        "text/html;q=0.9, application/vnd.com.nsn.cumulocity.managedobject+json;q=0.1, */*;q=0.8",
        "application/json, application/vnd.com.nsn.cumulocity.managedobject+json",
        "application/vnd.com.nsn.cumulocity.error+json, "
        "application/vnd.com.nsn.cumulocity.managedobject+json",
        "application/vnd.com.nsn.cumulocity.error+json;ver=0.9,"
        "application/vnd.com.nsn.cumulocity.managedObject+json;ver=0.9",
    ],
)
def test_vendor_accept_gets_the_vendor_content_type(admin_api: APIClient, accept: str) -> None:
    device = DeviceFactory()

    got = admin_api.get(f"{MO}/{device.pk}", HTTP_ACCEPT=accept)
    created = send(admin_api, "POST", MO, {"name": "n"}, HTTP_ACCEPT=accept)
    updated = send(admin_api, "PUT", f"{MO}/{device.pk}", {"name": "m"}, HTTP_ACCEPT=accept)

    for response, status in ((got, 200), (created, 201), (updated, 200)):
        assert response.status_code == status
        assert response["Content-Type"] == VENDOR_MO
        assert response.json()["self"].startswith(f"{BASE}{MO}/")


@pytest.mark.parametrize(
    "accept",
    [
        "application/json",
        "*/*",
        "application/*",
        "text/html",
        "application/xml",
        "application/vnd.com.nsn.cumulocity.operation+json",  # another resource's type
        "application/vnd.com.nsn.cumulocity.error+json",
        "application/vnd.com.nsn.cumulocity.managedobjectcollection+json",
        "nonsense",
        "",
    ],
)
def test_other_accept_gets_plain_json_never_406(admin_api: APIClient, accept: str) -> None:
    device = DeviceFactory()

    got = admin_api.get(f"{MO}/{device.pk}", HTTP_ACCEPT=accept)
    created = send(admin_api, "POST", MO, {"name": "n"}, HTTP_ACCEPT=accept)

    for response, status in ((got, 200), (created, 201)):
        assert response.status_code == status
        assert response["Content-Type"] == PLAIN_JSON
        assert response.json()["id"]


def test_get_without_accept_is_plain_json(admin_api: APIClient) -> None:
    device = DeviceFactory()

    response = admin_api.get(f"{MO}/{device.pk}")

    assert response.status_code == 200
    assert response["Content-Type"] == PLAIN_JSON
    assert response.json()["id"] == str(device.pk)


def test_collection_vendor_type(admin_api: APIClient) -> None:
    response = admin_api.get(
        MO, HTTP_ACCEPT="application/vnd.com.nsn.cumulocity.managedObjectCollection+json"
    )

    assert response["Content-Type"] == (
        "application/vnd.com.nsn.cumulocity.managedobjectcollection+json;charset=UTF-8;ver=0.9"
    )


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.com.nsn.cumulocity.managedobject+json",
        "application/vnd.com.nsn.cumulocity.managedObject+json;charset=UTF-8;ver=0.9",
        "APPLICATION/VND.COM.NSN.CUMULOCITY.MANAGEDOBJECT+JSON; ver=0.9; charset=UTF-8",
        "application/vnd.com.nsn.cumulocity.operation+json",  # vendor type never chooses behaviour
        "application/json",
        "Application/JSON;charset=utf-8",
        "",  # no Content-Type at all: parsed as JSON
    ],
)
def test_json_request_content_types_are_accepted(admin_api: APIClient, content_type: str) -> None:
    created = send(admin_api, "POST", MO, {"name": "typed"}, content_type=content_type, **JSON)

    assert created.status_code == 201, created.content
    assert created.json()["name"] == "typed"
    url = f"{MO}/{created.json()['id']}"
    updated = send(admin_api, "PUT", url, {"name": "retyped"}, content_type=content_type, **JSON)
    assert updated.status_code == 200
    assert updated.json()["name"] == "retyped"


def test_no_content_type_header_at_all_is_parsed_as_json(admin: Any) -> None:
    body = b'{"name": "bare"}'

    response = asgi_post(MO, body, ("content-length", str(len(body))))

    assert response.status_code == 201, response.content
    assert "CONTENT_TYPE" not in response.asgi_request.META
    assert ManagedObject.objects.get(pk=response.json()["id"]).name == "bare"


def test_chunked_body_without_content_type_is_parsed_as_json(admin: Any) -> None:
    response = asgi_post(MO, b'{"name": "bare"}', ("transfer-encoding", "chunked"))

    assert response.status_code == 201, response.content
    assert response.json()["name"] == "bare"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"name": "x"}'),
        ("text/plain;charset=UTF-8", b"name=x"),
        ("application/xml", b"<managedObject><name>x</name></managedObject>"),
        ("text/xml", b"<a/>"),
        ("application/x-www-form-urlencoded", b"name=x"),
        (
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--xyz--\r\n',
        ),
        ("application/octet-stream", b'{"name": "x"}'),
        ("application/vnd.com.nsn.cumulocity.managedobject+xml", b"<a/>"),
    ],
)
def test_other_request_content_types_are_415_and_write_nothing(
    admin_api: APIClient, row_counts: Callable[[], dict[str, int]], content_type: str, body: bytes
) -> None:
    device = DeviceFactory(name="before")
    child = DeviceFactory()
    before = row_counts()

    for method, path in [
        ("POST", MO),
        ("PUT", f"{MO}/{device.pk}"),
        ("POST", f"{MO}/{device.pk}/childDevices"),
        ("POST", f"/identity/globalIds/{device.pk}/externalIds"),
    ]:
        response = send(admin_api, method, path, body, content_type=content_type, **JSON)
        assert_error(response, 415, "general/unsupportedMediaType")
        assert response["Content-Type"] == ERROR_TYPE
    assert row_counts() == before
    device.refresh_from_db()
    assert device.name == "before"
    assert not ManagedObjectReference.objects.filter(child=child).exists()


# --- §2 the empty-body rule -----------------------------------------------------------------------


def test_post_without_accept_is_201_with_an_empty_body_and_a_location(
    admin_api: APIClient,
) -> None:
    response = send(admin_api, "POST", MO, {"name": "quiet"})

    assert response.status_code == 201
    assert response.content == b""
    assert response["Content-Length"] == "0"
    match = re.fullmatch(rf"{BASE}{MO}/(\d+)", response["Location"])
    assert match
    assert ManagedObject.objects.get(pk=int(match[1])).name == "quiet"
    # The Location works.
    assert admin_api.get(response["Location"]).json()["name"] == "quiet"


def test_put_without_accept_is_200_with_an_empty_body(admin_api: APIClient) -> None:
    device = DeviceFactory(name="old")

    response = send(admin_api, "PUT", f"{MO}/{device.pk}", {"name": "new"})

    assert response.status_code == 200
    assert response.content == b""
    assert response["Content-Length"] == "0"
    device.refresh_from_db()
    assert device.name == "new"


def test_reference_and_external_id_posts_without_accept_are_empty(admin_api: APIClient) -> None:
    parent, child = DeviceFactory(), DeviceFactory()

    reference = send(
        admin_api, "POST", f"{MO}/{parent.pk}/childDevices", {"managedObject": {"id": child.pk}}
    )
    external = send(
        admin_api,
        "POST",
        f"/identity/globalIds/{parent.pk}/externalIds",
        {"type": "c8y_Serial", "externalId": "quiet-1"},
    )

    for response in (reference, external):
        assert response.status_code == 201
        assert response.content == b""
        assert response["Content-Length"] == "0"
    assert reference["Location"] == f"{BASE}{MO}/{parent.pk}/childDevices/{child.pk}"
    assert external["Location"] == f"{BASE}/identity/externalIds/c8y_Serial/quiet-1"


@pytest.mark.parametrize(
    "accept",
    [
        "*/*",
        "application/json",
        "text/plain",
        "application/vnd.com.nsn.cumulocity.managedobject+json",
    ],
)
def test_post_and_put_with_any_accept_return_the_body(admin_api: APIClient, accept: str) -> None:
    created = send(admin_api, "POST", MO, {"name": "loud"}, HTTP_ACCEPT=accept)
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "loud"
    assert created["Location"] == body["self"] == f"{BASE}{MO}/{body['id']}"

    updated = send(admin_api, "PUT", created["Location"], {"name": "louder"}, HTTP_ACCEPT=accept)
    assert updated.status_code == 200
    assert updated.json()["name"] == "louder"
    assert int(updated["Content-Length"]) == len(updated.content) > 0


def test_delete_never_has_a_body(admin_api: APIClient) -> None:
    device = DeviceFactory()

    response = admin_api.delete(f"{MO}/{device.pk}", HTTP_ACCEPT="application/json")

    assert response.status_code == 204
    assert response.content == b""
    assert response["Content-Length"] == "0"


# --- §3 absolute links ----------------------------------------------------------------------------


def test_every_link_is_absolute(admin_api: APIClient) -> None:
    group = GroupFactory()
    device = DeviceFactory()
    link(device, DeviceFactory())
    link(group, device, relation=Relation.ASSET)
    ExternalIdFactory(managed_object=device, external_id="abs-1")
    bodies = [
        admin_api.get(f"{MO}/{device.pk}?withParents=true").json(),
        admin_api.get(f"{MO}?pageSize=2&currentPage=2&withParents=true").json(),
        admin_api.get(f"{MO}/{device.pk}/childDevices").json(),
        admin_api.get(f"{MO}/{device.pk}/assetParents").json(),
        admin_api.get(f"/identity/globalIds/{device.pk}/externalIds").json(),
        admin_api.get("/identity/externalIds/c8y_Serial/abs-1").json(),
        admin_api.get("/platform").json(),
        admin_api.get("/tenant/currentTenant").json(),
        admin_api.get("/user/currentUser").json(),
    ]

    found = [url for body in bodies for url in links(body)]
    assert len(found) > 40
    for url in found:
        assert url.startswith(f"{BASE}/"), url


def test_forwarded_host_is_ignored_unless_configured(admin_api: APIClient) -> None:
    response = send(
        admin_api,
        "POST",
        MO,
        {"name": "p"},
        HTTP_X_FORWARDED_HOST="proxy.example.com",
        HTTP_X_FORWARDED_PROTO="https",
        **JSON,
    )

    assert response["Location"].startswith(f"{BASE}{MO}/")
    assert all(url.startswith(f"{BASE}/") for url in links(response.json()))


def test_forwarded_host_and_proto_are_honoured_when_configured(
    admin_api: APIClient, settings: Any
) -> None:
    settings.USE_X_FORWARDED_HOST = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    headers = {"HTTP_X_FORWARDED_HOST": "proxy.example.com", "HTTP_X_FORWARDED_PROTO": "https"}

    created = send(admin_api, "POST", MO, {"name": "p"}, **headers, **JSON)
    listed = admin_api.get(f"{MO}?pageSize=1&currentPage=2", **headers).json()
    host_only = admin_api.get(MO, HTTP_X_FORWARDED_HOST="proxy.example.com:8443").json()

    root = "https://proxy.example.com/"
    assert created["Location"].startswith(f"{root}inventory/managedObjects/")
    found = list(links(created.json())) + list(links(listed))
    assert found
    assert all(url.startswith(root) for url in found), found
    assert host_only["self"].startswith("http://proxy.example.com:8443/inventory/managedObjects?")


# --- §2 Content-Length on every response ----------------------------------------------------------


def test_content_length_on_every_kind_of_response(
    admin_api: APIClient, anon_api: APIClient, nobody_api: APIClient, settings: Any
) -> None:
    device = DeviceFactory()
    doomed = DeviceFactory()
    # (status, response, body expected empty)
    responses = [
        (200, admin_api.get(f"{MO}/{device.pk}"), False),
        (200, admin_api.get(MO), False),
        (201, send(admin_api, "POST", MO, {"name": "x"}), True),
        (201, send(admin_api, "POST", MO, {"name": "x"}, **JSON), False),
        (200, send(admin_api, "PUT", f"{MO}/{device.pk}", {"name": "y"}), True),
        (204, admin_api.delete(f"{MO}/{doomed.pk}"), True),
        (400, send(admin_api, "POST", MO, b"{oops"), False),
        (401, anon_api.get(MO), False),
        (403, nobody_api.get("/inventory"), False),
        (404, admin_api.get(f"{MO}/{doomed.pk}"), False),
        (404, admin_api.get("/nope"), False),
        (405, send(admin_api, "PATCH", MO, {}), False),
        (415, send(admin_api, "POST", MO, b"x", content_type="text/plain"), False),
        (422, send(admin_api, "POST", MO, [1]), False),
    ]
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10
    responses.append((413, send(admin_api, "POST", MO, {"name": "x" * 20}), False))

    for status, response, empty in responses:
        assert response.status_code == status
        assert_content_length(response)
        assert (response["Content-Length"] == "0") is empty, (status, response.content)


# --- §6 errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"{", b"{not json}", b"{'name': 'x'}", b"[1,", b"\xff\xfe", b"nul"]
)
def test_malformed_json_is_400(
    admin_api: APIClient, row_counts: Callable[[], dict[str, int]], body: bytes
) -> None:
    device = DeviceFactory(name="kept")
    before = row_counts()

    for method, path in [
        ("POST", MO),
        ("PUT", f"{MO}/{device.pk}"),
        ("POST", f"{MO}/{device.pk}/childDevices"),
        ("POST", f"/identity/globalIds/{device.pk}/externalIds"),
    ]:
        assert_error(send(admin_api, method, path, body, **JSON), 400, "general/badRequest")
    assert row_counts() == before
    device.refresh_from_db()
    assert device.name == "kept"


def test_unauthenticated_is_401(anon_api: APIClient, row_counts: Any) -> None:
    before = row_counts()

    for response in (anon_api.get(MO), send(anon_api, "POST", MO, {"name": "x"})):
        assert_error(response, 401, "security/Unauthorized")
        assert response["WWW-Authenticate"] == 'Basic realm="Cumulocity"'
    assert row_counts() == before


def test_forbidden_is_403_access_is_denied(nobody_api: APIClient, row_counts: Any) -> None:
    before = row_counts()

    for response in (nobody_api.get("/inventory"), send(nobody_api, "POST", MO, {"name": "x"})):
        body = assert_error(response, 403, "security/Forbidden")
        assert body["message"] == "Access is denied"
    assert row_counts() == before


def test_unknown_id_is_404(admin_api: APIClient, row_counts: Any) -> None:
    missing = DeviceFactory().pk + 1000
    before = row_counts()

    for response in [
        admin_api.get(f"{MO}/{missing}"),
        send(admin_api, "PUT", f"{MO}/{missing}", {"name": "x"}),
        admin_api.delete(f"{MO}/{missing}"),
        admin_api.get(f"{MO}/{missing}/childDevices"),
        send(admin_api, "POST", f"{MO}/{missing}/childDevices", {"name": "new child"}),
        admin_api.get(f"/identity/globalIds/{missing}/externalIds"),
    ]:
        body = assert_error(response, 404, "inventory/Not Found")
        assert str(missing) in body["message"]
    assert_error(admin_api.get("/identity/externalIds/c8y_Serial/none"), 404, "identity/Not Found")
    assert row_counts() == before


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/nope/",
        "/inventory/nope/x",
        "/inventory/managedObjects/1/childThings",
        "/api/inventory/managedObjects",
        "/devicecontrol/newDeviceRequests/x/y",
        "/event/events",
    ],
)
def test_unknown_path_is_404_in_the_error_shape(admin_api: APIClient, path: str) -> None:
    for method in ("GET", "POST", "PUT", "DELETE"):
        body = assert_error(send(admin_api, method, path, {"a": 1}, **JSON), 404)
        assert body["error"].endswith("/Not Found")


@pytest.mark.parametrize("pk", ["abc", "-1", "1.5", "%20", "12abc", "0x10"])
def test_non_numeric_id_is_404(admin_api: APIClient, row_counts: Any, pk: str) -> None:
    before = row_counts()

    for response in [
        admin_api.get(f"{MO}/{pk}"),
        send(admin_api, "PUT", f"{MO}/{pk}", {"name": "x"}),
        admin_api.delete(f"{MO}/{pk}"),
        admin_api.get(f"{MO}/{pk}/childDevices"),
        admin_api.get(f"/identity/globalIds/{pk}/externalIds"),
    ]:
        assert_error(response, 404, "inventory/Not Found")
    assert row_counts() == before


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", MO, {"GET", "POST"}),
        ("PATCH", "{one}", {"GET", "PUT", "DELETE"}),
        ("PUT", MO, {"GET", "POST"}),
        ("POST", "/platform", {"GET"}),
        ("DELETE", "/platform", {"GET"}),
        ("PUT", "/user/currentUser", {"GET"}),
        ("POST", "/tenant/currentTenant", {"GET"}),
        ("POST", "/inventory", {"GET"}),
        ("PUT", "/identity/externalIds/c8y_Serial/x", {"GET", "DELETE"}),
    ],
)
def test_unsupported_method_is_405_with_allow(
    admin_api: APIClient, row_counts: Any, method: str, path: str, allowed: set[str]
) -> None:
    path = path.format(one=f"{MO}/{DeviceFactory().pk}")
    before = row_counts()

    response = send(admin_api, method, path, {"name": "x"}, **JSON)

    assert_error(response, 405, "general/methodNotAllowed")
    allow = {item.strip() for item in response["Allow"].split(",")}
    assert allowed <= allow
    assert method not in allow
    assert row_counts() == before


@pytest.mark.parametrize(
    "path",
    ["/inventory", MO, "{one}", "{one}/childDevices", "/identity", "/platform", "/devicecontrol"],
)
def test_options_is_405(admin_api: APIClient, anon_api: APIClient, path: str) -> None:
    path = path.format(one=f"{MO}/{DeviceFactory().pk}")

    assert_error(admin_api.options(path), 405, "general/methodNotAllowed")
    assert_error(anon_api.options(path), 401, "security/Unauthorized")


def test_options_on_login_options_is_405(anon_api: APIClient) -> None:
    assert_error(anon_api.options("/tenant/loginOptions"), 405, "general/methodNotAllowed")


def test_head_is_answered_like_get(
    admin_api: APIClient, nobody_api: APIClient, anon_api: APIClient
) -> None:
    device = DeviceFactory()
    link(device, DeviceFactory())

    for path in ("/inventory", MO, f"{MO}/{device.pk}", f"{MO}/{device.pk}/childDevices"):
        got = admin_api.get(path)
        head = admin_api.head(path)
        assert head.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head["Content-Type"] == got["Content-Type"]
        assert head["Content-Length"] == got["Content-Length"]
    assert nobody_api.head("/platform").status_code == 200
    assert nobody_api.head("/inventory").status_code == 403
    assert nobody_api.head(f"{MO}/{device.pk}").status_code == 403
    assert nobody_api.head(f"{MO}/{device.pk + 1000}").status_code == 404
    assert anon_api.head(MO).status_code == 401


def test_oversized_body_is_413(admin_api: APIClient, row_counts: Any, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    device = DeviceFactory(name="kept")
    big = {"name": "x" * 200}
    before = row_counts()

    for method, path in [
        ("POST", MO),
        ("PUT", f"{MO}/{device.pk}"),
        ("POST", f"{MO}/{device.pk}/childDevices"),
        ("POST", f"/identity/globalIds/{device.pk}/externalIds"),
    ]:
        assert_error(
            send(admin_api, method, path, big, **JSON), 413, "general/requestEntityTooLarge"
        )
    assert row_counts() == before
    # Just under the limit is fine.
    assert send(admin_api, "POST", MO, {"name": "x" * 80}, **JSON).status_code == 201


def asgi_post(path: str, body: bytes, *headers: tuple[str, str]) -> Any:
    """A POST through Django's ASGI request path carrying exactly `headers` (plus Host, Accept and
    the admin's credentials): unlike the WSGI test client, it can leave out Content-Length (a
    chunked body, as uvicorn passes it on) or Content-Type."""
    scope = {
        "method": "POST",
        "path": path,
        "query_string": "",
        "headers": [
            (b"host", b"testserver"),
            (b"accept", b"application/json"),
            (b"authorization", basic("t100/admin", PASSWORD).encode()),
            *((name.encode(), value.encode()) for name, value in headers),
        ],
        "_body_file": FakePayload(body),
    }
    return async_to_sync(AsyncClient().request)(**scope)


CHUNKED = (("transfer-encoding", "chunked"), ("content-type", "application/json"))


def test_chunked_body_is_read(admin: Any) -> None:
    response = asgi_post(MO, b'{"name": "chunked", "c8y_IsDevice": {}}', *CHUNKED)

    assert response.status_code == 201, response.content
    assert response.json()["name"] == "chunked"
    assert ManagedObject.objects.get(pk=response.json()["id"]).is_device


def test_oversized_chunked_body_is_413(admin: Any, row_counts: Any, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    before = row_counts()

    response = asgi_post(MO, json.dumps({"name": "x" * 200}).encode(), *CHUNKED)

    assert_error(response, 413, "general/requestEntityTooLarge")
    assert_content_length(response)
    assert row_counts() == before


@pytest.mark.parametrize(
    "body", [b"[]", b'[{"name": "x"}]', b'"a string"', b"42", b"1.5", b"true", b"null"]
)
def test_json_that_is_not_an_object_is_422(
    admin_api: APIClient, row_counts: Any, body: bytes
) -> None:
    device = DeviceFactory(name="kept")
    before = row_counts()

    for method, path in [
        ("POST", MO),
        ("PUT", f"{MO}/{device.pk}"),
        ("POST", f"{MO}/{device.pk}/childDevices"),
        ("POST", f"/identity/globalIds/{device.pk}/externalIds"),
    ]:
        response = send(admin_api, method, path, body, **JSON)
        assert_error(response, 422, "undefined/validationError")
        assert response["Content-Type"] == ERROR_TYPE
    assert row_counts() == before
    device.refresh_from_db()
    assert device.name == "kept"


# --- §5 paging ------------------------------------------------------------------------------------


@pytest.fixture
def seven(admin: Any) -> list[int]:
    """Seven objects, four of them with fragment `c8y_Marked`; their IDs in ascending order."""
    return [
        ManagedObjectFactory(fragments={"c8y_Marked": {}} if i % 2 == 0 else {}).pk
        for i in range(7)
    ]


def ids_of(body: dict[str, Any]) -> list[int]:
    return [int(mo["id"]) for mo in body["managedObjects"]]


def test_default_page(admin_api: APIClient, seven: list[int]) -> None:
    body = admin_api.get(MO).json()

    assert ids_of(body) == seven[:5]
    assert body["statistics"] == {"pageSize": 5, "currentPage": 1}
    assert body["self"] == f"{BASE}{MO}?pageSize=5&currentPage=1"
    assert body["next"] == f"{BASE}{MO}?pageSize=5&currentPage=2"
    assert "prev" not in body


def test_pages_in_order_and_past_the_end(admin_api: APIClient, seven: list[int]) -> None:
    second = admin_api.get(f"{MO}?pageSize=3&currentPage=3").json()
    past = admin_api.get(f"{MO}?pageSize=3&currentPage=4")
    far = admin_api.get(f"{MO}?pageSize=3&currentPage=1000")

    assert ids_of(second) == seven[6:]
    assert past.status_code == far.status_code == 200
    assert past.json()["managedObjects"] == far.json()["managedObjects"] == []
    assert past.json()["statistics"] == {"pageSize": 3, "currentPage": 4}
    assert past.json()["prev"] == f"{BASE}{MO}?pageSize=3&currentPage=3"
    assert past.json()["next"] == f"{BASE}{MO}?pageSize=3&currentPage=5"
    # Following `next` from page 1 visits every object once.
    seen: list[int] = []
    url = f"{MO}?pageSize=2"
    while True:
        page = admin_api.get(url).json()
        if not page["managedObjects"]:
            break
        seen += ids_of(page)
        url = page["next"]
    assert seen == seven


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "1e2"])
def test_bad_page_size_is_422(admin_api: APIClient, value: str) -> None:
    assert_error(admin_api.get(f"{MO}?pageSize={value}"), 422, "undefined/validationError")


@pytest.mark.parametrize("value", ["0", "-3", "x", "2.0"])
def test_bad_current_page_is_422(admin_api: APIClient, value: str) -> None:
    assert_error(admin_api.get(f"{MO}?currentPage={value}"), 422, "undefined/validationError")


def test_page_size_above_2000_is_trimmed(admin_api: APIClient, seven: list[int]) -> None:
    for value in ("2001", "100000"):
        body = admin_api.get(f"{MO}?pageSize={value}").json()
        assert body["statistics"]["pageSize"] == 2000
        assert ids_of(body) == seven
        assert query_of(body["next"])["pageSize"] == ["2000"]
        assert query_of(body["self"])["pageSize"] == ["2000"]
    assert admin_api.get(f"{MO}?pageSize=2000").json()["statistics"]["pageSize"] == 2000


@pytest.mark.parametrize(
    ("page_size", "pages"), [(1, 7), (2, 4), (3, 3), (6, 2), (7, 1), (8, 1), (2000, 1)]
)
def test_totals_are_exact(
    admin_api: APIClient, seven: list[int], page_size: int, pages: int
) -> None:
    body = admin_api.get(
        f"{MO}?pageSize={page_size}&withTotalPages=true&withTotalElements=true"
    ).json()

    assert body["statistics"] == {
        "pageSize": page_size,
        "currentPage": 1,
        "totalPages": pages,
        "totalElements": 7,
    }


def test_totals_one_at_a_time_and_any_case(admin_api: APIClient, seven: list[int]) -> None:
    pages = admin_api.get(f"{MO}?pageSize=2&withTotalPages=TRUE").json()["statistics"]
    elements = admin_api.get(f"{MO}?pageSize=2&withTotalElements=True").json()["statistics"]
    neither = admin_api.get(f"{MO}?pageSize=2&withTotalPages=false&withTotalElements=FALSE").json()[
        "statistics"
    ]

    assert pages == {"pageSize": 2, "currentPage": 1, "totalPages": 4}
    assert elements == {"pageSize": 2, "currentPage": 1, "totalElements": 7}
    assert neither == {"pageSize": 2, "currentPage": 1}


def test_totals_under_a_filter(admin_api: APIClient, seven: list[int]) -> None:
    marked = admin_api.get(
        f"{MO}?fragmentType=c8y_Marked&pageSize=3&currentPage=2"
        "&withTotalPages=true&withTotalElements=true"
    ).json()
    none = admin_api.get(
        f"{MO}?fragmentType=c8y_Nothing&withTotalPages=true&withTotalElements=true"
    ).json()

    assert ids_of(marked) == [seven[6]]
    assert marked["statistics"]["totalElements"] == 4
    assert marked["statistics"]["totalPages"] == 2
    assert none["managedObjects"] == []
    assert none["statistics"]["totalElements"] == 0
    assert none["statistics"]["totalPages"] == 0


def test_totals_for_a_user_who_sees_only_their_own(
    make_user: Callable[..., Any],
    client_for: Callable[..., APIClient],
    seven: list[int],
) -> None:
    client = client_for(make_user("Owner1", groups=["devices"]))
    own = [ManagedObjectFactory(owner="owner1", fragments={"c8y_Marked": {}}).pk for _ in range(3)]
    own.append(ManagedObjectFactory(owner="Owner1").pk)

    everything = client.get(f"{MO}?pageSize=3&withTotalPages=true&withTotalElements=true").json()
    marked = client.get(
        f"{MO}?fragmentType=c8y_Marked&pageSize=2&currentPage=2"
        "&withTotalPages=true&withTotalElements=true"
    ).json()

    assert ids_of(everything) == own[:3]
    assert everything["statistics"]["totalElements"] == 4
    assert everything["statistics"]["totalPages"] == 2
    assert ids_of(marked) == own[2:3]
    assert marked["statistics"]["totalElements"] == 3
    assert marked["statistics"]["totalPages"] == 2


@pytest.mark.parametrize("name", ["withTotalPages", "withTotalElements"])
@pytest.mark.parametrize("value", ["yes", "1", "maybe"])
def test_bad_total_flag_is_422(admin_api: APIClient, name: str, value: str) -> None:
    assert_error(admin_api.get(f"{MO}?{name}={value}"), 422, "undefined/validationError")


def test_links_keep_every_original_parameter(admin_api: APIClient, seven: list[int]) -> None:
    body = admin_api.get(
        f"{MO}?fragmentType=c8y_Marked&bulkId=5&foo=bar&foo=baz&empty="
        "&withTotalPages=true&pageSize=1&currentPage=2&text=a%20b"
    ).json()

    expected_rest = {
        "fragmentType": ["c8y_Marked"],
        "bulkId": ["5"],
        "foo": ["bar", "baz"],
        "empty": [""],
        "withTotalPages": ["true"],
        "text": ["a b"],
    }
    for key, page in (("self", 2), ("next", 3), ("prev", 1)):
        url = body[key]
        assert url.startswith(f"{BASE}{MO}?"), url
        assert query_of(url) == {
            **expected_rest,
            "pageSize": ["1"],
            "currentPage": [str(page)],
        }, key
        # Each link is usable as it is.
        followed = admin_api.get(url).json()
        assert followed["self"] == url


def test_links_add_the_effective_paging_parameters(admin_api: APIClient, seven: list[int]) -> None:
    body = admin_api.get(f"{MO}?type=none").json()

    assert query_of(body["self"]) == {"type": ["none"], "pageSize": ["5"], "currentPage": ["1"]}
    assert query_of(body["next"]) == {"type": ["none"], "pageSize": ["5"], "currentPage": ["2"]}


def test_unknown_query_parameters_are_ignored(admin_api: APIClient, seven: list[int]) -> None:
    plain = admin_api.get(f"{MO}?pageSize=10").json()
    noisy = admin_api.get(f"{MO}?pageSize=10&bulkId=1&unknown=%3F&x[]=1&withNothing=maybe").json()

    assert ids_of(noisy) == ids_of(plain) == seven


def test_other_collections_page_the_same_way(admin_api: APIClient) -> None:
    parent = DeviceFactory()
    children = [DeviceFactory() for _ in range(3)]
    link(parent, *children)
    for i in range(3):
        ExternalIdFactory(managed_object=parent, external_id=f"page-{i}")

    references = admin_api.get(
        f"{MO}/{parent.pk}/childDevices?pageSize=2&currentPage=2&withTotalElements=true"
    ).json()
    external = admin_api.get(
        f"/identity/globalIds/{parent.pk}/externalIds?withTotalPages=true&pageSize=2"
    ).json()

    assert [ref["managedObject"]["id"] for ref in references["references"]] == [str(children[2].pk)]
    assert references["statistics"] == {"pageSize": 2, "currentPage": 2, "totalElements": 3}
    assert query_of(references["prev"])["currentPage"] == ["1"]
    assert query_of(references["next"])["withTotalElements"] == ["true"]
    assert external["statistics"] == {"pageSize": 2, "currentPage": 1, "totalPages": 2}
    assert "prev" not in external
    assert_error(admin_api.get(f"{MO}/{parent.pk}/childDevices?pageSize=0"), 422)
    assert_error(admin_api.get(f"/identity/globalIds/{parent.pk}/externalIds?currentPage=x"), 422)


# --- §3 IDs and dates -----------------------------------------------------------------------------


def test_ids_are_strings_that_increase(admin_api: APIClient) -> None:
    ids = []
    for i in range(4):
        body = send(admin_api, "POST", MO, {"name": f"n{i}"}, **JSON).json()
        assert isinstance(body["id"], str)
        assert body["id"].isdigit()
        ids.append(int(body["id"]))
    parent = send(admin_api, "POST", MO, {"name": "p"}, **JSON).json()
    reference = send(
        admin_api,
        "POST",
        f"{MO}/{parent['id']}/childDevices",
        {"managedObject": {"id": ids[0]}},  # a JSON number is accepted as an ID
        **JSON,
    ).json()

    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert int(parent["id"]) > ids[-1]
    assert reference["managedObject"]["id"] == str(ids[0])
    listed = admin_api.get(f"{MO}/{parent['id']}").json()
    assert listed["childDevices"]["references"][0]["managedObject"]["id"] == str(ids[0])
    external = send(
        admin_api,
        "POST",
        f"/identity/globalIds/{parent['id']}/externalIds",
        {"type": "c8y_Serial", "externalId": "id-1"},
        **JSON,
    ).json()
    assert external["managedObject"]["id"] == parent["id"]


def test_dates_have_milliseconds_and_z(admin_api: APIClient) -> None:
    created = send(admin_api, "POST", MO, {"name": "d"}, **JSON).json()
    updated = send(admin_api, "PUT", created["self"], {"name": "e"}, **JSON).json()

    for body in (created, updated, admin_api.get(MO).json()["managedObjects"][0]):
        assert DATE.match(body["creationTime"]), body["creationTime"]
        assert DATE.match(body["lastUpdated"]), body["lastUpdated"]
    assert updated["creationTime"] == created["creationTime"]
    assert updated["lastUpdated"] >= created["lastUpdated"]


# --- §1 headers: X-HTTP-METHOD, processing mode, application key ----------------------------------


def test_x_http_method_put_on_post(admin_api: APIClient) -> None:
    device = DeviceFactory(name="old")

    response = send(
        admin_api, "POST", f"{MO}/{device.pk}", {"name": "new"}, HTTP_X_HTTP_METHOD="PUT", **JSON
    )

    assert response.status_code == 200
    assert response.json()["name"] == "new"
    device.refresh_from_db()
    assert device.name == "new"


def test_x_http_method_delete_on_post(admin_api: APIClient) -> None:
    device = DeviceFactory()

    response = send(admin_api, "POST", f"{MO}/{device.pk}", None, HTTP_X_HTTP_METHOD="delete")

    assert response.status_code == 204
    assert not ManagedObject.objects.filter(pk=device.pk).exists()


def test_x_http_method_get_on_post(admin_api: APIClient) -> None:
    device = DeviceFactory()

    response = send(admin_api, "POST", MO, None, HTTP_X_HTTP_METHOD="GET")

    assert response.status_code == 200
    assert ids_of(response.json()) == [device.pk]


def test_x_http_method_is_only_honoured_on_post(admin_api: APIClient) -> None:
    device = DeviceFactory()

    response = send(admin_api, "GET", f"{MO}/{device.pk}", None, HTTP_X_HTTP_METHOD="DELETE")

    assert response.status_code == 200
    assert ManagedObject.objects.filter(pk=device.pk).exists()


@pytest.mark.parametrize(
    "mode",
    ["PERSISTENT", "TRANSIENT", "QUIESCENT", "CEP", "persistent", "Transient", "quiescent", "cep"],
)
def test_processing_modes_are_accepted(admin_api: APIClient, mode: str) -> None:
    device = DeviceFactory()
    headers = {"HTTP_X_CUMULOCITY_PROCESSING_MODE": mode, **JSON}

    assert send(admin_api, "POST", MO, {"name": "m"}, **headers).status_code == 201
    assert send(admin_api, "PUT", f"{MO}/{device.pk}", {"name": "m"}, **headers).status_code == 200
    assert admin_api.get(MO, **headers).status_code == 200


@pytest.mark.parametrize("mode", ["FOO", "PERSISTENT,TRANSIENT", "ASYNC"])
def test_unknown_processing_mode_is_422(admin_api: APIClient, row_counts: Any, mode: str) -> None:
    before = row_counts()

    response = send(
        admin_api, "POST", MO, {"name": "m"}, HTTP_X_CUMULOCITY_PROCESSING_MODE=mode, **JSON
    )

    body = assert_error(response, 422, "undefined/validationError")
    assert "X-Cumulocity-Processing-Mode" in body["message"]
    assert row_counts() == before


def test_application_key_is_ignored(admin_api: APIClient) -> None:
    headers = {"HTTP_X_CUMULOCITY_APPLICATION_KEY": "some-app-key", **JSON}

    created = send(admin_api, "POST", MO, {"name": "k"}, **headers)

    assert created.status_code == 201
    assert admin_api.get(created.json()["self"], **headers).json()["name"] == "k"


# --- a query-count ceiling on the list endpoint (STYLE.md §12) ------------------------------------


def build_parents(count: int, group: ManagedObject) -> None:
    """`count` devices of type c8y_Parent, each with 3 child devices and 2 child assets, all in
    `group` (so each has an asset parent)."""
    for _ in range(count):
        parent = DeviceFactory(type="c8y_Parent")
        link(parent, *(DeviceFactory(type="c8y_Child") for _ in range(3)))
        link(parent, *(ManagedObjectFactory() for _ in range(2)), relation=Relation.ASSET)
        link(group, parent, relation=Relation.ASSET)


def test_listing_does_not_grow_with_the_number_of_objects(
    admin_api: APIClient, django_assert_max_num_queries: Any
) -> None:
    url = f"{MO}?type=c8y_Parent&pageSize=50&withParents=true&withTotalPages=true"
    group = GroupFactory()
    admin_api.get("/platform")  # authenticate once, as a long-running agent would have
    build_parents(10, group)

    with CaptureQueriesContext(connection) as ten:
        small = admin_api.get(url)
    build_parents(40, group)
    admin_api.get("/platform")  # roles cached again, however long building took (their TTL)
    with django_assert_max_num_queries(LIST_QUERY_CEILING) as fifty:
        large = admin_api.get(url)

    assert len(fifty.captured_queries) == len(ten.captured_queries)
    assert len(small.json()["managedObjects"]) == 10
    body = large.json()
    assert body["statistics"]["totalPages"] == 1
    assert len(body["managedObjects"]) == 50
    for mo in body["managedObjects"]:
        assert len(mo["childDevices"]["references"]) == 3
        assert len(mo["childAssets"]["references"]) == 2
        assert [ref["managedObject"]["id"] for ref in mo["assetParents"]["references"]] == [
            str(group.pk)
        ]


def test_processing_mode_is_checked_after_authentication(anon_api: APIClient) -> None:
    """auth.md §6: 401 comes before any validation, the processing-mode header included."""
    response = anon_api.post(
        "/inventory/managedObjects", {}, format="json", HTTP_X_CUMULOCITY_PROCESSING_MODE="BOGUS"
    )
    assert_error(response, 401, "security/Unauthorized")


@pytest.mark.parametrize("method", ["post", "put"])
def test_missing_body_is_422_and_writes_nothing(
    admin_api: APIClient, row_counts: Callable[[], dict[str, int]], method: str
) -> None:
    """No body at all is not `{}`: POST/PUT of a managed object without one is refused."""
    created = admin_api.post(
        "/inventory/managedObjects", {"name": "x"}, format="json", HTTP_ACCEPT="application/json"
    )
    path = "/inventory/managedObjects" if method == "post" else created.json()["self"]
    before = row_counts()
    response = getattr(admin_api, method)(path, content_type="application/json")
    body = assert_error(response, 422, "undefined/validationError")
    assert "missing" in body["message"]
    assert row_counts() == before
