"""The beat-driven ramp: a thin task that creates every due child operation and folds progress."""

from __future__ import annotations

from celery import shared_task

from bulkops import services


@shared_task(acks_late=True)
def advance_bulk_operations(batch_size: int = 500) -> int:
    """Idempotent: the claimed bulk operation's `next_index` moves in the same transaction as its
    children are created, so a rerun after a crash continues where the last commit left off.
    `batch_size` is the number of children per transaction. Then the progress deltas of the
    children's status changes are folded into their bulk operations' rows (also idempotent: a
    delta is deleted in the transaction that adds it to its row)."""
    created = services.bulk_operations_advance(batch_size=batch_size)
    services.bulk_progress_fold()
    return created
