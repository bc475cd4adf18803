"""Bayeux over WebSocket (realtime.md §2): one Channels consumer per socket, for both families.

Each text frame is a JSON array of messages (one message is accepted). Replies go out at once; a
held connect streams events in their own frames while it lasts and sends its reply when the hold
ends, so the socket keeps reading (subscribe, disconnect, a newer connect) during the hold."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http.request import validate_host

from deviceplatform.api.auth_throttle import client_address
from deviceplatform.realtime.protocol import Context, Exchange, encode_array
from deviceplatform.realtime.subscriptions import Family

logger = logging.getLogger(__name__)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def _base_url(scope: dict[str, Any], headers: dict[str, str]) -> str:
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    forwarded = headers.get("x-forwarded-proto")
    if proxy and forwarded:
        scheme = "https" if forwarded.split(",")[0].strip() in ("https", "wss") else "http"
    host = headers.get("host")
    if settings.USE_X_FORWARDED_HOST and headers.get("x-forwarded-host"):
        host = headers["x-forwarded-host"].split(",")[0].strip()
    if not host and scope.get("server"):
        server_host, port = scope["server"]
        host = f"{server_host}:{port}"
    return f"{scheme}://{host or 'localhost'}"


def _same_origin_authorization(headers: dict[str, str]) -> str | None:
    """The upgrade's Authorization header, unless the upgrade comes from a foreign web page: a
    browser sends remembered Basic credentials along, and another site must not ride on them."""
    authorization = headers.get("authorization")
    origin = headers.get("origin")
    if not authorization or origin is None:
        return authorization
    origin_host = urlsplit(origin).hostname or ""
    request_host = (headers.get("host") or "").rpartition(":")[0] or headers.get("host", "")
    if origin_host == request_host or validate_host(origin_host, settings.ALLOWED_HOSTS):
        return authorization
    return None


class BayeuxConsumer(AsyncWebsocketConsumer):
    # Events come from the realtime store, not the channel layer: no per-socket layer channel.
    channel_layer_alias = "__no_layer__"

    family: Family
    exchange: Exchange

    async def connect(self) -> None:
        self.family = Family(self.scope["url_route"]["kwargs"]["family"])
        headers = _headers(self.scope)
        client = self.scope.get("client")
        meta = {
            "REMOTE_ADDR": client[0] if client else "",
            "HTTP_X_FORWARDED_FOR": headers.get("x-forwarded-for", ""),
        }
        self.exchange = Exchange(
            Context(
                self.family,
                _base_url(self.scope, headers),
                _same_origin_authorization(headers),
                client_address(meta),
            )
        )
        self.holds: set[asyncio.Task[None]] = set()
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for task in list(self.holds):
            task.cancel()
        if self.holds:
            await asyncio.gather(*self.holds, return_exceptions=True)
        await self.exchange.close()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        raw = text_data if text_data is not None else bytes_data or b""
        if len(raw) > settings.REALTIME_MAX_MESSAGE_BYTES:
            await self._send(
                [orjson.dumps({"successful": False, "error": "413::Message too large"})]
            )
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self._send([orjson.dumps({"successful": False, "error": "400::Invalid JSON"})])
            return
        messages = [body] if isinstance(body, dict) else body
        if not isinstance(messages, list):
            await self._send([orjson.dumps({"successful": False, "error": "400::Invalid message"})])
            return
        self.exchange.new_request()  # each frame pays for at most one failed credential check
        holds_connect = any(
            isinstance(m, dict) and m.get("channel") == "/meta/connect" for m in messages
        )
        if not holds_connect:
            await self._send(await self.exchange.run(messages, holdable=False))
            return
        # A connect is held in its own task, so this socket keeps reading meanwhile.
        task = asyncio.create_task(self._run_connect(messages))
        self.holds.add(task)
        task.add_done_callback(self.holds.discard)

    async def _run_connect(self, messages: list[Any]) -> None:
        try:
            await self._send(await self.exchange.run(messages, holdable=True, stream=self._send))
        except asyncio.CancelledError:
            raise
        except OSError:
            # The client went away during the hold (uvicorn's ClientDisconnected is an OSError):
            # nothing to answer; `disconnect` shortens the session's life.
            logger.debug("realtime socket closed during a connect", exc_info=True)
        except Exception:
            logger.exception("realtime connect failed")
            with contextlib.suppress(Exception):
                await self.close(code=1011)

    async def _send(self, parts: list[bytes]) -> None:
        if parts:
            await self.send(text_data=encode_array(parts).decode())
