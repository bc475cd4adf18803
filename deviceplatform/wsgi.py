"""WSGI entry point: the production layout serves the REST API from gunicorn sync workers (README)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deviceplatform.settings")

application = get_wsgi_application()
