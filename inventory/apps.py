"""Inventory: managed objects, their hierarchies, and identity (external IDs)."""

from django.apps import AppConfig


class InventoryConfig(AppConfig):
    name = "inventory"
    verbose_name = "Inventory and identity"

    def ready(self) -> None:
        from inventory.realtime import register_channels

        register_channels()
