"""The OpenAPI description of the API (README "API description (OpenAPI)"), built by
drf-spectacular.

Paths and methods come from the URL patterns and the views' handlers; roles from each view's
`required_roles`. Our views parse bodies by hand, so bodies, query parameters and media types are
declared explicitly: each app's `schema.py` attaches them to its views (`extend_schema_view`) in a
preprocessing hook and adds its component schemas in a postprocessing hook; this module holds the
shared parts (error shape, paging, Basic auth, headers) and the helpers the apps use.

deviceplatform/api/openapi_views.py serves it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)

from deviceplatform.api.exceptions import INFO_URL
from deviceplatform.api.media_types import VENDOR_PREFIX, MediaType
from deviceplatform.api.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

JSON = "application/json"
BODY_REQUIRED = "x-body-required"
OWNER = "x-owner"  # read and removed by CumulocityAutoSchema.get_operation
STATUS_TEXT = {
    200: "OK (a POST or PUT answers a body only when the request has an Accept header)",
    201: "Created (a body only when the request has an Accept header)",
}
ERROR_MEDIA = f"{VENDOR_PREFIX}{MediaType.ERROR.value}+json"
CONVENTIONS = "docs/api/conventions.md"
REALTIME_DOC = "docs/api/realtime.md"

SchemaDict = dict[str, Any]


def ref(name: str) -> SchemaDict:
    return {"$ref": f"#/components/schemas/{name}"}


def vendor(media_type: MediaType) -> str:
    """The vendor media type without parameters, as OpenAPI content keys are written."""
    return f"{VENDOR_PREFIX}{media_type.value}+json"


def url(description: str = "") -> SchemaDict:
    schema: SchemaDict = {"type": "string", "format": "uri"}
    if description:
        schema["description"] = description
    return schema


ID = {"type": "string", "pattern": r"^[0-9]+$", "description": "A numeric ID, as a string"}
DATE_TIME = {"type": "string", "format": "date-time"}


def obj(
    properties: dict[str, SchemaDict],
    required: Sequence[str] = (),
    *,
    description: str = "",
    additional: bool | SchemaDict = True,
) -> SchemaDict:
    """An object schema; `additional` True lets custom fragments through, as the API does."""
    schema: SchemaDict = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if additional is not True:
        schema["additionalProperties"] = additional
    if description:
        schema["description"] = description
    return schema


def collection(key: str, item: SchemaDict, description: str = "") -> SchemaDict:
    """The paging envelope of conventions.md "Paging": the page under `key`, statistics, links."""
    return obj(
        {
            "self": url(),
            key: {"type": "array", "items": item},
            "statistics": ref("PageStatistics"),
            "prev": url("Present from page 2 on"),
            "next": url("Always present, also on the last page"),
        },
        ["self", key, "statistics", "next"],
        description=description,
    )


# --- Parameters -----------------------------------------------------------------------------------

PROCESSING_MODE = OpenApiParameter(
    "X-Cumulocity-Processing-Mode",
    str,
    OpenApiParameter.HEADER,
    enum=["PERSISTENT", "TRANSIENT", "QUIESCENT", "CEP"],
    description=(
        "Any letter case. QUIESCENT stores the change without any realtime notification; the "
        "others behave alike. Another value: 422."
    ),
)
IF_MATCH = OpenApiParameter(
    "If-Match",
    str,
    OpenApiParameter.HEADER,
    description=(
        "Optimistic concurrency (an extension): the ETag of the version you read, `*`, or a "
        "comma-separated list. A stale tag: 412 and nothing changes."
    ),
)
PAGING = [
    OpenApiParameter(
        "pageSize",
        {"type": "integer", "minimum": 1, "default": DEFAULT_PAGE_SIZE},
        description=f"Items per page; values above {MAX_PAGE_SIZE} are lowered to it",
    ),
    OpenApiParameter(
        "currentPage", {"type": "integer", "minimum": 1, "default": 1}, description="1-based"
    ),
    OpenApiParameter(
        "withTotalPages", bool, description="Adds statistics.totalPages (true/false, any case)"
    ),
    OpenApiParameter(
        "withTotalElements",
        bool,
        description="Adds statistics.totalElements (true/false, any case)",
    ),
]
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 255},
    OpenApiParameter.HEADER,
    description=(
        "Extension: the same key (per user) answers with the first result for 24 h instead of "
        "creating again; another body with the same key: 422"
    ),
)
LOCATION = OpenApiParameter(
    "Location",
    OpenApiTypes.URI,
    OpenApiParameter.HEADER,
    response=[201],
    description="The absolute URL of what was created",
)
ETAG = OpenApiParameter(
    "ETag",
    str,
    OpenApiParameter.HEADER,
    response=[200, 201],
    description="A strong tag of the object's JSON; send it back in If-Match",
)


def query(name: str, schema: Any = str, description: str = "", **kwargs: Any) -> OpenApiParameter:
    return OpenApiParameter(name, schema, OpenApiParameter.QUERY, description=description, **kwargs)


def path(name: str, description: str = "", schema: Any = str) -> OpenApiParameter:
    return OpenApiParameter(name, schema, OpenApiParameter.PATH, description=description)


def filter_parameters(filterset: type, descriptions: dict[str, str] | None = None) -> list[Any]:
    """Query parameters of a django-filter FilterSet, typed by their form fields: the list stays
    what the filter accepts when someone adds a filter."""
    from django import forms

    descriptions = descriptions or {}
    parameters = []
    for name, declared in filterset.base_filters.items():
        field = declared.field_class
        if (
            issubclass(field, forms.NullBooleanField | forms.BooleanField)
            or "Boolean" in type(declared).__name__
        ):
            schema: Any = bool
        elif issubclass(field, forms.DateTimeField):
            schema = OpenApiTypes.DATETIME
        elif "IdFilter" in type(declared).__name__:
            schema = {"type": "string", "pattern": r"^[0-9]+$"}
        else:
            schema = str
        parameters.append(query(name, schema, descriptions.get(name, "")))
    return parameters


# --- Operations -----------------------------------------------------------------------------------


def c8y_operation(
    summary: str,
    *,
    response: SchemaDict | None = None,
    media_type: MediaType | None = None,
    status: int = 200,
    request: SchemaDict | None = None,
    request_content: dict[str, SchemaDict] | None = None,
    body_required: bool = True,
    owner: str | None = None,
    description: str = "",
    parameters: Iterable[Any] = (),
    errors: dict[int, str] | None = None,
    operation_id: str | None = None,
) -> Callable[[Any], Any]:
    """`extend_schema` for one Cumulocity handler: the body in plain JSON and in the resource's
    vendor type (conventions.md "Media types"), or `request_content` by media type; `errors` adds
    statuses beyond the common ones; `owner` names what the owner rule looks at (roles.md)."""
    responses: dict[Any, Any] = {}
    if response is None:
        responses[status] = OpenApiResponse(description="No body")
    else:
        for content_type in (JSON, vendor(media_type)) if media_type else (JSON,):
            responses[(status, content_type)] = OpenApiResponse(
                response=response, description=STATUS_TEXT.get(status, "")
            )
    for code, text in (errors or {}).items():
        responses[(code, ERROR_MEDIA)] = OpenApiResponse(response=ref("Error"), description=text)
    request_body: dict[str, Any] | None = request_content
    if request is not None:
        request_body = {JSON: request}
        if media_type:
            request_body[vendor(media_type)] = request
    extra = list(parameters)
    if status == 201:
        extra.append(LOCATION)
    return extend_schema(
        summary=summary,
        description=description or None,
        request=request_body,
        responses=responses,
        parameters=extra,
        operation_id=operation_id,
        # drf-spectacular marks raw-schema bodies optional; postprocess() sets it from this.
        extensions={
            **({BODY_REQUIRED: body_required} if request_body is not None else {}),
            **({OWNER: owner} if owner else {}),
        }
        or None,
    )


class CumulocityAutoSchema(AutoSchema):
    """Tags by area, Basic auth unless the view takes anonymous requests, the roles each method
    needs (from the view's `required_roles`) and the processing-mode header on every handler."""

    def get_tags(self) -> list[str]:
        first = self.path.strip("/").split("/")[0]
        if first == "devicecontrol" and "/bulkoperations" in self.path:
            return ["bulk operations"]
        return [{"tenant": "platform", "user": "platform"}.get(first, first)]

    def get_auth(self) -> list[dict[str, list[str]]]:
        if getattr(self.view, "authentication_classes", None) == []:
            return []
        return [{"basicAuth": []}]

    def _get_request_body(self, direction: str = "request") -> Any:
        """drf-spectacular reads bodies of POST, PUT and PATCH only; some of our DELETEs take one
        (removing several children), so a declared body is described for DELETE too."""
        if self.method != "DELETE" or self.get_request_serializer() is None:
            return super()._get_request_body(direction)
        self.method = "POST"
        try:
            return super()._get_request_body(direction)
        finally:
            self.method = "DELETE"

    def get_operation_id(self) -> str:
        """`inventory_managedObjects_id_get`: unique by path and method, stable across runs."""
        parts = [part.strip("{}") for part in self.path.strip("/").split("/")]
        return "_".join([*parts, self.method.lower()])

    def get_description(self) -> str:
        return ""  # view docstrings are written for developers; descriptions come from schema.py

    def get_override_parameters(self) -> list[Any]:
        handler = getattr(self.view, self.method.lower(), None)
        extra = [IDEMPOTENCY_KEY] if getattr(handler, "idempotent_create", False) else []
        return [*super().get_override_parameters(), PROCESSING_MODE, *extra]

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is not None and not self.get_auth():
            operation["security"] = []  # explicitly anonymous
        roles = getattr(self.view, "required_roles", {}).get(self.method)
        if operation is None or roles is None or not self.get_auth():
            if operation is not None:
                operation.pop(OWNER, None)
            return operation
        needed = (
            "any one of " + ", ".join(f"`{role}`" for role in sorted(roles))
            if roles
            else "any authenticated user"
        )
        owner = operation.pop(OWNER, None)
        if owner:
            needed += f", or ownership of the {owner}"
        text = operation.get("description", "")
        operation["description"] = f"{text}\n\nRoles: {needed}.".strip()
        return operation


# --- The platform and session resources, realtime ---------------------------------------------

PLATFORM_SCHEMAS: dict[str, SchemaDict] = {
    "PlatformApi": obj(
        {
            "self": url(),
            "inventory": {"type": "object"},
            "identity": {"type": "object"},
            "deviceControl": {"type": "object"},
            "user": ref("Link"),
            "tenant": ref("Link"),
        },
        ["self"],
        description="Each area's API resource, as its own GET answers it (platform.md)",
    ),
    "CurrentTenant": obj(
        {
            "self": url(),
            "name": {"type": "string"},
            "domainName": {"type": "string"},
            "allowCreateTenants": {"type": "boolean"},
            "customProperties": {"type": "object"},
            "applications": {"type": "object"},
            "ownedApplications": {"type": "object"},
        },
        ["self", "name"],
    ),
    "CurrentUser": obj(
        {
            "self": url(),
            "id": {"type": "string"},
            "userName": {"type": "string"},
            "firstName": {"type": "string"},
            "lastName": {"type": "string"},
            "email": {"type": "string"},
            "shouldResetPassword": {"type": "boolean"},
            "twoFactorAuthenticationEnabled": {"type": "boolean"},
            "lastPasswordChange": DATE_TIME,
            "effectiveRoles": {
                "type": "array",
                "items": obj(
                    {"id": {"type": "string"}, "name": {"type": "string"}, "self": url()},
                    ["id", "name"],
                ),
            },
            "devicePermissions": {"type": "object"},
        },
        ["self", "id", "userName", "effectiveRoles"],
    ),
    "LoginOptionCollection": obj(
        {
            "self": url(),
            "loginOptions": {
                "type": "array",
                "items": obj(
                    {
                        "id": {"type": "string"},
                        "type": {"type": "string"},
                        "self": url(),
                        "userManagementSource": {"type": "string"},
                        "visibleOnLoginPage": {"type": "boolean"},
                    },
                    ["id", "type"],
                ),
            },
        },
        ["loginOptions"],
    ),
    "BayeuxMessage": obj(
        {
            "channel": {"type": "string", "examples": ["/meta/handshake", "/meta/connect"]},
            "clientId": {"type": "string"},
            "id": {"type": "string"},
            "subscription": {"type": "string", "examples": ["/operations/4712"]},
            "successful": {"type": "boolean"},
            "error": {"type": "string", "examples": ["403::Subscription denied"]},
            "advice": {"type": "object"},
            "ext": {"type": "object"},
            "data": {},
        },
        ["channel"],
        description=f"A Bayeux 1.0 message ({REALTIME_DOC})",
    ),
    "BayeuxReply": obj(
        {"channel": {"type": "string"}, "successful": {"type": "boolean"}, "id": {}},
        description=(
            "A reply or an event, shaped as a BayeuxMessage; `channel` is missing only in the "
            "reply to a message that had none, and `id` is echoed as the message sent it"
        ),
    ),
}


@cache
def _attach() -> None:
    from deviceplatform.api import session_views

    extend_schema_view(
        get=c8y_operation(
            "The platform's API resources",
            response=ref("PlatformApi"),
            media_type=MediaType.PLATFORM_API,
        )
    )(session_views.PlatformView)
    extend_schema_view(
        get=c8y_operation(
            "The current tenant",
            response=ref("CurrentTenant"),
            media_type=MediaType.CURRENT_TENANT,
            parameters=[OpenApiParameter("withParent", bool, description="Accepted, no effect")],
        )
    )(session_views.CurrentTenantView)
    extend_schema_view(
        get=c8y_operation(
            "The login options (no credentials needed)",
            response=ref("LoginOptionCollection"),
            media_type=MediaType.LOGIN_OPTION_COLLECTION,
        )
    )(session_views.LoginOptionsView)
    extend_schema_view(
        get=c8y_operation(
            "The current user and its effective roles",
            response=ref("CurrentUser"),
            media_type=MediaType.CURRENT_USER,
        )
    )(session_views.CurrentUserView)


def realtime_paths() -> dict[str, Any]:
    """The four Bayeux endpoints (plain async views, not enumerated by drf-spectacular). OpenAPI
    cannot describe the protocol; the long-polling POST is described, the WebSocket upgrade at
    the same path named."""
    from deviceplatform.realtime.routing import ENDPOINTS

    messages = {"oneOf": [ref("BayeuxMessage"), {"type": "array", "items": ref("BayeuxMessage")}]}
    paths: dict[str, Any] = {}
    for endpoint, family in ENDPOINTS.items():
        channels = (
            "`/operations/{deviceId}`, `/operations/*`, `/managedobjects/{id}`, `/managedobjects/*`"
            if family.value == "realtime"
            else "`/{agentId}`: the operations routed to the agent"
        )
        paths[f"/{endpoint}"] = {
            "post": {
                "operationId": "realtime_" + endpoint.replace("/", "_"),
                "summary": f"Bayeux long-polling ({family.value} channels)",
                "description": (
                    f"Bayeux 1.0 (CometD) over HTTP long-polling: POST one message or an array "
                    f"(handshake, connect, subscribe, unsubscribe, disconnect); the answer is an "
                    f"array. The same path takes a WebSocket upgrade (GET with `Upgrade: "
                    f"websocket`), which OpenAPI cannot describe. The path may end in "
                    f"`/handshake`, `/connect`, ... as CometD JavaScript sends it. Channels: "
                    f"{channels}. Credentials: the handshake's `ext.com.cumulocity.authn.token` "
                    f"or Basic auth. Protocol: {REALTIME_DOC}."
                ),
                "tags": ["realtime"],
                "externalDocs": {"description": "Realtime notifications", "url": REALTIME_DOC},
                "security": [{"basicAuth": []}, {}],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": messages}},
                },
                "responses": {
                    "200": {
                        "description": "The replies, and the events of a connect",
                        "content": {
                            JSON: {"schema": {"type": "array", "items": ref("BayeuxReply")}}
                        },
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                    "413": {"$ref": "#/components/responses/RequestEntityTooLarge"},
                    "429": {"$ref": "#/components/responses/TooManyRequests"},
                },
            }
        }
    return paths


def operations_paths() -> dict[str, Any]:
    """Health and metrics (README "Health and metrics"): plain views for orchestrators and
    Prometheus, described by hand."""
    health = {
        "schema": obj(
            {
                "status": {"type": "string", "enum": ["UP", "DOWN"]},
                "checks": {
                    "type": "object",
                    "additionalProperties": obj(
                        {
                            "status": {"type": "string", "enum": ["UP", "DOWN"]},
                            "latencyMs": {"type": "number"},
                            "error": {"type": "string"},
                        },
                        ["status"],
                    ),
                },
            },
            ["status"],
        )
    }

    def probe(summary: str, description: str, down: bool) -> dict[str, Any]:
        responses: dict[str, Any] = {
            "200": {"description": "UP", "content": {JSON: health}},
        }
        if down:
            responses["503"] = {"description": "A check is DOWN", "content": {JSON: health}}
        return {
            "get": {
                "operationId": "health_" + summary.split()[0].lower(),
                "summary": summary,
                "description": description,
                "tags": ["operations"],
                "security": [],
                "responses": responses,
            }
        }

    return {
        "/health/live": probe("Live: the process answers HTTP", "Checks nothing else.", False),
        "/health/ready": probe(
            "Ready: database, migrations, Redis, worker and beat heartbeats",
            "200 when every check is UP, else 503 with each check's status and latency.",
            True,
        ),
        "/metrics": {
            "get": {
                "operationId": "metrics_get",
                "summary": "Prometheus metrics",
                "description": (
                    "The Prometheus text format, to METRICS_ALLOWED_NETWORKS (default: this host) "
                    "or with `Authorization: Bearer $METRICS_TOKEN`; 404 when both are empty. "
                    "Through a proxy the client's address counts: the last X-Forwarded-For entry "
                    "when USE_X_FORWARDED_FOR is on, none otherwise (never the proxy's own)."
                ),
                "tags": ["operations"],
                "security": [{}, {"metricsToken": []}],
                "responses": {
                    "200": {
                        "description": "The samples",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "403": {"$ref": "#/components/responses/Forbidden"},
                    "404": {"$ref": "#/components/responses/NotFound"},
                },
            }
        },
    }


# --- Hooks ----------------------------------------------------------------------------------------


def preprocess(endpoints: list[tuple[str, str, str, Any]], **kwargs: Any) -> list[Any]:
    """Cumulocity paths have no trailing slash (both forms are served); the admin is not API."""
    _attach()
    result = []
    for path_, path_regex, method, callback in endpoints:
        if path_.startswith(("/admin", "/static", "/docs", "/openapi")):
            continue
        for old, new in PATH_NAMES.items():
            path_ = path_.replace(old, new)
        result.append((path_.rstrip("/") or "/", path_regex, method, callback))
    return result


# URL keyword arguments as the Cumulocity documentation names them.
PATH_NAMES = {"{child_pk}": "{childId}", "{external_id}": "{externalId}", "{device_id}": "{id}"}


ERROR_RESPONSES: dict[str, tuple[str, str]] = {
    "BadRequest": ("400", "The body is not valid JSON (`general/badRequest`)"),
    "Unauthorized": (
        "401",
        "Credentials missing or wrong (`security/Unauthorized`), with WWW-Authenticate",
    ),
    "Forbidden": ("403", "Neither the required role nor ownership (`security/Forbidden`)"),
    "NotFound": ("404", "The object in the path does not exist (`<area>/Not Found`)"),
    "PreconditionFailed": ("412", "If-Match names an outdated version"),
    "RequestEntityTooLarge": ("413", "The body exceeds MAX_REQUEST_BODY_BYTES"),
    "UnsupportedMediaType": (
        "415",
        "The body's Content-Type is neither application/json nor a Cumulocity +json type",
    ),
    "InvalidData": (
        "422",
        "A field, body, query parameter or header is invalid (`undefined/validationError`, "
        "`devicecontrol/Invalid Data`, ...)",
    ),
    "TooManyRequests": ("429", "Too many failed logins (`security/tooManyRequests`)"),
}

SHARED_SCHEMAS: dict[str, SchemaDict] = {
    "Error": obj(
        {
            "error": {
                "type": "string",
                "description": "`<area>/<kind>`",
                "examples": ["inventory/Not Found"],
            },
            "message": {"type": "string", "description": "For people; do not parse it"},
            "info": {"type": "string", "const": INFO_URL},
            "requestId": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9._:-]{1,128}$",
                "description": "Not Cumulocity's: the request's `X-Request-ID`, also on the "
                "server's log lines of the request",
            },
        },
        ["error", "message", "info"],
        description=f'Every 4xx and 5xx body ({CONVENTIONS} "Errors")',
    ),
    "PageStatistics": obj(
        {
            "pageSize": {"type": "integer", "minimum": 1},
            "currentPage": {"type": "integer", "minimum": 1},
            "totalPages": {
                "type": "integer",
                "minimum": 0,
                "description": "withTotalPages=true only",
            },
            "totalElements": {
                "type": "integer",
                "minimum": 0,
                "description": "withTotalElements=true only",
            },
        },
        ["pageSize", "currentPage"],
        additional=False,
    ),
    "Link": obj({"self": url()}, ["self"]),
}

TAGS = [
    ("platform", "The platform root, the current tenant and user, login options", "platform"),
    ("inventory", "Managed objects and their child and parent references", "inventory"),
    ("identity", "External IDs of managed objects", "identity"),
    ("devicecontrol", "Operations, device registration and credentials", "devicecontrol"),
    ("bulk operations", "One operation for many devices, at a ramp or rate", "bulkoperations"),
    ("realtime", "Bayeux/CometD notifications (long-polling and WebSocket)", "realtime"),
    ("operations", "Health probes and Prometheus metrics (no credentials)", "../api"),
]
BODY_METHODS = ("post", "put")
HAND_WRITTEN = {"realtime", "operations"}  # tags of the paths described in full by hand


def _has_path_parameter(path_: str) -> bool:
    return "{" in path_


def postprocess(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """Shared components, Basic auth, and the common error responses of every operation."""
    components = result.setdefault("components", {})
    components.setdefault("schemas", {}).update({**SHARED_SCHEMAS, **PLATFORM_SCHEMAS})
    result.setdefault("paths", {}).update({**realtime_paths(), **operations_paths()})
    components["responses"] = {
        name: {
            "description": text,
            "content": {ERROR_MEDIA: {"schema": ref("Error")}},
        }
        for name, (_, text) in ERROR_RESPONSES.items()
    }
    components["securitySchemes"] = {
        "metricsToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "METRICS_TOKEN, for /metrics only",
        },
        "basicAuth": {
            "type": "http",
            "scheme": "basic",
            "description": (
                "User name `user` or `<tenant>/user`. After too many failed logins for a user "
                'name or from a client address, 429 with Retry-After (README "Failed logins").'
            ),
        },
    }
    for path_, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "delete") or HAND_WRITTEN & set(
                operation.get("tags", [])
            ):
                continue
            if BODY_REQUIRED in operation and "requestBody" in operation:
                operation["requestBody"]["required"] = operation.pop(BODY_REQUIRED)
            wanted = ["InvalidData"]
            if operation.get("security") != []:
                wanted += ["Unauthorized", "Forbidden", "TooManyRequests"]
            if _has_path_parameter(path_):
                wanted.append("NotFound")
            if method in BODY_METHODS or "requestBody" in operation:
                wanted += ["BadRequest", "RequestEntityTooLarge", "UnsupportedMediaType"]
            if any(p.get("name") == "If-Match" for p in operation.get("parameters", [])):
                wanted.append("PreconditionFailed")
            responses = operation.setdefault("responses", {})
            for name in wanted:
                responses.setdefault(
                    ERROR_RESPONSES[name][0], {"$ref": f"#/components/responses/{name}"}
                )
            operation["responses"] = dict(sorted(responses.items()))
    result["paths"] = dict(sorted(result.get("paths", {}).items()))
    result["externalDocs"] = {"description": "API conventions", "url": CONVENTIONS}
    result["tags"] = [
        {"name": name, "description": text, "externalDocs": {"url": f"docs/api/{page}.md"}}
        for name, text, page in TAGS
    ]
    return result
