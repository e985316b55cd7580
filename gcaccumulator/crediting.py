"""Crediting payments exactly once, and recording every delivery.

A delivery (an IPN or a router call) goes through the steps DESIGN.md section
4 gives, in order. Whatever happens to it, one ``ipn_events`` row says so: a
credit and its delivery record are written in one transaction; a refusal is
recorded on its own. Only a database that cannot be reached leaves nothing
behind, and that answers 5xx so the sender retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from gcaccumulator import ipn
from gcaccumulator.payments import (
    FINISHED,
    InvalidContent,
    Payment,
    read_ipn,
    read_router_payment,
    read_status,
)
from gcaccumulator.prices import Prices, PriceUnavailable
from shared import money
from shared.db import Database, load_queries
from shared.errors import error_body
from shared.secrets import SecretSource

QUERIES = load_queries(Path(__file__).with_name("queries.sql"))

log = logging.getLogger("payouts.accumulator")


class ValuationUnavailable(Exception):
    """No price and no USD invoice: the payment cannot be valued right now."""


@dataclass(frozen=True)
class Delivery:
    """What arrived, as it arrived (truncated to the size limit)."""

    source: str  # 'ipn' or 'router'
    raw_body: bytes
    body_size: int
    request_id: str | None = None


@dataclass
class Result:
    """The answer to a delivery, and what its ``ipn_events`` row says."""

    outcome: str
    http_status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    payment_id: str | None = None
    payment_status: str | None = None
    signature_valid: bool | None = None
    error_code: str | None = None
    error_message: str | None = None
    accumulation_id: int | None = None
    # Set once the delivery's ipn_events row is written.
    recorded: bool = False
    event_id: int | None = None

    def response_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"outcome": self.outcome}
        if self.payment_id:
            body["payment_id"] = self.payment_id
        body.update(self.body)
        if self.error_code is not None:
            body.update(error_body(self.error_code, self.error_message or ""))
        return body


def refusal(outcome: str, status: int, message: str, **context: Any) -> Result:
    return Result(
        outcome=outcome,
        http_status=status,
        error_code=outcome,
        error_message=message,
        **context,
    )


@dataclass(frozen=True)
class Valuation:
    gross_usd: Decimal
    source: str  # 'price', 'invoice' or 'router'


# Called inside a credit's transaction, after its delivery is recorded.
WithinCredit = Callable[[Any, Result], None]


class Accumulator:
    """The accumulator's work, free of Flask so tests and tools can call it."""

    def __init__(
        self, db: Database, secrets: SecretSource, prices: Prices, fee_percent: Decimal
    ) -> None:
        self.db = db
        self.secrets = secrets
        self.prices = prices
        self.fee_percent = fee_percent

    # --- the two ways a payment arrives -----------------------------------

    def receive_ipn(self, delivery: Delivery, signature: str | None) -> Result:
        result = self._judge_ipn(delivery, signature)
        return self._finish(delivery, result)

    def receive_router_payment(self, delivery: Delivery) -> Result:
        try:
            payload = ipn.parse_object(delivery.raw_body)
            payment = read_router_payment(payload)
        except (ipn.NotJsonObject, InvalidContent) as error:
            return self._finish(delivery, refusal("invalid", 400, str(error)))
        assert payment.router_usd is not None
        valuation = Valuation(payment.router_usd, "router")
        context = {"payment_id": payment.payment_id, "payment_status": FINISHED}
        return self._credit(delivery, payment, valuation, context)

    def refuse(self, delivery: Delivery, result: Result) -> Result:
        """Record a delivery refused before it was read (too large, unauthorised)."""
        return self._finish(delivery, result)

    # --- a delivery recorded earlier, credited again (payoutctl) ------------

    def read_accepted(self, delivery: Delivery) -> tuple[Payment, dict[str, Any]]:
        """The payment in a delivery that passed authentication when it came:
        an IPN whose signature matched, or a router call that was let in.

        The signature header is not stored, so it is not checked again here.
        Raises ``ipn.NotJsonObject`` or ``InvalidContent``.
        """
        payload = ipn.parse_object(delivery.raw_body)
        if delivery.source == "router":
            payment = read_router_payment(payload)
            return payment, {
                "payment_id": payment.payment_id,
                "payment_status": FINISHED,
            }
        payment_id, status = read_status(payload)
        if status != FINISHED:
            raise InvalidContent(f"payment_status is {status}, not {FINISHED}")
        context = {
            "payment_id": payment_id,
            "payment_status": status,
            "signature_valid": True,
        }
        return read_ipn(payload, payment_id), context

    def credit_accepted(
        self,
        delivery: Delivery,
        payment: Payment,
        context: dict[str, Any],
        within: WithinCredit | None = None,
    ) -> Result:
        """Credit a payment from ``read_accepted`` exactly as on arrival."""
        if payment.router_usd is not None:
            valuation = Valuation(payment.router_usd, "router")
        else:
            valuation = self._value(payment)
        return self._credit(delivery, payment, valuation, context, within)

    def can_value(self, payment: Payment) -> bool:
        """Whether ``payment`` could be valued now: a dry run's question,
        asked without logging what a real credit would."""
        if payment.router_usd is not None:
            return True
        try:
            self.prices.usd_price(payment.outcome_currency)
        except PriceUnavailable:
            return _usable_invoice(payment)
        return True

    # --- steps ---------------------------------------------------------------

    def _judge_ipn(self, delivery: Delivery, signature: str | None) -> Result:
        try:
            payload = ipn.parse_object(delivery.raw_body)
        except ipn.NotJsonObject as error:
            return refusal("invalid", 400, str(error))

        secret = self.secrets.get("NOWPAYMENTS_IPN_SECRET")
        if not ipn.signature_matches(secret, delivery.raw_body, payload, signature):
            reason = "is missing" if not signature else "does not match the body"
            return refusal(
                "bad_signature",
                401,
                f"the x-nowpayments-sig signature {reason}",
                signature_valid=False,
            )

        try:
            payment_id, status = read_status(payload)
        except InvalidContent as error:
            return refusal("invalid", 400, str(error), signature_valid=True)
        context: dict[str, Any] = {
            "payment_id": payment_id,
            "payment_status": status,
            "signature_valid": True,
        }
        if status != FINISHED:
            return Result("not_final", body={"payment_status": status}, **context)

        try:
            payment = read_ipn(payload, payment_id)
            valuation = self._value(payment)
        except (InvalidContent, money.AmountError) as error:
            return refusal("invalid", 400, str(error), **context)
        except ValuationUnavailable as error:
            # A retry may find a price; the delivery is recorded meanwhile so
            # an operator can replay it if the retries run out.
            return Result(
                "retry_later",
                503,
                error_code="price_unavailable",
                error_message=f"no USD value for this payment right now ({error})",
                **context,
            )
        return self._credit(delivery, payment, valuation, context)

    def _value(self, payment: Payment) -> Valuation:
        try:
            price = self.prices.usd_price(payment.outcome_currency)
        except PriceUnavailable as error:
            if not _usable_invoice(payment):
                log.error(
                    "payment_unvalued",
                    extra={"payment_id": payment.payment_id, "error": str(error)},
                )
                raise ValuationUnavailable(str(error)) from error
            log.warning(
                "price_unavailable_using_invoice",
                extra={"payment_id": payment.payment_id, "error": str(error)},
            )
            assert payment.invoice_usd is not None
            return Valuation(payment.invoice_usd, "invoice")
        gross = money.multiply(payment.outcome_amount, price)
        return Valuation(money.quantize(gross, money.USD, "USD value"), "price")

    def _credit(
        self,
        delivery: Delivery,
        payment: Payment,
        valuation: Valuation,
        context: dict[str, Any],
        within: WithinCredit | None = None,
    ) -> Result:
        """Credit a threshold client's payment, with its delivery record."""
        result = Result("accumulated", **context)
        fee_usd = money.percent_of(valuation.gross_usd, self.fee_percent, money.USD)
        row: dict[str, Any] = {
            "payment_id": payment.payment_id,
            "user_id": payment.user_id,
            "subscription_id": payment.subscription_id,
            "payment_amount_usd": valuation.gross_usd,
            "usd_source": valuation.source,
            "platform_fee_percent": self.fee_percent,
            "accumulated_usd": valuation.gross_usd - fee_usd,
            "accumulated_eth": payment.outcome_amount,
            "outcome_currency": payment.outcome_currency,
        }
        with self.db.transaction() as cur:
            cur.execute(QUERIES["find_client"], {"channel_id": payment.channel_id})
            client = cur.fetchone()
            if client is None:
                result.outcome = "unknown_client"
                result.body = {"channel_id": payment.channel_id}
            elif client["payout_strategy"] != "threshold":
                result.outcome = "instant_client"
                result.body = {"client_id": client["client_id"]}
            else:
                cur.execute(
                    QUERIES["insert_credit"], {**row, "client_id": client["client_id"]}
                )
                inserted = cur.fetchone()
                if inserted is None:
                    result.outcome = "duplicate"
                    self._compare_duplicate(cur, payment, client["client_id"])
                else:
                    result.outcome = "accumulated"
                    result.accumulation_id = inserted["id"]
                    result.body = {
                        "client_id": client["client_id"],
                        "accumulated_eth": money.to_text(payment.outcome_amount),
                        "outcome_currency": payment.outcome_currency,
                        "accumulated_usd": money.to_text(row["accumulated_usd"]),
                        "usd_source": valuation.source,
                    }
            self._record(cur, delivery, result)
            if within is not None:
                within(cur, result)
        self._log(result, row)
        return result

    def _compare_duplicate(self, cur: Any, payment: Payment, client_id: int) -> None:
        cur.execute(QUERIES["find_credit"], {"payment_id": payment.payment_id})
        credited = cur.fetchone()
        if credited is not None and (
            credited["accumulated_eth"] != payment.outcome_amount
            or credited["outcome_currency"] != payment.outcome_currency
            or credited["client_id"] != client_id
        ):
            # Same id, other money or another client: the first credit stands,
            # but one of the two deliveries is wrong about money. Page.
            log.error(
                "duplicate_payment_differs",
                extra={
                    "payment_id": payment.payment_id,
                    "credited_client_id": credited["client_id"],
                    "delivered_client_id": client_id,
                    "credited_eth": credited["accumulated_eth"],
                    "delivered_eth": payment.outcome_amount,
                    "credited_currency": credited["outcome_currency"],
                    "delivered_currency": payment.outcome_currency,
                },
            )

    def _finish(self, delivery: Delivery, result: Result) -> Result:
        if not result.recorded:
            with self.db.transaction() as cur:
                self._record(cur, delivery, result)
            self._log(result, None)
        return result

    def _record(self, cur: Any, delivery: Delivery, result: Result) -> None:
        cur.execute(
            QUERIES["record_delivery"],
            {
                "source": delivery.source,
                "request_id": delivery.request_id,
                "payment_id": result.payment_id,
                "payment_status": result.payment_status,
                "signature_valid": result.signature_valid,
                "outcome": result.outcome,
                "http_status": result.http_status,
                "error_code": result.error_code,
                "error_message": result.error_message,
                "accumulation_id": result.accumulation_id,
                "raw_body": delivery.raw_body,
                "body_size": delivery.body_size,
            },
        )
        result.event_id = cur.fetchone()["id"]
        result.recorded = True

    def _log(self, result: Result, row: dict[str, Any] | None) -> None:
        fields: dict[str, Any] = {
            "outcome": result.outcome,
            "payment_id": result.payment_id,
            "http_status": result.http_status,
        }
        if result.outcome == "accumulated" and row is not None:
            log.info(
                "payment_accumulated",
                extra={
                    **fields,
                    "client_id": result.body["client_id"],
                    "accumulated_eth": row["accumulated_eth"],
                    "outcome_currency": row["outcome_currency"],
                    "payment_amount_usd": row["payment_amount_usd"],
                    "accumulated_usd": row["accumulated_usd"],
                    "platform_fee_percent": row["platform_fee_percent"],
                    "usd_source": row["usd_source"],
                },
            )
        elif result.outcome in (
            "unknown_client",
            "bad_signature",
            "invalid",
            "unauthorized",
        ):
            # Worth an operator's look (an unknown client's money waits for a
            # replay); not a page.
            log.warning(
                "payment_refused"
                if result.http_status >= 400
                else "payment_unknown_client",
                extra={**fields, **result.body, "error": result.error_message},
            )
        else:
            log.info("payment_" + result.outcome, extra={**fields, **result.body})


def _usable_invoice(payment: Payment) -> bool:
    # A zero invoice (a free or test order) values nothing: crediting real
    # crypto at 0 USD would leave it out of the threshold sums.
    return payment.invoice_usd is not None and payment.invoice_usd > 0
