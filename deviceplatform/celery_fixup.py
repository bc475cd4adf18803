"""Celery's Django fix-up, except that a worker process keeps its database connection pool.

Celery's own (`celery.fixups.django`) closes Django's connections before and after every task,
and in a prefork child with Django's PostgreSQL pool it closes the whole pool as well. Each task
then opened a pool of its own: new threads and new PostgreSQL sessions (about ten a second on an
idle platform with one-second sweeps), and a thread of the child that used the database meanwhile
(bulkops/live.py's publisher) had the pool closed under it: `PoolClosed`, or a `getconn` that
waited the pool's 10 s for a connection that the closing pool never handed out (`PoolTimeout`,
which the CI user journey caught as a traceback logged by an idle platform).

Here the connections go back to the pool around each task (Django's `close_old_connections`, as
at the end of a request; `CONN_MAX_AGE` without the pool) and the pool lives as long as the
process, as in the server processes, so `DATABASE_POOL_MIN_SIZE` is what a child keeps open. A
child still drops the connections and the pool it inherited from the worker's main process when
it starts (Celery's `worker_process_init` handling, unchanged)."""

from __future__ import annotations

import os
from typing import Any

from celery.fixups import django as celery_django


class WorkerFixup(celery_django.DjangoWorkerFixup):
    def close_database(self, **kwargs: Any) -> None:
        """Before and after each task (and when beat embeds in the worker): this thread's
        connections go back to the pool; the pool stays."""
        from django.db import close_old_connections

        close_old_connections()


class Fixup(celery_django.DjangoFixup):
    @property
    def worker_fixup(self) -> WorkerFixup:
        # Made on first use, as Celery's: its __init__ reads the configuration.
        if self._worker_fixup is None:
            self._worker_fixup = WorkerFixup(self.app)
        return self._worker_fixup

    @worker_fixup.setter
    def worker_fixup(self, value: WorkerFixup) -> None:
        self._worker_fixup = value


def fixup(app: Any, env: str = "DJANGO_SETTINGS_MODULE") -> Fixup | None:
    """`celery.fixups.django.fixup` with `Fixup`: installed when `env` names a settings module."""
    if not os.environ.get(env) or "django" in app.loader_cls.lower():
        return None
    return Fixup(app).install()
