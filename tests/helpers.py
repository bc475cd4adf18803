"""Assertion helpers shared by the tests."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
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
    # The request's id (README "Request ids and tracing"), as in its X-Request-ID header (neither
    # when the view was called without the middleware); left out of what is returned, so that
    # two refusals compare equal whatever their ids.
    assert body.pop("requestId", None) == response.get("X-Request-ID"), body
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


def run_together(work: Callable[[int], Any], count: int) -> list[Any]:
    """Run `work(i)` in `count` threads released at once (a barrier); each closes its own
    database connection. Returns each thread's result, or the exception it raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def target(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = work(index)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread below
            results[index] = exc
        finally:
            from django.db import connection

            connection.close()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return results


def shown_messages(response: Any) -> list[str]:
    """The admin's flash messages of a test-client response."""
    from django.contrib.messages import get_messages

    return [str(message) for message in get_messages(response.wsgi_request)]
