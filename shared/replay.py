"""Crediting recorded deliveries whose client now exists:
``payoutctl deliveries replay``.

A finished payment for a channel no client owned was recorded as
``unknown_client`` and answered 200 (the sender must not retry it), so its
money waits here until an operator adds the client and replays it. One that
could not be valued was recorded as ``retry_later``; if the sender's
retries ran out before a price came back, a replay credits it. The
replay goes through the accumulator's own reading and crediting, so the
money rules are the ones the payment would have met on arrival; the price
and the fee percent copied onto the row are today's configured ones.

``ipn_events`` stays append-only: each replay is a new delivery row (same
source, the body copied, ``request_id`` ``replay:<original id>``) with its
own outcome, written in the credit's transaction, and the original gets
``replayed_at`` when the replay had a final answer. A delivery whose channel
still has no client is left for a later replay and writes nothing. Running
the replay twice credits nothing twice: the payment id is unique, so a
second credit of the same payment answers ``duplicate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gcaccumulator import crediting, ipn
from gcaccumulator.crediting import Accumulator, Delivery, Result
from gcaccumulator.payments import InvalidContent, Payment
from gcaccumulator.prices import make_prices
from shared import money
from shared.clients import QUERIES
from shared.config import Config, ConfigError
from shared.db import Database

# Crediting's outcomes that answer a delivery for good.
FINAL = ("accumulated", "duplicate", "instant_client")


@dataclass(frozen=True)
class Replay:
    event_id: int
    source: str
    payment_id: str | None
    outcome: str  # crediting's, or waiting, unreadable, unvalued, would_*
    detail: str
    new_event_id: int | None = None

    @property
    def line(self) -> str:
        payment = f"payment {self.payment_id}" if self.payment_id else "no payment id"
        line = f"ipn_events {self.event_id} ({self.source}, {payment}): {self.detail}"
        if self.new_event_id is not None:
            line += f"; recorded as ipn_events {self.new_event_id}"
        return line


def accumulator_for(db: Database, config: Config) -> Accumulator:
    """The accumulator's crediting, with this configuration's fee and prices.

    They must be the accumulator service's own, or a replayed payment is
    valued and charged otherwise than the payments credited on arrival.
    """
    settings = config.settings
    if settings.environment == "production" and settings.prices.kind == "static":
        raise ConfigError(["PRICE_SOURCE: production never credits at static prices"])
    return Accumulator(
        db, config.secrets, make_prices(settings), settings.platform_fee_percent
    )


def replay_all(db: Database, accumulator: Accumulator, dry_run: bool) -> list[Replay]:
    """Replay every waiting delivery whose client exists now, oldest first."""
    with db.transaction() as cur:
        cur.execute(QUERIES["deliveries_to_replay"])
        recorded = [dict(row) for row in cur.fetchall()]
    # A dry run credits nothing, so it remembers what it would have credited:
    # a second delivery of the same payment would be a duplicate.
    planned: set[str] | None = set() if dry_run else None
    return [_replay_one(db, accumulator, event, planned) for event in recorded]


def _replay_one(
    db: Database,
    accumulator: Accumulator,
    event: dict[str, Any],
    planned: set[str] | None,
) -> Replay:
    delivery = Delivery(
        source=event["source"],
        raw_body=bytes(event["raw_body"]),
        body_size=event["body_size"],
        request_id=f"replay:{event['id']}",
    )

    def answer(outcome: str, detail: str, result: Result | None = None) -> Replay:
        return Replay(
            event["id"],
            event["source"],
            event["payment_id"],
            outcome,
            detail,
            None if result is None else result.event_id,
        )

    try:
        payment, context = accumulator.read_accepted(delivery)
    except (ipn.NotJsonObject, InvalidContent) as error:
        return answer("unreadable", f"cannot be read now: {error}")

    client = _client_of(db, payment.channel_id)
    if client is None:
        return answer(
            "waiting",
            f"still no client for channel {payment.channel_id}; left for a "
            "later replay",
        )
    if planned is not None:
        if not accumulator.can_value(payment):
            return answer(
                "would_wait", "no USD price now: would be left for a later replay"
            )
        return answer(*_would(db, payment, client, planned))

    try:
        result = accumulator.credit_accepted(
            delivery, payment, context, within=_mark_replayed(event["id"])
        )
    except crediting.ValuationUnavailable as error:
        return answer("unvalued", f"no USD price now ({error}); replay it later")
    return answer(result.outcome, _credited(result, payment), result)


def _client_of(db: Database, channel_id: int) -> dict[str, Any] | None:
    with db.transaction() as cur:
        cur.execute(crediting.QUERIES["find_client"], {"channel_id": channel_id})
        row = cur.fetchone()
    return None if row is None else dict(row)


def _mark_replayed(event_id: int) -> crediting.WithinCredit:
    def mark(cur: Any, result: Result) -> None:
        # Still unknown (the client went away meanwhile): the original
        # stays waiting, next to the new record of this attempt.
        if result.outcome in FINAL:
            cur.execute(QUERIES["mark_replayed"], {"id": event_id})

    return mark


def _would(
    db: Database, payment: Payment, client: dict[str, Any], planned: set[str]
) -> tuple[str, str]:
    if client["payout_strategy"] != "threshold":
        return (
            "would_instant_client",
            f"would be recorded as for instant client {client['client_id']}",
        )
    with db.transaction() as cur:
        cur.execute(
            crediting.QUERIES["find_credit"], {"payment_id": payment.payment_id}
        )
        credited = cur.fetchone()
    if credited is not None:
        return (
            "would_duplicate",
            f"already credited as row {credited['id']}: would be a duplicate",
        )
    if payment.payment_id in planned:
        return (
            "would_duplicate",
            "an earlier delivery above credits this payment: would be a duplicate",
        )
    planned.add(payment.payment_id)
    return (
        "would_credit",
        f"would credit {_crypto(payment)} to client {client['client_id']}",
    )


def _credited(result: Result, payment: Payment) -> str:
    if result.outcome == "accumulated":
        return (
            f"accumulated as row {result.accumulation_id} for client "
            f"{result.body['client_id']}: {_crypto(payment)}, "
            f"{result.body['accumulated_usd']} usd net of the fee "
            f"({result.body['usd_source']})"
        )
    if result.outcome == "duplicate":
        return "duplicate: the payment is credited already; nothing credited"
    if result.outcome == "instant_client":
        return (
            f"instant_client: client {result.body['client_id']} is paid per "
            "payment elsewhere; nothing credited"
        )
    return (
        f"{result.outcome}: channel {payment.channel_id} has no client again; "
        "left for a later replay"
    )


def _crypto(payment: Payment) -> str:
    return f"{money.to_text(payment.outcome_amount)} {payment.outcome_currency}"


def summary(replays: list[Replay], dry_run: bool) -> str:
    counts: dict[str, int] = {}
    for replay in replays:
        counts[replay.outcome] = counts.get(replay.outcome, 0) + 1
    if not replays:
        return "replay: no recorded delivery waits for its client"
    if dry_run:
        parts = [
            f"{counts.get('would_credit', 0)} would be credited",
            f"{counts.get('would_duplicate', 0)} duplicate",
            f"{counts.get('would_instant_client', 0)} for instant clients",
        ]
    else:
        parts = [
            f"{counts.get('accumulated', 0)} credited",
            f"{counts.get('duplicate', 0)} duplicate",
            f"{counts.get('instant_client', 0)} for instant clients",
        ]
    waiting = counts.get("waiting", 0) + counts.get("unknown_client", 0)
    parts.append(f"{waiting} still waiting for their client")
    trouble = sum(
        counts.get(word, 0) for word in ("unreadable", "unvalued", "would_wait")
    )
    if trouble:
        parts.append(f"{trouble} could not be replayed")
    prefix = "replay (dry run, nothing written)" if dry_run else "replay"
    total = "1 delivery" if len(replays) == 1 else f"{len(replays)} deliveries"
    return f"{prefix}: {total}: " + ", ".join(parts)


def failed(replays: list[Replay]) -> bool:
    """Whether a delivery needs an operator's look: unreadable or unvalued."""
    troubled = ("unreadable", "unvalued", "would_wait")
    return any(replay.outcome in troubled for replay in replays)
