"""Logging: the `LOGGING` dict (plain or JSON lines), one access-log line per request, and the
request id and user on every line logged while a request runs."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar, Token
from inspect import iscoroutinefunction
from typing import Any

from django.http import HttpRequest, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware
from django.utils.functional import SimpleLazyObject, empty

access_logger = logging.getLogger("deviceplatform.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A request id from a proxy (nginx's $request_id) or a client is kept when it is short and plain;
# anything else is replaced, so a log line never carries attacker-chosen control characters.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Celery logs a line for every task it receives and runs and beat one for every task it sends:
# with the ramp every 0.5 s that is thousands of lines an hour of an idle platform. Our tasks log
# what they did instead, so these stay quiet unless LOG_LEVEL is DEBUG.
PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.beat")


_request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request (or of the request that caused the Celery task) running now."""
    return _request_id_var.get()


def is_request_id(value: object) -> bool:
    """Whether `value` is an id we keep as it is: 1 to 128 letters, digits or `._:-`."""
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def set_request_id(value: str | None) -> Token[str | None]:
    """Make `value` the current request id (a Celery task, from its message's header); hand the
    token to `reset_request_id` when done."""
    return _request_id_var.set(value)


def reset_request_id(token: Token[str | None]) -> None:
    _request_id_var.reset(token)


class RequestContextFilter(logging.Filter):
    """Adds `request_id` to every record logged while a request is handled (in its thread or task:
    Django copies the context into `sync_to_async` threads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id_var.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class WebSocketChatterFilter(logging.Filter):
    """Drops the websockets library's "connection open" / "connection closed" lines (uvicorn
    passes its own logger to it), below WARNING: uvicorn's `[accepted]` line already records
    the connection, and an agent fleet reconnecting would write three lines per agent."""

    CHATTER = frozenset({"connection open", "connection closed"})

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= logging.WARNING
            or not isinstance(record.msg, str)
            or record.msg not in self.CHATTER
        )


class PlainFormatter(logging.Formatter):
    """The plain line, with `[<request id>] ` before the message of a record that has one."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f"[{request_id}] " if request_id else ""
        return super().formatMessage(record)


def logging_config(*, level: str, fmt: str) -> dict[str, Any]:
    """The LOGGING setting: everything to stderr through the root logger, `fmt` "plain" (one
    human-readable line) or "json" (one JSON object per line, with every extra field)."""
    level = level.upper()
    quiet_level = "DEBUG" if level == "DEBUG" else "WARNING"
    formatters: dict[str, Any] = {
        "plain": {
            "()": "deviceplatform.logs.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(request_tag)s%(message)s",
        },
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",  # ISO 8601 in UTC, with microseconds
        },
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request_context": {"()": "deviceplatform.logs.RequestContextFilter"},
            "websocket_chatter": {"()": "deviceplatform.logs.WebSocketChatterFilter"},
        },
        "formatters": {"main": formatters[fmt]},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "filters": ["request_context"],
            }
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # The access log has every request with its status; Django's own 4xx lines repeat it.
            "django.request": {"level": "ERROR"},
            **{name: {"level": quiet_level} for name in PER_TASK_LOGGERS},
            # gunicorn (production layout) logs through these; configured here, they lose
            # gunicorn's own handlers and format and propagate to ours.
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
            # uvicorn's access lines carry no duration and would double ours.
            "uvicorn.access": {"level": "WARNING"},
            # A WebSocket connection gets one line, uvicorn's `"WebSocket <path>" [accepted]`; the
            # websockets library's "connection open" / "connection closed" (logged on uvicorn's
            # logger) would add two more per agent connection.
            "uvicorn.error": {"filters": ["websocket_chatter"]},
        },
    }


def request_id_or_new(given: str) -> str:
    """`given` (an incoming `X-Request-ID`) if it is plain, else a new random id."""
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _request_id(request: HttpRequest) -> str:
    # META, not request.headers: the latter builds a dict of every header (7 of the middleware's
    # 11 µs per request, measured).
    return request_id_or_new(request.META.get("HTTP_X_REQUEST_ID", ""))


def _username(request: HttpRequest) -> str | None:
    """Who made the request, as far as the request already knows: DRF puts the user it
    authenticated on the Django request; the session middleware's lazy user counts only once the
    view has looked at it (loading it here would cost a query, and cannot run in async code)."""
    user = getattr(request, "user", None)
    if isinstance(user, SimpleLazyObject) and user._wrapped is empty:
        return None
    return getattr(user, "username", None) or None


def _finish(
    request: HttpRequest, response: HttpResponseBase, started: float, rid: str
) -> HttpResponseBase:
    """Hand the request id back and log the request."""
    response[REQUEST_ID_HEADER] = rid
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    user = _username(request)
    path = request.get_full_path()
    access_logger.info(
        "%s %s %s %.1fms user=%s",
        request.method,
        path,
        response.status_code,
        duration_ms,
        user or "-",
        extra={
            "method": request.method,
            "path": path,
            "status": response.status_code,
            "duration_ms": duration_ms,
            "user": user,
            "client": request.META.get("REMOTE_ADDR"),
            "request_id": rid,
        },
    )
    return response


@sync_and_async_middleware
def access_log_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """One INFO line per request on `deviceplatform.access`: method, path, status, duration and
    user (plus client and request id as JSON fields). The request id comes from `X-Request-ID`
    (nginx sets it) or is made here, and is returned in the same header.

    Async-capable like the rest of the chain, so a held long-poll pins no thread. Static files
    are served before Django (deviceplatform/asgi.py, wsgi.py) and are not logged here."""
    if iscoroutinefunction(get_response):

        async def middleware_async(request: HttpRequest) -> HttpResponseBase:
            started, rid = time.perf_counter(), _request_id(request)
            token = _request_id_var.set(rid)
            try:
                return _finish(request, await get_response(request), started, rid)
            finally:
                _request_id_var.reset(token)

        return middleware_async

    def middleware(request: HttpRequest) -> HttpResponseBase:
        started, rid = time.perf_counter(), _request_id(request)
        token = _request_id_var.set(rid)
        try:
            return _finish(request, get_response(request), started, rid)
        finally:
            _request_id_var.reset(token)

    return middleware
