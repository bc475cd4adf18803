"""App config of the project package itself: it owns the user model and the role permissions."""

from django.apps import AppConfig


class DevicePlatformConfig(AppConfig):
    name = "deviceplatform"
    verbose_name = "Users and roles"
