"""Device control: operations (filled by the operations issue)."""

from django.apps import AppConfig


class DeviceControlConfig(AppConfig):
    name = "devicecontrol"
    verbose_name = "Device control"
