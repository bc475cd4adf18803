"""The Celery application: configured from Django settings (CELERY_*), tasks discovered per app."""

import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deviceplatform.settings")

app = Celery("deviceplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# The worker's heartbeat for /health/ready (deviceplatform/health.py); beat writes its own from
# the scheduler class named by CELERY_BEAT_SCHEDULER.
app.steps["worker"].add("deviceplatform.health.WorkerHeartbeat")


@setup_logging.connect
def use_django_logging(**kwargs: Any) -> None:
    """The worker and beat log through Django's LOGGING (LOG_LEVEL, LOG_FORMAT) like every other
    process, instead of Celery's own handler and `--loglevel`."""
    import logging
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)
    logging.captureWarnings(True)  # as Django does: warnings become log records too
