"""The fast hasher for generated device passwords (issue 13 item 4, deviceplatform/hashers.py):
onboarding and rotation store device hashes that stay device hashes through logins; people's,
CSV and createuser passwords keep PBKDF2 (and still upgrade as Django does it). These tests set
the production PASSWORD_HASHERS (tests/conftest.py puts MD5 first for speed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.hashers import check_password, identify_hasher, make_password
from django.core.management import call_command
from rest_framework.test import APIClient

from deviceplatform import settings as project_settings
from deviceplatform.api.authentication import authenticate_credentials
from deviceplatform.hashers import (
    DEVICE_ALGORITHM,
    DevicePasswordHasher,
    device_password_hash,
    is_device_hash,
)
from deviceplatform.models import User
from deviceplatform.roles import Role
from deviceplatform.services import (
    bootstrap_user_ensure,
    device_user_provision,
    device_user_rotate,
    generate_password,
    user_upsert,
)
from tests.devicecontrol.conftest import call, ok_json
from tests.helpers import basic

pytestmark = pytest.mark.django_db

PBKDF2 = "pbkdf2_sha256"
CURRENT_USER = "/user/currentUser"


@pytest.fixture(autouse=True)
def production_hashers(settings: Any) -> None:
    settings.PASSWORD_HASHERS = project_settings.PASSWORD_HASHERS


def test_production_lists_the_device_hasher_after_the_default() -> None:
    hashers = project_settings.PASSWORD_HASHERS
    assert hashers[0] == "django.contrib.auth.hashers.PBKDF2PasswordHasher"
    assert hashers[-1] == "deviceplatform.hashers.DevicePasswordHasher"
    assert identify_hasher(make_password("a person's password")).algorithm == PBKDF2


def rest(username: str, password: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=basic(f"t100/{username}", password))
    return client


def stored(user: User) -> str:
    return User.objects.values_list("password", flat=True).get(pk=user.pk)


# --- the hasher ----------------------------------------------------------------------------------


def test_hash_is_salted_verifies_only_the_password_and_never_holds_it() -> None:
    password = generate_password()
    first, second = device_password_hash(password), device_password_hash(password)
    assert first.startswith(DEVICE_ALGORITHM + "$")
    assert is_device_hash(first)
    assert first != second  # a salt of its own each time
    assert password not in first
    assert check_password(password, first)
    assert check_password(password, second)
    assert not check_password(password[:-1], first)
    assert not check_password(password + "x", first)
    assert not check_password(generate_password(), first)
    algorithm, salt, digest = first.split("$")
    assert not check_password(password, f"{algorithm}${salt}${'0' * len(digest)}")
    assert not check_password(password, f"{algorithm}${salt}x${digest}")
    assert not DevicePasswordHasher().verify(password, f"{algorithm}$nodigest")


def test_only_generated_length_passwords_may_use_it() -> None:
    with pytest.raises(ValueError, match="generated device passwords"):
        device_password_hash("operator-chosen-password")
    assert not is_device_hash("")
    assert not is_device_hash(make_password("x" * 40))


def test_the_async_check_keeps_the_device_hash() -> None:
    password = generate_password()
    user = User(username="device_async", password=device_password_hash(password))
    before = user.password
    assert asyncio.run(user.acheck_password(password))
    assert not asyncio.run(user.acheck_password("wrong"))
    assert user.password == before


# --- generated passwords: device hashes, kept through logins --------------------------------------


def test_onboarded_device_user_gets_a_device_hash_that_survives_logins() -> None:
    user, password, created = device_user_provision("sn-fast-1")
    assert created
    hashed = stored(user)
    assert identify_hasher(hashed).algorithm == DEVICE_ALGORITHM
    for _ in range(2):
        response = rest(user.username, password).get(CURRENT_USER)
        assert response.status_code == 200, response.content
    assert stored(user) == hashed  # not upgraded to PBKDF2 by the login
    refreshed = User.objects.get(pk=user.pk)
    assert refreshed.check_password(password)
    assert stored(user) == hashed
    assert rest(user.username, password[:-1] + "!").get(CURRENT_USER).status_code == 401
    assert stored(user) == hashed


def test_rotation_stores_a_device_hash_and_the_old_password_stops() -> None:
    user, old, _ = device_user_provision("sn-fast-2")
    assert rest(user.username, old).get(CURRENT_USER).status_code == 200
    _, new = device_user_rotate(user.pk)
    assert new != old
    hashed = stored(user)
    assert identify_hasher(hashed).algorithm == DEVICE_ALGORITHM
    assert rest(user.username, old).get(CURRENT_USER).status_code == 401
    assert rest(user.username, new).get(CURRENT_USER).status_code == 200
    assert stored(user) == hashed


def test_onboarding_again_gives_a_new_device_hash() -> None:
    user, first, _ = device_user_provision("sn-fast-3")
    first_hash = stored(user)
    _, second, created = device_user_provision("sn-fast-3")
    assert not created
    assert stored(user) != first_hash
    assert is_device_hash(stored(user))
    assert authenticate_credentials(user.username, first) is None
    assert authenticate_credentials(user.username, second) is not None


def test_the_device_credentials_poll_hands_out_a_device_hashed_password(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    operator = client_for(make_user("operator", [Role.DEVICE_CONTROL_ADMIN]))
    bootstrap_user_ensure("bootstrap-secret")
    device = APIClient()
    device.credentials(HTTP_AUTHORIZATION=basic("management/devicebootstrap", "bootstrap-secret"))
    body, accepted, json = {"id": "sn-http"}, {"status": "ACCEPTED"}, "application/json"
    requests, credentials_path = (
        "/devicecontrol/newDeviceRequests",
        "/devicecontrol/deviceCredentials",
    )
    ok_json(call(operator, "POST", requests, body, accept=json), 201)
    assert call(device, "POST", credentials_path, body, accept=json).status_code == 404
    ok_json(call(operator, "PUT", f"{requests}/sn-http", accepted, accept=json))
    credentials = ok_json(call(device, "POST", credentials_path, body, accept=json), 201)
    user = User.objects.get(username=credentials["username"])
    assert is_device_hash(stored(user))
    # The bootstrap login is a person-like, operator-chosen password: PBKDF2.
    assert stored(User.objects.get(username="devicebootstrap")).startswith(PBKDF2 + "$")
    assert rest(user.username, credentials["password"]).get(CURRENT_USER).status_code == 200
    assert is_device_hash(stored(user))


# --- everything else stays PBKDF2 -----------------------------------------------------------------


def test_operator_chosen_device_password_keeps_pbkdf2() -> None:
    # The CSV bulk registration passes the CREDENTIALS column as the password.
    user, password, _ = device_user_provision("sn-csv", "operator-chosen-password")
    assert password == "operator-chosen-password"
    assert stored(user).startswith(PBKDF2 + "$")
    assert authenticate_credentials(user.username, password) is not None
    assert stored(user).startswith(PBKDF2 + "$")


def test_people_createuser_and_set_password_keep_pbkdf2() -> None:
    person = user_upsert(username="alice", password="alice-password")
    assert stored(person).startswith(PBKDF2 + "$")
    call_command("createuser", "bob", "--password", "bob-password")
    assert stored(User.objects.get(username="bob")).startswith(PBKDF2 + "$")
    user, _, _ = device_user_provision("sn-admin-set")
    user.set_password("set-in-the-admin")  # what the admin's password form does
    user.save()
    assert stored(user).startswith(PBKDF2 + "$")


def test_other_hashes_still_upgrade_to_the_preferred_one() -> None:
    """The override leaves Django's upgrade alone for every hash but a device hash."""
    person = User.objects.create(
        username="legacy", password=make_password("legacy-password", hasher="pbkdf2_sha1")
    )
    assert authenticate_credentials("legacy", "legacy-password") is not None
    assert stored(person).startswith(PBKDF2 + "$")
