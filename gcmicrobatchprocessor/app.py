"""The micro-batch processor: converts pending crypto to USDT in micro-batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, jsonify

from gcmicrobatchprocessor import conversion, sharing
from shared import status_page
from shared.auth import require_internal_auth
from shared.config import load_config
from shared.jobs import RunIdentity
from shared.outbox import Outbox, make_sender
from shared.scheduled import answer_run
from shared.secrets import SecretSource
from shared.web import create_service_app, json_object_body, suite

bp = Blueprint("microbatch", __name__)


def create_app(
    environ: Mapping[str, str] | None = None,
    secrets: SecretSource | None = None,
    sender: Any | None = None,
) -> Flask:
    config = load_config("microbatch", environ, secrets)
    app = create_service_app(config, conversion.SERVICE)
    settings = config.settings
    assert settings.service_url and settings.swap_executor_url
    app.extensions["conversion_settings"] = conversion.ConversionSettings(
        service_url=settings.service_url,
        swap_executor_url=settings.swap_executor_url,
        stale_after_s=settings.swap_stale_after,
    )
    app.extensions["outbox"] = Outbox(
        app.extensions["suite"].db,
        conversion.SERVICE,
        sender or make_sender(config),
        on_delivered=conversion.mark_accepted,
        still_wanted=conversion.still_wanted,
    )
    app.register_blueprint(bp)
    app.register_blueprint(status_page.bp)
    return app


def _outbox() -> Outbox:
    return cast(Outbox, current_app.extensions["outbox"])


@bp.post("/check-threshold")
@require_internal_auth
def check_threshold() -> tuple[Response, int]:
    current = suite()

    def work(identity: RunIdentity) -> dict[str, Any]:
        return conversion.check_threshold(
            current.db,
            current.config.secrets,
            current_app.extensions["conversion_settings"],
            _outbox(),
        )

    return answer_run("check-threshold", work, _outbox())


@bp.post("/swap-executed")
@require_internal_auth
def swap_executed() -> Response:
    payload = json_object_body()
    outcome = sharing.read_callback(payload)
    return jsonify(sharing.apply_callback(suite().db, outcome))
