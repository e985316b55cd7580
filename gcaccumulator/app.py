"""The accumulator's routes: every finished payment credited exactly once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from gcaccumulator.crediting import Accumulator, Delivery, Result
from gcaccumulator.prices import Prices, make_prices
from shared.auth import authenticate_request
from shared.config import load_config
from shared.db import DatabaseUnavailable
from shared.errors import ApiError, unavailable
from shared.secrets import SecretError, SecretSource
from shared.web import MAX_BODY_BYTES, create_service_app

bp = Blueprint("accumulator", __name__)


def create_app(
    environ: Mapping[str, str] | None = None,
    secrets: SecretSource | None = None,
    prices: Prices | None = None,
) -> Flask:
    config = load_config("accumulator", environ, secrets)
    app = create_service_app(config, "gcaccumulator", statement_timeout_ms=2_000)
    app.extensions["accumulator"] = Accumulator(
        db=app.extensions["suite"].db,
        secrets=config.secrets,
        prices=prices or make_prices(config.settings),
        fee_percent=config.settings.platform_fee_percent,
    )
    app.register_blueprint(bp)
    return app


def _accumulator() -> Accumulator:
    return cast(Accumulator, current_app.extensions["accumulator"])


# How much of an oversized body without Content-Length is read (and thrown
# away) to learn its size; past this the size is recorded as this bound.
_DRAIN_LIMIT = 16 * 1024 * 1024


def _read_delivery(source: str) -> Delivery:
    """The raw body, read past Flask's limit so an oversized one is recorded too."""
    stream = request.environ["wsgi.input"]
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        return Delivery(source, stream.read(MAX_BODY_BYTES), declared, g.request_id)
    if declared is not None:
        return Delivery(source, stream.read(declared), declared, g.request_id)
    body = stream.read(MAX_BODY_BYTES + 1)
    size = len(body)
    while MAX_BODY_BYTES < size < _DRAIN_LIMIT:
        chunk = stream.read(min(65536, _DRAIN_LIMIT - size))
        if not chunk:
            break
        size += len(chunk)
    return Delivery(source, body[:MAX_BODY_BYTES], size, g.request_id)


def _answer(result: Result) -> tuple[Response, int]:
    return jsonify(result.response_body()), result.http_status


def _too_large(delivery: Delivery) -> Result | None:
    if delivery.body_size <= MAX_BODY_BYTES:
        return None
    message = f"the body is over {MAX_BODY_BYTES} bytes"
    result = Result("invalid", 413, error_code="invalid", error_message=message)
    return _accumulator().refuse(delivery, result)


@bp.post("/ipn")
def receive_ipn() -> tuple[Response, int]:
    delivery = _read_delivery("ipn")
    result = _too_large(delivery) or _accumulator().receive_ipn(
        delivery, request.headers.get("x-nowpayments-sig")
    )
    return _answer(result)


@bp.post("/payments")
def receive_payment() -> tuple[Response, int]:
    delivery = _read_delivery("router")
    try:
        authenticate_request()
    except ApiError as error:
        refused = Result(
            "unauthorized",
            error.status,
            error_code=error.code,
            error_message=error.message,
        )
        return _answer(_accumulator().refuse(delivery, refused))
    result = _too_large(delivery) or _accumulator().receive_router_payment(delivery)
    return _answer(result)


@bp.errorhandler(DatabaseUnavailable)
@bp.errorhandler(SecretError)
def retry_later(error: Exception) -> Response:
    # Every answer to a delivery carries an outcome, this one included: the
    # sender should retry, and nothing was recorded or credited.
    return unavailable(error, outcome="retry_later")
