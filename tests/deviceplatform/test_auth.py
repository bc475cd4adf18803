"""Authentication, roles, the owner rule and the order of checks (spec auth.md, checklist §8).

Operations and bulk operations are not served yet: their lines of the checklist are covered by the
issues that add those endpoints."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from rest_framework.test import APIClient

from deviceplatform.api.authentication import authenticate_credentials
from deviceplatform.models import User
from deviceplatform.roles import ALL_ROLES, Role
from inventory.models import ExternalId, ManagedObject
from tests.factories import DeviceFactory, ExternalIdFactory
from tests.helpers import PASSWORD, assert_error, basic

pytestmark = pytest.mark.django_db

MO = "/inventory/managedObjects"
ACCEPT_JSON = {"HTTP_ACCEPT": "application/json"}


def header_client(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=value)
    return client


def assert_unauthorized(response: Any) -> None:
    body = assert_error(response, 401, "security/Unauthorized")
    assert body["message"] == "Invalid credentials! : Bad credentials"
    assert response["WWW-Authenticate"] == 'Basic realm="Cumulocity"'


def current_user(client: APIClient) -> str:
    response = client.get("/user/currentUser")
    assert response.status_code == 200, response.content
    return response.json()["userName"]


# --- Basic authentication (auth.md §2) ------------------------------------------------------------


@pytest.mark.parametrize("login", ["t100/admin", "admin", "ADMIN", "t100/AdMiN", "Admin"])
def test_tenant_prefixed_and_bare_logins_authenticate_case_insensitively(
    admin: User, login: str
) -> None:
    assert current_user(header_client(basic(login))) == "admin"


def test_the_fixture_clients_authenticate(
    admin: User, client_for: Callable[..., APIClient]
) -> None:
    assert current_user(client_for(admin)) == "admin"
    assert current_user(client_for(admin, tenant=None)) == "admin"


def test_password_is_split_at_the_first_colon(make_user: Callable[..., Any]) -> None:
    user = make_user("colon")
    user.set_password("a:b::c:")
    user.save()

    assert current_user(header_client(basic("t100/colon", "a:b::c:"))) == "colon"
    assert_unauthorized(header_client(basic("t100/colon", "a:b")).get("/platform"))
    assert ":" in PASSWORD  # every fixture client exercises this too


@pytest.mark.parametrize(
    "header",
    [
        basic("t999/admin"),  # a foreign tenant
        basic("/admin"),  # empty tenant
        basic("t100/"),  # empty user
        basic("t100/admin", "wrong"),
        basic("admin", ""),
        basic("ghost"),  # unknown user
        basic("t100/ghost"),
        "Basic " + base64.b64encode(b"admin").decode(),  # no colon
        "Basic " + base64.b64encode(f":{PASSWORD}".encode()).decode(),  # empty login
        "Basic %%%not-base64%%%",
        "Basic " + base64.b64encode(b"admin:\xff\xfe").decode(),  # not UTF-8
        "Basic",
        "Basic ",
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2ln",
        "Digest username=admin",
        "garbage",
    ],
)
def test_bad_credentials_are_401(admin: User, header: str) -> None:
    assert_unauthorized(header_client(header).get("/platform"))


def test_missing_header_is_401(admin: User, anon_api: APIClient) -> None:
    assert_unauthorized(anon_api.get("/platform"))
    assert_unauthorized(anon_api.get(MO))


def test_disabled_user_is_401(make_user: Callable[..., Any]) -> None:
    user = make_user("gone", groups=["admins"])
    user.is_active = False
    user.save()

    assert_unauthorized(header_client(basic("t100/gone")).get("/platform"))


def test_password_cache_follows_password_changes_and_disabling(
    make_user: Callable[..., Any],
) -> None:
    user = make_user("cached")
    old = header_client(basic("t100/cached"))
    assert current_user(old) == "cached"
    assert current_user(old) == "cached"  # second time from the cache

    user.set_password("brand:new")
    user.save()

    assert_unauthorized(old.get("/platform"))
    new = header_client(basic("t100/cached", "brand:new"))
    assert current_user(new) == "cached"
    assert current_user(new) == "cached"

    user.is_active = False
    user.save()

    assert_unauthorized(new.get("/platform"))


def test_a_wrong_password_is_never_served_from_the_cache(make_user: Callable[..., Any]) -> None:
    make_user("cached2")
    assert current_user(header_client(basic("cached2"))) == "cached2"

    assert_unauthorized(header_client(basic("cached2", PASSWORD + "x")).get("/platform"))
    assert_unauthorized(header_client(basic("cached2", PASSWORD[:-1])).get("/platform"))


@pytest.mark.django_db(transaction=True)  # the threads read the user over their own connections
def test_concurrent_checks_of_the_same_credentials_hash_once(
    make_user: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight requests with one user's right password and two with wrong ones arrive at once (an
    agent's fleet connecting): the right password is hashed once, each wrong one on its own."""
    make_user("stampede")
    checked: list[str] = []
    original = User.check_password

    def slow_check(user: User, raw_password: str) -> bool:
        checked.append(raw_password)
        time.sleep(0.2)  # long enough for every thread to arrive while the first one checks
        return original(user, raw_password)

    monkeypatch.setattr(User, "check_password", slow_check)
    passwords = [PASSWORD] * 8 + ["wrong-1", "wrong-2"]
    barrier = threading.Barrier(len(passwords))
    results: dict[int, Any] = {}

    def authenticate(index: int, password: str) -> None:
        barrier.wait()
        try:
            user = authenticate_credentials("stampede", password)
            results[index] = user.username if user is not None else None
        finally:
            connection.close()

    threads = [threading.Thread(target=authenticate, args=(i, p)) for i, p in enumerate(passwords)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [results[i] for i in range(len(passwords))] == ["stampede"] * 8 + [None, None]
    assert sorted(checked) == sorted([PASSWORD, "wrong-1", "wrong-2"])


# --- Roles and groups (auth.md §3) ----------------------------------------------------------------

API_RESOURCES = {
    "inventory": "/inventory",
    "identity": "/identity",
    "devicecontrol": "/devicecontrol",
}


def api_statuses(client: APIClient) -> dict[str, int]:
    return {name: client.get(path).status_code for name, path in API_RESOURCES.items()}


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.INVENTORY_ADMIN, "inventory"),
        (Role.IDENTITY_ADMIN, "identity"),
        (Role.DEVICE_CONTROL_ADMIN, "devicecontrol"),
        (Role.INVENTORY_READ, "inventory"),
        (Role.IDENTITY_READ, "identity"),
        (Role.DEVICE_CONTROL_READ, "devicecontrol"),
    ],
)
def test_admin_roles_imply_read(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient], role: Role, allowed: str
) -> None:
    client = client_for(make_user("someone", roles=[role]))

    assert api_statuses(client) == {name: 200 if name == allowed else 403 for name in API_RESOURCES}


def test_no_role_gets_403_on_every_api_resource(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    client = client_for(make_user("nobody"))

    for path in API_RESOURCES.values():
        body = assert_error(client.get(path), 403, "security/Forbidden")
        assert body["message"] == "Access is denied"


def test_readers_group_reads_everything_and_writes_nothing(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient], row_counts: Any
) -> None:
    client = client_for(make_user("reader", groups=["readers"]))
    foreign = DeviceFactory(owner="someone-else")
    ExternalIdFactory(managed_object=foreign, external_id="r-1")
    before = row_counts()

    assert api_statuses(client) == dict.fromkeys(API_RESOURCES, 200)
    assert client.get(f"{MO}/{foreign.pk}").status_code == 200
    assert client.get(f"{MO}/{foreign.pk}/childDevices").status_code == 200
    assert client.get(f"/identity/globalIds/{foreign.pk}/externalIds").status_code == 200
    assert client.get("/identity/externalIds/c8y_Serial/r-1").status_code == 200
    assert client.get(MO).json()["managedObjects"][0]["id"] == str(foreign.pk)

    assert_error(client.post(MO, {"name": "x"}, format="json"), 403, "security/Forbidden")
    assert_error(client.put(f"{MO}/{foreign.pk}", {"name": "x"}, format="json"), 403)
    assert_error(client.delete(f"{MO}/{foreign.pk}"), 403)
    assert_error(
        client.post(
            f"/identity/globalIds/{foreign.pk}/externalIds",
            {"type": "c8y_Serial", "externalId": "r-2"},
            format="json",
        ),
        403,
    )
    assert_error(client.delete("/identity/externalIds/c8y_Serial/r-1"), 403)
    assert row_counts() == before


def test_devices_group_creates_and_reads_identity_only(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    client = client_for(make_user("dev", groups=["devices"]))
    foreign = DeviceFactory(owner="someone-else")

    assert api_statuses(client) == {"inventory": 403, "identity": 200, "devicecontrol": 403}
    created = client.post(MO, {"name": "mine", "c8y_IsDevice": {}}, format="json", **ACCEPT_JSON)
    assert created.status_code == 201
    assert created.json()["owner"] == "dev"
    assert_error(client.get(f"{MO}/{foreign.pk}"), 403, "security/Forbidden")


def test_admins_group_may_do_everything_to_anyones_objects(
    admin_api: APIClient,
) -> None:
    foreign = DeviceFactory(owner="someone-else")

    assert api_statuses(admin_api) == dict.fromkeys(API_RESOURCES, 200)
    assert admin_api.get(f"{MO}/{foreign.pk}").status_code == 200
    updated = admin_api.put(
        f"{MO}/{foreign.pk}",
        {"name": "renamed", "owner": "new-owner"},
        format="json",
        **ACCEPT_JSON,
    )
    assert updated.status_code == 200
    assert updated.json()["owner"] == "new-owner"  # ADMIN may set the owner (auth.md §4)
    response = admin_api.post(
        f"/identity/globalIds/{foreign.pk}/externalIds",
        {"type": "c8y_Serial", "externalId": "a-1"},
        format="json",
    )
    assert response.status_code == 201
    assert admin_api.delete("/identity/externalIds/c8y_Serial/a-1").status_code == 204
    assert admin_api.delete(f"{MO}/{foreign.pk}").status_code == 204


def test_superuser_has_every_role(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    client = client_for(make_user("root", superuser=True))
    foreign = DeviceFactory(owner="someone-else")

    roles = {role["id"] for role in client.get("/user/currentUser").json()["effectiveRoles"]}
    assert roles == {role.value for role in ALL_ROLES}
    assert api_statuses(client) == dict.fromkeys(API_RESOURCES, 200)
    assert client.put(f"{MO}/{foreign.pk}", {"name": "x"}, format="json").status_code == 200
    assert client.delete(f"{MO}/{foreign.pk}").status_code == 204


# --- The owner rule (auth.md §4, checklist §8) ----------------------------------------------------


@pytest.fixture
def creator(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    return client_for(make_user("creator", roles=[Role.INVENTORY_CREATE]))


def test_create_only_user_manages_its_own_device(creator: APIClient) -> None:
    created = creator.post(
        MO,
        {"name": "mine", "c8y_IsDevice": {}, "owner": "someone-else"},
        format="json",
        **ACCEPT_JSON,
    )
    assert created.status_code == 201
    device = created.json()
    assert device["owner"] == "creator"  # a non-admin's `owner` is ignored
    url = f"{MO}/{device['id']}"

    assert creator.get(url).json()["name"] == "mine"
    updated = creator.put(url, {"name": "renamed", "owner": "x"}, format="json", **ACCEPT_JSON)
    assert updated.status_code == 200
    assert updated.json()["name"] == "renamed"
    assert updated.json()["owner"] == "creator"

    external = creator.post(
        f"/identity/globalIds/{device['id']}/externalIds",
        {"type": "c8y_Serial", "externalId": "mine-1"},
        format="json",
        **ACCEPT_JSON,
    )
    assert external.status_code == 201
    assert external.json()["managedObject"]["id"] == device["id"]
    assert creator.get("/identity/externalIds/c8y_Serial/mine-1").status_code == 200
    listed = creator.get(f"/identity/globalIds/{device['id']}/externalIds").json()
    assert [item["externalId"] for item in listed["externalIds"]] == ["mine-1"]
    assert creator.delete("/identity/externalIds/c8y_Serial/mine-1").status_code == 204

    assert creator.delete(url).status_code == 204
    assert not ManagedObject.objects.filter(pk=device["id"]).exists()


def test_create_only_user_gets_403_on_a_foreign_device(creator: APIClient, row_counts: Any) -> None:
    foreign = DeviceFactory(owner="admin")
    ExternalIdFactory(managed_object=foreign, external_id="foreign-1")
    url = f"{MO}/{foreign.pk}"
    before = row_counts()

    for response in [
        creator.get(url),
        creator.put(url, {"name": "stolen"}, format="json"),
        creator.delete(url),
        creator.get(f"{url}/childDevices"),
        creator.get(f"{url}/deviceParents"),
        creator.get(f"/identity/globalIds/{foreign.pk}/externalIds"),
        creator.post(
            f"/identity/globalIds/{foreign.pk}/externalIds",
            {"type": "c8y_Serial", "externalId": "mine-2"},
            format="json",
        ),
        creator.get("/identity/externalIds/c8y_Serial/foreign-1"),
        creator.delete("/identity/externalIds/c8y_Serial/foreign-1"),
    ]:
        body = assert_error(response, 403, "security/Forbidden")
        assert body["message"] == "Access is denied"
    assert row_counts() == before
    foreign.refresh_from_db()
    assert foreign.name != "stolen"


def test_create_only_user_gets_404_on_a_missing_device(creator: APIClient) -> None:
    missing = DeviceFactory(owner="admin").pk + 1000

    for response in [
        creator.get(f"{MO}/{missing}"),
        creator.put(f"{MO}/{missing}", {"name": "x"}, format="json"),
        creator.delete(f"{MO}/{missing}"),
        creator.post(
            f"/identity/globalIds/{missing}/externalIds",
            {"type": "c8y_Serial", "externalId": "x"},
            format="json",
        ),
    ]:
        assert_error(response, 404, "inventory/Not Found")
    assert_error(creator.get("/identity/externalIds/c8y_Serial/nope"), 404, "identity/Not Found")


def test_owner_match_is_case_insensitive(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    client = client_for(make_user("Mixed", roles=[Role.INVENTORY_CREATE]))
    device = DeviceFactory(owner="mixed")

    assert client.get(f"{MO}/{device.pk}").status_code == 200


# --- Visibility in collections (auth.md §5) -------------------------------------------------------


def test_collection_for_a_user_without_read_lists_only_own_objects_with_exact_totals(
    creator: APIClient,
) -> None:
    for _ in range(3):
        DeviceFactory(owner="admin")
    own = [DeviceFactory(owner="creator").pk for _ in range(7)]
    DeviceFactory(owner="admin")

    pages = [
        creator.get(
            f"{MO}?pageSize=3&currentPage={page}&withTotalPages=true&withTotalElements=true"
        ).json()
        for page in (1, 2, 3, 4)
    ]

    for page in pages:
        assert page["statistics"]["totalPages"] == 3
        assert page["statistics"]["totalElements"] == 7
    listed = [int(mo["id"]) for page in pages for mo in page["managedObjects"]]
    assert listed == own
    assert pages[3]["managedObjects"] == []
    assert {mo["owner"] for page in pages for mo in page["managedObjects"]} == {"creator"}


def test_collection_for_a_user_with_no_role_at_all_is_200_and_empty(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    DeviceFactory(owner="admin")
    client = client_for(make_user("nobody"))

    response = client.get(f"{MO}?withTotalPages=true&withTotalElements=true")

    assert response.status_code == 200
    body = response.json()
    assert body["managedObjects"] == []
    assert body["statistics"]["totalPages"] == 0
    assert body["statistics"]["totalElements"] == 0


def test_collection_for_a_reader_lists_everything(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    ids = [DeviceFactory(owner=f"user{i}").pk for i in range(4)]
    client = client_for(make_user("reader", roles=[Role.INVENTORY_READ]))

    body = client.get(f"{MO}?pageSize=10&withTotalElements=true").json()

    assert [int(mo["id"]) for mo in body["managedObjects"]] == ids
    assert body["statistics"]["totalElements"] == 4


# --- Order of checks (auth.md §6) -----------------------------------------------------------------


def test_unauthenticated_patch_is_401_not_405(anon_api: APIClient, admin: User) -> None:
    device = DeviceFactory(owner="admin")

    assert_unauthorized(anon_api.patch(f"{MO}/{device.pk}", {"name": "x"}, format="json"))
    assert_unauthorized(anon_api.patch(MO, {"name": "x"}, format="json"))


def test_authenticated_patch_without_roles_is_405_not_403(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    client = client_for(make_user("nobody"))
    device = DeviceFactory(owner="admin")

    for path in (MO, f"{MO}/{device.pk}", "/inventory", "/identity", "/devicecontrol"):
        response = client.patch(path, {"name": "x"}, format="json")
        assert_error(response, 405, "general/methodNotAllowed")
        assert "PATCH" not in response["Allow"]


def test_unknown_id_without_role_is_404_not_403(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    client = client_for(make_user("nobody"))
    missing = DeviceFactory(owner="admin").pk + 1000

    assert_error(client.get(f"{MO}/{missing}"), 404, "inventory/Not Found")
    assert_error(client.put(f"{MO}/{missing}", [1], format="json"), 404, "inventory/Not Found")
    assert_error(client.delete(f"{MO}/{missing}"), 404, "inventory/Not Found")
    assert_error(client.get(f"/identity/globalIds/{missing}/externalIds"), 404)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[1, 2]", "application/json"),
        (b'"a string"', "application/json"),
        (b"{not json", "application/json"),
        (b"<a/>", "application/xml"),
    ],
)
def test_bad_body_from_a_user_without_role_is_403_not_4xx(
    make_user: Callable[..., Any],
    client_for: Callable[..., APIClient],
    row_counts: Any,
    body: bytes,
    content_type: str,
) -> None:
    client = client_for(make_user("nobody"))
    device = DeviceFactory(owner="admin")
    before = row_counts()

    for method, path in [
        ("POST", MO),
        ("PUT", f"{MO}/{device.pk}"),
        ("POST", f"{MO}/{device.pk}/childDevices"),
        ("POST", f"/identity/globalIds/{device.pk}/externalIds"),
    ]:
        response = client.generic(method, path, body, content_type=content_type)
        assert_error(response, 403, "security/Forbidden")
    assert row_counts() == before


def test_order_for_an_authorised_user_ends_with_validation(admin_api: APIClient) -> None:
    device = DeviceFactory(owner="admin")

    assert_error(
        admin_api.generic("PUT", f"{MO}/{device.pk}", b"[1]", content_type="application/json"), 422
    )
    assert_error(
        admin_api.generic("PUT", f"{MO}/{device.pk}", b"{x", content_type="application/json"), 400
    )
    assert_error(
        admin_api.generic("PUT", f"{MO}/{device.pk}", b"x", content_type="text/plain"), 415
    )
    assert not ExternalId.objects.exists()


def test_roles_cache_expires_and_is_forgotten_on_upsert(
    make_user: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Effective roles are reused for AUTH_ROLES_CACHE_SECONDS; a group edit made elsewhere applies
    after that, a createuser/user_upsert change at once. The clock is injected, nothing sleeps."""
    from django.contrib.auth.models import Group

    from deviceplatform.api import authentication
    from deviceplatform.roles import Role

    settings.AUTH_ROLES_CACHE_SECONDS = 5
    now = [1000.0]
    monkeypatch.setattr(authentication.roles_cache, "_clock", lambda: now[0])
    user = make_user("carol", groups=["devices"])
    login = authentication.authenticate_credentials
    assert Role.INVENTORY_READ not in login("carol", PASSWORD)._c8y_roles
    # An operator adds the user to `readers` in the admin (not through user_upsert).
    user.groups.add(Group.objects.get(name="readers"))
    assert Role.INVENTORY_READ not in login("carol", PASSWORD)._c8y_roles
    now[0] += 5.1
    assert Role.INVENTORY_READ in login("carol", PASSWORD)._c8y_roles
    # user_upsert (createuser) forgets the entry at once.
    make_user("carol", groups=["devices"])
    assert Role.INVENTORY_READ not in login("carol", PASSWORD)._c8y_roles


def test_user_roles_statement_reads_direct_and_group_grants_of_role_permissions_only(
    make_user: Callable[..., Any], django_assert_num_queries: Any
) -> None:
    """user_roles's fixed statement: grants on the user and through any of its groups count,
    permissions of other apps (Django's own view/change ones) do not, each user sees only its own."""
    from django.contrib.auth.models import Group, Permission

    from deviceplatform.roles import user_roles

    def role(name: str) -> Permission:
        return Permission.objects.get(content_type__app_label="deviceplatform", codename=name)

    user = make_user("mixed-grants")
    user.groups.clear()
    user.user_permissions.set([role("ROLE_IDENTITY_READ")])
    group = Group.objects.create(name="operators-for-roles-test")
    group.permissions.set(
        [role("ROLE_BULK_OPERATION_ADMIN"), Permission.objects.get(codename="view_group")]
    )
    user.groups.add(group)
    user.user_permissions.add(Permission.objects.get(codename="change_group"))
    other = make_user("other-grants")
    other.groups.clear()
    other.user_permissions.set([role("ROLE_INVENTORY_ADMIN")])

    fresh = User.objects.get(pk=user.pk)
    with django_assert_num_queries(1):
        roles = user_roles(fresh)
    assert roles == {
        Role.IDENTITY_READ,
        Role.BULK_OPERATION_ADMIN,
        Role.BULK_OPERATION_READ,
        Role.USER_MANAGEMENT_OWN_READ,
    }
    assert user_roles(User.objects.get(pk=other.pk)) == {
        Role.INVENTORY_ADMIN,
        Role.INVENTORY_READ,
        Role.INVENTORY_CREATE,
        Role.USER_MANAGEMENT_OWN_READ,
    }
    group.permissions.clear()
    user.user_permissions.clear()
    assert user_roles(User.objects.get(pk=user.pk)) == {Role.USER_MANAGEMENT_OWN_READ}
