"""PENDING operations per agent, read at scrape time for /metrics (DeviceControlConfig.ready).

Not a series per agent: a histogram of the agents by their PENDING count, and a labelled series
for the METRICS_PENDING_TOP_AGENTS agents with the most only.

Counting them is one GROUP BY over every PENDING row: about 0.3 s of database time at 1,000,000
PENDING operations (bench/observability.py). So the figures are counted at most once per
METRICS_PENDING_CACHE_SECONDS by all processes together (deviceplatform.metrics
`cached_for_scrape`): other scrapes serve the last count, and
`deviceplatform_pending_operations_age_seconds` says how old it is."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

from django.conf import settings
from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from devicecontrol.models import Operation, OperationStatus
from deviceplatform.metrics import cached_for_scrape

# Agents by how many PENDING operations they have (upper bounds).
PENDING_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 10000)
CACHE_NAME = "pending_per_agent"


def count_pending() -> dict[str, Any]:
    """One GROUP BY over the PENDING rows, reduced to what the metrics show: agents per bucket,
    the total and the top agents (small whatever the number of agents)."""
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
    return {
        "agents_in": agents_in,
        "total": sum(count for _, count in counts),
        "top": [
            [agent_id, count] for agent_id, count in counts[: settings.METRICS_PENDING_TOP_AGENTS]
        ],
    }


def pending_per_agent(*, now: float | None = None) -> Iterable[Metric]:
    moment = time.time() if now is None else now
    counted, age = cached_for_scrape(
        CACHE_NAME, count_pending, settings.METRICS_PENDING_CACHE_SECONDS, now=moment
    )
    agents_in = counted["agents_in"]
    buckets = [
        (floatToGoString(bound), agents)
        for bound, agents in zip(PENDING_BUCKETS, accumulate(agents_in), strict=False)
    ]
    buckets.append(("+Inf", sum(agents_in)))
    yield HistogramMetricFamily(
        "deviceplatform_pending_operations_per_agent",
        "Agents by their number of PENDING operations (the sum: all PENDING operations).",
        buckets=buckets,
        sum_value=counted["total"],
    )
    top = GaugeMetricFamily(
        "deviceplatform_pending_operations_top_agents",
        "PENDING operations of the agents that have the most (METRICS_PENDING_TOP_AGENTS).",
        labels=["agent"],
    )
    for agent_id, count in counted["top"][: settings.METRICS_PENDING_TOP_AGENTS]:
        top.add_metric([str(agent_id)], count)
    yield top
    yield GaugeMetricFamily(
        "deviceplatform_pending_operations_age_seconds",
        "How long ago the PENDING figures above were counted (METRICS_PENDING_CACHE_SECONDS).",
        value=age,
    )
