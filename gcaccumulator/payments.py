"""Reading a payment out of a delivery's JSON, field by field.

Both deliveries (a NOWPayments IPN, a router's ``/payments`` call) become one
``Payment``. Every problem with the content is collected, so the refusal
names all of them at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from shared import money

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
FINISHED = "finished"

_ORDER_ID = re.compile(r"PGP-([0-9]{1,19})\|(-?[1-9][0-9]{0,18})", re.ASCII)
_PAYMENT_ID = re.compile(r"[0-9]{1,40}", re.ASCII)
_CURRENCY = re.compile(r"^[a-z0-9]{2,20}$")
_STATUS = re.compile(r"^[a-z_]{1,32}$")
_SUBSCRIPTION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class InvalidContent(ValueError):
    """The payment cannot be credited as sent; a retry will not change that."""


@dataclass(frozen=True)
class Payment:
    """A payment to credit, whichever way it arrived."""

    payment_id: str
    channel_id: int
    user_id: int
    outcome_amount: Decimal
    outcome_currency: str
    subscription_id: str | None = None
    # The invoice's USD amount (an IPN's price_amount), the fallback value.
    invoice_usd: Decimal | None = None
    # The router's valuation, trusted as the gross USD value.
    router_usd: Decimal | None = None


class _Fields:
    """Typed reads from a JSON object that collect problems instead of raising."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self._payload = payload
        self.problems: list[str] = []

    def _get(self, name: str) -> Any:
        value = self._payload.get(name)
        if value is None:
            self.problems.append(f"{name} is missing")
        return value

    def identifier(self, name: str) -> str:
        """A positive id, as a JSON integer or a string of digits.

        Kept as text in its one canonical spelling: "0940000007" and
        940000007 are the same payment and must meet the same unique key.
        """
        value = self._get(name)
        if value is None:
            return ""
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _PAYMENT_ID.fullmatch(value):
            self.problems.append(f"{name} must be a positive integer")
            return ""
        canonical = str(int(value))
        if canonical == "0":
            self.problems.append(f"{name} must be a positive integer")
            return ""
        return canonical

    def integer(self, name: str, minimum: int = BIGINT_MIN) -> int:
        value = self._get(name)
        if value is None:
            return 0
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.problems.append(f"{name} must be an integer")
            return 0
        if not minimum <= value <= BIGINT_MAX:
            self.problems.append(f"{name} is out of range")
            return 0
        return value

    def amount(self, name: str, column: money.Column, positive: bool) -> Decimal:
        value = self._get(name)
        if value is None:
            return Decimal(0)
        try:
            amount = money.parse_amount(value, name)
            if column is money.CRYPTO:
                amount = money.exact(amount, column, name)
            else:
                amount = money.quantize(amount, column, name)
        except money.AmountError as error:
            self.problems.append(str(error))
            return Decimal(0)
        if amount < 0 or (positive and amount == 0):
            bound = "greater than zero" if positive else "zero or more"
            self.problems.append(f"{name} must be {bound}")
        return amount

    def code(self, name: str, pattern: re.Pattern[str] = _CURRENCY) -> str:
        value = self._get(name)
        if value is None:
            return ""
        if not isinstance(value, str) or not pattern.match(value.strip().lower()):
            self.problems.append(f"{name} is not a valid code")
            return ""
        return value.strip().lower()

    def optional_text(self, name: str, pattern: re.Pattern[str]) -> str | None:
        value = self._payload.get(name)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.problems.append(f"{name} is not a valid identifier")
            return None
        return value

    def check(self) -> None:
        if self.problems:
            raise InvalidContent("; ".join(self.problems))


def read_status(payload: dict[str, Any]) -> tuple[str, str]:
    """The payment id and status every IPN must carry, whatever its status."""
    fields = _Fields(payload)
    payment_id = fields.identifier("payment_id")
    status = fields.code("payment_status", _STATUS)
    fields.check()
    return payment_id, status


def read_ipn(payload: dict[str, Any], payment_id: str) -> Payment:
    """A finished IPN's payment; ``order_id`` is ``PGP-{user_id}|{channel_id}``."""
    fields = _Fields(payload)
    order_id = fields._get("order_id")
    match = _ORDER_ID.fullmatch(order_id) if isinstance(order_id, str) else None
    if order_id is not None and match is None:
        fields.problems.append("order_id must look like PGP-{user_id}|{channel_id}")
    user_id, channel_id = (
        (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    )
    if match and not (user_id <= BIGINT_MAX and BIGINT_MIN <= channel_id <= BIGINT_MAX):
        fields.problems.append("order_id holds an id out of range")
    outcome_amount = fields.amount("outcome_amount", money.CRYPTO, positive=True)
    outcome_currency = fields.code("outcome_currency")
    invoice_usd = _invoice_usd(payload, fields)
    fields.check()
    return Payment(
        payment_id=payment_id,
        channel_id=channel_id,
        user_id=user_id,
        outcome_amount=outcome_amount,
        outcome_currency=outcome_currency,
        invoice_usd=invoice_usd,
    )


def _invoice_usd(payload: dict[str, Any], fields: _Fields) -> Decimal | None:
    # Only a USD invoice can stand in for a price; anything else is ignored
    # here and the valuation then depends on the price source alone.
    if str(payload.get("price_currency", "")).lower() != "usd":
        return None
    if payload.get("price_amount") is None:
        return None
    return fields.amount("price_amount", money.USD, positive=False)


def read_router_payment(payload: dict[str, Any]) -> Payment:
    """A payment the upstream router validated and valued (``POST /payments``)."""
    fields = _Fields(payload)
    payment = Payment(
        payment_id=fields.identifier("nowpayments_payment_id"),
        channel_id=fields.integer("client_id"),
        user_id=fields.integer("user_id", minimum=0),
        outcome_amount=fields.amount("outcome_amount", money.CRYPTO, positive=True),
        outcome_currency=fields.code("outcome_currency"),
        subscription_id=fields.optional_text("subscription_id", _SUBSCRIPTION_ID),
        router_usd=fields.amount("payment_amount_usd", money.USD, positive=False),
    )
    fields.check()
    return payment
