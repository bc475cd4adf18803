"""The product's settings with one difference: ROOT_URLCONF adds the bare DRF ceiling views.

Used by bench/operations.py and bench/inventory_http.py as DJANGO_SETTINGS_MODULE of the one server
they start, so the ceiling and the product run in the same gunicorn workers, with the same
middleware, database pool and logging, and are measured alternately in the same run."""

from deviceplatform.settings import *  # noqa: F403

ROOT_URLCONF = "bench.bare_drf.urls"
