"""The platform root and the session resources (spec platform.md): what clients call first."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from deviceplatform.roles import ALL_ROLES, Role
from tests.helpers import assert_error, basic

pytestmark = pytest.mark.django_db

VENDOR = "application/vnd.com.nsn.cumulocity.{}+json;charset=UTF-8;ver=0.9"
PLAIN_JSON = "application/json;charset=UTF-8"
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SESSION_PATHS = ["/platform", "/tenant/currentTenant", "/user/currentUser"]


@pytest.fixture
def plain_user(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    """An authenticated user with no role at all."""
    return client_for(make_user("nobody"))


# --- GET /platform --------------------------------------------------------------------------------


def test_platform_members_are_the_area_api_resources(admin_api: APIClient) -> None:
    response = admin_api.get("/platform")

    assert response.status_code == 200
    assert response["Content-Type"] == PLAIN_JSON
    body = response.json()
    assert body["self"] == "http://testserver/platform"
    assert body["inventory"] == admin_api.get("/inventory").json()
    assert body["identity"] == admin_api.get("/identity").json()
    assert body["deviceControl"] == admin_api.get("/devicecontrol").json()
    assert body["user"] == {"self": "http://testserver/user"}
    assert body["tenant"] == {"self": "http://testserver/tenant"}


def test_platform_urls_the_java_sdk_follows(admin_api: APIClient) -> None:
    body = admin_api.get("/platform").json()

    assert body["inventory"]["managedObjects"]["self"] == (
        "http://testserver/inventory/managedObjects"
    )
    assert body["deviceControl"]["operations"]["self"] == (
        "http://testserver/devicecontrol/operations"
    )
    assert body["identity"]["externalId"] == (
        "http://testserver/identity/externalIds/{type}/{externaId}"
    )
    assert body["identity"]["externalIdsOfGlobalId"] == (
        "http://testserver/identity/globalIds/{globalId}/externalIds"
    )


@pytest.mark.parametrize(
    "accept",
    [
        "application/vnd.com.nsn.cumulocity.platformApi+json;charset=UTF-8;ver=0.9",  # Java SDK
        "application/vnd.com.nsn.cumulocity.platformapi+json",
        "application/vnd.com.nsn.cumulocity.error+json, application/vnd.com.nsn.cumulocity.platformapi+json",
    ],
)
def test_platform_vendor_type_when_asked(admin_api: APIClient, accept: str) -> None:
    response = admin_api.get("/platform", HTTP_ACCEPT=accept)

    assert response.status_code == 200
    assert response["Content-Type"] == VENDOR.format("platformapi")


def test_platform_needs_no_role(plain_user: APIClient) -> None:
    response = plain_user.get("/platform")

    assert response.status_code == 200
    assert set(response.json()) >= {"self", "inventory", "identity", "deviceControl"}


# --- GET /tenant/currentTenant --------------------------------------------------------------------


def test_current_tenant_shape(plain_user: APIClient) -> None:
    response = plain_user.get(
        "/tenant/currentTenant",
        HTTP_ACCEPT="application/vnd.com.nsn.cumulocity.currentTenant+json;ver=0.9",
    )

    assert response.status_code == 200
    assert response["Content-Type"] == VENDOR.format("currenttenant")
    assert response.json() == {
        "self": "http://testserver/tenant/currentTenant",
        "name": "t100",
        "domainName": "testserver",
        "allowCreateTenants": False,
        "customProperties": {},
        "applications": {
            "self": "http://testserver/tenant/tenants/t100/applications",
            "references": [],
        },
        "ownedApplications": {"references": []},
    }


def test_current_tenant_name_follows_the_setting(
    settings: Any, make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    settings.C8Y_TENANT_ID = "t4711"
    user = make_user("agent")

    response = client_for(user, tenant="t4711").get("/tenant/currentTenant")

    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "t4711"
    assert body["applications"]["self"] == "http://testserver/tenant/tenants/t4711/applications"
    # The old tenant prefix is now a foreign tenant.
    assert_error(client_for(user, tenant="t100").get("/tenant/currentTenant"), 401)


@pytest.mark.parametrize("value", ["true", "FALSE"])
def test_current_tenant_accepts_and_ignores_with_parent(plain_user: APIClient, value: str) -> None:
    response = plain_user.get(f"/tenant/currentTenant?withParent={value}")

    assert response.status_code == 200
    assert response.json()["name"] == "t100"


def test_current_tenant_with_parent_must_be_a_boolean(plain_user: APIClient) -> None:
    assert_error(plain_user.get("/tenant/currentTenant?withParent=yes"), 422)


# --- GET /user/currentUser ------------------------------------------------------------------------


def test_current_user_of_a_reader(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    user = make_user("Reader1", groups=["readers"])
    user.first_name, user.email = "Rita", "rita@example.com"
    user.save()

    response = client_for(user).get(
        "/user/currentUser", HTTP_ACCEPT="application/vnd.com.nsn.cumulocity.currentUser+json"
    )

    assert response.status_code == 200
    assert response["Content-Type"] == VENDOR.format("currentuser")
    body = response.json()
    assert body["self"] == "http://testserver/user/currentUser"
    assert body["id"] == body["userName"] == "Reader1"
    assert body["firstName"] == "Rita"
    assert body["email"] == "rita@example.com"
    assert "lastName" not in body  # unset optional fields are omitted
    assert body["shouldResetPassword"] is False
    assert body["twoFactorAuthenticationEnabled"] is False
    assert DATE.match(body["lastPasswordChange"])
    assert body["devicePermissions"] == {}
    expected = {
        "ROLE_INVENTORY_READ",
        "ROLE_IDENTITY_READ",
        "ROLE_DEVICE_CONTROL_READ",
        "ROLE_BULK_OPERATION_READ",
        "ROLE_USER_MANAGEMENT_OWN_READ",
    }
    roles = body["effectiveRoles"]
    assert {role["id"] for role in roles} == expected
    assert len(roles) == len(expected)
    for role in roles:
        assert role == {
            "id": role["id"],
            "name": role["id"],
            "self": f"http://testserver/user/roles/{role['id']}",
        }


def test_current_user_lists_implied_roles(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    user = make_user("operator", roles=[Role.DEVICE_CONTROL_ADMIN])

    body = client_for(user).get("/user/currentUser").json()

    assert {role["id"] for role in body["effectiveRoles"]} == {
        "ROLE_DEVICE_CONTROL_ADMIN",
        "ROLE_DEVICE_CONTROL_READ",
        "ROLE_USER_MANAGEMENT_OWN_READ",
    }


def test_current_user_of_an_admin_has_every_role(admin_api: APIClient) -> None:
    body = admin_api.get("/user/currentUser").json()

    assert body["userName"] == "admin"
    assert {role["id"] for role in body["effectiveRoles"]} == {role.value for role in ALL_ROLES}


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
def test_current_user_writes_are_405(admin_api: APIClient, method: str) -> None:
    response = admin_api.generic(
        method, "/user/currentUser", b'{"firstName":"x"}', content_type="application/json"
    )

    assert_error(response, 405, "general/methodNotAllowed")
    assert "GET" in response["Allow"]
    assert method not in response["Allow"]


@pytest.mark.parametrize("method", ["PUT", "GET", "POST"])
def test_current_user_password_is_out_of_scope_405(admin_api: APIClient, method: str) -> None:
    response = admin_api.generic(
        method,
        "/user/currentUser/password",
        b'{"currentUserPassword":"a","newPassword":"b"}',
        content_type="application/json",
    )

    assert_error(response, 405, "general/methodNotAllowed")


# --- GET /tenant/loginOptions ---------------------------------------------------------------------


def test_login_options_without_credentials(anon_api: APIClient) -> None:
    response = anon_api.get("/tenant/loginOptions")

    assert response.status_code == 200
    body = response.json()
    assert body["self"] == "http://testserver/tenant/loginOptions"
    assert [option["type"] for option in body["loginOptions"]] == ["BASIC"]
    assert body["loginOptions"][0]["self"] == "http://testserver/tenant/loginOptions/basic"


def test_login_options_ignores_bad_credentials(anon_api: APIClient) -> None:
    anon_api.credentials(HTTP_AUTHORIZATION=basic("t100/ghost", "wrong"))

    response = anon_api.get("/tenant/loginOptions/")

    assert response.status_code == 200
    assert response.json()["loginOptions"][0]["type"] == "BASIC"


def test_login_options_post_is_405(anon_api: APIClient) -> None:
    response = anon_api.post("/tenant/loginOptions", {}, format="json")

    assert_error(response, 405, "general/methodNotAllowed")
    assert "GET" in response["Allow"]


# --- identity templates ---------------------------------------------------------------------------


def test_identity_templates_keep_the_java_sdk_placeholder_names(admin_api: APIClient) -> None:
    body = admin_api.get("/identity").json()

    assert body == {
        "self": "http://testserver/identity",
        "externalId": "http://testserver/identity/externalIds/{type}/{externaId}",
        "externalIdsOfGlobalId": "http://testserver/identity/globalIds/{globalId}/externalIds",
    }
    raw = admin_api.get("/platform").content
    assert b"{externaId}" in raw
    assert b"{globalId}" in raw


# --- 401 and 405 on every session resource --------------------------------------------------------


@pytest.mark.parametrize("path", SESSION_PATHS)
def test_session_resources_need_credentials(anon_api: APIClient, path: str) -> None:
    response = anon_api.get(path)

    body = assert_error(response, 401, "security/Unauthorized")
    assert body["message"]
    assert response["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize("path", SESSION_PATHS)
def test_session_resources_refuse_post_with_405(plain_user: APIClient, path: str) -> None:
    response = plain_user.post(path, {"a": 1}, format="json")

    assert_error(response, 405, "general/methodNotAllowed")
    assert "GET" in response["Allow"]
    assert "POST" not in response["Allow"]


@pytest.mark.parametrize("path", SESSION_PATHS)
def test_unauthenticated_post_is_401_before_405(anon_api: APIClient, path: str) -> None:
    assert_error(anon_api.post(path, {}, format="json"), 401, "security/Unauthorized")
