"""Operation reads with rules: visibility by role and device owner, lookups that 404, enrichment;
new device requests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.db.models import QuerySet

from devicecontrol.models import NewDeviceRequest, NewDeviceRequestStatus, Operation
from devicecontrol.services import new_device_request_not_found, operation_not_found
from deviceplatform.api.exceptions import InvalidQuery
from deviceplatform.api.params import parse_id
from deviceplatform.api.permissions import has_any_role
from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject
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
    return dict(ManagedObject.objects.filter(pk__in=set(device_ids)).values_list("pk", "name"))


def device_external_ids(device_ids: Iterable[int], *, base: str) -> dict[int, list[dict[str, Any]]]:
    result: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for external_id in ExternalId.objects.filter(managed_object_id__in=set(device_ids)).order_by(
        "id"
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
