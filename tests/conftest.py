"""Shared fixtures: users with roles, Basic-auth API clients, row counts. Real PostgreSQL throughout."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from deviceplatform.roles import Role
from tests.helpers import PASSWORD, basic

RUN_ID = uuid.uuid4().hex[:10]


def pytest_configure(config: pytest.Config) -> None:
    # Tests only ever run against the real services (DEVELOPERS.md); bin/test sets these.
    engine = settings.DATABASES["default"]["ENGINE"]
    if engine != "django.db.backends.postgresql":
        raise pytest.UsageError(
            "The test suite runs against PostgreSQL: run it with bin/test, or set DATABASE_URL"
        )
    # The MD5 hasher keeps user fixtures fast; production keeps Django's default.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Realtime state of each run and xdist worker apart in the shared Redis.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    settings.REALTIME_PREFIX = f"test:{RUN_ID}:{worker}:rt"


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> None:
    """Each run (and each xdist worker) gets its own database, so parallel runs never collide."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    settings.DATABASES["default"].setdefault("TEST", {})
    settings.DATABASES["default"]["TEST"]["NAME"] = f"test_dp_{RUN_ID}_{worker}"


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
