"""Cumulocity role names (spec auth.md §3) as one enum, and how a user's effective roles are derived."""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deviceplatform.models import User


class Role(StrEnum):
    INVENTORY_READ = "ROLE_INVENTORY_READ"
    INVENTORY_CREATE = "ROLE_INVENTORY_CREATE"
    INVENTORY_ADMIN = "ROLE_INVENTORY_ADMIN"
    IDENTITY_READ = "ROLE_IDENTITY_READ"
    IDENTITY_ADMIN = "ROLE_IDENTITY_ADMIN"
    DEVICE_CONTROL_READ = "ROLE_DEVICE_CONTROL_READ"
    DEVICE_CONTROL_ADMIN = "ROLE_DEVICE_CONTROL_ADMIN"
    BULK_OPERATION_READ = "ROLE_BULK_OPERATION_READ"
    BULK_OPERATION_ADMIN = "ROLE_BULK_OPERATION_ADMIN"
    USER_MANAGEMENT_OWN_READ = "ROLE_USER_MANAGEMENT_OWN_READ"
    DEVICE_BOOTSTRAP = "ROLE_DEVICE_BOOTSTRAP"


ROLE_DESCRIPTIONS: dict[Role, str] = {
    Role.INVENTORY_READ: "Read any managed object and its references",
    Role.INVENTORY_CREATE: "Create managed objects (the creator becomes the owner)",
    Role.INVENTORY_ADMIN: "Create, read, update and delete any managed object and reference",
    Role.IDENTITY_READ: "Read any external ID",
    Role.IDENTITY_ADMIN: "Create and delete any external ID",
    Role.DEVICE_CONTROL_READ: "Read any operation; subscribe to operation notifications",
    Role.DEVICE_CONTROL_ADMIN: "Create and update any operation; delete operation collections",
    Role.BULK_OPERATION_READ: "Read bulk operations",
    Role.BULK_OPERATION_ADMIN: "Create, update and cancel bulk operations",
    Role.USER_MANAGEMENT_OWN_READ: "Read the current user and tenant",
    Role.DEVICE_BOOTSTRAP: (
        "Only the device bootstrap login: ask for device credentials, nothing else"
    ),
}

# `*_ADMIN` implies the matching `*_READ` here (auth.md §3); every user may read their own session.
IMPLIED_ROLES: dict[Role, frozenset[Role]] = {
    Role.INVENTORY_ADMIN: frozenset({Role.INVENTORY_READ, Role.INVENTORY_CREATE}),
    Role.IDENTITY_ADMIN: frozenset({Role.IDENTITY_READ}),
    Role.DEVICE_CONTROL_ADMIN: frozenset({Role.DEVICE_CONTROL_READ}),
    Role.BULK_OPERATION_ADMIN: frozenset({Role.BULK_OPERATION_READ}),
}
ALWAYS_GRANTED = frozenset({Role.USER_MANAGEMENT_OWN_READ})

READ_ROLES = frozenset(role for role in Role if role.value.endswith("_READ"))

# The bootstrap role stands alone: a user holding it may call only the views that require it
# (`POST /devicecontrol/deviceCredentials`), so it is never part of "every role".
BOOTSTRAP_ONLY = frozenset({Role.DEVICE_BOOTSTRAP})
ALL_ROLES = frozenset(Role) - BOOTSTRAP_ONLY

# Built-in groups (auth.md §3): created by a migration and recreated after every migrate or flush.
DEFAULT_GROUPS: dict[str, frozenset[Role]] = {
    "admins": ALL_ROLES,
    "readers": READ_ROLES,
    "devices": frozenset({Role.INVENTORY_CREATE, Role.IDENTITY_READ}),
}

ROLE_APP_LABEL = "deviceplatform"


def ensure_default_groups(apps: Any) -> None:
    """Create the role permissions and the built-in groups if missing (idempotent).

    `apps` is a migration state registry or the global one. Runs from the data migration and on
    `post_migrate`, so a `flush` (as transactional tests do) leaves the built-in groups in place.
    """
    from django.contrib.auth.management import create_permissions

    app_config = apps.get_app_config(ROLE_APP_LABEL)
    models_module = getattr(app_config, "models_module", None)
    app_config.models_module = models_module or True  # a state registry has none
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = models_module
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, roles in DEFAULT_GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(
            Permission.objects.filter(
                content_type__app_label=ROLE_APP_LABEL, codename__in=[r.value for r in roles]
            )
        )


def expand_roles(granted: set[str] | frozenset[str]) -> frozenset[Role]:
    """The effective roles for a set of granted role names: implied and always-granted roles added."""
    roles = {Role(name) for name in granted if name in Role.__members__.values()}
    if Role.DEVICE_BOOTSTRAP in roles:
        return BOOTSTRAP_ONLY  # whatever else was granted: the bootstrap login does one thing
    for role in list(roles):
        roles |= IMPLIED_ROLES.get(role, frozenset())
    return frozenset(roles | ALWAYS_GRANTED)


def user_roles(user: User) -> frozenset[Role]:
    """Effective roles of a user, computed once per user object (one query, cached on the instance)."""
    cached = getattr(user, "_c8y_roles", None)
    if cached is not None:
        return cached
    if not user.is_active:
        roles: frozenset[Role] = frozenset()
    elif user.is_superuser:
        roles = ALL_ROLES
    else:
        from django.db import connections, router

        alias = router.db_for_read(type(user), instance=user)
        with connections[alias].cursor() as cursor:
            cursor.execute(_roles_statement(type(user), alias), [user.pk, user.pk])
            granted = {codename for (codename,) in cursor.fetchall()}
        roles = expand_roles(granted)
    user._c8y_roles = roles  # type: ignore[attr-defined]
    return roles


@cache
def _roles_statement(user_model: Any, alias: str) -> str:
    """The role names granted to a user directly or through a group: two plain joins in a UNION.

    An OR across both many-to-many paths with DISTINCT (what Django's own get_all_permissions
    amounts to) costs several times more per request; and building the same UNION as a queryset
    cost more client CPU (the ORM's compiler) than PostgreSQL spent answering it: a device's first
    request to each process after a restart pays it (bench/reconnect.py). Only the role
    permissions count: those of our app label."""
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType
    from django.db import connections

    quote = connections[alias].ops.quote_name

    def table(model: Any) -> str:
        return quote(model._meta.db_table)

    def column(model: Any, name: str) -> str:
        return quote(model._meta.get_field(name).column)

    user_perms = user_model.user_permissions.through
    user_groups = user_model.groups.through
    group_perms = Group.permissions.through
    perm, ctype = table(Permission), table(ContentType)
    roles_only = (
        f"FROM {perm} p JOIN {ctype} ct ON ct.{column(ContentType, 'id')} = "
        f"p.{column(Permission, 'content_type')} AND ct.{column(ContentType, 'app_label')} = "
        f"'{ROLE_APP_LABEL}' "
    )
    return (
        f"SELECT p.{column(Permission, 'codename')} {roles_only}"  # noqa: S608 - our names
        f"JOIN {table(user_perms)} up ON up.{column(user_perms, 'permission')} = p.{column(Permission, 'id')} "
        f"WHERE up.{column(user_perms, 'user')} = %s "
        f"UNION SELECT p.{column(Permission, 'codename')} {roles_only}"
        f"JOIN {table(group_perms)} gp ON gp.{column(group_perms, 'permission')} = p.{column(Permission, 'id')} "
        f"JOIN {table(user_groups)} ug ON ug.{column(user_groups, 'group')} = gp.{column(group_perms, 'group')} "
        f"WHERE ug.{column(user_groups, 'user')} = %s"
    )


def is_bootstrap(roles: frozenset[Role]) -> bool:
    """The device bootstrap login: refused everywhere but the views that require its role."""
    return roles == BOOTSTRAP_ONLY
