"""Device control: operations, their sweepers and their realtime events."""

from django.apps import AppConfig


class DeviceControlConfig(AppConfig):
    name = "devicecontrol"
    verbose_name = "Device control"

    def ready(self) -> None:
        from devicecontrol.realtime import register_channels
        from devicecontrol.services import operations_delete_for_devices
        from inventory.services import BEFORE_DELETE_HOOKS

        register_channels()
        from devicecontrol.metrics import pending_per_agent
        from deviceplatform.metrics import register_scrape_collector

        register_scrape_collector("devicecontrol", pending_per_agent)
        if operations_delete_for_devices not in BEFORE_DELETE_HOOKS:
            BEFORE_DELETE_HOOKS.append(operations_delete_for_devices)
