"""gunicorn settings for every service, from the environment.

``GUNICORN_WORKERS`` worker processes (else ``WEB_CONCURRENCY``, default 2),
``GUNICORN_THREADS`` threads each (default 4), ``GUNICORN_TIMEOUT`` seconds
(default 30), listening on ``BIND``, else every address at ``PORT`` (Cloud
Run sets it). The container image sets its own defaults (Dockerfile).
Cloud Run logs each request itself, so there is no access log; gunicorn's
own lines go out as JSON like ours.
"""

import os

from shared.logging import formatter

bind = os.environ.get("BIND", f"0.0.0.0:{os.environ.get('PORT', '8080')}")
workers = int(
    os.environ.get("GUNICORN_WORKERS") or os.environ.get("WEB_CONCURRENCY", "2")
)
# A request whose body arrives slowly holds its thread until it is all in:
# gunicorn's gthread worker sets no read timeout, so workers x threads
# stalled uploads stop the accumulator answering. In production Cloud Run's
# front end is expected to absorb such clients; that has not been measured
# here, and in front of anything else a buffering proxy is needed.
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread" if threads > 1 else "sync"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 20
keepalive = 5
accesslog = None
# gunicorn 27's control socket lives at one path per user: three services on
# one machine would fight over it, and nothing here uses it.
control_socket_disable = True
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": formatter}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stdout",
        }
    },
    # The app's own lines go through shared.logging's handler, added at start.
    "root": {"handlers": [], "level": "INFO"},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
    },
}
