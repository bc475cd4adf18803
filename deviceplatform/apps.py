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


class DevicePlatformConfig(AppConfig):
    name = "deviceplatform"
    verbose_name = "Users and roles"

    def ready(self) -> None:
        # After `flush` too (transactional tests, `manage.py flush`): the built-in groups come back.
        post_migrate.connect(
            _default_groups, sender=self, dispatch_uid="deviceplatform.default_groups"
        )
        if settings.OTEL_TRACES != "none":
            # Only then: without tracing no opentelemetry package is imported (or needed).
            from deviceplatform.tracing import start

            start()
