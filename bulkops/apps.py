"""Bulk operations: a prototype ramped across the devices of a group by Celery beat."""

from django.apps import AppConfig


class BulkOpsConfig(AppConfig):
    name = "bulkops"
    verbose_name = "Bulk operations"

    def ready(self) -> None:
        from bulkops.live import register_channels
        from bulkops.services import bulk_progress_apply
        from devicecontrol.services import STATUS_CHANGE_HOOKS

        register_channels()
        if bulk_progress_apply not in STATUS_CHANGE_HOOKS:
            STATUS_CHANGE_HOOKS.append(bulk_progress_apply)
