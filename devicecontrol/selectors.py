"""Operation reads with rules: visibility by role and device owner, lookups that 404, enrichment;
new device requests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.db import connections
from django.db.models import QuerySet

from devicecontrol.models import NewDeviceRequest, NewDeviceRequestStatus, Operation
from devicecontrol.services import new_device_request_not_found, operation_not_found
from deviceplatform.api.exceptions import InvalidQuery
from deviceplatform.api.params import parse_id
from deviceplatform.api.permissions import has_any_role
from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject
from inventory.selectors import instances_where
from inventory.serializers import external_id_json


def operation_get(*, pk: object) -> Operation:
    try:
        operation_id = parse_id(pk)
    except Exception:
        raise operation_not_found(pk) from None
    operation = Operation.objects.select_related("device").filter(pk=operation_id).first()
    if operation is None:
        raise operation_not_found(pk)
    return operation


def operations_visible_to(user: Any) -> QuerySet[Operation]:
    """All operations for ROLE_DEVICE_CONTROL_READ, otherwise those on devices the user owns."""
    queryset = Operation.objects.all()
    if has_any_role(user, {Role.DEVICE_CONTROL_READ}):
        return queryset
    return queryset.filter(device__owner__iexact=user.username)


def device_names(device_ids: Iterable[int]) -> dict[int, str | None]:
    """Names by device ID: one fixed statement per page (a queryset's compiler cost more)."""
    ids = sorted(set(device_ids))
    if not ids:
        return {}
    placeholders = ", ".join(["%s"] * len(ids))
    with connections[ManagedObject.objects.db].cursor() as cursor:
        cursor.execute(
            f'SELECT "id", "name" FROM inventory_managedobject WHERE "id" IN ({placeholders})',  # noqa: S608
            ids,
        )
        return dict(cursor.fetchall())


def device_external_ids(device_ids: Iterable[int], *, base: str) -> dict[int, list[dict[str, Any]]]:
    result: dict[int, list[dict[str, Any]]] = defaultdict(list)
    ids = sorted(set(device_ids))
    if not ids:
        return result
    placeholders = ", ".join(["%s"] * len(ids))
    for external_id in instances_where(
        ExternalId, f'"managed_object_id" IN ({placeholders}) ORDER BY "id"', ids
    ):
        result[external_id.managed_object_id].append(external_id_json(external_id, base=base))
    return result


# --- new device requests -------------------------------------------------------------------------


def new_device_request_get(*, device_id: str) -> NewDeviceRequest:
    request = NewDeviceRequest.objects.filter(device_id=device_id).first()
    if request is None:
        raise new_device_request_not_found(device_id)
    return request


def new_device_requests(params: Any) -> QuerySet[NewDeviceRequest]:
    """Every request, oldest first; `status` narrows to one status (any other value: 422)."""
    queryset = NewDeviceRequest.objects.order_by("id")
    status = (params.get("status") or "").strip()
    if status:
        if status not in NewDeviceRequestStatus.values:
            raise InvalidQuery(
                f"status {status!r} is not one of {', '.join(NewDeviceRequestStatus.values)}"
            )
        queryset = queryset.filter(status=status)
    return queryset
