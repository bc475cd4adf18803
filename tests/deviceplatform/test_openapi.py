"""The OpenAPI description (deviceplatform/schema.py, README "API description (OpenAPI)"): a
valid OpenAPI 3.1 document, served without credentials, naming every URL pattern and method the
server answers, and describing real answers: bodies of a set of endpoints (success and errors,
plain JSON and vendor media types) are validated against the document's schemas."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from django.conf import settings
from django.urls import URLPattern, URLResolver, get_resolver
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from openapi_spec_validator.versions.shortcuts import get_spec_version
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from deviceplatform.api.openapi_views import schema_document
from deviceplatform.roles import Role
from deviceplatform.schema import PATH_NAMES
from tests.factories import ManagedObjectFactory

METHODS = ("get", "post", "put", "delete")
# Plain (non-DRF) views and the methods they answer; any other plain view fails the coverage test.
PLAIN_VIEWS = {
    "long_polling": {"post"},
    "operation_create_and_wait": {"post"},
    "live_view": {"get"},
    "ready_view": {"get"},
    "metrics_view": {"get"},
}
ANONYMOUS = ("/tenant/loginOptions", "/health/live", "/health/ready", "/metrics")
NOT_API = ("admin/", "static/", "openapi", "docs")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return schema_document()


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert str(get_spec_version(document)) == "OpenAPIV3.1"
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema and its references


def test_served_without_credentials_as_json_and_yaml(client: Any, document: dict[str, Any]) -> None:
    as_json = client.get("/openapi.json")
    assert as_json.status_code == 200
    assert as_json["Content-Type"] == "application/json"
    assert orjson.loads(as_json.content) == orjson.loads(orjson.dumps(document))
    as_yaml = client.get("/openapi.yaml")
    assert as_yaml.status_code == 200
    assert yaml.safe_load(as_yaml.content) == orjson.loads(as_json.content)
    assert client.post("/openapi.json").status_code == 405


def test_docs_page_loads_swagger_ui_from_our_static_files(client: Any) -> None:
    for path in ("/docs/", "/docs"):
        page = client.get(path)
        assert page.status_code == 200
        html = page.content.decode()
        assert "/openapi.json" in html
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
        assert any("swagger-ui-bundle" in asset for asset in assets), html
        assert not re.search(r'(?:src|href)="https?://', html), "no CDN"
        for asset in assets:  # hashed names from the manifest, present in STATIC_ROOT
            assert (Path(settings.STATIC_ROOT) / asset.removeprefix("/static/")).is_file(), asset


def _openapi_path(regex: str) -> str:
    """`^inventory/managedObjects/(?P<pk>[^/]+)/?$` -> `/inventory/managedObjects/{id}`."""
    path = regex.removeprefix("^").removesuffix("$").removesuffix("/?")
    path = re.sub(r"\(\?:/\(\?P<\w+>[^)]*\)\)\?", "", path)  # optional suffixes (realtime)
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", path).replace("{pk}", "{id}")
    for old, new in PATH_NAMES.items():
        path = path.replace(old, new)
    return "/" + path.rstrip("/")


def _served() -> dict[str, set[str]]:
    """Every API path of the URL configuration and the methods its view implements."""
    served: dict[str, set[str]] = {}

    def walk(patterns: list[Any], prefix: str) -> None:
        for pattern in patterns:
            regex = prefix + str(pattern.pattern.regex.pattern).removeprefix("^")
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, regex)
                continue
            assert isinstance(pattern, URLPattern)
            if regex.startswith(NOT_API):
                continue
            view_class = getattr(pattern.callback, "cls", None)
            if view_class is not None:
                methods = {method for method in METHODS if hasattr(view_class, method)}
            else:
                name = pattern.callback.__name__
                assert name in PLAIN_VIEWS, f"describe {name} ({regex}) in a schema.py"
                methods = PLAIN_VIEWS[name]
            if methods:
                served.setdefault(_openapi_path(regex), set()).update(methods)

    walk(get_resolver().url_patterns, "")
    return served


def test_every_path_and_method_is_described(document: dict[str, Any]) -> None:
    served = _served()
    described = {
        path: {method for method in item if method in METHODS}
        for path, item in document["paths"].items()
    }
    assert described == served
    assert len(served) > 30


def test_every_operation_is_described_explicitly(document: dict[str, Any]) -> None:
    """A summary, typed 2xx bodies (no drf-spectacular fallback), the error shape for errors,
    a security requirement unless anonymous, and no parameter left untyped."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert operation.get("summary"), where
            responses = operation["responses"]
            assert any(code.startswith("2") for code in responses), where
            for code, response in responses.items():
                if "$ref" in response:
                    continue
                for media_type, content in response.get("content", {}).items():
                    schema = content["schema"]
                    assert schema.get("description") != "Unspecified response body", where
                    if not code.startswith("2") and (path, code) != ("/health/ready", "503"):
                        assert schema == {"$ref": "#/components/schemas/Error"}, where
                        assert media_type.endswith("error+json"), where
            if path not in ANONYMOUS:
                assert "401" in responses, where
                assert operation.get("security"), where
            for parameter in operation.get("parameters", []):
                assert "schema" in parameter, (where, parameter)
            if "{" in path:
                assert "404" in responses, where
            if "requestBody" in operation and operation["tags"] != ["realtime"]:
                assert {"400", "413", "415", "422"} <= set(responses), where


def test_vendor_media_types_roles_and_extensions_are_named(document: dict[str, Any]) -> None:
    operation = document["paths"]["/devicecontrol/operations"]["post"]
    assert set(operation["requestBody"]["content"]) == {
        "application/json",
        "application/vnd.com.nsn.cumulocity.operation+json",
    }
    assert set(operation["responses"]["201"]["content"]) == set(operation["requestBody"]["content"])
    assert "Location" in operation["responses"]["201"]["headers"]
    assert "`ROLE_DEVICE_CONTROL_ADMIN`" in operation["description"]
    names = {parameter["name"] for parameter in operation["parameters"]}
    assert {"Idempotency-Key", "X-Cumulocity-Processing-Mode"} <= names
    listing = document["paths"]["/devicecontrol/operations"]["get"]
    names = {parameter["name"] for parameter in listing["parameters"]}
    assert {"pageSize", "currentPage", "withTotalPages", "status", "agentId", "revert"} <= names
    assert {"If-Match"} <= {
        p["name"] for p in document["paths"]["/inventory/managedObjects/{id}"]["put"]["parameters"]
    }
    assert document["components"]["securitySchemes"]["basicAuth"]["scheme"] == "basic"
    assert document["paths"]["/tenant/loginOptions"]["get"]["security"] == []
    realtime = document["paths"]["/notification/realtime"]["post"]
    assert "docs/api/realtime.md" in realtime["description"]
    assert "/devicecontrol/operations/{id}/cancel" in document["paths"]


# --- real answers against the document ------------------------------------------------------------


class Conformance:
    """Validates a test-client response against the document's response for its path and method."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource("urn:openapi", resource)
        self.checked: set[tuple[str, str, str]] = set()

    def response_of(self, path: str, method: str, status: int) -> dict[str, Any]:
        responses = self.document["paths"][path][method]["responses"]
        assert str(status) in responses, f"{method.upper()} {path}: {status} not described"
        response = responses[str(status)]
        if "$ref" in response:
            response = self.document["components"]["responses"][response["$ref"].split("/")[-1]]
        return response

    def __call__(self, response: Any, path: str, method: str) -> dict[str, Any] | None:
        described = self.response_of(path, method, response.status_code)
        self.checked.add((path, method, str(response.status_code)))
        if not response.content:
            return None
        content_type = response["Content-Type"].split(";")[0].strip().lower()
        content = described.get("content", {})
        assert content_type in content, (path, method, response.status_code, content_type)
        # The schema as written, its references pointing into the whole document.
        schema = orjson.loads(
            orjson.dumps(content[content_type]["schema"]).replace(b'"#/', b'"urn:openapi#/')
        )
        body = (
            orjson.loads(response.content)
            if content_type.endswith("json")
            else response.content.decode()
        )
        errors = list(Draft202012Validator(schema, registry=self.registry).iter_errors(body))
        assert not errors, (path, method, [error.message for error in errors[:3]], body)
        return body


VENDOR = "application/vnd.com.nsn.cumulocity.{}+json"


@pytest.mark.django_db
def test_real_answers_match_the_document(
    document: dict[str, Any],
    admin_api: Any,
    make_user: Callable[..., Any],
    client_for: Callable[..., Any],
) -> None:
    check = Conformance(document)
    api = admin_api
    for path in ("/platform", "/inventory", "/identity", "/devicecontrol", "/tenant/currentTenant",
                 "/user/currentUser", "/tenant/loginOptions"):  # fmt: skip
        check(api.get(path), path, "get")

    agent = ManagedObjectFactory(
        name="agent", fragments={"com_cumulocity_model_Agent": {}, "c8y_IsDevice": {}}
    )
    mo = "/inventory/managedObjects"
    created = check(
        api.post(
            mo,
            {"name": "sensor", "type": "thermo", "c8y_IsDevice": {}},
            format="json",
            HTTP_ACCEPT=VENDOR.format("managedObject"),
        ),
        mo,
        "post",
    )
    device = created["id"]
    check(
        api.post(
            f"{mo}/{agent.pk}/childDevices",
            {"managedObject": {"id": device}},
            format="json",
            HTTP_ACCEPT="application/json",
        ),
        f"{mo}/{{id}}/childDevices",
        "post",
    )
    check(api.get(mo, {"withTotalPages": "true", "pageSize": 1}), mo, "get")
    check(api.get(f"{mo}/count", {"type": "thermo"}), f"{mo}/count", "get")
    check(api.get(f"{mo}/{agent.pk}", {"withChildrenCount": "true"}), f"{mo}/{{id}}", "get")
    check(
        api.put(f"{mo}/{device}", {"c8y_Config": {"a": 1}}, format="json", HTTP_ACCEPT="*/*"),
        f"{mo}/{{id}}",
        "put",
    )
    check(api.get(f"{mo}/{agent.pk}/childDevices"), f"{mo}/{{id}}/childDevices", "get")
    check(
        api.get(f"{mo}/{agent.pk}/childDevices/{device}"),
        f"{mo}/{{id}}/childDevices/{{childId}}",
        "get",
    )
    check(api.get(f"{mo}/{device}/deviceParents"), f"{mo}/{{id}}/deviceParents", "get")
    check(api.get(f"{mo}/999999999"), f"{mo}/{{id}}", "get")  # 404 in the error shape
    check(api.get(mo, {"pageSize": "x"}), mo, "get")  # 422

    ids = f"/identity/globalIds/{device}/externalIds"
    check(
        api.post(ids, {"externalId": "SN-1", "type": "c8y_Serial"}, format="json"),
        "/identity/globalIds/{id}/externalIds",
        "post",
    )
    check(api.get(ids), "/identity/globalIds/{id}/externalIds", "get")
    check(
        api.get("/identity/externalIds/c8y_Serial/SN-1"),
        "/identity/externalIds/{type}/{externalId}",
        "get",
    )

    ops = "/devicecontrol/operations"
    operation = check(
        api.post(
            ops,
            {"deviceId": device, "description": "restart", "c8y_Restart": {}},
            format="json",
            HTTP_ACCEPT=VENDOR.format("operation"),
        ),
        ops,
        "post",
    )
    check(api.get(ops, {"agentId": agent.pk, "withTotalElements": "true"}), ops, "get")
    check(api.get(ops, {"deviceId": device, "revert": "true"}), ops, "get")
    one = f"{ops}/{operation['id']}"
    check(
        api.put(one, {"status": "FAILED", "failureReason": "no"}, format="json", HTTP_ACCEPT="*/*"),
        f"{ops}/{{id}}",
        "put",
    )
    check(api.post(f"{one}/retry", HTTP_ACCEPT="*/*"), f"{ops}/{{id}}/retry", "post")
    check(api.post(f"{one}/cancel", HTTP_ACCEPT="*/*"), f"{ops}/{{id}}/cancel", "post")  # 422
    check(api.put(one, {"status": "NOPE"}, format="json"), f"{ops}/{{id}}", "put")  # 422

    group = ManagedObjectFactory(name="group", fragments={"c8y_IsDeviceGroup": {}})
    check(
        api.post(f"{mo}/{group.pk}/childAssets", {"managedObject": {"id": device}}, format="json"),
        f"{mo}/{{id}}/childAssets",
        "post",
    )
    bulk_path = "/devicecontrol/bulkoperations"
    bulk = check(
        api.post(
            bulk_path,
            {
                "groupId": str(group.pk),
                "startDate": "2030-01-01T00:00:00Z",
                "creationRamp": 1.5,
                "operationPrototype": {"c8y_Restart": {}},
            },
            format="json",
            HTTP_ACCEPT=VENDOR.format("bulkOperation"),
        ),
        bulk_path,
        "post",
    )
    check(api.get(bulk_path), bulk_path, "get")
    check(api.get(f"{bulk_path}/{bulk['id']}"), f"{bulk_path}/{{id}}", "get")
    check(
        api.put(f"{bulk_path}/{bulk['id']}", {"creationRamp": 2}, format="json", HTTP_ACCEPT="*/*"),
        f"{bulk_path}/{{id}}",
        "put",
    )

    rollout = check(
        api.post(
            bulk_path,
            {
                "groupId": str(group.pk),
                "startDate": "2030-01-01T00:00:00Z",
                "rolloutConfig": {"maximumPerMinute": 60},
                "waves": [{"percentage": 50, "successThreshold": 90, "then": "PAUSE"},
                          {"percentage": 100}],
                "abortConfig": {"criteria": [{"failureType": "ANY", "thresholdPercentage": 20}]},
                "retryConfig": {"criteria": [{"failureType": "FAILED", "numberOfRetries": 2}]},
                "operationPrototype": {"c8y_Restart": {}},
            },
            format="json",
            HTTP_ACCEPT="application/json",
        ),
        bulk_path,
        "post",
    )  # fmt: skip
    assert rollout["rollout"]["state"]
    for action in ("pause", "resume"):
        check(
            api.post(f"{bulk_path}/{rollout['id']}/{action}", HTTP_ACCEPT="*/*"),
            f"{bulk_path}/{{id}}/{action}",
            "post",
        )
    check(
        api.delete(f"{bulk_path}/{rollout['id']}?cancelPending=true"),
        f"{bulk_path}/{{id}}",
        "delete",
    )
    retried = check(
        api.post(
            ops,
            {
                "deviceId": device,
                "c8y_Restart": {},
                "retryConfig": {"criteria": [{"failureType": "FAILED", "numberOfRetries": 1}]},
            },
            format="json",
            HTTP_ACCEPT="application/json",
        ),
        ops,
        "post",
    )
    assert retried["retryConfig"]

    for path in ("/health/live", "/health/ready", "/metrics"):
        check(api.get(path), path, "get")

    requests = "/devicecontrol/newDeviceRequests"
    check(api.post(requests, {"id": "SN-77"}, format="json", HTTP_ACCEPT="*/*"), requests, "post")
    check(api.get(requests), requests, "get")
    check(api.get(f"{requests}/SN-77"), f"{requests}/{{id}}", "get")

    reader = client_for(make_user("reader", roles=[Role.INVENTORY_READ]))
    check(reader.post(ops, {"deviceId": device}, format="json"), ops, "post")  # 403
    check(client_for(make_user("nobody"), password="wrong").get(mo), mo, "get")  # 401

    assert len(check.checked) >= 40, sorted(check.checked)
