"""`POST /devicecontrol/operations/wait?timeout=SECONDS`: create an operation and wait for its result.

An extension beyond Cumulocity (README "Beyond Cumulocity"), shaped like GenieACS's task timeout:
200 with the operation when it reached SUCCESSFUL or FAILED in time, 202 with its current state
otherwise. It is an async view: while it waits it holds no thread and no database connection, only a
server-side realtime subscription (`deviceplatform.realtime.hub.watching`). The create itself is the ordinary create view, so validation,
permissions and realtime events are identical; plain Cumulocity clients never call this path."""

from __future__ import annotations

import time

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from devicecontrol import selectors
from devicecontrol.models import FINAL_STATUSES
from devicecontrol.realtime import device_channel
from devicecontrol.serializers import operation_json, operation_url
from deviceplatform.api.auth_throttle import TooManyFailures, client_address
from deviceplatform.api.authentication import BAD_CREDENTIALS, authenticate_header_value
from deviceplatform.api.exceptions import (
    ApiError,
    error_response,
    method_not_allowed_response,
    throttled_response,
    unauthorized_response,
)
from deviceplatform.api.media_types import MediaType, response_content_type
from deviceplatform.api.params import parse_id
from deviceplatform.api.renderers import dumps
from deviceplatform.api.views import base_url
from deviceplatform.realtime.hub import Watch, watching


def _timeout(request: HttpRequest) -> float | HttpResponse:
    raw = request.GET.get("timeout", "")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= settings.OPERATION_MAX_WAIT_SECONDS:
        return error_response(
            422,
            "undefined/validationError",
            f"timeout must be a number of seconds from 0 to {settings.OPERATION_MAX_WAIT_SECONDS}",
        )
    return value


def _device_id(request: HttpRequest) -> int | None:
    try:
        body = orjson.loads(request.body or b"null")
        return parse_id(body.get("deviceId"))
    except Exception:
        return None  # the create view answers the precise error


@csrf_exempt
async def operation_create_and_wait(request: HttpRequest) -> HttpResponse:
    # Authentication first (auth.md §6); the create view checks roles and the body again.
    try:
        user = await sync_to_async(authenticate_header_value)(
            request.META.get("HTTP_AUTHORIZATION"), client=client_address(request.META)
        )
    except TooManyFailures as limited:
        return throttled_response(limited)
    if user is None:
        return unauthorized_response(BAD_CREDENTIALS)
    if request.method != "POST":
        return method_not_allowed_response(request.method, "POST")
    timeout = _timeout(request)
    if isinstance(timeout, HttpResponse):
        return timeout
    device_id = _device_id(request)
    accept = request.META.get("HTTP_ACCEPT")
    request.META["HTTP_ACCEPT"] = accept or "application/json"
    if device_id is None:  # the create view answers the precise error
        return await _create(request)
    # Subscribe before creating, so an agent that finishes at once cannot be missed.
    async with watching([device_channel(device_id)]) as watch:
        created = await _create(request)
        if created.status_code != 201:
            return created
        body = orjson.loads(created.content)
        operation_id = int(body["id"])
        if body["status"] not in FINAL_STATUSES:
            await _until_final(watch, str(operation_id), timeout)
    try:
        operation = await sync_to_async(selectors.operation_get)(pk=operation_id)
    except ApiError as error:
        return error_response(error.status_code, error.error, error.message)
    base = base_url(request)
    done = operation.status in FINAL_STATUSES
    response = HttpResponse(
        dumps(operation_json(operation, base=base)),
        status=200 if done else 202,
        content_type=response_content_type(accept, MediaType.OPERATION),
    )
    response["Location"] = operation_url(base, operation.pk)
    return response


async def _create(request: HttpRequest) -> HttpResponse:
    """The ordinary create view, in a thread."""
    from devicecontrol.views import OperationCollectionView

    create = OperationCollectionView.as_view()

    def run_create() -> HttpResponse:
        response = create(request)
        if hasattr(response, "render"):  # not a replayed Idempotency-Key answer (already bytes)
            response.render()
        # Hand the connection back (to the pool) before waiting: otherwise it stays checked out by
        # this request's thread until the request ends. Not inside an enclosing transaction (the
        # test client's), which closing would break.
        if not connection.in_atomic_block:
            connection.close()
        return response

    return await sync_to_async(run_create)()


async def _until_final(watch: Watch, operation_id: str, timeout: float) -> None:
    """Wait until the operation reaches a final status, is deleted, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        for payload in await watch.next(remaining):
            change = orjson.loads(payload)["data"]
            data = change["data"]
            if change["realtimeAction"] == "DELETE":
                if data == operation_id:
                    return  # deleted meanwhile (by filter, or with its device): answered 404
            elif data["id"] == operation_id and data["status"] in FINAL_STATUSES:
                return
