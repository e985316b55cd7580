"""The one error shape: ``{"error": {"code": "snake_case", "message": "..."}}``.

4xx means the request is wrong and a retry will not help; 5xx means a retry
may help (database down, a secret unreadable). Nothing is ever answered 200
with an error inside.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from shared.db import DatabaseUnavailable
from shared.secrets import SecretError

log = logging.getLogger("payouts.errors")


class ApiError(Exception):
    """A refusal the caller should see as it is."""

    status = 400
    code = "invalid"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.status = status or self.status
        self.extra = extra or {}


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, **extra}


def error_response(code: str, message: str, status: int, **extra: Any) -> Response:
    response = jsonify(error_body(code, message, **extra))
    response.status_code = status
    return response


def _snake(name: str) -> str:
    return "_".join(name.lower().replace("-", " ").split())


def unavailable(error: Exception, **extra: Any) -> Response:
    """503 for what a retry may fix: the database or a secret out of reach."""
    if isinstance(error, DatabaseUnavailable):
        log.error("database_unavailable", extra={"error": str(error)})
        code, what = "database_unavailable", "the database cannot be reached"
    else:
        log.error("secret_unavailable", extra={"error": str(error)})
        code, what = "secret_unavailable", "a secret cannot be read"
    return error_response(code, f"{what}; retry later", 503, **extra)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> Response:
        return error_response(error.code, error.message, error.status, **error.extra)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        name = "body_too_large" if status == 413 else _snake(error.name)
        response = error_response(name, error.description or error.name, status)
        allowed = getattr(error, "valid_methods", None)
        if allowed:  # a 405 says what is allowed
            response.headers["Allow"] = ", ".join(allowed)
        return response

    app.register_error_handler(DatabaseUnavailable, unavailable)
    app.register_error_handler(SecretError, unavailable)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unhandled_error", extra={"error_type": type(error).__name__})
        return error_response(
            "internal_error", "unexpected error; it has been logged", 500
        )
