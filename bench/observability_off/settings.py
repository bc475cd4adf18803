"""The product's settings without the request-metrics and access-log (request id) middlewares:
the ceiling of bench/observability.py, served by the same kind of gunicorn worker and measured
alternately with the product."""

from deviceplatform.settings import *  # noqa: F403
from deviceplatform.settings import MIDDLEWARE

OBSERVABILITY = {
    "deviceplatform.metrics.request_metrics_middleware",
    "deviceplatform.logs.access_log_middleware",
}
MIDDLEWARE = [name for name in MIDDLEWARE if name not in OBSERVABILITY]
