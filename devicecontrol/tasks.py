"""Beat-driven sweepers: thin tasks that call one service each with the current time, and log what
they changed (nothing when there was nothing to do: they run every OPERATION_SWEEP_INTERVAL)."""

from __future__ import annotations

import logging

from celery import shared_task
from django.utils import timezone

from devicecontrol import services

logger = logging.getLogger(__name__)


@shared_task(acks_late=True)
def expire_pending_operations() -> int:
    count = services.operations_expire(now=timezone.now())
    if count:
        logger.info("Expiry sweep: %d PENDING operation(s) expired (now FAILED)", count)
    return count


@shared_task(acks_late=True)
def time_out_executing_operations() -> int:
    count = services.operations_time_out(now=timezone.now())
    if count:
        logger.info("Timeout sweep: %d EXECUTING operation(s) timed out (now FAILED)", count)
    return count


@shared_task(acks_late=True)
def retry_failed_operations() -> int:
    count = services.operations_retry_due(now=timezone.now())
    if count:
        logger.info("Retry sweep: %d automatic retry(ies) created", count)
    return count


@shared_task(acks_late=True)
def purge_old_operations() -> int:
    count = services.operations_purge(now=timezone.now())
    if count:
        logger.info("Retention sweep: %d finished operation(s) deleted", count)
    return count
