"""Beat-driven sweepers: thin tasks that call one service each with the current time."""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from devicecontrol import services


@shared_task(acks_late=True)
def expire_pending_operations() -> int:
    return services.operations_expire(now=timezone.now())


@shared_task(acks_late=True)
def time_out_executing_operations() -> int:
    return services.operations_time_out(now=timezone.now())


@shared_task(acks_late=True)
def purge_old_operations() -> int:
    return services.operations_purge(now=timezone.now())
