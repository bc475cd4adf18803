"""`manage.py serve`: the ASGI server (uvicorn) for REST and WebSocket, plus the embedded scheduler."""

from __future__ import annotations

from typing import Any

import uvicorn
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from deviceplatform.scheduler import Scheduler

# Seconds a stopping server gives open requests (a held long-poll holds up to a minute) before it
# closes them; bin/run's supervisor kills what is still running 5 s after asking it to stop.
GRACEFUL_SHUTDOWN_SECONDS = 3


class Command(BaseCommand):
    help = (
        "Serve HTTP and WebSocket with uvicorn. Without REDIS_URL this process also runs the beat "
        "schedule (deviceplatform/scheduler.py); with REDIS_URL run Celery worker and beat "
        "separately (bin/run does)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--workers",
            type=int,
            default=1,
            help="uvicorn worker processes (more than one needs REDIS_URL: they share sessions "
            "and events through Redis)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        workers = options["workers"]
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        if workers > 1 and settings.EMBEDDED_SCHEDULER:
            raise CommandError("--workers above 1 needs REDIS_URL (sessions and events in Redis)")
        # Started here, not in AppConfig.ready(), so that exactly one scheduler runs per server
        # process and none in other management commands, workers or tests; without REDIS_URL this
        # process is the only one serving.
        scheduler = Scheduler() if settings.EMBEDDED_SCHEDULER else None
        if scheduler is not None:
            scheduler.start()
        try:
            uvicorn.run(
                "deviceplatform.asgi:application",
                host=options["host"],
                port=options["port"],
                workers=workers,
                lifespan="off",
                log_config=None,  # keep Django's LOGGING (LOG_LEVEL, LOG_FORMAT) for uvicorn's too
                access_log=False,  # deviceplatform.logs logs each request, with its duration
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )
        finally:
            if scheduler is not None:
                scheduler.stop()
