"""The beat-driven ramp: a thin task that creates every due child operation."""

from __future__ import annotations

from celery import shared_task

from bulkops import services


@shared_task(acks_late=True)
def advance_bulk_operations() -> int:
    """Idempotent: the claimed bulk operation's `next_index` moves in the same transaction as its
    children are created, so a rerun after a crash continues where the last commit left off."""
    return services.bulk_operations_advance()
