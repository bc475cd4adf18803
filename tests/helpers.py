"""Assertion helpers shared by the tests."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

PASSWORD = "pw-secret:with-colon"


def basic(login: str, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def assert_error(response: Any, status: int, error: str | None = None) -> dict[str, Any]:
    """The response is `status` with the Cumulocity error body and media type."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/vnd.com.nsn.cumulocity.error+json")
    body = response.json()
    assert set(body) >= {"error", "message", "info"}, body
    assert isinstance(body["message"], str)
    assert body["message"]
    if error is not None:
        assert body["error"] == error, body
    return body


def database_url() -> str:
    """The URL of this run's test database, for the server and worker processes a test starts
    (the connection points at it once `django_db_setup` ran): PostgreSQL, or the SQLite file."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db["USER"] or "", safe="")
    if db.get("PASSWORD"):
        credentials += ":" + quote(db["PASSWORD"], safe="")
    host = db["HOST"] or "127.0.0.1"
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgres://{credentials}@{host}{port}/{quote(db['NAME'], safe='')}"
