"""Wire format of device control (spec devicecontrol.md): operations, device registration requests
and device credentials."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from django.conf import settings

from devicecontrol.models import NewDeviceRequest, Operation, OperationStatus
from deviceplatform.api.dates import format_datetime
from deviceplatform.api.exceptions import MissingFields, ValidationFailed

INVALID_DATA = "devicecontrol/Invalid Data"


def devicecontrol_api_json(base: str) -> dict[str, Any]:
    """`GET /devicecontrol` (devicecontrol.md §2); the Java SDK reads `operations.self`."""
    operations = f"{base}/devicecontrol/operations"
    return {
        "self": f"{base}/devicecontrol",
        "operations": {"self": operations},
        "operationsByStatus": f"{operations}?status={{status}}",
        "operationsByAgentId": f"{operations}?agentId={{agentId}}",
        "operationsByAgentIdAndStatus": f"{operations}?agentId={{agentId}}&status={{status}}",
        "operationsByDeviceId": f"{operations}?deviceId={{deviceId}}",
        "operationsByDeviceIdAndStatus": f"{operations}?deviceId={{deviceId}}&status={{status}}",
    }


# --- operations ------------------------------------------------------------------------------------

# Keys of an operation body that are never fragments (devicecontrol.md §3, §6, §7). `deviceId` and
# `status` are read by the services; the rest are read-only and ignored on input.
READ_ONLY_KEYS = frozenset(
    {
        "id",
        "self",
        "deviceId",
        "status",
        "creationTime",
        "failureReason",
        "bulkOperationId",
        "deviceName",
        "deviceExternalIDs",
        "agentId",
        "delivery",
        "retryOf",
        "attempt",
        "retryAt",
    }
)
# Extension keys beyond Cumulocity (README "Beyond Cumulocity"): seconds, validated by the services.
EXTENSION_KEYS = frozenset({"pendingTimeout", "executionTimeout"})


def operation_url(base: str, pk: int) -> str:
    return f"{base}/devicecontrol/operations/{pk}"


def operation_json(
    operation: Operation,
    *,
    base: str,
    device_name: str | None = None,
    external_ids: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One operation. `device_name` and `external_ids` are given only for collection responses
    (`deviceName` when the device has a name; `deviceExternalIDs` when listing by agentId)."""
    body: dict[str, Any] = {
        "id": str(operation.pk),
        "self": operation_url(base, operation.pk),
        "deviceId": str(operation.device_id),
    }
    if device_name is not None:
        body["deviceName"] = device_name
    body["status"] = operation.status
    body["creationTime"] = format_datetime(operation.creation_time)
    if operation.status == OperationStatus.FAILED and operation.failure_reason is not None:
        body["failureReason"] = operation.failure_reason
    if operation.bulk_operation_id is not None:
        body["bulkOperationId"] = str(operation.bulk_operation_id)
    if operation.retry_of_id is not None:
        body["retryOf"] = str(operation.retry_of_id)
    _retry_state(body, operation.attempt, operation.retry_at, operation.fragments)
    body.update(operation.fragments)
    if external_ids is not None:
        body["deviceExternalIDs"] = {
            "self": f"{base}/identity/globalIds/{operation.device_id}/externalIds",
            "externalIds": external_ids,
        }
    return body


def _retry_state(
    body: dict[str, Any], attempt: int, retry_at: Any, fragments: dict[str, Any]
) -> None:
    """Automatic retries (README "Automatic retries"): `attempt` once there was a retry or when
    the operation has its own `retryConfig`; `retryAt` while a retry is booked."""
    if attempt > 1 or "retryConfig" in fragments:
        body["attempt"] = attempt
    if retry_at is not None:
        body["retryAt"] = format_datetime(retry_at)


def operation_row_json(
    row: tuple[Any, ...], *, base: str, external_ids: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`operation_json` of a collection item from a `selectors.OperationPage` tuple (id, device_id,
    status, creation_time, failure_reason, bulk_operation_id, retry_of_id, fragments, attempt,
    retry_at, device name): the same document, key for key, without a model instance."""
    (
        pk,
        device_id,
        status,
        creation_time,
        failure_reason,
        bulk_id,
        retry_of_id,
        fragments,
        attempt,
        retry_at,
        name,
    ) = row
    body: dict[str, Any] = {
        "id": str(pk),
        "self": f"{base}/devicecontrol/operations/{pk}",
        "deviceId": str(device_id),
    }
    if name is not None:
        body["deviceName"] = name
    body["status"] = status
    body["creationTime"] = format_datetime(creation_time)
    if status == OperationStatus.FAILED and failure_reason is not None:
        body["failureReason"] = failure_reason
    if bulk_id is not None:
        body["bulkOperationId"] = str(bulk_id)
    if retry_of_id is not None:
        body["retryOf"] = str(retry_of_id)
    _retry_state(body, attempt, retry_at, fragments)
    body.update(fragments)
    if external_ids is not None:
        body["deviceExternalIDs"] = {
            "self": f"{base}/identity/globalIds/{device_id}/externalIds",
            "externalIds": external_ids,
        }
    return body


# --- device registration (newDeviceRequests) and device credentials ----------------------------

# Keys of a newDeviceRequest the server owns: ignored in a request body (docs/api/conventions.md).
NEW_DEVICE_REQUEST_OWNED_KEYS = frozenset(
    {
        "self",
        "owner",
        "tenantId",
        "creationTime",
        "acceptedBy",
        "acceptanceTime",
        "credentialsIssuedTime",
        "securityTokenSet",
    }
)


def _body_keys(data: dict[str, Any], allowed: frozenset[str]) -> None:
    """422 naming the keys that are neither `allowed` nor owned by the server: a request stores
    no fragments, so a key it would silently drop (a `groupId`, say) is refused instead."""
    unknown = sorted(set(data) - allowed - NEW_DEVICE_REQUEST_OWNED_KEYS)
    if unknown:
        raise ValidationFailed(
            f"Unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            "a newDeviceRequest takes id, status (PUT) and securityToken",
            error=INVALID_DATA,
        )


def new_device_request_create_input(data: dict[str, Any]) -> tuple[object, str | None]:
    """(id, securityToken) of a POST body; `status` is ignored (a request starts waiting)."""
    _body_keys(data, frozenset({"id", "securityToken", "status"}))
    if data.get("id") in (None, ""):
        raise MissingFields(["id"])
    return data["id"], security_token_input(data.get("securityToken"))


def new_device_request_update_input(data: dict[str, Any]) -> tuple[object, str | None]:
    """(status, securityToken) of a PUT body; `id` is ignored (the path names the request)."""
    _body_keys(data, frozenset({"id", "securityToken", "status"}))
    if data.get("status") in (None, ""):
        raise MissingFields(["status"])
    return data["status"], security_token_input(data.get("securityToken"))


MAX_SECURITY_TOKEN_LENGTH = 1024


def security_token_input(value: object) -> str | None:
    """A security token: a non-empty string (absent or null: none)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValidationFailed(
            "Invalid value for securityToken: a non-empty string is expected", error=INVALID_DATA
        )
    if len(value) > MAX_SECURITY_TOKEN_LENGTH:
        raise ValidationFailed(
            f"Invalid value for securityToken: at most {MAX_SECURITY_TOKEN_LENGTH} characters "
            f"are allowed, not {len(value)}",
            error=INVALID_DATA,
        )
    return value


def new_device_request_url(base: str, device_id: str) -> str:
    return f"{base}/devicecontrol/newDeviceRequests/{quote(device_id, safe='')}"


def new_device_request_json(request: NewDeviceRequest, *, base: str) -> dict[str, Any]:
    """One request. The security token is never shown, only whether one is set; when the device
    last polled is left out (it changes every second while a device waits, and would change the
    ETag with it); the admin shows it."""
    body: dict[str, Any] = {
        "id": request.device_id,
        "self": new_device_request_url(base, request.device_id),
        "status": request.status,
        "owner": request.owner,
        "tenantId": settings.C8Y_TENANT_ID,
        "creationTime": format_datetime(request.creation_time),
    }
    if request.has_security_token:
        body["securityTokenSet"] = True
    if request.accepted_at is not None:
        body["acceptedBy"] = request.accepted_by
        body["acceptanceTime"] = format_datetime(request.accepted_at)
    if request.credentials_issued_at is not None:
        body["credentialsIssuedTime"] = format_datetime(request.credentials_issued_at)
    return body


def device_credentials_json(
    *, device_id: str, username: str, password: str, base: str
) -> dict[str, Any]:
    """The one answer that carries a device's password (shown once, never stored or logged)."""
    return {
        "id": device_id,
        "self": f"{base}/devicecontrol/deviceCredentials/{quote(device_id, safe='')}",
        "tenantId": settings.C8Y_TENANT_ID,
        "username": username,
        "password": password,
    }


# --- bulk registration: the CSV of `POST /devicecontrol/bulkNewDeviceRequests` ------------------

BULK_COLUMNS = ("ID", "CREDENTIALS", "TYPE", "NAME", "IDTYPE", "PATH", "ICCID", "SHELL")
SEPARATORS = (";", ",", "\t")
MASK = "******"


@dataclass(frozen=True)
class BulkDeviceRow:
    """One device line of the CSV: its 1-based line number in the file, its fields by column
    (only the known columns; missing ones are ""), and the line as it may be shown back."""

    line_number: int
    fields: dict[str, str] = field(repr=False)  # holds CREDENTIALS
    shown: str
    problem: str | None = None  # a row that cannot be read as a device (wrong field count)

    def get(self, column: str) -> str:
        return self.fields.get(column, "").strip()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationFailed(
            "The file is not a CSV in UTF-8: it holds bytes that are not UTF-8 text",
            error=INVALID_DATA,
        ) from None


def _header(first_line: str) -> tuple[str, list[str]]:
    """The separator (whichever of ; , tab splits the header into columns that include ID) and
    the column names, upper-cased."""
    best: tuple[str, list[str]] | None = None
    for separator in SEPARATORS:
        names = [
            name.strip().upper() for name in next(csv.reader([first_line], delimiter=separator))
        ]
        if "ID" in names and (best is None or len(names) > len(best[1])):
            best = (separator, names)
    if best is None:
        raise ValidationFailed(
            "The file has no ID column: its first line must name the columns, separated by ';', "
            f"',' or a tab, among them ID and CREDENTIALS (known columns: {', '.join(BULK_COLUMNS)})",
            error=INVALID_DATA,
        )
    separator, names = best
    duplicated = sorted({name for name in names if name and names.count(name) > 1})
    if duplicated:
        raise ValidationFailed(
            f"The header names column{'s' if len(duplicated) > 1 else ''} "
            f"{', '.join(duplicated)} more than once",
            error=INVALID_DATA,
        )
    if "CREDENTIALS" not in names:
        raise ValidationFailed(
            "The file has no CREDENTIALS column: every device needs its password here",
            error=INVALID_DATA,
        )
    return separator, names


def _row(
    number: int, names: list[str], id_index: int, values: list[str], separator: str
) -> BulkDeviceRow:
    if len(values) == len(names):
        fields = {name: value for name, value in zip(names, values, strict=True) if name}
        shown = [
            MASK if name == "CREDENTIALS" else value
            for name, value in zip(names, values, strict=True)
        ]
        problem = None
    else:
        fields = {"ID": values[id_index]} if id_index < len(values) else {}
        shown = [value if index == id_index else MASK for index, value in enumerate(values)]
        problem = f"Expected {len(names)} fields as in the header, found {len(values)}"
    return BulkDeviceRow(number, fields, separator.join(shown), problem)


def bulk_new_device_rows(raw: bytes, *, max_rows: int) -> list[BulkDeviceRow]:
    """The device rows of an uploaded CSV; 422 for a file that is not one (not UTF-8 text, no ID
    or CREDENTIALS column, no device row, more than `max_rows` rows), before anything is written.
    A password is never part of `shown`: the CREDENTIALS field is masked, and in a row whose field
    count does not match the header every field but the ID is."""
    text = _decode(raw)
    if "\x00" in text:
        raise ValidationFailed("The file is not a CSV: it holds NUL characters", error=INVALID_DATA)
    stripped = text.lstrip("\r\n")
    if not stripped.strip():
        raise ValidationFailed("The file is empty", error=INVALID_DATA)
    skipped = text.count("\n", 0, len(text) - len(stripped))  # blank lines above the header
    separator, names = _header(stripped.split("\n", 1)[0].rstrip("\r"))
    id_index = names.index("ID")
    reader = csv.reader(io.StringIO(stripped, newline=""), delimiter=separator)
    rows: list[BulkDeviceRow] = []
    try:
        next(reader)  # the header
        start = reader.line_num + 1  # a quoted field may span lines: a row's first line
        for values in reader:
            number, start = skipped + start, reader.line_num + 1
            if not any(value.strip() for value in values):
                continue
            if len(rows) >= max_rows:
                raise ValidationFailed(
                    f"The file holds more than {max_rows} device rows: split it",
                    error=INVALID_DATA,
                )
            rows.append(_row(number, names, id_index, values, separator))
    except csv.Error as exc:
        raise ValidationFailed(
            f"The file is not a CSV: line {skipped + reader.line_num}: {exc}", error=INVALID_DATA
        ) from None
    if not rows:
        raise ValidationFailed("The file holds no device rows below its header", error=INVALID_DATA)
    return rows


def bulk_new_device_result_json(
    results: list[tuple[BulkDeviceRow, str, str | None]],
) -> dict[str, Any]:
    """The answer of a bulk registration: each row's (row, status, failure reason)."""
    created = sum(1 for _, status, _ in results if status == "CREATED")
    failed = [(row, reason) for row, status, reason in results if status == "FAILED"]
    return {
        "numberOfAll": len(results),
        "numberOfCreated": created,
        "numberOfFailed": len(failed),
        "numberOfSuccessful": len(results) - len(failed),
        "credentialUpdatedList": [
            {"bulkNewDeviceStatus": status, "deviceId": row.get("ID")}
            for row, status, _ in results
            if status != "FAILED"
        ],
        "failedCreationList": [
            {
                "bulkNewDeviceStatus": "FAILED",
                "deviceId": row.get("ID"),
                "failureReason": reason,
                "line": row.shown,
                "lineNumber": row.line_number,
            }
            for row, reason in failed
        ],
    }
