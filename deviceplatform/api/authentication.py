"""HTTP Basic authentication with `<tenant>/<user>` or `<user>` logins (spec auth.md §2)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication

from deviceplatform import metrics
from deviceplatform.api.auth_throttle import (
    check_allowed,
    client_address,
    record_failure,
    refund_slow_check,
    reserve_slow_check,
)
from deviceplatform.api.credential_cache import shared_credentials
from deviceplatform.hashers import is_device_hash
from deviceplatform.roles import Role, user_roles

BAD_CREDENTIALS = "Invalid credentials! : Bad credentials"


def parse_basic_authorization(header: str) -> tuple[str, str]:
    """(username, password) from `Basic base64(login:password)`; the tenant prefix must be ours.

    Raises AuthenticationFailed for anything malformed or for a foreign tenant: also for bytes
    outside ASCII in the header (servers hand them over as latin-1 characters, which base64 has no
    use for) and for a NUL in the credentials (no stored name or password holds one, and
    PostgreSQL refuses it in a query)."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        raise exceptions.AuthenticationFailed(BAD_CREDENTIALS)
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError as exc:  # binascii.Error, UnicodeDecodeError, non-ASCII str
        raise exceptions.AuthenticationFailed(BAD_CREDENTIALS) from exc
    login, sep, password = decoded.partition(":")  # passwords may contain ':'
    if not sep or not login or "\x00" in decoded:
        raise exceptions.AuthenticationFailed(BAD_CREDENTIALS)
    if "/" in login:
        tenant, _, login = login.partition("/")
        # Devices log in to the bootstrap account as Cumulocity's do: `management/devicebootstrap`.
        bootstrap = (
            tenant == settings.DEVICE_BOOTSTRAP_TENANT
            and login.lower() == settings.DEVICE_BOOTSTRAP_USERNAME
        )
        if (tenant != settings.C8Y_TENANT_ID and not bootstrap) or not login:
            raise exceptions.AuthenticationFailed(BAD_CREDENTIALS)
    return login, password


class VerifiedPasswordCache:
    """Remembers, per process, which (user, password) pairs were verified against which stored hash.

    Django's PBKDF2 check costs hundreds of milliseconds by design; a device agent sends Basic
    credentials on every request. We skip the check only when the presented password's keyed digest
    matches one that was verified against exactly the password hash still stored for the user, so a
    password change or a disabled user takes effect on the next request."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[tuple[int, str], str] = OrderedDict()
        self._lock = threading.Lock()
        self._max_entries = max_entries
        self._flights: dict[tuple[int, str, str], list[Any]] = {}  # key -> [lock, users]

    def _digest(self, password: str) -> str:
        return hmac.new(self._key, password.encode("utf-8"), hashlib.sha256).hexdigest()

    def is_verified(self, user_id: int, stored_hash: str, password: str) -> bool:
        key = (user_id, stored_hash)
        with self._lock:
            digest = self._entries.get(key)
            if digest is not None:
                self._entries.move_to_end(key)
        return digest is not None and hmac.compare_digest(digest, self._digest(password))

    @contextmanager
    def single_flight(self, user_id: int, stored_hash: str, password: str) -> Iterator[None]:
        """One check at a time per (user, stored hash, password) in this process: a fleet of an
        agent's clients connecting at once pays the hash once, not once per thread. Different
        passwords (a wrong one among them) never wait for each other."""
        key = (user_id, stored_hash, self._digest(password))
        with self._lock:
            flight = self._flights.setdefault(key, [threading.Lock(), 0])
            flight[1] += 1
        try:
            with flight[0]:
                yield
        finally:
            with self._lock:
                flight[1] -= 1
                if flight[1] == 0:
                    del self._flights[key]

    def remember(self, user_id: int, stored_hash: str, password: str) -> None:
        with self._lock:
            self._entries[(user_id, stored_hash)] = self._digest(password)
            self._entries.move_to_end((user_id, stored_hash))
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)


password_cache = VerifiedPasswordCache()


class RolesCache:
    """Effective roles per user for a few seconds (AUTH_ROLES_CACHE_SECONDS), per process.

    The roles lookup was about a third of a create's server CPU. Role grants changed through
    `user_upsert` apply at once in this process (it calls `forget`); grants changed elsewhere (the
    admin's group editor, another process) apply within the TTL. Disabling a user or changing the
    password always applies at once: the user row is still read on every request."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._entries: dict[int, tuple[float, frozenset[Role]]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def get(self, user_id: int) -> frozenset[Role] | None:
        with self._lock:
            entry = self._entries.get(user_id)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def put(self, user_id: int, roles: frozenset[Role]) -> None:
        ttl = settings.AUTH_ROLES_CACHE_SECONDS
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[user_id] = (self._clock() + ttl, roles)

    def forget(self, user_id: int) -> None:
        with self._lock:
            self._entries.pop(user_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


roles_cache = RolesCache()


def note_request(user: Any) -> None:
    """Record when the user was last heard from (`last_request_at`, shown in the admin), at most
    once per AUTH_LAST_REQUEST_INTERVAL_SECONDS: the row was read anyway, so a fresh value costs
    nothing and a stale one one UPDATE."""
    now = timezone.now()
    last = user.last_request_at
    interval = settings.AUTH_LAST_REQUEST_INTERVAL_SECONDS
    if last is None or (now - last).total_seconds() >= interval or last > now:
        type(user).objects.filter(pk=user.pk).update(last_request_at=now)
        user.last_request_at = now


def attach_roles(user: Any) -> Any:
    """Give the authenticated user its effective roles, from the cache when fresh."""
    cached = roles_cache.get(user.pk)
    if cached is not None:
        user._c8y_roles = cached
    else:
        roles_cache.put(user.pk, user_roles(user))
    return user


@cache
def _user_statement(user_model: Any, alias: str) -> tuple[list[str], str]:
    """(attribute names, SQL) of `active_user`'s statement on PostgreSQL."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    fields = user_model._meta.concrete_fields
    columns = ", ".join(quote(field.column) for field in fields)
    username = quote(user_model._meta.get_field("username").column)
    is_active = quote(user_model._meta.get_field("is_active").column)
    # LOWER(username): the expression of the unique index (models.User), so one index probe.
    sql = (
        f"SELECT {columns} FROM {quote(user_model._meta.db_table)} "  # noqa: S608 - our names
        f"WHERE LOWER({username}) = LOWER(%s) AND {is_active} LIMIT 1"
    )
    return [field.attname for field in fields], sql


def active_user(username: str) -> Any:
    """The active user with this username in any letter case, or None. Every request reads the
    row, so a disabled user, a changed password or a deleted user applies at once in every process.

    On PostgreSQL a fixed statement answered by the unique index on LOWER(username), turned into a
    User without the ORM's query compiler: ~0.17 ms of CPU instead of ~0.9 ms for the queryset,
    whose UPPER() comparison could not use that index either (bench/README.md, operations.py).
    Elsewhere (SQLite) the queryset."""
    user_model = get_user_model()
    alias = user_model.objects.db
    if connections[alias].vendor != "postgresql":
        return user_model.objects.filter(username__iexact=username, is_active=True).first()
    names, sql = _user_statement(user_model, alias)
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, [username])
        row = cursor.fetchone()
    return None if row is None else user_model.from_db(alias, names, row)


def authenticate_credentials(username: str, password: str, *, client: str | None = None) -> Any:
    """The active user with these credentials, or None. One query when the password is cached.

    A check that fails counts against the username and the client address (`auth_throttle`);
    once either is used up, raises TooManyFailures instead of checking (no hash), except for
    credentials this process verified before."""
    user = _check_credentials(username, password, client)
    if user is not None:
        note_request(user)
    else:
        metrics.auth_failed("bad_credentials")
    return user


def _verified_before(user: Any, password: str) -> bool:
    """Whether this password was verified against the user's current stored hash before: by this
    process (memory), or for a device user by any process within AUTH_VERIFIED_CACHE_SECONDS
    (Redis, `credential_cache`; the entry is then kept in memory too). No hash either way."""
    if password_cache.is_verified(user.pk, user.password, password):
        return True
    if shared_credentials().is_verified(user, password):
        password_cache.remember(user.pk, user.password, password)
        return True
    return False


def _check_credentials(username: str, password: str, client: str | None) -> Any:
    """The `authenticate_credentials` check, without the bookkeeping."""
    user_model = get_user_model()
    user = active_user(username)
    if user is not None and user.password and _verified_before(user, password):
        return attach_roles(user)
    check_allowed(username, client)
    if user is None or not user.password:
        record_failure(username, client)
        return None
    with password_cache.single_flight(user.pk, user.password, password):
        # A concurrent request with the same credentials may have verified them meanwhile.
        if password_cache.is_verified(user.pk, user.password, password):
            return attach_roles(user)
        # A slow check (PBKDF2) counts as a failure before it runs, atomically with the limits'
        # test, so concurrent wrong passwords cannot run more of them than the limits allow.
        slow = not is_device_hash(user.password)
        if slow:
            reserve_slow_check(username, client)  # raises TooManyFailures
        if not user.check_password(password):  # may upgrade the hash (changes user.password)
            if not slow:
                record_failure(username, client)
            return None
        if slow:
            refund_slow_check(username, client)
        password_cache.remember(user.pk, user.password, password)
        shared_credentials().remember(user, password)  # device users, with REDIS_URL
        # A login: the password was checked against its hash (once per process and password, or
        # for a device user with REDIS_URL once per AUTH_VERIFIED_CACHE_SECONDS).
        user.last_login = timezone.now()
        user_model.objects.filter(pk=user.pk).update(last_login=user.last_login)
    return attach_roles(user)


def authenticate_header_value(header: str | None, *, client: str | None = None) -> Any:
    """The user for an Authorization header value, or None (used by REST and the Bayeux handshake).
    Raises TooManyFailures (see `authenticate_credentials`)."""
    if not header:
        return None
    try:
        username, password = parse_basic_authorization(header)
    except exceptions.AuthenticationFailed:
        return None
    return authenticate_credentials(username, password, client=client)


class CumulocityBasicAuthentication(BaseAuthentication):
    """DRF authentication class. Returning a header from `authenticate_header` makes DRF answer 401."""

    def authenticate(self, request: Any) -> tuple[Any, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        username, password = parse_basic_authorization(header)
        user = authenticate_credentials(username, password, client=client_address(request.META))
        if user is None:
            raise exceptions.AuthenticationFailed(BAD_CREDENTIALS)
        return user, None

    def authenticate_header(self, request: Any) -> str:
        return 'Basic realm="Cumulocity"'
