"""WSGI entry point: the production layout serves the REST API from gunicorn sync workers (README);
static files are answered before Django (deviceplatform/staticfiles.py)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deviceplatform.settings")

application = get_wsgi_application()

from deviceplatform.staticfiles import static_wsgi  # noqa: E402  (after Django is set up)

application = static_wsgi(application)
