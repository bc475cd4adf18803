"""Bulk-operation REST resources (spec bulkoperations.md); only the two bulk roles apply."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.response import Response

from bulkops import services
from bulkops.filters import bulk_operations_filter
from bulkops.models import BulkOperation
from bulkops.selectors import bulk_operations_with_progress
from bulkops.serializers import bulk_operation_json, bulk_operation_url
from deviceplatform.api.idempotency import idempotent_create
from deviceplatform.api.media_types import MediaType
from deviceplatform.api.pagination import paginated
from deviceplatform.api.params import get_strict_bool, parse_path_id
from deviceplatform.api.views import CumulocityView
from deviceplatform.roles import Role

READ = frozenset({Role.BULK_OPERATION_READ})
ADMIN = frozenset({Role.BULK_OPERATION_ADMIN})


class BulkOperationView(CumulocityView):
    def get_bulk_operation(self, pk: str | int) -> BulkOperation:
        """The bulk operation with its exact progress (one query), 404 if there is none."""
        try:
            bulk = bulk_operations_with_progress().filter(pk=parse_path_id(pk)).first()
        except Exception:
            bulk = None
        if bulk is None:
            raise services.bulk_operation_not_found(pk)
        self.check_object_permissions(self.request, bulk)  # 404 before 403 (auth.md §6)
        return bulk


class BulkOperationCollectionView(BulkOperationView):
    required_roles = {"GET": READ, "POST": ADMIN}

    def get(self, request: Any) -> Response:
        queryset = bulk_operations_filter(bulk_operations_with_progress(), request.GET)
        base = self.base
        return self.respond(
            paginated(
                request,
                queryset,
                key="bulkOperations",
                render=lambda rows: [bulk_operation_json(row, base=base) for row in rows],
            ),
            MediaType.BULK_OPERATION_COLLECTION,
        )

    @idempotent_create
    def post(self, request: Any) -> Response:
        bulk = services.bulk_operation_create(data=self.request_object())
        bulk = self.get_bulk_operation(bulk.pk)  # as it is now, progress included
        return self.respond(
            lambda: bulk_operation_json(bulk, base=self.base),
            MediaType.BULK_OPERATION,
            etag=True,
            status=201,
            location=bulk_operation_url(self.base, bulk.pk),
        )


class BulkOperationDetailView(BulkOperationView):
    required_roles = {"GET": READ, "PUT": ADMIN, "DELETE": ADMIN}
    # Decided per object so an unknown ID is 404 first; no owner rule applies (no `owner`).
    owner_rule_methods = frozenset({"GET", "PUT", "DELETE"})

    def get(self, request: Any, pk: str) -> Response:
        bulk = self.get_bulk_operation(pk)
        return self.respond(
            bulk_operation_json(bulk, base=self.base), MediaType.BULK_OPERATION, etag=True
        )

    def put(self, request: Any, pk: str) -> Response:
        bulk = self.get_bulk_operation(pk)
        bulk = services.bulk_operation_update(
            bulk_operation_id=bulk.pk,
            data=self.request_object(),
            precondition=self.if_match(self.render),
        )
        bulk = self.get_bulk_operation(bulk.pk)  # as committed, progress included
        return self.respond(lambda: self.render(bulk), MediaType.BULK_OPERATION, etag=True)

    def delete(self, request: Any, pk: str) -> Response:
        # The refusals in README's order, before anything is written: 404, 403 (both in
        # get_bulk_operation), a bad body, a bad cancelPending, then a stale If-Match (412).
        bulk = self.get_bulk_operation(pk)
        self.no_body()
        cancel_pending = get_strict_bool(request.GET, "cancelPending")
        services.bulk_operation_cancel(
            bulk_operation_id=bulk.pk,
            precondition=self.if_match(self.render),
            cancel_pending=cancel_pending,
            by=request.user.username,
            notify=self.notify,
            # A large backlog goes on in a worker (the 204 comes within this budget).
            inline_seconds=settings.BULK_PENDING_FAIL_INLINE_SECONDS,
        )
        return self.no_content()

    def render(self, bulk: BulkOperation) -> dict[str, Any]:
        return bulk_operation_json(bulk, base=self.base)


class BulkOperationRolloutView(BulkOperationView):
    """POST .../{id}/pause and .../{id}/resume (issue 14): 200 with the bulk operation as it is
    now. No body is read (a bad one is refused: `no_body`)."""

    required_roles = {"POST": ADMIN}
    owner_rule_methods = frozenset({"POST"})
    action: str = ""

    def post(self, request: Any, pk: str) -> Response:
        self.no_body()
        change = {
            "pause": services.bulk_operation_pause,
            "resume": services.bulk_operation_resume,
        }[self.action]
        bulk = change(
            bulk_operation_id=self.get_bulk_operation(pk).pk, by=request.user.get_username()
        )
        bulk = self.get_bulk_operation(bulk.pk)  # as committed, progress included
        return self.respond(
            lambda: bulk_operation_json(bulk, base=self.base), MediaType.BULK_OPERATION, etag=True
        )
