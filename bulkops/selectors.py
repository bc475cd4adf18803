"""Reads of bulk operations with their exact progress (folded counters plus unfolded deltas)."""

from __future__ import annotations

from django.db.models import F, OuterRef, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce

from bulkops.models import COUNTERS, BulkOperation, BulkProgressDelta

# The annotation holding a counter's exact value: `current_pending`, ...
CURRENT = {name: f"current_{name}" for name in COUNTERS}


def _unfolded(name: str) -> Coalesce:
    """The sum of one counter over the deltas not folded into the row yet (0 if none)."""
    deltas = (
        BulkProgressDelta.objects.filter(bulk_operation_id=OuterRef("pk"))
        .order_by()
        .values("bulk_operation_id")
        .annotate(total=Sum(name))
        .values("total")
    )
    return Coalesce(Subquery(deltas), 0)


def bulk_operations_with_progress(
    queryset: QuerySet[BulkOperation] | None = None,
) -> QuerySet[BulkOperation]:
    """`queryset` (default: every bulk operation) with `current_<counter>` = the folded column
    plus the deltas not folded yet. Row and deltas are read by one statement, so from one
    snapshot: a fold committing meanwhile (it moves deltas into the row in one transaction) is
    seen entirely or not at all, and the counts are exact. `general_status_q` filters on these."""
    if queryset is None:
        queryset = BulkOperation.objects.all()
    return queryset.annotate(**{CURRENT[name]: F(name) + _unfolded(name) for name in COUNTERS})


def bulk_operation_progress(bulk: BulkOperation) -> dict[str, int]:
    """The exact counters of `bulk`: its `current_*` annotations when it was read through
    `bulk_operations_with_progress`; otherwise its columns plus a query for the unfolded deltas,
    which is exact when the row is locked by this transaction (a fold needs that lock), as in
    the services that check `If-Match`."""
    if hasattr(bulk, CURRENT["pending"]):
        return {name: getattr(bulk, CURRENT[name]) for name in COUNTERS}
    sums = BulkProgressDelta.objects.filter(bulk_operation_id=bulk.pk).aggregate(
        **{name: Sum(name) for name in COUNTERS}
    )
    return {name: getattr(bulk, name) + (sums[name] or 0) for name in COUNTERS}
