"""ASGI middleware: a request body that stops arriving is answered with 408, not waited for forever.

Django's ASGI handler reads the whole body before it calls a view, and uvicorn has no body timeout:
a client that declares a `Content-Length` larger than what it sends would hold the connection (and
a coroutine) with no answer. Here each wait for the next piece of the body is bounded by
`REQUEST_BODY_TIMEOUT_SECONDS` (as nginx's `client_body_timeout`: the time between two reads, not
for the whole body). When it passes, Django is told the client left (it then answers nothing) and
the client gets 408 in the Cumulocity error shape, with the connection closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings

from deviceplatform.api.exceptions import error_body
from deviceplatform.api.media_types import ERROR_CONTENT_TYPE
from deviceplatform.api.renderers import dumps
from deviceplatform.logs import request_id_or_new

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TIMEOUT_MESSAGE = "The request body did not arrive in time"


def body_timeout_asgi(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        timeout = settings.REQUEST_BODY_TIMEOUT_SECONDS
        if scope["type"] != "http" or timeout <= 0:
            await app(scope, receive, send)
            return
        body_complete = False
        timed_out = False
        response_started = False

        async def timed_receive() -> Message:
            nonlocal body_complete, timed_out
            if body_complete:  # afterwards Django only listens for the client leaving
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                timed_out = body_complete = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await app(scope, timed_receive, tracking_send)
        if timed_out and not response_started:
            # Django never ran the request's middleware (it reads the body first): the request id
            # and the log line are made here.
            given = dict(scope.get("headers") or ()).get(b"x-request-id", b"")
            request_id = request_id_or_new(given.decode("latin-1"))
            logger.warning(
                "%s %s 408: the request body did not arrive in time",
                scope.get("method"),
                scope.get("path"),
                extra={"request_id": request_id, "status": 408},
            )
            body = dumps(
                {
                    **error_body(408, "general/requestTimeout", TIMEOUT_MESSAGE),
                    "requestId": request_id,
                }
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 408,
                    "headers": [
                        (b"content-type", ERROR_CONTENT_TYPE.encode()),
                        (b"content-length", str(len(body)).encode()),
                        (b"x-request-id", request_id.encode()),
                        (b"connection", b"close"),  # the rest of the body never came
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

    return middleware
