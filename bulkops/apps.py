"""Bulk operations (filled by the bulk-operations issue)."""

from django.apps import AppConfig


class BulkOpsConfig(AppConfig):
    name = "bulkops"
    verbose_name = "Bulk operations"
