"""The platform root and the session resources real clients call first (spec platform.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from django.conf import settings
from rest_framework.response import Response

from deviceplatform.api.dates import format_datetime
from deviceplatform.api.media_types import MediaType
from deviceplatform.api.params import get_bool
from deviceplatform.api.views import CumulocityView, base_url
from deviceplatform.roles import user_roles


class PlatformView(CumulocityView):
    """`GET /platform`: each area's API resource, identical to its own body (platform.md §1).

    The areas' body builders are passed in by the URL wiring, so this module names no app."""

    required_roles = {"GET": frozenset()}
    resources: ClassVar[dict[str, Callable[[str], dict[str, Any]]]] = {}

    def get(self, request: Any) -> Response:
        base = base_url(request)
        body: dict[str, Any] = {"self": f"{base}/platform"}
        for key, build in self.resources.items():
            body[key] = build(base)
        body["user"] = {"self": f"{base}/user"}
        body["tenant"] = {"self": f"{base}/tenant"}
        return self.respond(body, MediaType.PLATFORM_API)


class CurrentTenantView(CumulocityView):
    required_roles = {"GET": frozenset()}

    def get(self, request: Any) -> Response:
        get_bool(request.GET, "withParent")  # accepted and ignored
        base = base_url(request)
        tenant = settings.C8Y_TENANT_ID
        return self.respond(
            {
                "self": f"{base}/tenant/currentTenant",
                "name": tenant,
                "domainName": request.get_host().split(":")[0],
                "allowCreateTenants": False,
                "customProperties": {},
                "applications": {
                    "self": f"{base}/tenant/tenants/{tenant}/applications",
                    "references": [],
                },
                "ownedApplications": {"references": []},
            },
            MediaType.CURRENT_TENANT,
        )


class CurrentUserView(CumulocityView):
    """`GET /user/currentUser`; writes are out of scope (405, platform.md §3)."""

    required_roles = {"GET": frozenset()}

    def get(self, request: Any) -> Response:
        user = request.user
        base = base_url(request)
        body: dict[str, Any] = {
            "self": f"{base}/user/currentUser",
            "id": user.username,
            "userName": user.username,
        }
        for key, value in (
            ("firstName", user.first_name),
            ("lastName", user.last_name),
            ("email", user.email),
        ):
            if value:
                body[key] = value
        body["shouldResetPassword"] = False
        body["twoFactorAuthenticationEnabled"] = False
        body["lastPasswordChange"] = format_datetime(user.date_joined)
        body["effectiveRoles"] = [
            {"id": role.value, "name": role.value, "self": f"{base}/user/roles/{role.value}"}
            for role in sorted(user_roles(user))
        ]
        body["devicePermissions"] = {}
        return self.respond(body, MediaType.CURRENT_USER)


class CurrentUserPasswordView(CumulocityView):
    """`/user/currentUser/password`: out of scope, so every method is 405 (platform.md §3)."""


class LoginOptionsView(CumulocityView):
    """Unauthenticated: tells pyc8y and web clients that Basic auth is available (platform.md §4)."""

    authentication_classes: ClassVar[list[Any]] = []
    permission_classes: ClassVar[list[Any]] = []

    def get(self, request: Any) -> Response:
        base = base_url(request)
        return self.respond(
            {
                "self": f"{base}/tenant/loginOptions",
                "loginOptions": [
                    {
                        "id": "basic",
                        "type": "BASIC",
                        "self": f"{base}/tenant/loginOptions/basic",
                        "userManagementSource": "INTERNAL",
                        "visibleOnLoginPage": True,
                    }
                ],
            },
            MediaType.LOGIN_OPTION_COLLECTION,
        )
