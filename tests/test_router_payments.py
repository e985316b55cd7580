"""``POST /payments``: payments the upstream router validated and valued.

Internal auth instead of a signature; the router's ``payment_amount_usd`` is
the gross USD value; otherwise the same outcomes and records as ``/ipn``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import requests
from conftest import INTERNAL_TOKEN

from shared.db import Database

THRESHOLD_CLIENT = -1003296084379
OPEN_CHANNEL = -1002000000001
INSTANT_CLIENT = -1001000000003

PAYMENT = {
    "nowpayments_payment_id": "6100000001",
    "client_id": THRESHOLD_CLIENT,
    "user_id": 6271402111,
    "payment_amount_usd": "12.3456789012",
    "outcome_amount": "0.003703703703703704",
    "outcome_currency": "eth",
}

AUTHORIZED = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}


@pytest.fixture
def base(accumulator: Any, serve: Any, fixture_clients: Any) -> str:
    return str(serve(accumulator))


def post_payment(
    base: str, payment: dict[str, Any], headers: dict[str, str] | None = None
) -> requests.Response:
    return requests.post(
        f"{base}/payments",
        data=json.dumps(payment).encode(),
        headers={
            "Content-Type": "application/json",
            **(AUTHORIZED if headers is None else headers),
        },
        timeout=10,
    )


def credits(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute("SELECT * FROM payout_accumulation ORDER BY id")
        return [dict(row) for row in cur.fetchall()]


def deliveries(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute(
            "SELECT source, outcome, http_status, error_code, payment_id,"
            " signature_valid, accumulation_id, raw_body FROM ipn_events ORDER BY id"
        )
        return [dict(row) for row in cur.fetchall()]


def test_router_payment_is_credited_at_the_router_valuation(
    base: str, db: Database
) -> None:
    response = post_payment(base, PAYMENT)

    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "accumulated"
    assert body["usd_source"] == "router"
    [credit] = credits(db)
    assert credit["nowpayments_payment_id"] == "6100000001"
    assert credit["client_id"] == THRESHOLD_CLIENT
    assert credit["user_id"] == 6271402111
    assert credit["usd_source"] == "router"
    assert credit["payment_amount_usd"] == Decimal("12.3456789012")
    # Default fee 3 %: 0.370370367036 rounds half-up to 0.3703703670.
    assert credit["platform_fee_percent"] == Decimal("3")
    assert credit["accumulated_usd"] == Decimal("11.9753085342")
    assert credit["accumulated_eth"] == Decimal("0.003703703703703704")
    assert credit["outcome_currency"] == "eth"
    assert credit["subscription_id"] is None
    [event] = deliveries(db)
    assert (event["source"], event["outcome"], event["http_status"]) == (
        "router",
        "accumulated",
        200,
    )
    assert event["accumulation_id"] == credit["id"]
    assert event["signature_valid"] is None


def test_router_payment_naming_the_open_channel_credits_its_client(
    base: str, db: Database
) -> None:
    response = post_payment(base, {**PAYMENT, "client_id": OPEN_CHANNEL})

    assert response.json()["outcome"] == "accumulated"
    [credit] = credits(db)
    assert credit["client_id"] == THRESHOLD_CLIENT


def test_router_amounts_as_json_numbers_are_read_from_their_text(
    base: str, db: Database
) -> None:
    body = (
        b'{"nowpayments_payment_id":6100000001,"client_id":-1003296084379,'
        b'"user_id":6271402111,"payment_amount_usd":12.3456789012,'
        b'"outcome_amount":0.003703703703703704,"outcome_currency":"eth"}'
    )

    response = requests.post(
        f"{base}/payments", data=body, headers=AUTHORIZED, timeout=10
    )

    assert response.json()["outcome"] == "accumulated"
    [credit] = credits(db)
    assert credit["payment_amount_usd"] == Decimal("12.3456789012")
    assert credit["accumulated_eth"] == Decimal("0.003703703703703704")


UNAUTHORIZED = {
    "no_header": {},
    "wrong_token": {"Authorization": "Bearer not-the-token"},
    "token_with_suffix": {"Authorization": f"Bearer {INTERNAL_TOKEN}x"},
    "token_prefix": {"Authorization": f"Bearer {INTERNAL_TOKEN[:-1]}"},
    "basic_scheme": {"Authorization": f"Basic {INTERNAL_TOKEN}"},
    "bare_token": {"Authorization": INTERNAL_TOKEN},
    "empty_bearer": {"Authorization": "Bearer "},
}


@pytest.mark.parametrize("headers", UNAUTHORIZED.values(), ids=UNAUTHORIZED.keys())
def test_router_payment_without_the_token_is_401_and_recorded(
    base: str, db: Database, headers: dict[str, str]
) -> None:
    response = post_payment(base, PAYMENT, headers=headers)

    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["outcome"] == "unauthorized"
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["message"]
    assert credits(db) == []
    [event] = deliveries(db)
    assert (event["source"], event["outcome"], event["http_status"]) == (
        "router",
        "unauthorized",
        401,
    )
    assert bytes(event["raw_body"]) == json.dumps(PAYMENT).encode()


INVALID = {
    "not_json": b"nowpayments_payment_id=6100000001",
    "json_array": b"[]",
    "missing_usd": {k: v for k, v in PAYMENT.items() if k != "payment_amount_usd"},
    "missing_payment_id": {
        k: v for k, v in PAYMENT.items() if k != "nowpayments_payment_id"
    },
    "missing_client_id": {k: v for k, v in PAYMENT.items() if k != "client_id"},
    "missing_outcome_amount": {
        k: v for k, v in PAYMENT.items() if k != "outcome_amount"
    },
    "negative_usd": {**PAYMENT, "payment_amount_usd": "-1"},
    "usd_nan": {**PAYMENT, "payment_amount_usd": "NaN"},
    "usd_too_large": {**PAYMENT, "payment_amount_usd": "1e14"},
    "usd_far_too_large": {**PAYMENT, "payment_amount_usd": "1e100"},
    "zero_outcome_amount": {**PAYMENT, "outcome_amount": "0"},
    "outcome_amount_nineteen_places": {
        **PAYMENT,
        "outcome_amount": "0.0000000000000000001",
    },
    "outcome_amount_abc": {**PAYMENT, "outcome_amount": "abc"},
    "client_id_beyond_bigint": {**PAYMENT, "client_id": -(2**63) - 1},
    "client_id_text": {**PAYMENT, "client_id": "channel"},
    "user_id_bool": {**PAYMENT, "user_id": True},
    "payment_id_negative": {**PAYMENT, "nowpayments_payment_id": "-6100000001"},
    "currency_bad": {**PAYMENT, "outcome_currency": "e"},
    "subscription_id_bad": {**PAYMENT, "subscription_id": "sub 1; drop"},
}


@pytest.mark.parametrize("content", INVALID.values(), ids=INVALID.keys())
def test_router_payment_with_invalid_content_is_400_and_recorded(
    base: str, db: Database, content: bytes | dict[str, Any]
) -> None:
    body = content if isinstance(content, bytes) else json.dumps(content).encode()

    response = requests.post(
        f"{base}/payments", data=body, headers=AUTHORIZED, timeout=10
    )

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["outcome"] == "invalid"
    assert response.json()["error"]["code"] == "invalid"
    assert credits(db) == []
    [event] = deliveries(db)
    assert (event["source"], event["outcome"], event["http_status"]) == (
        "router",
        "invalid",
        400,
    )


def test_router_payment_for_an_unknown_client_is_recorded_not_credited(
    base: str, db: Database
) -> None:
    response = post_payment(base, {**PAYMENT, "client_id": -1009999999999})

    assert response.status_code == 200
    assert response.json()["outcome"] == "unknown_client"
    assert credits(db) == []
    [event] = deliveries(db)
    assert (event["outcome"], event["payment_id"]) == ("unknown_client", "6100000001")


def test_router_payment_for_an_instant_client_is_not_accumulated(
    base: str, db: Database
) -> None:
    response = post_payment(base, {**PAYMENT, "client_id": INSTANT_CLIENT})

    assert response.status_code == 200
    assert response.json()["outcome"] == "instant_client"
    assert credits(db) == []
    [event] = deliveries(db)
    assert event["outcome"] == "instant_client"


def test_router_subscription_id_is_stored(base: str, db: Database) -> None:
    response = post_payment(base, {**PAYMENT, "subscription_id": "sub_2025-11:42"})

    assert response.json()["outcome"] == "accumulated"
    [credit] = credits(db)
    assert credit["subscription_id"] == "sub_2025-11:42"


def test_repeated_router_payment_is_a_duplicate_credited_once(
    base: str, db: Database
) -> None:
    first = post_payment(base, PAYMENT)
    again = post_payment(base, {**PAYMENT, "payment_amount_usd": "99"})

    assert (first.json()["outcome"], again.json()["outcome"]) == (
        "accumulated",
        "duplicate",
    )
    assert again.status_code == 200
    [credit] = credits(db)
    assert credit["payment_amount_usd"] == Decimal("12.3456789012")
    assert [event["outcome"] for event in deliveries(db)] == [
        "accumulated",
        "duplicate",
    ]


@pytest.mark.parametrize("spelling", ["06100000001", "0006100000001", 6100000001])
def test_a_payment_id_spelled_with_leading_zeros_is_the_same_payment(
    base: str, db: Database, spelling: Any
) -> None:
    first = post_payment(base, PAYMENT)
    again = post_payment(base, {**PAYMENT, "nowpayments_payment_id": spelling})

    assert (first.json()["outcome"], again.json()["outcome"]) == (
        "accumulated",
        "duplicate",
    )
    assert [credit["nowpayments_payment_id"] for credit in credits(db)] == [
        "6100000001"
    ]


def test_a_duplicate_with_other_money_is_logged_at_error(
    base: str, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    post_payment(base, PAYMENT)

    again = post_payment(base, {**PAYMENT, "outcome_amount": "5"})

    assert again.json()["outcome"] == "duplicate"
    [line] = [
        r for r in caplog.records if r.getMessage() == "duplicate_payment_differs"
    ]
    assert line.levelname == "ERROR"
    assert [credit["accumulated_eth"] for credit in credits(db)] == [
        Decimal("0.003703703703703704")
    ]
