"""Beat-driven sweeper of the platform itself: expired idempotency keys."""

from __future__ import annotations

import logging

from celery import shared_task
from django.utils import timezone

from deviceplatform.api import idempotency

logger = logging.getLogger(__name__)


@shared_task(acks_late=True)
def purge_idempotency_keys() -> int:
    count = idempotency.purge_expired(now=timezone.now())
    if count:
        logger.info("Idempotency sweep: %d expired key(s) deleted", count)
    return count
