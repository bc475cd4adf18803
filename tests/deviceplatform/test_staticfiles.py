"""Static files in front of Django (deviceplatform/staticfiles.py), through the real ASGI and WSGI
applications the servers load: the admin's stylesheets as the admin links them, cached for ever
under their hashed names, compressed on request; a missing file is a plain 404; the API behind
the wrapper is untouched."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application
from django.test import Client

from deviceplatform.staticfiles import static_asgi, static_wsgi

FOREVER = "max-age=315360000, public, immutable"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def asgi_get(path: str, headers: dict[str, str] | None = None) -> Response:
    application = static_asgi(get_asgi_application())

    async def call() -> Response:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
            + [(b"host", b"testserver")],
            "client": ("127.0.0.1", 40000),
            "server": ("testserver", 80),
        }
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await communicator.receive_output(10)
        body = b""
        while True:
            message = await communicator.receive_output(10)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await communicator.wait()
        return Response(
            start["status"],
            {k.decode().lower(): v.decode() for k, v in start["headers"]},
            body,
        )

    return async_to_sync(call)()


def wsgi_get(path: str, headers: dict[str, str] | None = None) -> Response:
    application = static_wsgi(get_wsgi_application())
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    for key, value in (headers or {}).items():
        environ["HTTP_" + key.upper().replace("-", "_")] = value
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO(b"")
    started: list[Any] = []
    chunks = application(environ, lambda status, headers, *_: started.append((status, headers)))
    body = b"".join(chunks)
    if hasattr(chunks, "close"):
        chunks.close()
    status, header_list = started[0]
    return Response(int(status.split()[0]), {k.lower(): v for k, v in header_list}, body)


SERVERS = [pytest.param(asgi_get, id="asgi"), pytest.param(wsgi_get, id="wsgi")]
Get = Callable[..., Response]


@pytest.fixture
def admin_stylesheets(make_user: Callable[..., Any]) -> list[str]:
    """The stylesheet URLs the admin's own pages link to."""
    browser = Client()
    browser.force_login(make_user("root", superuser=True))
    page = browser.get("/admin/")
    assert page.status_code == 200
    sheets = re.findall(r'<link rel="stylesheet"[^>]*href="([^"]+)"', page.content.decode())
    assert sheets
    return sheets


@pytest.mark.django_db
@pytest.mark.parametrize("get", SERVERS)
def test_the_admins_stylesheets_are_served_with_hashed_names_cached_for_ever(
    get: Get, admin_stylesheets: list[str]
) -> None:
    for href in admin_stylesheets:
        assert re.search(r"\.[0-9a-f]{12}\.css$", href), href
        response = get(href)
        assert response.status == 200, href
        assert response.headers["content-type"] == 'text/css; charset="utf-8"'
        assert response.headers["cache-control"] == FOREVER
        assert b"{" in response.body


@pytest.mark.django_db
@pytest.mark.parametrize("get", SERVERS)
def test_unhashed_names_are_cached_briefly_and_gzip_is_offered(get: Get) -> None:
    plain = get("/static/admin/css/base.css")
    assert plain.status == 200
    assert plain.headers["cache-control"] == "max-age=60, public"
    zipped = get("/static/admin/css/base.css", {"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert len(zipped.body) < len(plain.body)


@pytest.mark.django_db
@pytest.mark.parametrize("get", SERVERS)
@pytest.mark.parametrize(
    "path", ["/static/admin/css/missing.css", "/static/", "/static/../settings.py"]
)
def test_a_missing_static_file_is_a_plain_404_not_an_api_error(get: Get, path: str) -> None:
    response = get(path)
    assert response.status == 404
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.body == b"Not Found"


@pytest.mark.django_db
@pytest.mark.parametrize("get", SERVERS)
def test_the_api_behind_the_static_layer_is_untouched(get: Get) -> None:
    response = get("/tenant/loginOptions")
    assert response.status == 200
    assert b"loginOptions" in response.body
