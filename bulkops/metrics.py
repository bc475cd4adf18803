"""Bulk operation state read at scrape time for /metrics (registered in BulkOpsConfig.ready)."""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from bulkops.models import RUNNING_STATUSES, BulkOperation


def bulk_state() -> Iterable[Metric]:
    """Running bulk operations by status, and how far the ramp is behind now: the oldest due time
    of a running bulk operation that has passed (0 when none is overdue). One indexed query."""
    rows = (
        BulkOperation.objects.filter(status__in=RUNNING_STATUSES)
        .values("status")
        .annotate(count=Count("pk"), due=Min("next_due_at"))
        .order_by()
    )
    active = GaugeMetricFamily(
        "deviceplatform_bulk_operations_active",
        "Bulk operations still creating children (ACTIVE: not started; IN_PROGRESS).",
        labels=["status"],
    )
    counts = dict.fromkeys((str(status) for status in RUNNING_STATUSES), 0)
    oldest = None
    for row in rows:
        counts[str(row["status"])] = row["count"]
        if row["due"] is not None and (oldest is None or row["due"] < oldest):
            oldest = row["due"]
    for status, count in counts.items():
        active.add_metric([status], count)
    yield active
    behind = 0.0 if oldest is None else max(0.0, (timezone.now() - oldest).total_seconds())
    yield GaugeMetricFamily(
        "deviceplatform_bulk_ramp_behind_seconds",
        "Now minus the oldest due time of a running bulk operation's next child (0: on time).",
        value=behind,
    )
