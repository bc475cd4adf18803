"""Static files (the admin's CSS and JS) in front of Django, under both servers.

`manage.py collectstatic` (bin/run runs it) writes STATIC_ROOT with content-hashed copies and a
manifest. ServeStatic (a WhiteNoise fork with native ASGI) wraps the ASGI and the WSGI application
and answers requests for those files before Django sees them: hashed names with a cache lifetime of
ten years (`immutable`), other names for a minute, gzip when the client takes it. WhiteNoise itself
would have to be a sync-only Django middleware, which under uvicorn would put every request, held
long-polls included, on a thread. A path under STATIC_URL that names no file reaches Django, which
answers a plain 404 (`static_not_found`), never the API's error body."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseNotFound
from servestatic import ServeStatic, ServeStaticASGI

logger = logging.getLogger(__name__)

MANIFEST = "staticfiles.json"  # what ManifestStaticFilesStorage writes into STATIC_ROOT


def _options() -> dict[str, Any]:
    root = Path(settings.STATIC_ROOT)
    if not (root / MANIFEST).is_file():
        logger.error(
            "Static files are not collected in %s: the admin UI will not work. Run "
            "`manage.py collectstatic --noinput` (bin/run does) before starting the server.",
            root,
        )
    return {
        "root": root if root.is_dir() else None,
        "prefix": "/" + settings.STATIC_URL.strip("/") + "/",
        "max_age": 60,
    }


def static_asgi(application: Any) -> ServeStaticASGI:
    options = _options()
    return ServeStaticASGI(application, **options)


def static_wsgi(application: Any) -> ServeStatic:
    options = _options()
    return ServeStatic(application, **options)


def static_not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    return HttpResponseNotFound(b"Not Found", content_type="text/plain; charset=utf-8")
