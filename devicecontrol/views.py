"""Device-control REST resources (spec devicecontrol.md): validate, call a service or selector, render."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from devicecontrol import selectors, services
from devicecontrol.filters import OperationFilter, page_query, simple_operations
from devicecontrol.models import NewDeviceRequest, Operation
from devicecontrol.poll_limits import poll_admit, poll_missed
from devicecontrol.serializers import (
    BulkDeviceRow,
    bulk_new_device_result_json,
    bulk_new_device_rows,
    device_credentials_json,
    devicecontrol_api_json,
    new_device_request_create_input,
    new_device_request_json,
    new_device_request_update_input,
    new_device_request_url,
    operation_json,
    operation_row_json,
    operation_url,
    security_token_input,
)
from deviceplatform.api.auth_throttle import client_address
from deviceplatform.api.exceptions import ApiError, MissingFields, NotFound, ValidationFailed
from deviceplatform.api.idempotency import idempotent_create
from deviceplatform.api.media_types import MediaType, response_content_type
from deviceplatform.api.pagination import paginated
from deviceplatform.api.params import parse_id
from deviceplatform.api.parsers import CsvUploadParser
from deviceplatform.api.permissions import has_any_role, is_owner
from deviceplatform.api.views import CumulocityView
from deviceplatform.roles import Role
from deviceplatform.services import validate_device_id
from inventory.selectors import managed_object_with_agent

READ = frozenset({Role.DEVICE_CONTROL_READ})
ADMIN = frozenset({Role.DEVICE_CONTROL_ADMIN})
BOOTSTRAP = frozenset({Role.DEVICE_BOOTSTRAP})


class DeviceControlView(CumulocityView):
    def owner_of(self, obj: Operation) -> str | None:
        """The owner rule for operations is the target device's owner (auth.md §4)."""
        return obj.device.owner


class DeviceControlApiView(DeviceControlView):
    required_roles = {"GET": READ}

    def get(self, request: Any) -> Response:
        return self.respond(devicecontrol_api_json(self.base), MediaType.DEVICE_CONTROL_API)


class OperationCollectionView(DeviceControlView):
    """`GET` (FIFO, filtered), `POST` (create, agent resolution), `DELETE` (by filter)."""

    required_roles = {"GET": frozenset(), "POST": ADMIN, "DELETE": ADMIN}
    owner_rule_methods = frozenset({"POST"})

    def get(self, request: Any) -> Response:
        query = page_query(request.GET)
        if query is not None and selectors.fixed_page_available():
            return self.fixed_page(request, *query)
        return self.queryset_page(request)

    def queryset_page(self, request: Any) -> Response:
        """Any query (SQLite: every one) through the ORM: the filter set, or for the simple
        shapes the same queryset built without it (filters.simple_operations)."""
        visible = selectors.operations_visible_to(request.user)
        simple = simple_operations(request.GET, visible)
        if simple is not None:
            queryset = simple[0].order_by(*simple[1])
        else:
            filterset = OperationFilter(request.GET, queryset=visible)
            queryset = filterset.qs.order_by(*filterset.ordering())
        with_external_ids = bool(request.GET.get("agentId"))
        base = self.base

        def render(rows: list[Operation]) -> list[dict[str, Any]]:
            device_ids = [row.device_id for row in rows]
            names = selectors.device_names(device_ids)
            external = (
                selectors.device_external_ids(device_ids, base=base) if with_external_ids else None
            )
            return [
                operation_json(
                    row,
                    base=base,
                    device_name=names.get(row.device_id),
                    external_ids=external.get(row.device_id, []) if external is not None else None,
                )
                for row in rows
            ]

        return self.respond(
            paginated(request, queryset, key="operations", render=render),
            MediaType.OPERATION_COLLECTION,
        )

    def fixed_page(
        self, request: Any, conditions: list[tuple[str, str, Any]], descending: bool
    ) -> Response:
        """The agent's poll and a device's history page (PostgreSQL): the same document as the
        queryset path, from one fixed statement's tuples (selectors.OperationPage)."""
        user = request.user
        rows = selectors.OperationPage(
            conditions,
            owner=None if selectors.sees_all_operations(user) else user.username,
            descending=descending,
        )
        with_external_ids = bool(request.GET.get("agentId"))
        base = self.base

        def render(page: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
            if not with_external_ids:
                return [operation_row_json(row, base=base) for row in page]
            external = selectors.device_external_ids([row[1] for row in page], base=base)
            return [
                operation_row_json(row, base=base, external_ids=external.get(row[1], []))
                for row in page
            ]

        return self.respond(
            paginated(request, rows, key="operations", render=render, count=rows.count),
            MediaType.OPERATION_COLLECTION,
        )

    @idempotent_create
    def post(self, request: Any) -> Response:
        body = self.request_object()
        # Check order (devicecontrol.md §6): deviceId present, device exists, permission, agent.
        if body.get("deviceId") in (None, ""):
            raise MissingFields(["deviceId"])
        try:
            device_id = parse_id(body["deviceId"], field="deviceId")
        except ValidationFailed:
            raise ValidationFailed(
                f"Invalid deviceId {body['deviceId']!r}", error="devicecontrol/Invalid Data"
            ) from None
        found = managed_object_with_agent(device_id)
        if found is None:
            raise ValidationFailed(
                f"Device {device_id} does not exist", error="devicecontrol/Invalid Data"
            )
        device, agent_id = found
        if not (has_any_role(request.user, ADMIN) or is_owner(request.user, device.owner)):
            raise PermissionDenied()
        operation = services.operation_create(
            device=device, data=body, notify=self.notify, agent_id=agent_id
        )
        return self.respond(
            lambda: operation_json(operation, base=self.base),
            MediaType.OPERATION,
            etag=True,
            status=201,
            location=operation_url(self.base, operation.pk),
        )

    def delete(self, request: Any) -> Response:
        filterset = OperationFilter(request.GET, queryset=Operation.objects.all())
        services.operations_delete(queryset=filterset.qs, notify=self.notify)
        return self.no_content()


class OperationDetailView(DeviceControlView):
    """`GET` and `PUT` of one operation; there is no single DELETE (405, devicecontrol.md §8)."""

    required_roles = {"GET": READ, "PUT": ADMIN}
    owner_rule_methods = frozenset({"GET", "PUT"})

    def get_operation(self, pk: str) -> Operation:
        operation = selectors.operation_get(pk=pk)
        self.check_object_permissions(self.request, operation)
        return operation

    def get(self, request: Any, pk: str) -> Response:
        operation = self.get_operation(pk)
        return self.respond(
            operation_json(operation, base=self.base), MediaType.OPERATION, etag=True
        )

    def put(self, request: Any, pk: str) -> Response:
        operation = self.get_operation(pk)
        operation = services.operation_update(
            operation_id=operation.pk,
            data=self.request_object(),
            notify=self.notify,
            precondition=self.if_match(lambda row: operation_json(row, base=self.base)),
        )
        return self.respond(
            lambda: operation_json(operation, base=self.base), MediaType.OPERATION, etag=True
        )


class OperationRetryView(DeviceControlView):
    """`POST /devicecontrol/operations/{id}/retry` (extension): re-issue a FAILED operation."""

    required_roles = {"POST": ADMIN}
    owner_rule_methods = frozenset({"POST"})

    def post(self, request: Any, pk: str) -> Response:
        operation = selectors.operation_get(pk=pk)
        self.check_object_permissions(request, operation)
        self.no_body()
        retry = services.operation_retry(operation=operation, notify=self.notify)
        return self.respond(
            lambda: operation_json(retry, base=self.base),
            MediaType.OPERATION,
            etag=True,
            status=201,
            location=operation_url(self.base, retry.pk),
        )


class OperationCancelView(DeviceControlView):
    """`POST /devicecontrol/operations/{id}/cancel` (extension): a PENDING operation fails at
    once; an EXECUTING one gets `c8y_CancelRequested` for its agent (README "Cancel that reaches
    the device"). 200 with the operation."""

    required_roles = {"POST": ADMIN}
    owner_rule_methods = frozenset({"POST"})

    def post(self, request: Any, pk: str) -> Response:
        operation = selectors.operation_get(pk=pk)
        self.check_object_permissions(request, operation)  # 404 before 403
        self.no_body()
        cancelled = services.operation_cancel(
            operation=operation, by=request.user.username, notify=self.notify
        )
        return self.respond(
            lambda: operation_json(cancelled, base=self.base), MediaType.OPERATION, etag=True
        )


# --- device registration and credentials (Cumulocity's bootstrap flow) -------------------------


class NewDeviceRequestCollectionView(CumulocityView):
    """`GET` (paged, `status` filter) and `POST` (register a device id)."""

    required_roles = {"GET": READ, "POST": ADMIN}

    def get(self, request: Any) -> Response:
        base = self.base
        return self.respond(
            paginated(
                request,
                selectors.new_device_requests(request.GET),
                key="newDeviceRequests",
                render=lambda rows: [new_device_request_json(row, base=base) for row in rows],
            ),
            MediaType.NEW_DEVICE_REQUEST_COLLECTION,
        )

    def post(self, request: Any) -> Response:
        device_id, token = new_device_request_create_input(self.request_object())
        created = services.new_device_request_create(
            device_id=device_id, owner=request.user.username, security_token=token
        )
        return self.respond(
            lambda: new_device_request_json(created, base=self.base),
            MediaType.NEW_DEVICE_REQUEST,
            etag=True,
            status=201,
            location=new_device_request_url(self.base, created.device_id),
        )


class NewDeviceRequestDetailView(CumulocityView):
    """`GET`, `PUT` (accept) and `DELETE` (reject) of one request, by device id."""

    required_roles = {"GET": READ, "PUT": ADMIN, "DELETE": ADMIN}

    def render(self, row: NewDeviceRequest) -> dict[str, Any]:
        return new_device_request_json(row, base=self.base)

    def get(self, request: Any, device_id: str) -> Response:
        found = selectors.new_device_request_get(device_id=device_id)
        return self.respond(self.render(found), MediaType.NEW_DEVICE_REQUEST, etag=True)

    def put(self, request: Any, device_id: str) -> Response:
        status, token = new_device_request_update_input(self.request_object())
        accepted = services.new_device_request_accept(
            device_id=device_id,
            status=status,
            accepted_by=request.user.username,
            security_token=token,
            precondition=self.if_match(self.render),
        )
        return self.respond(lambda: self.render(accepted), MediaType.NEW_DEVICE_REQUEST, etag=True)

    def delete(self, request: Any, device_id: str) -> Response:
        services.new_device_request_delete(
            device_id=device_id, precondition=self.if_match(self.render)
        )
        return self.no_content()


# Every poll that gets no credentials gets this same answer: unknown id, not accepted yet, issued
# before, wrong token. A poller learns nothing about which ids are registered.
NO_CREDENTIALS = "No device credentials for this id: register it, and wait until it is accepted"


class DeviceCredentialsView(CumulocityView):
    """`POST /devicecontrol/deviceCredentials`: a device, logged in as the bootstrap user, asks
    for its own credentials (only ROLE_DEVICE_BOOTSTRAP may; admins get 403)."""

    required_roles = {"POST": BOOTSTRAP}

    def post(self, request: Any) -> Response:
        body = self.request_object()
        if body.get("id") in (None, ""):
            raise MissingFields(["id"])
        device_id = validate_device_id(body["id"])
        token = security_token_input(body.get("securityToken"))
        client = client_address(request.META)
        poll_admit(device_id, client)
        outcome, credentials = services.device_credentials_poll(
            device_id=device_id, security_token=token
        )
        if outcome.is_miss:
            poll_missed(client)
        if credentials is None:
            raise NotFound(NO_CREDENTIALS, error="devicecontrol/Not Found")
        # Always with a body, whatever Accept says: the password is shown this once.
        return Response(
            device_credentials_json(
                device_id=credentials.device_id,
                username=credentials.username,
                password=credentials.password,
                base=self.base,
            ),
            status=201,
            headers={"Cache-Control": "no-store"},
            content_type=response_content_type(
                request.META.get("HTTP_ACCEPT"), MediaType.DEVICE_CREDENTIALS
            ),
        )


class BulkNewDeviceRequestView(CumulocityView):
    """`POST /devicecontrol/bulkNewDeviceRequests`: a CSV file (multipart part `file`) of device
    ids and passwords; each row is provisioned in its own transaction, and the answer lists
    every row's result. A file that cannot be read as such a CSV is one 422, nothing written."""

    required_roles = {"POST": ADMIN}
    parser_classes = [CsvUploadParser]

    def post(self, request: Any) -> Response:
        upload = request.FILES.get("file")
        if upload is None:
            raise ValidationFailed(
                "A multipart/form-data part named 'file' holding the CSV is required",
                error="devicecontrol/Invalid Data",
            )
        rows = bulk_new_device_rows(upload.read(), max_rows=settings.BULK_NEW_DEVICE_MAX_ROWS)
        results: list[tuple[BulkDeviceRow, str, str | None]] = []
        first_line: dict[str, int] = {}  # lower-cased ID -> the line that named it first
        for row in rows:
            key = row.get("ID").lower()
            if key and key in first_line:
                reason = f"The ID {row.get('ID')} is on line {first_line[key]} already"
                results.append((row, "FAILED", reason))
                continue
            first_line.setdefault(key, row.line_number)
            try:
                status = services.device_bulk_register(row=row, owner=request.user.username)
            except ApiError as exc:
                results.append((row, "FAILED", exc.message))
            else:
                results.append((row, status, None))
        return self.respond(
            bulk_new_device_result_json(results), MediaType.BULK_NEW_DEVICE_REQUEST, status=201
        )
