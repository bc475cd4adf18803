"""gunicorn settings of the production layout's REST server (Procfile `rest`).

Used as `gunicorn -c python:deviceplatform.gunicorn_conf deviceplatform.wsgi`. The worker count
comes from `--workers` or gunicorn's own `WEB_CONCURRENCY`."""

from deviceplatform.settings import LOGGING

# gunicorn's own lines (start, worker boot and exit) go through the platform's logging, so
# LOG_LEVEL and LOG_FORMAT govern them too; each request is logged by deviceplatform.logs.
logconfig_dict = LOGGING
accesslog = None
# REST requests are short (the wait endpoint and long-polls go to uvicorn): a stop need not wait.
graceful_timeout = 5
# gunicorn 25+ opens a control socket for `gunicornc` at one path per user ($HOME/.gunicorn or
# $XDG_RUNTIME_DIR): two platforms on one machine would share it, and a read-only home would
# have to be written. bin/run manages the processes; nothing here uses it.
control_socket_disable = True


def child_exit(server: object, worker: object) -> None:
    """A worker exited: with PROMETHEUS_MULTIPROC_DIR (bin/run), drop its live gauges' files."""
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
