"""PENDING operations per agent, read at scrape time for /metrics (DeviceControlConfig.ready).

Not a series per agent: a histogram of the agents by their PENDING count, and a labelled series
for the METRICS_PENDING_TOP_AGENTS agents with the most only."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate

from django.conf import settings
from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from devicecontrol.models import Operation, OperationStatus

# Agents by how many PENDING operations they have (upper bounds).
PENDING_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 10000)


def pending_per_agent() -> Iterable[Metric]:
    """One GROUP BY over the PENDING rows (operation_agent_status_idx)."""
    counts = sorted(
        Operation.objects.filter(status=OperationStatus.PENDING, agent_id__isnull=False)
        .values_list("agent_id")
        .annotate(count=Count("pk"))
        .order_by(),
        key=lambda row: (-row[1], row[0]),
    )
    agents_in = [0] * (len(PENDING_BUCKETS) + 1)  # agents per bucket (the last: above all)
    for _, count in counts:
        agents_in[bisect_left(PENDING_BUCKETS, count)] += 1
    buckets = []
    for bound, agents in zip(PENDING_BUCKETS, accumulate(agents_in), strict=False):
        buckets.append((floatToGoString(bound), agents))
    buckets.append(("+Inf", len(counts)))
    yield HistogramMetricFamily(
        "deviceplatform_pending_operations_per_agent",
        "Agents by their number of PENDING operations (the sum: all PENDING operations).",
        buckets=buckets,
        sum_value=sum(count for _, count in counts),
    )
    top = GaugeMetricFamily(
        "deviceplatform_pending_operations_top_agents",
        "PENDING operations of the agents that have the most (METRICS_PENDING_TOP_AGENTS).",
        labels=["agent"],
    )
    for agent_id, count in counts[: settings.METRICS_PENDING_TOP_AGENTS]:
        top.add_metric([str(agent_id)], count)
    yield top
