"""Bayeux over HTTP long-polling (realtime.md §2): an async view, so a held connect pins no thread."""

from __future__ import annotations

import orjson
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from deviceplatform.api.auth_throttle import TooManyFailures, client_address
from deviceplatform.api.authentication import BAD_CREDENTIALS
from deviceplatform.api.exceptions import (
    error_response,
    method_not_allowed_response,
    throttled_response,
    unauthorized_response,
)
from deviceplatform.api.views import base_url
from deviceplatform.realtime.protocol import Context, Exchange, encode_array
from deviceplatform.realtime.subscriptions import Family

CONTENT_TYPE = "application/json;charset=UTF-8"


@csrf_exempt
async def long_polling(request: HttpRequest, family: str, **_: str) -> HttpResponse:
    """POST a JSON array of Bayeux messages (or one message); the answer is a JSON array."""
    if request.method != "POST":
        return method_not_allowed_response(request.method, "POST")
    header = request.META.get("HTTP_AUTHORIZATION") or None
    exchange = Exchange(
        Context(Family(family), base_url(request), header, client_address(request.META))
    )
    if header is not None:
        # A present but invalid header is refused outright; the Java SDK counts these 401s. The
        # exchange remembers the outcome: a handshake relying on the header is not checked again.
        try:
            if await exchange.authenticate(header) is None:
                return unauthorized_response(BAD_CREDENTIALS)
        except TooManyFailures as limited:
            return throttled_response(limited)
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return error_response(400, "general/badRequest", "The body is not JSON")
    if isinstance(body, dict):
        messages = [body]
    elif isinstance(body, list):
        messages = body
    else:
        return error_response(
            400, "general/badRequest", "Expected a Bayeux message or an array of them"
        )
    parts = await exchange.run(messages, holdable=len(messages) == 1)
    return HttpResponse(encode_array(parts), content_type=CONTENT_TYPE)
