"""Shared fixtures: users with roles, Basic-auth API clients, row counts. Real databases throughout:
PostgreSQL, or the embedded default SQLite in a file (bin/test runs the suite on both)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest
from django.conf import settings
from rest_framework.test import APIClient

from deviceplatform.roles import Role
from tests.helpers import PASSWORD, basic

RUN_ID = uuid.uuid4().hex[:10]
ENGINES = ("deviceplatform.backends.postgresql", "deviceplatform.backends.sqlite3")


def pytest_configure(config: pytest.Config) -> None:
    # Tests only ever run against the real services (DEVELOPERS.md); bin/test sets these.
    engine = settings.DATABASES["default"]["ENGINE"]
    if engine not in ENGINES:
        raise pytest.UsageError(
            "The test suite runs against PostgreSQL or SQLite: run it with bin/test, or set "
            "DATABASE_URL"
        )
    # The MD5 hasher keeps user fixtures fast; production keeps Django's default. The device
    # hasher (generated device passwords, deviceplatform/hashers.py) must stay known.
    settings.PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.MD5PasswordHasher",
        "deviceplatform.hashers.DevicePasswordHasher",
    ]
    # Realtime state of each run and xdist worker apart in the shared Redis.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    settings.REALTIME_PREFIX = f"test:{RUN_ID}:{worker}:rt"
    # The scrape cache of /metrics (deviceplatform.metrics.cached_for_scrape), likewise.
    os.environ["METRICS_CACHE_PREFIX"] = f"test:{RUN_ID}:{worker}:metrics"
    settings.METRICS_CACHE_PREFIX = os.environ["METRICS_CACHE_PREFIX"]
    # The suite's many users and wrong-password tests must not trip the failed-login limiter: it
    # is off here and in the servers tests start (they inherit the environment); the tests of the
    # limiter turn it on themselves.
    limits = {
        "AUTH_FAILURES_PER_USER": "0",
        "AUTH_FAILURES_PER_ADDRESS": "0",
        "AUTH_FAILURE_PREFIX": f"test:{RUN_ID}:{worker}:authfail",
    }
    os.environ.update(limits)
    settings.AUTH_FAILURES_PER_USER = settings.AUTH_FAILURES_PER_ADDRESS = 0
    settings.AUTH_FAILURE_PREFIX = limits["AUTH_FAILURE_PREFIX"]
    # Verified device credentials shared through Redis (deviceplatform/api/credential_cache.py):
    # each run and worker under its own prefix, also in the servers tests start.
    os.environ["AUTH_VERIFIED_CACHE_PREFIX"] = f"test:{RUN_ID}:{worker}:verified"
    settings.AUTH_VERIFIED_CACHE_PREFIX = os.environ["AUTH_VERIFIED_CACHE_PREFIX"]
    # Booked ramp runs (bulkops/tasks.py) would pile up in the shared Redis's default queue, which
    # no worker of the suite consumes: off here and in the processes tests start; the tests of
    # booking turn it on with a queue of their own.
    os.environ["BULK_RAMP_BOOKING"] = "0"
    settings.BULK_RAMP_BOOKING = False


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> Iterator[None]:
    """Each run (and each xdist worker) gets its own database, so parallel runs never collide.

    SQLite's is a file in a temporary directory, never `:memory:`: the server and worker processes
    some tests start must open the same database. The directory goes when the session ends (after
    Django has dropped the database), with any `-wal`/`-shm` files a killed process left."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"test_dp_{RUN_ID}_{worker}"
    database = settings.DATABASES["default"]
    database.setdefault("TEST", {})
    if database["ENGINE"] != "deviceplatform.backends.sqlite3":
        database["TEST"]["NAME"] = name
        yield
        return
    directory = tempfile.mkdtemp(prefix=f"{name}_")
    database["TEST"]["NAME"] = os.path.join(directory, f"{name}.sqlite3")
    # A throwaway database needs no fsync: commits (and the flush after every transactional
    # test) stop waiting for the disk, about a fifth of the run. Only crash durability changes.
    options = database.setdefault("OPTIONS", {})
    options["init_command"] = options.get("init_command", "") + " PRAGMA synchronous=OFF;"
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_roles_cache() -> None:
    """Each test starts without cached roles. The cache is keyed by user ID, and on SQLite a
    rolled-back test gives its IDs back (sqlite_sequence is rolled back too): the next test's
    first user would otherwise inherit the roles of the previous test's for a few seconds."""
    from deviceplatform.api.authentication import roles_cache

    roles_cache.clear()


@pytest.fixture(autouse=True)
def platform_celery_app_stays_current() -> Iterator[None]:
    """A test that builds a Celery app of its own (a client for a private broker) must not leave it
    as Celery's current app: the platform's shared tasks would be sent there in every later test of
    this process (CI failed that way once: Connection refused to a private Redis long stopped)."""
    from celery import current_app

    from deviceplatform.celery import app

    yield
    assert current_app._get_current_object() is app, (
        "this test left another Celery app current: build it with set_as_current=False"
    )


@pytest.fixture
def make_user(db: None) -> Callable[..., Any]:
    from deviceplatform.services import user_upsert

    def make(
        username: str,
        roles: Iterable[Role | str] = (),
        groups: Iterable[str] = (),
        *,
        superuser: bool = False,
    ) -> Any:
        return user_upsert(
            username=username,
            password=PASSWORD,
            roles=[str(role) for role in roles],
            groups=groups,
            is_superuser=superuser,
        )

    return make


@pytest.fixture
def client_for() -> Callable[..., APIClient]:
    """An API client sending real Basic credentials as `<tenant>/<user>` (what c8y-api sends)."""

    def make(user: Any, *, tenant: str | None = "t100", password: str = PASSWORD) -> APIClient:
        client = APIClient()
        login = f"{tenant}/{user.username}" if tenant else user.username
        client.credentials(HTTP_AUTHORIZATION=basic(login, password))
        return client

    return make


@pytest.fixture
def superuser(db: None) -> Any:
    """An operator of the admin UI (a superuser, `root-admin`)."""
    from deviceplatform.services import user_upsert

    return user_upsert(username="root-admin", password="x", is_superuser=True)


@pytest.fixture
def admin_client(client: Any, superuser: Any) -> Any:
    """Django's test client logged in to the admin UI as `superuser`."""
    client.force_login(superuser)
    return client


@pytest.fixture
def admin(make_user: Callable[..., Any]) -> Any:
    return make_user("admin", groups=["admins"])


@pytest.fixture
def admin_api(admin: Any, client_for: Callable[..., APIClient]) -> APIClient:
    return client_for(admin)


@pytest.fixture
def anon_api() -> APIClient:
    return APIClient()


@pytest.fixture
def row_counts() -> Callable[[], dict[str, int]]:
    """Snapshot of every table's row count, to prove a refused request wrote nothing."""
    from django.apps import apps

    def counts() -> dict[str, int]:
        return {
            model._meta.label: model._default_manager.count()
            for model in apps.get_models()
            if model._meta.app_label in {"inventory", "devicecontrol", "bulkops", "deviceplatform"}
            and model._meta.managed
        }

    return counts


@pytest.fixture
def c8y(live_server: Any) -> Iterator[Any]:
    """The official c8y-api client against the live server, as a user of the `admins` group."""
    from c8y_api import CumulocityApi

    from deviceplatform.services import user_upsert

    user_upsert(username="admin", password=PASSWORD, groups=["admins"])
    api = CumulocityApi(
        base_url=live_server.url, tenant_id="t100", username="admin", password=PASSWORD
    )
    yield api
    api.session.close()


# --- realtime: server-side sessions seen as subscribers --------------------------------------------

Run = Callable[[Coroutine[Any, Any, Any]], Any]
TEST_SERVER = "http://testserver"  # the host of the test client's requests


class Subscriber:
    """A server-side session on the real realtime store (`watching`), subscribed to `channels`,
    seen as a subscriber that connected to the test client's host: each message is `{"channel", "data"}`
    with the base URL marks made absolute (realtime.md §5)."""

    def __init__(self, run: Run, watch: Any) -> None:
        self._run = run
        self._watch = watch
        self._buffer: list[dict[str, Any]] = []

    def _take(self, payloads: list[bytes]) -> None:
        from deviceplatform.realtime.events import absolute, delivered

        # As the server delivers them: without the envelope's request id (Exchange.encode).
        self._buffer.extend(
            orjson.loads(absolute(delivered(p)[0], b'"' + TEST_SERVER.encode())) for p in payloads
        )

    def received(self) -> list[dict[str, Any]]:
        """Everything queued for this session so far. Publishing is synchronous (the commit that
        registered an event returns after its messages are queued), so no waiting is needed."""
        self._take(self._run(self._watch.next(0)))
        taken, self._buffer = self._buffer, []
        return taken

    def receive(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next `count` messages, waiting for them (for publishers in other threads); the
        timeout only bounds a hang, it is no timing assertion."""
        deadline = time.monotonic() + timeout
        while len(self._buffer) < count and (left := deadline - time.monotonic()) > 0:
            self._take(self._run(self._watch.next(left)))
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        assert len(taken) == count, taken
        return taken


Subscribe = Callable[..., Subscriber]


@pytest.fixture
def realtime_loop() -> Iterator[Run]:
    """`realtime_loop(coroutine)` runs it on one event loop in a background thread and returns its
    result: the realtime store's async client and the hub belong to a loop, so synchronous tests
    (the REST client, on-commit publishing) talk to them through this."""
    from deviceplatform.realtime.hub import get_hub
    from deviceplatform.realtime.store import RedisStore

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    async def close() -> None:
        hub = get_hub()
        await hub.close()
        if isinstance(hub.store, RedisStore):
            client, _ = hub.store._client()
            await client.aclose()

    try:
        yield run
    finally:
        run(close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@pytest.fixture
def subscriber(realtime_loop: Run) -> Iterator[Subscribe]:
    """`subscriber("/operations/4712", "/4711")`: a session on the configured realtime store (the
    test run's own Redis prefix when REDIS_URL is set) that receives what real clients of those
    channels would."""
    from deviceplatform.realtime.hub import watching

    stack = AsyncExitStack()

    def subscribe(*channels: str) -> Subscriber:
        return Subscriber(
            realtime_loop, realtime_loop(stack.enter_async_context(watching(list(channels))))
        )

    try:
        yield subscribe
    finally:
        realtime_loop(stack.aclose())


@pytest.fixture(scope="session", autouse=True)
def collected_static_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Static files collected as `bin/run` collects them (hashed names, manifest), into this
    session's own STATIC_ROOT: admin pages resolve `{% static %}` through the manifest as in
    production, and servers the tests start (which inherit the environment) serve the same files."""
    from django.core.management import call_command

    root = str(tmp_path_factory.mktemp("static"))
    settings.STATIC_ROOT = root
    os.environ["STATIC_ROOT"] = root
    call_command("collectstatic", interactive=False, verbosity=0)
