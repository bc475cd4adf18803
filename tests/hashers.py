"""A password hasher that counts its checks, for tests of what a request costs in password checks.

Django's own MD5 hasher (the one the test users are stored with), with `verify` counted: listed as
the only hasher (`settings.PASSWORD_HASHERS`), it checks every `md5$...` password of the run."""

from __future__ import annotations

import threading
from typing import Any

from django.contrib.auth.hashers import MD5PasswordHasher

NAME = "tests.hashers.CountingMD5PasswordHasher"


class CountingMD5PasswordHasher(MD5PasswordHasher):
    checks = 0
    _lock = threading.Lock()

    def verify(self, password: str, encoded: str) -> bool:
        with self._lock:
            type(self).checks += 1
        return super().verify(password, encoded)


def counting_hasher(settings: Any) -> type[CountingMD5PasswordHasher]:
    """Install the counting hasher through pytest-django's `settings` fixture; returns its class
    with the count at zero."""
    settings.PASSWORD_HASHERS = [NAME]
    CountingMD5PasswordHasher.checks = 0
    return CountingMD5PasswordHasher
