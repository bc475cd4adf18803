"""Run with the venv built from requirements.txt alone: import every module of the platform and of
the fleet simulator (bin/simulate), and every module the platform's processes load at run time
(server, gunicorn, uvicorn, Celery worker and beat, the Redis transport, honcho), so a runtime
dependency that only the dev requirements bring in fails here, not in a user's terminal. Prints what it imported; exits non-zero naming what failed."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("deviceplatform", "inventory", "devicecontrol", "bulkops", "simulator")
# Loaded lazily by the processes bin/run starts, so importing our packages does not reach them.
RUNTIME_MODULES = (
    "kombu.transport.redis",  # the Celery broker with REDIS_URL (needed `packaging`)
    "celery.bin.celery",
    "celery.apps.worker",
    "celery.apps.beat",
    "celery.concurrency.prefork",
    "channels_redis.pubsub",
    "redis.asyncio",
    "psycopg",
    "psycopg_pool",
    "uvicorn.main",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.websockets_impl",
    "uvicorn.loops.uvloop",
    "uvicorn.supervisors.multiprocess",
    "gunicorn.app.wsgiapp",
    "gunicorn.workers.sync",
    "honcho.command",
    "pythonjsonlogger.json",
    "servestatic.storage",
    "deviceplatform.asgi",
    "deviceplatform.wsgi",
    "deviceplatform.gunicorn_conf",
)
# Modules of an optional feature, whose packages come from their own requirements file (bin/run
# installs it when the feature is turned on): not importable from requirements.txt alone, by design.
OPTIONAL_MODULES = {"deviceplatform.tracing": "requirements-otel.txt (OTEL_TRACES)"}


def main() -> int:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deviceplatform.settings")
    import django

    django.setup()
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.append(package)
        names += [
            info.name
            for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")
            if ".migrations." not in info.name and info.name not in OPTIONAL_MODULES
        ]
    names += RUNTIME_MODULES
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure, not only the first
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    print(f"imported {len(names) - len(failed)} of {len(names)} modules with {sys.executable}")
    for name, needs in OPTIONAL_MODULES.items():
        print(f"not checked: {name} (optional, needs {needs})")
    for line in failed:
        print(f"error: cannot import {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
