"""The one permission class: views declare the roles each method needs (STYLE.md §6)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rest_framework import exceptions
from rest_framework.permissions import BasePermission

from deviceplatform.roles import Role, is_bootstrap, user_roles


def has_any_role(user: Any, roles: Iterable[Role]) -> bool:
    wanted = frozenset(roles)
    return bool(user_roles(user) & wanted)


class RolePermission(BasePermission):
    """Enforces `view.required_roles` (method -> roles, any one suffices; empty = any user).

    Methods listed in `view.owner_rule_methods` pass here and are decided per object by
    `has_object_permission`: a required role, or ownership (`view.owner_of(obj)`), auth.md §4.
    A method the view does not implement passes, so the caller sees 405 before 403 (auth.md §6).
    The device bootstrap login passes only where the method requires `ROLE_DEVICE_BOOTSTRAP`: not
    even the views any user may call (the platform and current-user resources) let it in."""

    message = "Access is denied"

    def has_permission(self, request: Any, view: Any) -> bool:
        if request.user is None:
            raise exceptions.NotAuthenticated()
        method = _method(request)
        if not hasattr(view, method.lower()) or method == "OPTIONS":
            return True
        if is_bootstrap(user_roles(request.user)):
            return Role.DEVICE_BOOTSTRAP in view.required_roles.get(method, frozenset())
        if method in getattr(view, "owner_rule_methods", frozenset()):
            return True
        roles = view.required_roles.get(method)
        if roles is None:
            return False
        return not roles or has_any_role(request.user, roles)

    def has_object_permission(self, request: Any, view: Any, obj: Any) -> bool:
        method = _method(request)
        roles = view.required_roles.get(method, frozenset())
        if not roles or has_any_role(request.user, roles):
            return True
        if method in getattr(view, "owner_rule_methods", frozenset()):
            return is_owner(request.user, view.owner_of(obj))
        return False


def _method(request: Any) -> str:
    """HEAD is answered by the GET handler (Django's View), so it needs what GET needs."""
    method = request.method.upper()
    return "GET" if method == "HEAD" else method


def is_owner(user: Any, owner: str | None) -> bool:
    return owner is not None and owner.lower() == user.username.lower()
