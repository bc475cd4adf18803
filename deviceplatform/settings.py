"""The only settings module: every deployment difference is an environment variable (README)."""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from deviceplatform.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

SECRET_KEY = env.str("SECRET_KEY", default="insecure-dev-key-change-me-in-production-0123456789")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["*"])

# Cumulocity: one tenant per deployment (spec auth.md §1).
C8Y_TENANT_ID = env.str("C8Y_TENANT_ID", default="t100")

# Seconds a process reuses a user's effective roles (0: look them up on every request): a change of
# roles or groups (createuser, the admin) reaches the other running processes within this time.
AUTH_ROLES_CACHE_SECONDS = env.float("AUTH_ROLES_CACHE_SECONDS", default=5.0)

# Failed authentications (deviceplatform/api/auth_throttle.py): once a username or a client address
# has this many failed password checks within the window, further attempts are refused with 429
# (Bayeux: a failed handshake with advice) without checking, until the window ends. 0: no limit.
# The counters live in Redis under AUTH_FAILURE_PREFIX when REDIS_URL is set, else in the process.
AUTH_FAILURES_PER_USER = env.int("AUTH_FAILURES_PER_USER", default=10)
AUTH_FAILURES_PER_ADDRESS = env.int("AUTH_FAILURES_PER_ADDRESS", default=30)
AUTH_FAILURE_WINDOW_SECONDS = env.float("AUTH_FAILURE_WINDOW_SECONDS", default=60.0)
AUTH_FAILURE_PREFIX = env.str("AUTH_FAILURE_PREFIX", default="dp:authfail")
# A failed check against a slow hash (PBKDF2, ~0.3 s of CPU) counts this many failures against the
# client address (1 against the username): one address can make the server run only
# AUTH_FAILURES_PER_ADDRESS / this many slow checks a window, whatever usernames it tries.
AUTH_SLOW_FAILURE_WEIGHT = env.int("AUTH_SLOW_FAILURE_WEIGHT", default=3)

# Verified device credentials shared by every process (deviceplatform/api/credential_cache.py), with
# REDIS_URL: a device user's password checked once is accepted by the other processes, and after a
# restart, for this many seconds (0: per-process memory only). Redis holds only keyed digests
# (HMAC with AUTH_VERIFIED_CACHE_KEY, by default derived from SECRET_KEY) under the prefix.
AUTH_VERIFIED_CACHE_SECONDS = env.float("AUTH_VERIFIED_CACHE_SECONDS", default=43200.0)
AUTH_VERIFIED_CACHE_PREFIX = env.str("AUTH_VERIFIED_CACHE_PREFIX", default="dp:verified")
AUTH_VERIFIED_CACHE_KEY = env.str("AUTH_VERIFIED_CACHE_KEY", default="")

# The first superuser `manage.py ensureadmin` (bin/run) creates; no password: a random one, kept in
# the git-ignored file .admin-password.
ADMIN_USERNAME = env.str("ADMIN_USERNAME", default="admin")
ADMIN_PASSWORD = env.str("ADMIN_PASSWORD", default="")

# Device onboarding (README "Device onboarding"): the shared login devices use to ask for their own
# credentials, `management/devicebootstrap` or `devicebootstrap`. `manage.py ensureadmin` (bin/run)
# creates it with this password, or a random one kept in the git-ignored .bootstrap-password.
DEVICE_BOOTSTRAP_USERNAME = "devicebootstrap"
DEVICE_BOOTSTRAP_TENANT = "management"
DEVICE_BOOTSTRAP_PASSWORD = env.str("DEVICE_BOOTSTRAP_PASSWORD", default="")
# Device users (created for a device when it receives credentials) are named this plus the id.
DEVICE_USER_PREFIX = "device_"
# How often (seconds, per user and process) a user's `last_request_at` is written: an agent that
# polls every second costs one UPDATE a minute, and the admin shows when it was last heard from.
AUTH_LAST_REQUEST_INTERVAL_SECONDS = env.float("AUTH_LAST_REQUEST_INTERVAL_SECONDS", default=60.0)
# Credential polls (POST /devicecontrol/deviceCredentials, README "Device onboarding"): at most this
# many polls per device id, and this many misses (an id without a request, a wrong security token)
# per client address, within the window; beyond, 429 until the window ends. 0: no limit. The
# counters are the failed-login limiter's (Redis under AUTH_FAILURE_PREFIX with REDIS_URL).
DEVICE_CREDENTIALS_POLLS_PER_ID = env.int("DEVICE_CREDENTIALS_POLLS_PER_ID", default=120)
DEVICE_CREDENTIALS_MISSES_PER_ADDRESS = env.int(
    "DEVICE_CREDENTIALS_MISSES_PER_ADDRESS", default=120
)
DEVICE_CREDENTIALS_WINDOW_SECONDS = env.float("DEVICE_CREDENTIALS_WINDOW_SECONDS", default=60.0)
# Rows one `POST /devicecontrol/bulkNewDeviceRequests` CSV may hold (the body limit applies too).
# Each row hashes a password (PBKDF2, ~0.3 s of CPU): 1,000 rows hold a server thread ~5 minutes.
BULK_NEW_DEVICE_MAX_ROWS = env.int("BULK_NEW_DEVICE_MAX_ROWS", default=1_000)

INSTALLED_APPS = [
    # Before django.contrib.admin, so that its admin/base_site.html (the date script) wins.
    "deviceplatform",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served as our own static files (no CDN)
    "channels",
    "inventory",
    "devicecontrol",
    "bulkops",
]

MIDDLEWARE = [
    "deviceplatform.metrics.request_metrics_middleware",
    "deviceplatform.logs.access_log_middleware",
    "deviceplatform.api.middleware.cumulocity_request_middleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Cumulocity serves every path with and without a trailing slash and never redirects (spec README §1).
APPEND_SLASH = False

ROOT_URLCONF = "deviceplatform.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "deviceplatform.wsgi.application"
ASGI_APPLICATION = "deviceplatform.asgi.application"

# --- Database -------------------------------------------------------------------------------------
# No DATABASE_URL: embedded SQLite. With a PostgreSQL URL: psycopg 3 with Django's connection pool,
# because a new PostgreSQL connection costs ~5 ms (shared/PERFORMANCE.md §1).
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    if env.bool("DATABASE_POOL", default=True):
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=2),
            "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=10),
            "timeout": 10,
        }
    else:
        DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
        DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
else:
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # WAL lets the in-process scheduler write while the server reads.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    )
# Django's backends plus one step before every COMMIT: the transaction's realtime event order
# (deviceplatform/backends, deviceplatform/realtime/events.py).
DATABASES["default"]["ENGINE"] = {
    "django.db.backends.postgresql": "deviceplatform.backends.postgresql",
    "django.db.backends.sqlite3": "deviceplatform.backends.sqlite3",
}.get(DATABASES["default"]["ENGINE"], DATABASES["default"]["ENGINE"])

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "deviceplatform.User"

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []
# Django's default list, then the fast hasher that only generated device passwords use explicitly
# (deviceplatform/hashers.py): everything else (people, CSV imports, createuser) stays PBKDF2.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
    "deviceplatform.hashers.DevicePasswordHasher",
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# Dates and times with seconds and zone in the admin (deviceplatform/formats/en/formats.py).
FORMAT_MODULE_PATH = ["deviceplatform.formats"]

# Static files (the admin's CSS and JS): `manage.py collectstatic` (bin/run runs it) copies them to
# STATIC_ROOT with content-hashed names; ServeStatic serves them in front of Django under both
# servers (asgi.py, wsgi.py), hashed names with a cache lifetime of a year.
STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedManifestStaticFilesStorage"},
}

# Largest accepted request body; larger ones get 413 in the Cumulocity error shape.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("MAX_REQUEST_BODY_BYTES", default=1024 * 1024)

# Behind a TLS-terminating proxy, self links must carry the client's scheme and host (spec README §3).
USE_X_FORWARDED_HOST = env.bool("USE_X_FORWARDED_HOST", default=False)
if env.bool("USE_X_FORWARDED_PROTO", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Behind a proxy every request comes from the proxy's address: the client's is the last one of
# X-Forwarded-For (the one the proxy appended), used for the failed-login limit per address.
USE_X_FORWARDED_FOR = env.bool("USE_X_FORWARDED_FOR", default=False)

# Seconds between two reads of a request body before the ASGI server answers 408 (a client that
# declared more than it sends must not hold the connection); behind nginx, client_body_timeout.
REQUEST_BODY_TIMEOUT_SECONDS = env.float("REQUEST_BODY_TIMEOUT_SECONDS", default=30.0)

# --- REST framework --------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "deviceplatform.api.authentication.CumulocityBasicAuthentication"
    ],
    "DEFAULT_PERMISSION_CLASSES": ["deviceplatform.api.permissions.RolePermission"],
    "DEFAULT_RENDERER_CLASSES": ["deviceplatform.api.renderers.CumulocityJSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["deviceplatform.api.parsers.CumulocityJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "deviceplatform.api.media_types.CumulocityContentNegotiation",
    "EXCEPTION_HANDLER": "deviceplatform.api.exceptions.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_VERSIONING_CLASS": None,
    "DEFAULT_SCHEMA_CLASS": "deviceplatform.schema.CumulocityAutoSchema",
}

# --- API description (README "API description (OpenAPI)") -----------------------------------------
# drf-spectacular builds the OpenAPI document from the URL patterns and views; the bodies, query
# parameters and media types come from each app's schema.py, attached by these hooks.
SPECTACULAR_SETTINGS = {
    "OAS_VERSION": "3.1.0",
    "TITLE": "Device platform API",
    "DESCRIPTION": (
        "A Cumulocity IoT compatible REST API: inventory, identity, device control, bulk "
        "operations and realtime notifications. Conventions (media types, paging, errors, "
        "ETags): docs/api/conventions.md."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/",
    "SCHEMA_COERCE_PATH_PK": False,
    "COMPONENT_SPLIT_REQUEST": False,
    "PREPROCESSING_HOOKS": [
        "deviceplatform.schema.preprocess",
        "inventory.schema.attach",
        "devicecontrol.schema.attach",
        "bulkops.schema.attach",
    ],
    "POSTPROCESSING_HOOKS": [
        "inventory.schema.postprocess",
        "devicecontrol.schema.postprocess",
        "bulkops.schema.postprocess",
        "deviceplatform.schema.postprocess",
    ],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Redis, Channels, Celery ----------------------------------------------------------------------
# No REDIS_URL: in-process channel layer and scheduler (the embedded default). With REDIS_URL: the
# channels-redis pub/sub layer and a Celery broker; worker and beat run as separate processes.
REDIS_URL = env.str("REDIS_URL", default="")

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "prefix": env.str("CHANNELS_PREFIX", default="dp"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Realtime (Bayeux/CometD, spec realtime.md) ---------------------------------------------------
# Sessions, subscriptions and queues live in Redis under this key prefix (in this process without
# REDIS_URL). Events do not travel through the channel layer: its per-channel capacity (100) and
# expiry (60 s) would drop them silently; each session has its own bounded Redis list instead.
REALTIME_PREFIX = env.str("REALTIME_PREFIX", default="dp:rt")
REALTIME_QUEUE_LIMIT = env.int("REALTIME_QUEUE_LIMIT", default=1000)  # oldest dropped beyond
REALTIME_DEFAULT_TIMEOUT_MS = env.int("REALTIME_DEFAULT_TIMEOUT_MS", default=60_000)  # connect hold
REALTIME_MAX_TIMEOUT_MS = 7_200_000  # longest hold a client may ask for
REALTIME_MAX_INTERVAL_MS = env.int("REALTIME_MAX_INTERVAL_MS", default=10_000)  # reconnect grace
REALTIME_SESSIONS_PER_USER = env.int("REALTIME_SESSIONS_PER_USER", default=10)  # per family
REALTIME_MAX_MESSAGE_BYTES = env.int("REALTIME_MAX_MESSAGE_BYTES", default=64 * 1024)  # WS frame
REALTIME_SWEEP_SECONDS = env.float("REALTIME_SWEEP_SECONDS", default=5.0)  # expired sessions
# A subscription's right is checked again when its events are delivered; the verdict is reused for
# this long (deviceplatform/realtime/rights.py). A device's owner change applies at once anyway.
REALTIME_RIGHTS_CACHE_SECONDS = env.float("REALTIME_RIGHTS_CACHE_SECONDS", default=60.0)
# An event whose predecessor for the same device has not arrived is held back this long at most
# (its publisher may have died after the commit); 0 delivers every event as it arrives.
REALTIME_ORDER_TIMEOUT_MS = env.int("REALTIME_ORDER_TIMEOUT_MS", default=3000)

CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = "UTC"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Without a broker the in-process scheduler (deviceplatform/scheduler.py) runs the beat schedule.
EMBEDDED_SCHEDULER = not REDIS_URL
# Without a broker nothing would consume `memory://`: tasks enqueued with delay()/delay_on_commit()
# run inline in the calling process instead of being silently lost.
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
# Static, reviewed beat schedule (STYLE.md §8): seconds between runs.
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    # Beat ticks are coarser than a ramp; each tick creates everything due by then, so the pace
    # holds (bulkoperations.md §4). The runs booked for each next due child keep it on time; beat
    # is the safety net behind them (BULK_RAMP_BOOKING).
    "advance-bulk-operations": {
        "task": "bulkops.tasks.advance_bulk_operations",
        "schedule": env.float("BULK_RAMP_INTERVAL", default=0.5),
    },
    "expire-pending-operations": {
        "task": "devicecontrol.tasks.expire_pending_operations",
        "schedule": env.float("OPERATION_SWEEP_INTERVAL", default=30.0),
    },
    "time-out-executing-operations": {
        "task": "devicecontrol.tasks.time_out_executing_operations",
        "schedule": env.float("OPERATION_SWEEP_INTERVAL", default=30.0),
    },
    # Automatic retries (README "Automatic retries"): a booked retry is created at most this
    # many seconds after its `retryAt`.
    "retry-failed-operations": {
        "task": "devicecontrol.tasks.retry_failed_operations",
        "schedule": env.float("OPERATION_RETRY_INTERVAL", default=5.0),
    },
    "purge-old-operations": {
        "task": "devicecontrol.tasks.purge_old_operations",
        "schedule": env.float("OPERATION_PURGE_INTERVAL", default=3600.0),
    },
    "purge-idempotency-keys": {
        "task": "deviceplatform.tasks.purge_idempotency_keys",
        "schedule": env.float("IDEMPOTENCY_PURGE_INTERVAL", default=3600.0),
    },
}
# How long an `Idempotency-Key` answers with its first result (deviceplatform/api/idempotency.py);
# after that the key is new again. Expired keys are deleted by `purge-idempotency-keys`.
IDEMPOTENCY_KEY_TTL_SECONDS = env.int("IDEMPOTENCY_KEY_TTL_SECONDS", default=24 * 3600)
# Each ramp run books the next one for the moment the next child is due (a Celery task with that
# ETA, or the embedded scheduler's ramp entry), so ramps keep their pace between beat ticks
# (bulkops/tasks.py). Off: beat alone drives the ramp (the test suite, whose Redis has no worker).
BULK_RAMP_BOOKING = env.bool("BULK_RAMP_BOOKING", default=True)
# A bulk operation's changes go out on /bulkoperations/{id} at most once per this many ms (the last
# state always), whichever processes see them (bulkops/live.py); 0: every change at once.
BULK_LIVE_INTERVAL_MS = env.int("BULK_LIVE_INTERVAL_MS", default=250)
# PENDING children of a stopped bulk operation (an abort, `?cancelPending=true`) failed per
# transaction (bulkops/abort.py `bulk_pending_fail`; bench/rollout_abort.py: 2,000 took about half
# the time per child of 500).
BULK_PENDING_FAIL_BATCH_SIZE = env.int("BULK_PENDING_FAIL_BATCH_SIZE", default=2000)
if not 1 <= BULK_PENDING_FAIL_BATCH_SIZE <= 100_000:
    raise ImproperlyConfigured(
        f"BULK_PENDING_FAIL_BATCH_SIZE must be from 1 to 100000, not {BULK_PENDING_FAIL_BATCH_SIZE}"
    )
# How long a request that stops a bulk operation (`DELETE ...?cancelPending=true`, the admin's Abort)
# fails its PENDING children itself before it hands the rest to the task `fail_pending_children`
# and answers (with a broker; without one it fails them all: nobody else would). Well below
# gunicorn's 30 s worker timeout (bin/run).
BULK_PENDING_FAIL_INLINE_SECONDS = env.float("BULK_PENDING_FAIL_INLINE_SECONDS", default=5.0)
if not 0 <= BULK_PENDING_FAIL_INLINE_SECONDS <= 20:  # also refuses nan
    raise ImproperlyConfigured(
        "BULK_PENDING_FAIL_INLINE_SECONDS must be from 0 to 20 (a request must answer before "
        f"gunicorn's 30 s worker timeout), not {BULK_PENDING_FAIL_INLINE_SECONDS}"
    )

# --- Device control (README "Beyond Cumulocity") ---------------------------------------------------
# A PENDING operation not picked up within this many seconds becomes FAILED (0: never). ARTIK: 7 days.
OPERATION_PENDING_TIMEOUT = env.int("OPERATION_PENDING_TIMEOUT", default=7 * 24 * 3600)
# An operation EXECUTING for longer than this many seconds becomes FAILED (0: never).
OPERATION_EXECUTION_TIMEOUT = env.int("OPERATION_EXECUTION_TIMEOUT", default=24 * 3600)
# Operations in a final state are deleted this many days after their last status change (0: keep).
OPERATION_RETENTION_DAYS = env.int("OPERATION_RETENTION_DAYS", default=30)
# Backend handed SMS-delivered operations (devicecontrol/delivery.py documents the interface).
OPERATION_SMS_BACKEND = env.str(
    "OPERATION_SMS_BACKEND", default="devicecontrol.delivery.LoggingSmsBackend"
)
# Longest `timeout` a client may ask for in POST /devicecontrol/operations/wait?timeout=SECONDS.
OPERATION_MAX_WAIT_SECONDS = env.int("OPERATION_MAX_WAIT_SECONDS", default=120)

# --- Tracing (optional: README "Request ids and tracing", requirements-otel.txt) ----------------
# OpenTelemetry is off, and not imported, unless OTEL_TRACES_EXPORTER is `otlp` or `console`, or an
# OTLP endpoint is set (then `otlp` unless OTEL_TRACES_EXPORTER is `none`); OTEL_SDK_DISABLED=true
# turns it off whatever else is set. The OTLP exporter reads its OTEL_EXPORTER_OTLP_* variables.
_OTLP_ENDPOINT = env.str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", default="") or env.str(
    "OTEL_EXPORTER_OTLP_ENDPOINT", default=""
)
OTEL_TRACES = env.str("OTEL_TRACES_EXPORTER", default="") or ("otlp" if _OTLP_ENDPOINT else "none")
OTEL_TRACES = "none" if env.bool("OTEL_SDK_DISABLED", default=False) else OTEL_TRACES.lower()
if OTEL_TRACES not in ("otlp", "console", "none"):
    raise ImproperlyConfigured(
        f"OTEL_TRACES_EXPORTER must be otlp, console or none, not {OTEL_TRACES!r}"
    )
OTEL_SERVICE_NAME = env.str("OTEL_SERVICE_NAME", default="deviceplatform")

# --- Health and metrics (README "Health and metrics") ------------------------------------------
# /health/ready: the Celery worker writes a heartbeat to Redis every HEALTH_WORKER_HEARTBEAT_SECONDS
# (beat on its ticks, at most as often) under HEALTH_HEARTBEAT_PREFIX; ready answers 503 once the
# worker's is older than HEALTH_WORKER_MAX_AGE_SECONDS, or beat's (and without REDIS_URL the
# in-process scheduler's last tick) older than HEALTH_BEAT_MAX_AGE_SECONDS (0: three times the
# shortest beat interval, at least the worker's limit). Redis calls of the checks time out after
# HEALTH_CHECK_TIMEOUT_SECONDS, and the database check waits that long for a pooled connection.
HEALTH_HEARTBEAT_PREFIX = env.str("HEALTH_HEARTBEAT_PREFIX", default="dp:health")
HEALTH_WORKER_HEARTBEAT_SECONDS = env.float("HEALTH_WORKER_HEARTBEAT_SECONDS", default=1.0)
HEALTH_WORKER_MAX_AGE_SECONDS = env.float("HEALTH_WORKER_MAX_AGE_SECONDS", default=3.0)
HEALTH_BEAT_MAX_AGE_SECONDS = env.float("HEALTH_BEAT_MAX_AGE_SECONDS", default=0.0)
HEALTH_CHECK_TIMEOUT_SECONDS = env.float("HEALTH_CHECK_TIMEOUT_SECONDS", default=1.0)
CELERY_BEAT_SCHEDULER = "deviceplatform.health:HeartbeatScheduler"
# /metrics (Prometheus text format) answers a client whose address is in METRICS_ALLOWED_NETWORKS
# (CIDRs, comma-separated; behind a proxy the client's address from X-Forwarded-For when
# USE_X_FORWARDED_FOR trusts it, and a request forwarded by an untrusted proxy has none: the proxy's
# own address never admits it) or that sends `Authorization: Bearer METRICS_TOKEN`; others get 403. Both empty:
# /metrics is off (404). PROMETHEUS_MULTIPROC_DIR (read by prometheus-client itself; bin/run sets
# it) makes every process (gunicorn and uvicorn workers, Celery) write its samples there and
# /metrics add them up. METRICS_PENDING_TOP_AGENTS: the agents with the most PENDING operations
# that get a labelled series of their own; those PENDING figures (a count over every PENDING row)
# are counted at most once per METRICS_PENDING_CACHE_SECONDS by all processes together (kept in
# Redis under METRICS_CACHE_PREFIX with REDIS_URL), 0: on every scrape.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_ALLOWED_NETWORKS = env.list("METRICS_ALLOWED_NETWORKS", default=["127.0.0.1/32", "::1/128"])
METRICS_PENDING_TOP_AGENTS = env.int("METRICS_PENDING_TOP_AGENTS", default=10)
METRICS_PENDING_CACHE_SECONDS = env.float("METRICS_PENDING_CACHE_SECONDS", default=30.0)
METRICS_CACHE_PREFIX = env.str("METRICS_CACHE_PREFIX", default="dp:metrics")

# --- Logging ---------------------------------------------------------------------------------------
# Every process (server, gunicorn, uvicorn, Celery worker and beat) logs to stderr through this one
# configuration (deviceplatform/logs.py): LOG_LEVEL for all of them, LOG_FORMAT plain or json.
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
LOG_FORMAT = env.str("LOG_FORMAT", default="plain").lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}")
LOGGING = logging_config(level=LOG_LEVEL, fmt=LOG_FORMAT)
