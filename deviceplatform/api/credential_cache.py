"""Verified device credentials shared by every server process, in Redis (README "Device users").

A device agent sends its Basic credentials with every request, and a server process that has not
seen them yet must check the password against the stored hash: a restart of the web tier would
otherwise make every device pay one check per process again (PBKDF2: ~0.3 s of CPU each). With
REDIS_URL set, a successful check of a *device user's* password leaves one Redis key, so that the
other processes, and the processes started after a restart, accept the same credentials without
checking them again.

What is stored: the key `<AUTH_VERIFIED_CACHE_PREFIX>:<hex HMAC-SHA256(secret, user id, stored
hash, password)>` with an empty value and an expiry of AUTH_VERIFIED_CACHE_SECONDS; never the
password, the username or the hash. The secret is AUTH_VERIFIED_CACHE_KEY, or one derived from
SECRET_KEY; it is never written to Redis. Because the stored hash is part of the key and the user
row is read on every request, a password change (rotation), a disabled user or a deleted user takes
effect at once: the old entry can no longer be found, and it expires unused.

Who is cached: device users only (members of `devices`, neither staff nor superuser). Anyone holding
both the secret and the Redis keys could test password guesses against a cached entry at the speed
of one HMAC, bypassing PBKDF2's stretching; people's passwords are guessable, so they stay out of
Redis (the per-process cache in `authentication.py` still spares them a check per request). A
Redis that cannot be reached is a cache miss: the password is checked as without REDIS_URL."""

from __future__ import annotations

import hashlib
import hmac
import logging
from functools import cache
from typing import Any

import redis
from django.conf import settings
from django.core.signals import setting_changed

logger = logging.getLogger(__name__)

KEY_PURPOSE = b"deviceplatform.api.credential_cache"


def cache_secret(configured: str, secret_key: str) -> bytes:
    """The HMAC key: AUTH_VERIFIED_CACHE_KEY when set, else one derived from SECRET_KEY for this
    purpose only (the HMAC cannot be turned back into SECRET_KEY)."""
    if configured:
        return configured.encode()
    return hmac.new(secret_key.encode(), KEY_PURPOSE, hashlib.sha256).digest()


def entry_digest(secret: bytes, user_id: int, stored_hash: str, password: str) -> str:
    """Hex HMAC-SHA256 over the user id, the stored hash and the password, each length-prefixed
    so that no two different triples give the same message."""
    parts = [str(user_id).encode(), stored_hash.encode(), password.encode("utf-8")]
    message = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def is_device_user(user: Any) -> bool:
    """Whether the user is a device user (`models.device_user_condition`): one query."""
    from deviceplatform.models import DEVICES_GROUP

    if user.is_staff or user.is_superuser:
        return False
    return user.groups.filter(name=DEVICES_GROUP).exists()


class SharedVerifiedCredentials:
    """The Redis half: `is_verified` is one EXISTS, `remember` one SET with an expiry. Short socket
    timeouts: an unreachable Redis must not stall logins (every error is a miss, logged)."""

    def __init__(self, url: str, prefix: str, secret: bytes, ttl: float) -> None:
        self._client = redis.Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=30
        )
        self._prefix = f"{prefix}:"
        self._secret = secret
        self._ttl_ms = max(1, int(ttl * 1000))

    def _key(self, user_id: int, stored_hash: str, password: str) -> str:
        return self._prefix + entry_digest(self._secret, user_id, stored_hash, password)

    def is_verified(self, user: Any, password: str) -> bool:
        """Whether a process verified this password against the user's current stored hash
        within the expiry. Never for staff or superusers (people)."""
        if user.is_staff or user.is_superuser:
            return False
        try:
            return bool(self._client.exists(self._key(user.pk, user.password, password)))
        except Exception:
            logger.warning("verified-credentials cache unavailable; checking the password")
            return False

    def remember(self, user: Any, password: str) -> bool:
        """Record a successful check, for device users only; whether an entry was written."""
        if not is_device_user(user):
            return False
        try:
            self._client.set(self._key(user.pk, user.password, password), b"", px=self._ttl_ms)
        except Exception:
            logger.warning("verified-credentials cache unavailable; the check was not shared")
            return False
        return True

    def forget_all(self) -> None:
        """Remove every entry under the prefix (tests, the bench)."""
        keys = list(self._client.scan_iter(match=f"{self._prefix}*", count=1000))
        if keys:
            self._client.delete(*keys)


class NoSharedCache:
    """Without REDIS_URL (one process, or processes that each keep their own cache)."""

    def is_verified(self, user: Any, password: str) -> bool:
        return False

    def remember(self, user: Any, password: str) -> bool:
        return False

    def forget_all(self) -> None:
        pass


@cache
def _shared(
    url: str, prefix: str, configured: str, secret_key: str, ttl: float
) -> SharedVerifiedCredentials | NoSharedCache:
    if not url or ttl <= 0:
        return NoSharedCache()
    return SharedVerifiedCredentials(url, prefix, cache_secret(configured, secret_key), ttl)


def shared_credentials() -> SharedVerifiedCredentials | NoSharedCache:
    """The shared cache the settings name: Redis when REDIS_URL is set (and the expiry above 0)."""
    return _shared(
        settings.REDIS_URL,
        settings.AUTH_VERIFIED_CACHE_PREFIX,
        settings.AUTH_VERIFIED_CACHE_KEY,
        settings.SECRET_KEY,
        settings.AUTH_VERIFIED_CACHE_SECONDS,
    )


def _reset(setting: str, **_: object) -> None:
    if setting in {
        "REDIS_URL",
        "AUTH_VERIFIED_CACHE_PREFIX",
        "AUTH_VERIFIED_CACHE_KEY",
        "SECRET_KEY",
        "AUTH_VERIFIED_CACHE_SECONDS",
    }:
        _shared.cache_clear()


setting_changed.connect(_reset)
