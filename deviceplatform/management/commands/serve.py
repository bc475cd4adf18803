"""`manage.py serve`: one ASGI server (uvicorn) for REST and WebSocket, plus the embedded scheduler."""

from __future__ import annotations

from typing import Any

import uvicorn
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from deviceplatform.scheduler import Scheduler


class Command(BaseCommand):
    help = (
        "Serve HTTP and WebSocket with uvicorn in this process. Without REDIS_URL this process also "
        "runs the beat schedule (deviceplatform/scheduler.py); with REDIS_URL run Celery worker and "
        "beat separately (bin/run does)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args: Any, **options: Any) -> None:
        # Started here, not in AppConfig.ready(), so that exactly one scheduler runs per server
        # process and none in other management commands, workers or tests. uvicorn runs without
        # workers or reload, so this process is the only one serving.
        scheduler = Scheduler() if settings.EMBEDDED_SCHEDULER else None
        if scheduler is not None:
            scheduler.start()
        try:
            uvicorn.run(
                "deviceplatform.asgi:application",
                host=options["host"],
                port=options["port"],
                lifespan="off",
                log_config=None,  # keep Django's LOGGING (LOG_LEVEL) for uvicorn's loggers too
            )
        finally:
            if scheduler is not None:
                scheduler.stop()
