"""What every service's Flask app has in common.

``create_service_app`` turns a checked ``Config`` into an app with JSON
logging, request ids, the body size limit, the error shape, the database
pool (schema checked) and ``/livez`` plus the database part of ``/health``.
Each service adds its own blueprint.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from shared import embedded, faults, schema
from shared import logging as suite_logging
from shared.auth import Authenticator, TokenAuthenticator
from shared.config import Config
from shared.db import Database, DatabaseUnavailable
from shared.errors import ApiError, register_error_handlers
from shared.health import health_report
from shared.oidc import OidcAuthenticator

MAX_BODY_BYTES = 64 * 1024

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

log = logging.getLogger("payouts.web")


@dataclass(frozen=True)
class Suite:
    """What a request needs besides itself: configuration and the database."""

    name: str
    config: Config
    db: Database


def suite() -> Suite:
    return cast(Suite, current_app.extensions["suite"])


def create_service_app(
    config: Config, name: str, statement_timeout_ms: int | None = None
) -> Flask:
    """The common app; ``statement_timeout_ms`` is the service's default."""
    settings = config.settings
    suite_logging.configure(name, settings.log_level)
    faults.arm(settings.test_fault_point, settings.test_fault_trigger_file)
    database_url = embedded.resolve_database_url(settings.database_url)
    gate = schema.SchemaGate(database_url)
    try:
        gate.check()
    except DatabaseUnavailable as error:
        log.warning("schema_check_deferred", extra={"error": str(error)})
    db = Database(
        database_url,
        size=settings.db_pool_size,
        statement_timeout_ms=settings.db_statement_timeout_ms
        or statement_timeout_ms
        or 15_000,
        application_name=name,
    )

    # No service serves files: without this Flask adds /static/<path:filename>.
    app = Flask(name, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["suite"] = Suite(name=name, config=config, db=db)
    app.extensions["authenticator"] = make_authenticator(config)
    app.extensions["schema_gate"] = gate
    app.before_request(_start_request)
    app.before_request(_require_schema)
    app.after_request(_finish_request)
    register_error_handlers(app)
    app.register_blueprint(_probes)
    log.info(
        "service_started",
        extra={"version": settings.version, "environment": settings.environment},
    )
    return app


def make_authenticator(config: Config) -> Authenticator:
    """The authenticator ``AUTH_MODE`` asks for."""
    settings = config.settings
    if settings.auth_mode == "oidc":
        # load_config refuses oidc without SERVICE_URL, the tokens' audience.
        assert settings.service_url is not None
        return OidcAuthenticator(settings.service_url, settings.allowed_invokers)
    return TokenAuthenticator(config.secrets)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_body() -> bytes:
    """The request body, chunked or not; 413 past ``MAX_BODY_BYTES``.

    Read from the WSGI stream itself: Werkzeug cuts a chunked body at the
    limit without a word (the JSON then reads as invalid, a 400), and a
    run that reads no body would never look at it at all.
    """
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise RequestEntityTooLarge("request bodies are limited to 64 KiB")
    stream = request.environ["wsgi.input"]
    body: bytes = stream.read(MAX_BODY_BYTES + 1 if declared is None else declared)
    if len(body) > MAX_BODY_BYTES:
        raise RequestEntityTooLarge("request bodies are limited to 64 KiB")
    return body


def json_object_body() -> dict[str, Any]:
    """The request body as a JSON object, numbers as Decimal; else 400."""
    try:
        payload = json.loads(
            read_body().decode("utf-8"),
            parse_float=Decimal,
            parse_constant=_refuse_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError("the body is not valid JSON", code="invalid") from None
    except InvalidOperation:
        # JSON puts no bound on an exponent; Decimal does (1e9999999999999999999).
        raise ApiError("a number in the body is out of range", code="invalid") from None
    if not isinstance(payload, dict):
        raise ApiError("the body must be a JSON object", code="invalid")
    return payload


def _start_request() -> None:
    incoming = request.headers.get("X-Request-Id", "")
    g.request_id = (
        incoming if _REQUEST_ID.match(incoming) else suite_logging.new_request_id()
    )
    suite_logging.request_id.set(g.request_id)
    project = suite().config.settings.gcp_project
    trace_header = request.headers.get("X-Cloud-Trace-Context", "")
    trace_id = trace_header.split("/", 1)[0]
    if project and re.fullmatch(r"[0-9a-f]{32}", trace_id):
        suite_logging.trace.set(f"projects/{project}/traces/{trace_id}")
    else:
        suite_logging.trace.set(None)


def _require_schema() -> None:
    gate = cast(schema.SchemaGate, current_app.extensions["schema_gate"])
    if gate.checked or request.endpoint == "probes.livez":
        return
    try:
        gate.check()
    except DatabaseUnavailable:
        if request.endpoint != "probes.health":
            raise
        # /health goes on: it finds the database down and reports it so.
    except schema.SchemaOutdated as error:
        log.error("schema_outdated", extra={"error": str(error)})
        raise ApiError(str(error), code="schema_outdated", status=503) from None


def _finish_request(response: Response) -> Response:
    response.headers["X-Request-Id"] = g.get("request_id", "")
    return response


_probes = Blueprint("probes", __name__)


@_probes.get("/livez")
def livez() -> Response:
    return jsonify({"status": "ok"})


@_probes.get("/health")
def health() -> tuple[Response, int]:
    current = suite()
    body, status = health_report(current.db, current.config.settings, current.name)
    if status != 200:
        # An uptime check pages on the 503 itself; this line says why.
        log.error(
            "health_down", extra={"database": body["database"], "jobs": body["jobs"]}
        )
    return jsonify(body), status
