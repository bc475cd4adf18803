"""`/openapi.json`, `/openapi.yaml` and the Swagger UI at `/docs/` (README "API description
(OpenAPI)").

The document is generated once per process and cached (generation takes a noticeable fraction of
a second; bench/openapi.py measures it). No credentials are needed: it describes the API, not
data, and the Cumulocity documentation is public too."""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import yaml
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.views import SpectacularSwaggerView
from orjson import dumps
from rest_framework.permissions import AllowAny

_generating = threading.Lock()


@cache
def _generate() -> dict[str, Any]:
    return SchemaGenerator().get_schema(request=None, public=True)


def schema_document() -> dict[str, Any]:
    """The OpenAPI document (deviceplatform/schema.py), built on first use, by one thread (the
    schema hooks attach descriptions to the view classes)."""
    with _generating:
        return _generate()


class _Dumper(yaml.SafeDumper):
    """No anchors or aliases: the shared schema dicts are written out where they are used."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@cache
def rendered(fmt: str) -> bytes:
    document = schema_document()
    if fmt == "json":
        return dumps(document)
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True).encode()


@require_safe
def openapi_json(request: HttpRequest) -> HttpResponse:
    return HttpResponse(rendered("json"), content_type="application/json")


@require_safe
def openapi_yaml(request: HttpRequest) -> HttpResponse:
    return HttpResponse(rendered("yaml"), content_type="application/yaml")


class DocsView(SpectacularSwaggerView):
    """Swagger UI from drf-spectacular-sidecar's files, served by our static files pipeline."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    url = "/openapi.json"
    title = "Device platform API"
