"""Inventory: managed objects, their hierarchies, and identity (external IDs)."""

from django.apps import AppConfig


class InventoryConfig(AppConfig):
    name = "inventory"
    verbose_name = "Inventory and identity"
