"""Tasks that only the worker of tests/deviceplatform/test_worker_pool.py loads (`celery worker
--include`): each reports, to a list in the test's private Redis, what the database looks like
from inside a prefork child."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import redis
from django.conf import settings
from django.db import connection, connections

from deviceplatform.celery import app

RESULTS = "worker-probe:results"
_threads: list[threading.Thread] = []


def _report(**fields: Any) -> None:
    redis.Redis.from_url(settings.REDIS_URL).rpush(RESULTS, json.dumps(fields))


def _pool_name() -> str | None:
    pool = getattr(connection, "pool", None)
    return None if pool is None else pool.name


@app.task(name="worker_probe.pool")
def pool() -> None:
    """This child's pid, the pool its connection came from and that connection's server pid."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    _report(pid=os.getpid(), pool=_pool_name(), backend=backend)


@app.task(name="worker_probe.background")
def background(queries: int) -> None:
    """A thread of the child queries the database `queries` times (closing its connection after
    each, as bulkops/live.py's publisher does) while the next tasks run; it reports the errors."""

    def run() -> None:
        errors = []
        for _ in range(queries):
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                connections.close_all()
        _report(pid=os.getpid(), errors=errors)

    thread = threading.Thread(target=run, name="probe-background", daemon=True)
    _threads.append(thread)
    thread.start()
