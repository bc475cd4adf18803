"""ASGI entry point: HTTP through Django (static files first, a body that stops arriving answered
with 408), WebSocket through Channels (the realtime endpoints)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deviceplatform.settings")

# Django must be set up before anything imports models (consumers, routing).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from deviceplatform.body_timeout import body_timeout_asgi  # noqa: E402
from deviceplatform.realtime.routing import websocket_urlpatterns  # noqa: E402
from deviceplatform.staticfiles import static_asgi  # noqa: E402

# No origin check on the upgrade: agents send no Origin, and a session is only ever authorised by
# the handshake's credentials. An upgrade's Authorization header counts only from our own origin
# (deviceplatform/realtime/consumers.py), so a foreign page cannot ride on remembered credentials.
application = ProtocolTypeRouter(
    {
        "http": body_timeout_asgi(static_asgi(django_asgi_app)),
        "websocket": URLRouter(websocket_urlpatterns()),
    }
)
