"""Verified device credentials shared by every server process through Redis (issue 13 item 4,
deviceplatform/api/credential_cache.py): a device user's password checked by one process is
accepted by another, and by processes started after a restart, without a hash; a rotation, a
disabled user or a changed hash takes effect at once; Redis holds only keyed digests that expire;
people's passwords never go there. Password checks are counted by a counting copy of the MD5 hasher
the test users are stored with (`tests/hashers.py`). The test runs set REDIS_URL (bin/test)."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.test import Client, override_settings

from deviceplatform.api.authentication import password_cache
from deviceplatform.api.credential_cache import (
    NoSharedCache,
    SharedVerifiedCredentials,
    cache_secret,
    entry_digest,
    shared_credentials,
)
from deviceplatform.models import User
from tests.hashers import counting_hasher
from tests.helpers import PASSWORD, basic
from tests.servers import Servers, free_port, launch  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

ME = "/user/currentUser"


@pytest.fixture
def shared(settings: Any) -> Iterator[SharedVerifiedCredentials]:
    """The Redis cache under this run's prefix, empty before and after; no process memory."""
    assert settings.REDIS_URL, "the test runs set REDIS_URL (bin/test)"
    cache = shared_credentials()
    assert isinstance(cache, SharedVerifiedCredentials)
    cache.forget_all()
    password_cache._entries.clear()
    yield cache
    cache.forget_all()
    password_cache._entries.clear()


@pytest.fixture
def hashes(settings: Any) -> Any:
    return counting_hasher(settings)


@pytest.fixture
def redis_client(settings: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


def entries(client: redis.Redis, settings: Any) -> list[bytes]:
    return list(client.scan_iter(match=f"{settings.AUTH_VERIFIED_CACHE_PREFIX}:*"))


def status(login: str, password: str = PASSWORD) -> int:
    return Client(HTTP_AUTHORIZATION=basic(f"t100/{login}", password)).get(ME).status_code


def new_process() -> None:
    """What another server process (or this one after a restart) knows: nothing in memory."""
    password_cache._entries.clear()


def test_the_digest_binds_user_hash_and_password_and_needs_the_secret() -> None:
    secret = cache_secret("", "some-secret-key")
    base = entry_digest(secret, 7, "md5$salt$abc", PASSWORD)

    assert len(base) == 64
    assert PASSWORD not in base
    assert entry_digest(secret, 7, "md5$salt$abc", PASSWORD) == base
    assert entry_digest(secret, 8, "md5$salt$abc", PASSWORD) != base
    assert entry_digest(secret, 7, "md5$salt$abd", PASSWORD) != base
    assert entry_digest(secret, 7, "md5$salt$abc", PASSWORD + "x") != base
    # Moving characters between the fields gives another message (the fields are length-prefixed).
    assert entry_digest(secret, 7, "md5$salt$ab", "c" + PASSWORD) != base
    assert entry_digest(cache_secret("", "another-key"), 7, "md5$salt$abc", PASSWORD) != base
    assert cache_secret("configured", "some-secret-key") == b"configured"


def test_a_device_users_check_is_shared_with_other_processes(
    make_user: Any, shared: Any, hashes: Any, redis_client: redis.Redis, settings: Any
) -> None:
    make_user("device_sh-1", groups=["devices"])

    assert status("device_sh-1") == 200
    assert hashes.checks == 1
    [key] = entries(redis_client, settings)
    new_process()
    assert status("device_sh-1") == 200
    assert status("device_sh-1") == 200

    assert hashes.checks == 1  # the other "process" checked no hash
    # Only a digest under the prefix, with an expiry and no value: no name, hash or password.
    assert PASSWORD.encode() not in key
    assert b"device_sh-1" not in key
    assert redis_client.get(key) == b""
    ttl = redis_client.pttl(key)
    assert 0 < ttl <= settings.AUTH_VERIFIED_CACHE_SECONDS * 1000


def test_a_wrong_password_is_never_accepted_from_the_shared_cache(
    make_user: Any, shared: Any, hashes: Any
) -> None:
    make_user("device_sh-2", groups=["devices"])
    assert status("device_sh-2") == 200
    new_process()

    assert status("device_sh-2", PASSWORD + "x") == 401
    assert status("device_sh-2", PASSWORD[:-1]) == 401
    assert hashes.checks == 3


def test_rotation_and_disabling_take_effect_at_once_in_every_process(
    make_user: Any, shared: Any, hashes: Any
) -> None:
    user = make_user("device_sh-3", groups=["devices"])
    assert status("device_sh-3") == 200

    user.set_password("rotated:" + PASSWORD)
    user.save()
    new_process()
    assert status("device_sh-3") == 401  # the old entry names the old hash
    assert status("device_sh-3", "rotated:" + PASSWORD) == 200
    new_process()
    assert status("device_sh-3", "rotated:" + PASSWORD) == 200
    checks = hashes.checks

    User.objects.filter(pk=user.pk).update(is_active=False)
    new_process()
    assert status("device_sh-3", "rotated:" + PASSWORD) == 401
    assert hashes.checks == checks  # refused before any check: the row is read per request


def test_peoples_passwords_never_go_to_redis(
    make_user: Any, shared: Any, hashes: Any, redis_client: redis.Redis, settings: Any
) -> None:
    make_user("operator", groups=["admins"])
    device = make_user("device_staff", groups=["devices"])
    User.objects.filter(pk=device.pk).update(is_staff=True)  # staff: a person after all

    assert status("operator") == 200
    assert status("device_staff") == 200
    assert entries(redis_client, settings) == []
    new_process()
    assert status("operator") == 200
    assert status("device_staff") == 200
    assert hashes.checks == 4  # each process checks a person's password itself


def test_entries_expire(
    make_user: Any, shared: Any, hashes: Any, redis_client: redis.Redis, settings: Any
) -> None:
    """Redis expires an entry after AUTH_VERIFIED_CACHE_SECONDS (fractions too); then the password
    is checked again. The test does not wait out the expiry: it moves the entry's to now, and
    waits (bounded) until Redis has dropped it."""
    settings.AUTH_VERIFIED_CACHE_SECONDS = 90.5
    make_user("device_sh-4", groups=["devices"])
    assert status("device_sh-4") == 200
    [key] = entries(redis_client, settings)
    assert 30_000 < redis_client.pttl(key) <= 90_500  # set from the setting, a minute to spare

    assert redis_client.pexpire(key, 1)
    deadline = time.monotonic() + 30  # a bound for a broken run, not a timing assertion
    while redis_client.exists(key):
        assert time.monotonic() < deadline, "Redis kept an expired entry"
        time.sleep(0.01)
    new_process()
    assert entries(redis_client, settings) == []
    assert status("device_sh-4") == 200
    assert hashes.checks == 2


def test_an_unreachable_redis_means_checking_the_password(
    make_user: Any, shared: Any, hashes: Any
) -> None:
    make_user("device_sh-5", groups=["devices"])
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):  # nobody listens
        assert status("device_sh-5") == 200
        new_process()
        assert status("device_sh-5") == 200
        assert status("device_sh-5", "wrong") == 401
    assert hashes.checks == 3


def test_without_redis_each_process_keeps_its_own(make_user: Any, hashes: Any) -> None:
    make_user("device_sh-6", groups=["devices"])
    with override_settings(REDIS_URL=""):
        assert isinstance(shared_credentials(), NoSharedCache)
        new_process()
        assert status("device_sh-6") == 200
        assert status("device_sh-6") == 200  # this process's memory
        new_process()
        assert status("device_sh-6") == 200
    assert hashes.checks == 2


@pytest.mark.django_db(transaction=True)
def test_a_restarted_server_accepts_credentials_verified_before_without_a_login(
    launch: Servers,  # noqa: F811
    make_user: Any,
    shared: Any,
) -> None:
    """A check in this process (a login: `last_login` written), then a freshly started gunicorn
    sharing Redis serves the same credentials without checking them (no login written), and
    refuses a wrong password."""
    user = make_user("device_sh-7", groups=["devices"])
    assert status("device_sh-7") == 200
    User.objects.filter(pk=user.pk).update(last_login=None)
    assert shared.is_verified(User.objects.get(pk=user.pk), PASSWORD)
    server = launch.start(
        "gunicorn", AUTH_VERIFIED_CACHE_PREFIX=shared_credentials()._prefix.rstrip(":")
    )

    def get(password: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            connection.request(
                "GET", ME, headers={"Authorization": basic("t100/device_sh-7", password)}
            )
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    assert get(PASSWORD) == 200
    assert User.objects.get(pk=user.pk).last_login is None  # served from Redis: no check
    assert get("wrong") == 401
