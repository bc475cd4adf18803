"""App config of the project package itself: it owns the user model and the role permissions."""

from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import post_migrate


def _default_groups(sender: AppConfig, apps: Any = None, **kwargs: Any) -> None:
    from django.apps import apps as global_apps

    from deviceplatform.roles import ensure_default_groups

    apps = apps or global_apps  # `flush` sends no registry

    ensure_default_groups(apps)


def _task_finished(sender: Any = None, retval: Any = None, **kwargs: Any) -> None:
    """Celery task_postrun (worker, and eager runs of the in-process scheduler): the beat
    schedule's tasks count as sweeps, with the rows they report."""
    from django.conf import settings

    from deviceplatform import metrics

    name = getattr(sender, "name", None)
    if name and name in {spec["task"] for spec in settings.CELERY_BEAT_SCHEDULE.values()}:
        metrics.sweep_ran(name.rpartition(".")[2], retval)


def _worker_process_exited(pid: int | None = None, **kwargs: Any) -> None:
    from deviceplatform import metrics

    if pid is not None:
        metrics.process_exited(pid)


class DevicePlatformConfig(AppConfig):
    name = "deviceplatform"
    verbose_name = "Users and roles"

    def ready(self) -> None:
        # After `flush` too (transactional tests, `manage.py flush`): the built-in groups come back.
        post_migrate.connect(
            _default_groups, sender=self, dispatch_uid="deviceplatform.default_groups"
        )
        from celery.signals import task_postrun, worker_process_shutdown

        from deviceplatform.metrics import register_scrape_collector
        from deviceplatform.realtime.metrics import realtime_state

        task_postrun.connect(_task_finished, weak=False, dispatch_uid="deviceplatform.sweeps")
        worker_process_shutdown.connect(
            _worker_process_exited, weak=False, dispatch_uid="deviceplatform.process_exited"
        )
        register_scrape_collector("realtime", realtime_state)
        if settings.OTEL_TRACES != "none":
            # Only then: without tracing no opentelemetry package is imported (or needed).
            from deviceplatform.tracing import start

            start()
