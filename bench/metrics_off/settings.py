"""The product's settings without the request-metrics middleware: the ceiling of bench/metrics.py,
served by the same kind of gunicorn worker and measured alternately with the product."""

from deviceplatform.settings import *  # noqa: F403
from deviceplatform.settings import MIDDLEWARE

MIDDLEWARE = [
    name for name in MIDDLEWARE if name != "deviceplatform.metrics.request_metrics_middleware"
]
