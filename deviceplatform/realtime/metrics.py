"""Realtime state read at scrape time for /metrics: live Bayeux sessions and their subscriptions."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric


def realtime_state() -> Iterable[Metric]:
    """From the store every server shares (Redis), or this process's own (embedded)."""
    from deviceplatform.realtime.hub import get_store

    sessions, subscriptions = get_store().stats()
    yield GaugeMetricFamily(
        "deviceplatform_realtime_sessions",
        "Live Bayeux sessions (handshaken, not expired).",
        value=sessions,
    )
    yield GaugeMetricFamily(
        "deviceplatform_realtime_subscriptions",
        "Channel subscriptions clients made in the live sessions (option variants not counted).",
        value=subscriptions,
    )
