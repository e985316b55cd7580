"""The batch processor: pays each client once converted USDT reaches its threshold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, jsonify

from gcbatchprocessor import payouts
from shared import status_page
from shared.auth import require_internal_auth
from shared.config import load_config
from shared.jobs import RunIdentity
from shared.outbox import Outbox, make_sender
from shared.scheduled import answer_run
from shared.secrets import SecretSource
from shared.web import create_service_app, json_object_body, suite

bp = Blueprint("batch", __name__)


def create_app(
    environ: Mapping[str, str] | None = None,
    secrets: SecretSource | None = None,
    sender: Any | None = None,
) -> Flask:
    config = load_config("batch", environ, secrets)
    app = create_service_app(config, payouts.SERVICE)
    settings = config.settings
    assert settings.service_url and settings.payout_executor_url
    app.extensions["payout_settings"] = payouts.PayoutSettings(
        service_url=settings.service_url,
        payout_executor_url=settings.payout_executor_url,
        stale_after_s=settings.swap_stale_after,
        claim_timeout_s=settings.job_lock_timeout_s,
    )
    app.extensions["outbox"] = Outbox(
        app.extensions["suite"].db,
        payouts.SERVICE,
        sender or make_sender(config),
        on_delivered=payouts.mark_accepted,
        still_wanted=payouts.still_wanted,
    )
    app.register_blueprint(bp)
    app.register_blueprint(status_page.bp)
    return app


def _outbox() -> Outbox:
    return cast(Outbox, current_app.extensions["outbox"])


@bp.post("/process")
@require_internal_auth
def process() -> tuple[Response, int]:
    current = suite()
    settings = current_app.extensions["payout_settings"]

    def work(identity: RunIdentity) -> dict[str, Any]:
        return payouts.process(current.db, settings)

    return answer_run("process", work, _outbox())


@bp.post("/payout-completed")
@require_internal_auth
def payout_completed() -> Response:
    payload = json_object_body()
    outcome = payouts.read_callback(payload)
    return jsonify(payouts.apply_callback(suite().db, outcome))
