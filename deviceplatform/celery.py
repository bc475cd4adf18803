"""The Celery application: configured from Django settings (CELERY_*), tasks discovered per app."""

import os
from typing import Any

from celery import Celery
from celery.signals import before_task_publish, setup_logging, task_postrun, task_prerun

from deviceplatform.logs import current_request_id, is_request_id, reset_request_id, set_request_id

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deviceplatform.settings")

# Celery's Django fix-up, keeping each worker process's connection pool (deviceplatform/celery_fixup.py).
app = Celery("deviceplatform", fixups=["deviceplatform.celery_fixup:fixup"])
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


# A task carries the id of the request that caused it (README "Request ids and tracing"): a header
# set when it is sent, made the current request id while the worker runs it, so its log lines (and
# the tasks and realtime events it causes in turn) carry the same id. A task no request caused
# (beat's) goes by its own Celery task id, which the tasks it sends carry on.
REQUEST_ID_HEADER = "request_id"
_task_tokens: dict[str, Any] = {}


@before_task_publish.connect
def add_request_id_header(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    request_id = current_request_id()
    if request_id is not None and headers is not None:
        headers[REQUEST_ID_HEADER] = request_id


@task_prerun.connect
def use_request_id_header(task_id: str = "", task: Any = None, **kwargs: Any) -> None:
    # Custom message headers become attributes of the task's request. Run eagerly (no broker),
    # a task has none and keeps the calling request's id, being in its context.
    request_id = getattr(getattr(task, "request", None), REQUEST_ID_HEADER, None)
    if is_request_id(request_id):
        _task_tokens[task_id] = set_request_id(request_id)
    elif current_request_id() is None and is_request_id(task_id):
        _task_tokens[task_id] = set_request_id(task_id)


@task_postrun.connect
def drop_request_id(task_id: str = "", **kwargs: Any) -> None:
    token = _task_tokens.pop(task_id, None)
    if token is not None:
        reset_request_id(token)
