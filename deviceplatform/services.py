"""User writes: create or update a user with exact roles and groups (the createuser command, tests),
the device bootstrap login, and device users (created, rotated, revoked)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from functools import partial

from django.conf import settings
from django.contrib.auth.models import Group, Permission
from django.db import transaction

from deviceplatform.api.authentication import roles_cache
from deviceplatform.api.exceptions import Conflict, ValidationFailed
from deviceplatform.api.lengths import check_length, max_length
from deviceplatform.hashers import device_password_hash
from deviceplatform.models import User, device_user_condition
from deviceplatform.realtime.rights import credentials_changed
from deviceplatform.roles import ROLE_APP_LABEL, Role


def role_permissions(roles: Iterable[str]) -> list[Permission]:
    names = set(roles)
    unknown = names - {role.value for role in Role}
    if unknown:
        raise ValidationFailed(
            f"Unknown role(s): {', '.join(sorted(unknown))}; known: {', '.join(r.value for r in Role)}"
        )
    return list(
        Permission.objects.filter(content_type__app_label=ROLE_APP_LABEL, codename__in=names)
    )


@transaction.atomic
def user_upsert(
    *,
    username: str,
    password: str | None = None,
    roles: Iterable[str] = (),
    groups: Iterable[str] = (),
    is_superuser: bool = False,
) -> User:
    """Create the user, or update the existing one (matched case-insensitively): the password if
    given, and roles and groups set to exactly those given. Idempotent."""
    if not username or "/" in username or ":" in username:
        raise ValidationFailed("A username must be non-empty and contain neither '/' nor ':'")
    check_length(username, User, "username")
    permissions = role_permissions(roles)
    group_names = set(groups)
    group_objects = list(Group.objects.filter(name__in=group_names))
    missing = group_names - {group.name for group in group_objects}
    if missing:
        raise ValidationFailed(f"Unknown group(s): {', '.join(sorted(missing))}")
    user = User.objects.select_for_update().filter(username__iexact=username).first()
    if user is None:
        user = User(username=username)
    if password is not None:
        user.set_password(password)
    user.is_active = True
    user.is_superuser = is_superuser or user.is_superuser
    user.is_staff = user.is_superuser or user.is_staff
    user.save()
    user.user_permissions.set(permissions)
    user.groups.set(group_objects)
    roles_cache.forget(user.pk)
    return user


# --- device onboarding: the bootstrap login and device users -----------------------------------

# Cumulocity's rules for a device id that becomes part of a username: no whitespace, no control
# character, none of \ / + $ : (and not "." or ".."); our username column bounds the length.
_DEVICE_ID_FORBIDDEN = re.compile(r"[\s\\/+$:\x00-\x1f\x7f-\x9f]")


def generate_password() -> str:
    """A device password: 32 URL-safe characters (192 random bits)."""
    return secrets.token_urlsafe(24)


def device_username(device_id: str) -> str:
    return f"{settings.DEVICE_USER_PREFIX}{device_id}"


def validate_device_id(device_id: object, *, name: str = "id") -> str:
    """The device id (a serial, an IMEI) as a device user's name can hold it, or 422."""
    if not isinstance(device_id, str) or not device_id:
        raise ValidationFailed(f"Invalid value for {name}: a non-empty string is required")
    limit = (max_length(User, "username") or 150) - len(settings.DEVICE_USER_PREFIX)
    if len(device_id) > limit:
        raise ValidationFailed(
            f"Invalid value for {name}: at most {limit} characters are allowed, "
            f"not {len(device_id)}"
        )
    if device_id in {".", ".."} or _DEVICE_ID_FORBIDDEN.search(device_id):
        raise ValidationFailed(
            f"Invalid value for {name}: a device id must not be '.' or '..' and must contain no "
            "whitespace, control character, '\\', '/', '+', '$' or ':'"
        )
    return device_id


@transaction.atomic
def bootstrap_user_ensure(password: str) -> User:
    """The device bootstrap login with exactly ROLE_DEVICE_BOOTSTRAP and this password."""
    return user_upsert(
        username=settings.DEVICE_BOOTSTRAP_USERNAME,
        password=password,
        roles=[Role.DEVICE_BOOTSTRAP.value],
    )


def non_device_account(device_id: str) -> str | None:
    """The username of the account `device_<id>` names when it is not a device user (a person,
    staff, or outside `devices`: `device_user_condition`), else None."""
    return (
        User.objects.filter(username__iexact=device_username(device_id))
        .exclude(device_user_condition())
        .values_list("username", flat=True)
        .first()
    )


@transaction.atomic
def device_user_provision(device_id: str, password: str | None = None) -> tuple[User, str, bool]:
    """Create the device user `device_<id>` in the `devices` group, or give the existing one a
    new password and the standard device rights again (a device onboarding again: its groups
    become `devices` alone, direct roles are dropped), active either way. Returns the user, its
    password (generated unless given: show it once, never log it) and whether it was created.
    409 when `device_<id>` names an account that is not a device user."""
    validate_device_id(device_id)
    username = device_username(device_id)
    existing = User.objects.select_for_update().filter(username__iexact=username).first()
    clash = non_device_account(device_id) if existing is not None else None
    if clash is not None:
        # Never hand out a person's account (or any account outside `devices`) to a device.
        raise Conflict(f"The user {clash} exists and is not a device user")
    generated = password is None
    password = generate_password() if password is None else password
    user = user_upsert(
        username=username, password=None if generated else password, groups=["devices"]
    )
    if generated:  # 192 random bits: the fast device hash (deviceplatform/hashers.py)
        user.password = device_password_hash(password)
        user.save(update_fields=["password"])
    if existing is not None:  # realtime sessions opened with the old password end
        transaction.on_commit(partial(credentials_changed, user.pk))
    return user, password, existing is None


@transaction.atomic
def device_user_rotate(user_id: int) -> tuple[User, str]:
    """A new generated password for a user (the old one stops working at once, in every process:
    the verified-password cache is keyed by the stored hash; realtime sessions opened with it end
    on commit). Returns the user and the password."""
    user = User.objects.select_for_update().get(pk=user_id)
    password = generate_password()
    user.password = device_password_hash(password)
    user.save(update_fields=["password"])
    roles_cache.forget(user.pk)
    transaction.on_commit(partial(credentials_changed, user.pk))
    return user, password


@transaction.atomic
def user_set_active(user_id: int, *, active: bool) -> User:
    """Revoke (disable) or restore a user. A disabled user's next request is refused in every
    process (the user row is read on each request), and its realtime sessions end on commit."""
    user = User.objects.select_for_update().get(pk=user_id)
    if user.is_active != active:
        user.is_active = active
        user.save(update_fields=["is_active"])
    roles_cache.forget(user.pk)
    if not active:
        transaction.on_commit(partial(credentials_changed, user.pk))
    return user
