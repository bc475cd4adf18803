"""User writes: create or update a user with exact roles and groups (the createuser command, tests)."""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import Group, Permission
from django.db import transaction

from deviceplatform.api.authentication import roles_cache
from deviceplatform.api.exceptions import ValidationFailed
from deviceplatform.api.lengths import check_length
from deviceplatform.models import User
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
