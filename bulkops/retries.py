"""Automatic retries of a bulk operation's children (README "Automatic retries"): the bulk
operation's top-level `retryConfig`, validated when the bulk operation is stored, and handed to
devicecontrol (`BULK_RETRY_CONFIGS`, registered in apps.py) when one of its children fails and
again when the child's retry is due. A cancelled (DELETED) bulk operation retries nothing."""

from __future__ import annotations

from typing import Any

from bulkops.models import RUNNING_STATUSES, BulkOperation, BulkStatus, RolloutState
from devicecontrol.services import RETRY_CONFIG, retry_config_validate


def bulk_retry_config_validate(data: dict[str, Any]) -> None:
    """422 for a bad top-level `retryConfig` of a bulk operation's POST or PUT body (`null`: none;
    in a PUT it removes the one stored)."""
    value = data.get(RETRY_CONFIG)
    if value is not None:
        retry_config_validate(value)


def bulk_retry_configs(bulk_ids: set[int]) -> dict[int, dict[str, Any]]:
    """The `retryConfig` of each of these bulk operations that has one and is not cancelled."""
    rows = (
        BulkOperation.objects.filter(pk__in=bulk_ids)
        .exclude(status=BulkStatus.DELETED)
        .order_by()
        .values_list("pk", "fragments")
    )
    return {
        pk: fragments[RETRY_CONFIG]
        for pk, fragments in rows
        if isinstance(fragments.get(RETRY_CONFIG), dict)
    }


def bulk_retries_held() -> set[int]:
    """The paused bulk operations: their children's due retries wait for the resume (a paused
    rollout creates nothing). Few rows: only bulk operations an operator or a gate paused."""
    return set(
        BulkOperation.objects.filter(
            rollout_state=RolloutState.PAUSED, status__in=RUNNING_STATUSES
        ).values_list("pk", flat=True)
    )
