"""`createuser` and `createsuperuser` produce users that log in with exactly the roles asked for."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from deviceplatform.api.authentication import authenticate_credentials
from deviceplatform.models import User
from deviceplatform.roles import ALL_ROLES, ALWAYS_GRANTED, READ_ROLES, Role, user_roles

pytestmark = pytest.mark.django_db


def createuser(*args: str) -> str:
    out = StringIO()
    call_command("createuser", *args, stdout=out)
    return out.getvalue()


def logged_in(username: str, password: str) -> Any:
    return authenticate_credentials(username, password)


def test_creates_a_user_with_the_given_roles() -> None:
    output = createuser(
        "alice", "--password", "pw-1", "--roles", "ROLE_INVENTORY_READ", "ROLE_DEVICE_CONTROL_ADMIN"
    )

    assert "alice" in output
    user = logged_in("alice", "pw-1")
    assert user is not None
    assert user.username == "alice"
    assert not user.is_superuser
    assert user_roles(user) == {
        Role.INVENTORY_READ,
        Role.DEVICE_CONTROL_ADMIN,
        Role.DEVICE_CONTROL_READ,  # implied by DEVICE_CONTROL_ADMIN
        *ALWAYS_GRANTED,
    }


def test_running_twice_is_idempotent() -> None:
    args = ("bob", "--password", "pw-1", "--roles", "ROLE_INVENTORY_READ", "--groups", "devices")
    createuser(*args)
    createuser(*args)

    assert User.objects.filter(username__iexact="bob").count() == 1
    user = logged_in("bob", "pw-1")
    assert user is not None
    assert list(user.groups.values_list("name", flat=True)) == ["devices"]
    assert user_roles(user) == {
        Role.INVENTORY_READ,
        Role.INVENTORY_CREATE,
        Role.IDENTITY_READ,
        *ALWAYS_GRANTED,
    }


def test_rerun_replaces_password_roles_and_groups_exactly() -> None:
    createuser(
        "carol", "--password", "old", "--roles", "ROLE_INVENTORY_ADMIN", "--groups", "admins"
    )

    createuser("Carol", "--password", "new", "--roles", "ROLE_IDENTITY_READ", "--groups", "readers")

    assert User.objects.filter(username__iexact="carol").count() == 1
    assert logged_in("carol", "old") is None
    user = logged_in("carol", "new")
    assert user is not None
    assert list(user.groups.values_list("name", flat=True)) == ["readers"]
    assert list(user.user_permissions.values_list("codename", flat=True)) == ["ROLE_IDENTITY_READ"]
    assert user_roles(user) == READ_ROLES | ALWAYS_GRANTED


def test_rerun_without_roles_removes_them() -> None:
    createuser("dave", "--password", "pw", "--roles", "ROLE_INVENTORY_ADMIN")
    createuser("dave", "--password", "pw")

    user = logged_in("dave", "pw")
    assert user is not None
    assert user_roles(user) == ALWAYS_GRANTED


def test_superuser_flag_grants_every_role() -> None:
    createuser("root-like", "--password", "pw", "--superuser")

    user = logged_in("root-like", "pw")
    assert user is not None
    assert user_roles(user) == ALL_ROLES


def test_unknown_role_is_a_command_error_and_creates_nothing() -> None:
    with pytest.raises(CommandError, match="ROLE_NO_SUCH_THING"):
        createuser("erin", "--password", "pw", "--roles", "ROLE_NO_SUCH_THING")

    assert not User.objects.filter(username__iexact="erin").exists()


def test_unknown_group_is_a_command_error_and_changes_nothing() -> None:
    createuser("frank", "--password", "pw", "--roles", "ROLE_INVENTORY_READ")

    with pytest.raises(CommandError, match="no-such-group"):
        createuser("frank", "--password", "other", "--groups", "no-such-group")

    user = logged_in("frank", "pw")
    assert user is not None
    assert user_roles(user) == {Role.INVENTORY_READ, *ALWAYS_GRANTED}


def test_createsuperuser_noinput_yields_a_user_with_every_role(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "boss")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "boss-pw")
    monkeypatch.setenv("DJANGO_SUPERUSER_EMAIL", "boss@example.com")

    call_command("createsuperuser", "--noinput", stdout=StringIO())

    user = logged_in("boss", "boss-pw")
    assert user is not None
    assert user.is_superuser
    assert user_roles(user) == ALL_ROLES
