"""JSON log lines in the fields Cloud Logging reads.

One line is ``{"severity", "message", "time", "logger", "service",
"request_id", ...figures}``; Cloud Logging lifts ``severity`` and
``message`` and keeps the rest as the entry's JSON payload. A trace header
from Cloud Run becomes ``logging.googleapis.com/trace`` so a request's lines
group together in the console.

Messages are constant event names (``payment_accumulated``); figures go in
``extra=``. Amounts are logged as decimal strings.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from shared import money

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
trace: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trace", default=None
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def _json_default(value: object) -> Any:
    if isinstance(value, Decimal):
        return money.to_text(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self._service
        current = request_id.get()
        if current is not None:
            record.request_id = current
        current_trace = trace.get()
        if current_trace is not None:
            setattr(record, "logging.googleapis.com/trace", current_trace)
        return True


class _CloudFormatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, tz=UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def formatter() -> logging.Formatter:
    return _CloudFormatter(
        "%(levelname)s %(message)s %(asctime)s %(name)s",
        rename_fields={"levelname": "severity", "asctime": "time", "name": "logger"},
        json_default=_json_default,
        json_ensure_ascii=False,
    )


def configure(service: str, level: str = "INFO") -> None:
    """Send every logger's lines, as JSON, to stdout. Safe to call twice."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter())
    handler.addFilter(_ContextFilter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "payout_suite", False):
            root.removeHandler(old)
    handler.payout_suite = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Request lines come from Cloud Run's own request log; werkzeug's would
    # repeat them as unstructured text.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
