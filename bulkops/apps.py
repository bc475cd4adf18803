"""Bulk operations: a prototype ramped across the devices of a group by Celery beat."""

from django.apps import AppConfig


class BulkOpsConfig(AppConfig):
    name = "bulkops"
    verbose_name = "Bulk operations"

    def ready(self) -> None:
        from bulkops.live import register_channels
        from bulkops.metrics import bulk_state
        from bulkops.retries import bulk_retries_held, bulk_retry_configs
        from bulkops.services import bulk_progress_apply
        from devicecontrol.services import (
            BULK_RETRIES_HELD,
            BULK_RETRY_CONFIGS,
            STATUS_CHANGE_HOOKS,
        )
        from deviceplatform.metrics import register_scrape_collector

        register_channels()
        if bulk_progress_apply not in STATUS_CHANGE_HOOKS:
            STATUS_CHANGE_HOOKS.append(bulk_progress_apply)
        if bulk_retry_configs not in BULK_RETRY_CONFIGS:
            BULK_RETRY_CONFIGS.append(bulk_retry_configs)
        if bulk_retries_held not in BULK_RETRIES_HELD:
            BULK_RETRIES_HELD.append(bulk_retries_held)

        register_scrape_collector("bulkops", bulk_state)
