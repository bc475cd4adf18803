"""The four realtime endpoints (realtime.md §1), for HTTP long-polling and for WebSocket.

CometD JavaScript may append the message type to the long-polling URL (`.../handshake`); those
suffixes are the same endpoint. Every path works with and without a trailing slash."""

from __future__ import annotations

from django.urls import URLPattern, re_path

from deviceplatform.realtime.subscriptions import Family

ENDPOINTS: dict[str, Family] = {
    "notification/realtime": Family.REALTIME,
    "cep/realtime": Family.REALTIME,
    "notification/operations": Family.AGENT,
    "devicecontrol/notifications": Family.AGENT,
}
_SUFFIX = r"(?:/(?P<message_type>handshake|connect|subscribe|unsubscribe|disconnect))?"


def http_urlpatterns() -> list[URLPattern]:
    from deviceplatform.realtime.views import long_polling

    return [
        re_path(rf"^{path}{_SUFFIX}/?$", long_polling, kwargs={"family": family.value})
        for path, family in ENDPOINTS.items()
    ]


def websocket_urlpatterns() -> list[URLPattern]:
    from deviceplatform.realtime.consumers import BayeuxConsumer

    return [
        re_path(rf"^{path}/?$", BayeuxConsumer.as_asgi(), kwargs={"family": family.value})
        for path, family in ENDPOINTS.items()
    ]
