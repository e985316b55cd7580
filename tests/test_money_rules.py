"""The money rules of a credited IPN (DESIGN.md section 2), read from the row.

The price 3333.3333333333 makes almost every product need rounding, and the
amounts below are chosen so that half-up, half-even and truncation give
different answers at 10^-10. Expected values are written out by hand.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import requests
from conftest import IPN_SECRET

from gcaccumulator.ipn import sign
from shared.db import Database

THIRDS = "static:eth=3333.3333333333"


def ipn_body(
    payment_id: int,
    outcome_amount: str,
    price_amount: str | None = "1.35",
    price_currency: str | None = "usd",
) -> bytes:
    """A finished IPN for the first fixture client; amounts as raw JSON text."""
    members = [
        f'"payment_id":{payment_id}',
        '"payment_status":"finished"',
        '"order_id":"PGP-6271402111|-1003296084379"',
        f'"outcome_amount":{outcome_amount}',
        '"outcome_currency":"eth"',
    ]
    if price_amount is not None:
        members.append(f'"price_amount":{price_amount}')
    if price_currency is not None:
        members.append(f'"price_currency":{json.dumps(price_currency)}')
    return ("{" + ",".join(members) + "}").encode()


def deliver(base: str, body: bytes) -> requests.Response:
    return requests.post(
        f"{base}/ipn",
        data=body,
        headers={
            "Content-Type": "application/json",
            "x-nowpayments-sig": sign(IPN_SECRET, body),
        },
        timeout=10,
    )


def credited(db: Database, payment_id: int) -> dict[str, Any]:
    with db.transaction() as cur:
        cur.execute(
            "SELECT payment_amount_usd, usd_source, platform_fee_percent,"
            " accumulated_usd, accumulated_eth, outcome_currency"
            " FROM payout_accumulation WHERE nowpayments_payment_id = %s",
            (str(payment_id),),
        )
        row = cur.fetchone()
    assert row is not None, f"payment {payment_id} was not credited"
    for name in ("payment_amount_usd", "platform_fee_percent", "accumulated_usd"):
        assert isinstance(row[name], Decimal)
    assert isinstance(row["accumulated_eth"], Decimal)
    return dict(row)


def credit_count(db: Database) -> int:
    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM payout_accumulation")
        return int(cur.fetchone()["n"])


@pytest.fixture
def thirds_base(make_accumulator: Any, serve: Any, fixture_clients: Any) -> str:
    app = make_accumulator(PRICE_SOURCE=THIRDS, PLATFORM_FEE_PERCENT="2.5")
    return str(serve(app))


def test_usd_value_is_rounded_half_up_at_the_tie(
    thirds_base: str, db: Database
) -> None:
    # 0.5 x 3333.3333333333 = 1666.66666666665: a tie whose even neighbour
    # is below, so half-even or truncation would give ...6666.
    response = deliver(thirds_base, ipn_body(1, "0.5"))

    assert response.json()["outcome"] == "accumulated"
    row = credited(db, 1)
    assert row["payment_amount_usd"] == Decimal("1666.6666666667")
    assert row["usd_source"] == "price"
    assert row["accumulated_eth"] == Decimal("0.5")
    # Fee 1666.6666666667 x 2.5 / 100 = 41.6666666666675 -> 41.6666666667.
    assert row["accumulated_usd"] == Decimal("1625.0000000000")


def test_fee_is_rounded_half_up_at_the_tie(thirds_base: str, db: Database) -> None:
    # 18.8 x 3333.3333333333 = 62666.66666666604 -> 62666.6666666660; its fee
    # 1566.66666666665 is a tie whose even neighbour is below.
    deliver(thirds_base, ipn_body(2, "18.8"))

    row = credited(db, 2)
    assert row["payment_amount_usd"] == Decimal("62666.6666666660")
    assert row["accumulated_usd"] == Decimal("62666.6666666660") - Decimal(
        "1566.6666666667"
    )
    assert row["accumulated_usd"] == Decimal("61099.9999999993")


def test_ordinary_payment_is_valued_at_the_price_to_ten_places(
    thirds_base: str, db: Database
) -> None:
    # 0.0002734 x 3333.3333333333 = 0.91133333333332422 -> 0.9113333333;
    # fee 0.0227833333325 -> 0.0227833333.
    response = deliver(thirds_base, ipn_body(3, "0.0002734"))

    row = credited(db, 3)
    assert row["payment_amount_usd"] == Decimal("0.9113333333")
    assert row["accumulated_usd"] == Decimal("0.8885500000")
    assert row["accumulated_eth"] == Decimal("0.0002734")
    assert row["platform_fee_percent"] == Decimal("2.5")
    # Amounts in the answer are decimal strings, never JSON numbers.
    body = response.json()
    assert body["accumulated_eth"] == "0.0002734"
    assert body["accumulated_usd"] == "0.88855"


@pytest.mark.parametrize("amount", ["0.1", '"0.1"'], ids=["number", "string"])
def test_amount_is_stored_exactly_from_its_text(
    thirds_base: str, db: Database, amount: str
) -> None:
    deliver(thirds_base, ipn_body(4, amount))

    row = credited(db, 4)
    assert row["accumulated_eth"] == Decimal("0.1")
    assert row["payment_amount_usd"] == Decimal("333.3333333333")


def test_fee_is_copied_onto_each_row_and_a_later_fee_leaves_it_alone(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    before = serve(make_accumulator(PRICE_SOURCE=THIRDS, PLATFORM_FEE_PERCENT="2.5"))
    deliver(before, ipn_body(10, "0.5"))

    after = serve(make_accumulator(PRICE_SOURCE=THIRDS, PLATFORM_FEE_PERCENT="4"))
    deliver(after, ipn_body(11, "0.5"))

    first, second = credited(db, 10), credited(db, 11)
    assert first["platform_fee_percent"] == Decimal("2.5")
    assert first["accumulated_usd"] == Decimal("1625.0000000000")
    assert second["platform_fee_percent"] == Decimal("4")
    # 1666.6666666667 x 4 / 100 = 66.666666666668 -> 66.6666666667.
    assert second["accumulated_usd"] == Decimal("1600.0000000000")


def test_default_fee_is_three_percent(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    base = serve(make_accumulator(PRICE_SOURCE=THIRDS))

    deliver(base, ipn_body(12, "0.5"))

    row = credited(db, 12)
    assert row["platform_fee_percent"] == Decimal("3")
    # 1666.6666666667 x 3 / 100 = 50.000000000001 -> 50.0000000000.
    assert row["accumulated_usd"] == Decimal("1616.6666666667")


def test_dust_payment_worth_zero_usd_is_credited_with_its_exact_amount(
    thirds_base: str, db: Database
) -> None:
    # 1e-18 ETH is worth 3.33e-15 USD, which rounds to zero at 10^-10.
    response = deliver(thirds_base, ipn_body(20, "0.000000000000000001"))

    assert (response.status_code, response.json()["outcome"]) == (200, "accumulated")
    row = credited(db, 20)
    assert row["accumulated_eth"] == Decimal("0.000000000000000001")
    assert row["payment_amount_usd"] == Decimal(0)
    assert row["accumulated_usd"] == Decimal(0)
    assert response.json()["accumulated_eth"] == "0.000000000000000001"


def test_price_source_failure_falls_back_to_the_usd_invoice(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    # A static price for BTC only: there is no price for ETH.
    base = serve(make_accumulator(PRICE_SOURCE="static:btc=1"))

    response = deliver(base, ipn_body(30, "0.0002734", "1.35", "usd"))

    assert response.json()["outcome"] == "accumulated"
    assert response.json()["usd_source"] == "invoice"
    row = credited(db, 30)
    assert row["usd_source"] == "invoice"
    assert row["payment_amount_usd"] == Decimal("1.35")
    # Default fee 3 %: 1.35 x 3 / 100 = 0.0405.
    assert row["accumulated_usd"] == Decimal("1.3095")
    assert row["accumulated_eth"] == Decimal("0.0002734")


NO_VALUATION = {
    "eur_invoice": ("1.35", "eur"),
    "no_invoice_currency": ("1.35", None),
    "usd_invoice_without_amount": (None, "usd"),
    # A zero invoice (a free or test order) says nothing of the crypto's worth.
    "zero_usd_invoice": ("0", "usd"),
}


@pytest.mark.parametrize("invoice", NO_VALUATION.values(), ids=NO_VALUATION.keys())
def test_no_price_and_no_usd_invoice_is_503_and_credits_nothing(
    make_accumulator: Any,
    serve: Any,
    db: Database,
    fixture_clients: Any,
    invoice: tuple[str | None, str | None],
) -> None:
    base = serve(make_accumulator(PRICE_SOURCE="static:btc=1"))
    price_amount, price_currency = invoice

    response = deliver(base, ipn_body(40, "0.0002734", price_amount, price_currency))

    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "price_unavailable"
    assert error["message"]
    assert response.json()["outcome"] == "retry_later"
    assert credit_count(db) == 0
    # Recorded all the same: if the sender's retries run out, an operator
    # replays it (payoutctl deliveries replay).
    with db.transaction() as cur:
        cur.execute("SELECT outcome, http_status, payment_id FROM ipn_events")
        assert [dict(row) for row in cur.fetchall()] == [
            {"outcome": "retry_later", "http_status": 503, "payment_id": "40"}
        ]


def test_a_usd_value_beyond_its_column_is_invalid_and_recorded(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    base = serve(make_accumulator(PRICE_SOURCE="static:3400"))

    # Valid as crypto, but 3400 USD each makes more than NUMERIC(24,10) holds.
    response = deliver(base, ipn_body(41, "29411764705.882352941176470588", "1", "usd"))

    assert (response.status_code, response.json()["outcome"]) == (400, "invalid")
    assert credit_count(db) == 0
    with db.transaction() as cur:
        cur.execute("SELECT outcome, http_status FROM ipn_events")
        assert [tuple(row.values()) for row in cur.fetchall()] == [("invalid", 400)]
