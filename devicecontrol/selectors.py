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
from deviceplatform.api.params import parse_path_id
from deviceplatform.api.permissions import has_any_role
from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject
from inventory.selectors import instances_where
from inventory.serializers import external_id_json


def operation_get(*, pk: object) -> Operation:
    try:
        operation_id = parse_path_id(pk)
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


# --- the agent's poll and a device's history page: one fixed statement --------------------------

# The columns an operation's collection item shows, then its device's name (in the same statement
# instead of a second one), in the order `serializers.operation_row_json` reads them.
PAGE_COLUMNS = (
    '"devicecontrol_operation"."id", "devicecontrol_operation"."device_id", '
    '"devicecontrol_operation"."status", "devicecontrol_operation"."creation_time", '
    '"devicecontrol_operation"."failure_reason", "devicecontrol_operation"."bulk_operation_id", '
    '"devicecontrol_operation"."retry_of_id", "devicecontrol_operation"."fragments", '
    '"devicecontrol_operation"."attempt", "devicecontrol_operation"."retry_at", '
)
# Without the owner condition the name is a primary-key lookup per row of the page (a join let the
# planner hash the whole inventory); with it, the join the owner condition needs gives the name.
NAME_LOOKUP = (
    '(SELECT "inventory_managedobject"."name" FROM "inventory_managedobject"'
    ' WHERE "inventory_managedobject"."id" = "devicecontrol_operation"."device_id")'
)
NAME_JOINED = '"inventory_managedobject"."name"'
PAGE_FROM = ' FROM "devicecontrol_operation"'
OWNER_JOIN = (
    ' INNER JOIN "inventory_managedobject"'
    ' ON ("devicecontrol_operation"."device_id" = "inventory_managedobject"."id")'
)
# The owner condition exactly as the ORM writes `device__owner__iexact` on PostgreSQL.
OWNER_CONDITION = 'UPPER("inventory_managedobject"."owner"::text) = UPPER(%s)'


def sees_all_operations(user: Any) -> bool:
    """Whether `operations_visible_to(user)` is every operation (no owner condition)."""
    return has_any_role(user, {Role.DEVICE_CONTROL_READ})


def fixed_page_available() -> bool:
    """The fixed statement is written for PostgreSQL; SQLite keeps the queryset."""
    return connections[Operation.objects.db].vendor == "postgresql"


class OperationPage:
    """The operations matching `conditions` ((column, operator, value) of the operation table), restricted to devices `owner` owns unless None, in ID order, as tuples: what
    `operations_visible_to(user)` filtered by `filters.simple_operations` selects, read with one
    statement written once instead of a compiled queryset and model instances (the compiler and
    the instances were over half of a poll's CPU, bench/README.md "operations.py"). Sliced by
    `deviceplatform.api.pagination.paginated`; `count()` is its total."""

    def __init__(
        self,
        conditions: list[tuple[str, str, Any]],
        *,
        owner: str | None,
        descending: bool = False,
    ) -> None:
        where = [f'"devicecontrol_operation"."{column}" {op} %s' for column, op, _ in conditions]
        self.params: list[Any] = [value for _, _, value in conditions]
        self.order = "DESC" if descending else "ASC"
        if owner is not None:
            where.append(OWNER_CONDITION)
            self.params.append(owner)
        self.where = f" WHERE {' AND '.join(where)}" if where else ""
        self.source = PAGE_FROM + (OWNER_JOIN if owner is not None else "")
        self.name = NAME_JOINED if owner is not None else NAME_LOOKUP

    def statement(self, offset: int, limit: int) -> tuple[str, list[Any]]:
        """(SQL, parameters) of the page at `offset` (what bench/operations.py times)."""
        sql = (
            f"SELECT {PAGE_COLUMNS}{self.name}{self.source}{self.where}"  # noqa: S608
            f' ORDER BY "devicecontrol_operation"."id" {self.order} LIMIT %s OFFSET %s'
        )
        return sql, [*self.params, limit, offset]

    def __getitem__(self, page: slice) -> list[tuple[Any, ...]]:
        offset = page.start or 0
        with connections[Operation.objects.db].cursor() as cursor:
            cursor.execute(*self.statement(offset, page.stop - offset))
            rows = cursor.fetchall()
        decode = Operation._meta.get_field("fragments").from_db_value
        connection = connections[Operation.objects.db]
        return [(*row[:7], decode(row[7], None, connection), *row[8:]) for row in rows]

    def count(self) -> int:
        with connections[Operation.objects.db].cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*){self.source}{self.where}", self.params)  # noqa: S608
            return cursor.fetchone()[0]
