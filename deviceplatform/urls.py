"""URL wiring: the Cumulocity API at the host root, the admin UI under /admin/.

This and asgi.py are the only modules of the project package that name the apps (STYLE.md §1)."""

from django.contrib import admin
from django.urls import include, path, re_path

from devicecontrol.serializers import devicecontrol_api_json
from deviceplatform import health, metrics
from deviceplatform.api import openapi_views, session_views
from deviceplatform.api.routing import c8y_path
from deviceplatform.realtime.routing import http_urlpatterns as realtime_urlpatterns
from deviceplatform.staticfiles import static_not_found
from inventory.serializers import identity_api_json, inventory_api_json

platform_resources = {
    "inventory": inventory_api_json,
    "identity": identity_api_json,
    "deviceControl": devicecontrol_api_json,
}

urlpatterns = [
    path("admin/", admin.site.urls),
    # Existing static files never get here (deviceplatform/staticfiles.py); a missing one is a
    # plain 404, not an API error.
    re_path(r"^static/(?P<path>.*)$", static_not_found),
    # The API description (README "API description (OpenAPI)"), readable without credentials.
    path("openapi.json", openapi_views.openapi_json),
    path("openapi.yaml", openapi_views.openapi_yaml),
    re_path(r"^docs/?$", openapi_views.DocsView.as_view(), name="api-docs"),
    c8y_path(r"health/live", health.live_view),
    c8y_path(r"health/ready", health.ready_view),
    c8y_path(r"metrics", metrics.metrics_view),
    c8y_path(r"platform", session_views.PlatformView.as_view(resources=platform_resources)),
    c8y_path(r"tenant/currentTenant", session_views.CurrentTenantView.as_view()),
    c8y_path(r"tenant/loginOptions", session_views.LoginOptionsView.as_view()),
    c8y_path(r"user/currentUser", session_views.CurrentUserView.as_view()),
    c8y_path(r"user/currentUser/password", session_views.CurrentUserPasswordView.as_view()),
    *realtime_urlpatterns(),
    path("", include("inventory.urls")),
    path("", include("bulkops.urls")),
    path("", include("devicecontrol.urls")),
]

handler400 = "deviceplatform.api.exceptions.handler400"
handler403 = "deviceplatform.api.exceptions.handler403"
handler404 = "deviceplatform.api.exceptions.handler404"
handler500 = "deviceplatform.api.exceptions.handler500"
