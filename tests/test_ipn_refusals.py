"""Refused IPN deliveries.

Every refusal answers its 4xx in the one error shape with an ``outcome``,
credits nothing, and still leaves exactly one ``ipn_events`` row saying what
was done. Bodies that test their content are signed over their exact bytes,
so they pass the signature step and reach the content checks.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests
from conftest import IPN_SECRET

from gcaccumulator.ipn import sign
from shared.db import Database
from shared.web import MAX_BODY_BYTES

# A finished IPN for the first fixture client, each value as raw JSON text.
FINISHED = {
    "payment_id": "5077125051",
    "payment_status": '"finished"',
    "order_id": '"PGP-6271402111|-1003296084379"',
    "outcome_amount": "0.0002734",
    "outcome_currency": '"eth"',
    "price_amount": "1.35",
    "price_currency": '"usd"',
}

REQUIRED = [
    "payment_id",
    "payment_status",
    "order_id",
    "outcome_amount",
    "outcome_currency",
]

SNAKE_CASE = re.compile(r"^[a-z]+(_[a-z]+)*$")


def ipn_body(**members: str | None) -> bytes:
    """A finished IPN's bytes; each member is raw JSON text, None leaves it out."""
    merged = {**FINISHED, **members}
    text = ",".join(
        f"{json.dumps(name)}:{value}"
        for name, value in merged.items()
        if value is not None
    )
    return ("{" + text + "}").encode("utf-8")


def post_ipn(
    base: str, body: bytes, signature: str | None = "sign"
) -> requests.Response:
    """POST ``body``; ``signature="sign"`` signs it correctly, None sends none."""
    headers = {"Content-Type": "application/json"}
    if signature == "sign":
        signature = sign(IPN_SECRET, body)
    if signature is not None:
        headers["x-nowpayments-sig"] = signature
    return requests.post(f"{base}/ipn", data=body, headers=headers, timeout=10)


def recorded_deliveries(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute(
            "SELECT source, outcome, http_status, error_code, signature_valid,"
            " raw_body, body_size FROM ipn_events ORDER BY id"
        )
        return [dict(row) for row in cur.fetchall()]


def credited_count(db: Database) -> int:
    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM payout_accumulation")
        return int(cur.fetchone()["n"])


def assert_refused(
    response: requests.Response,
    db: Database,
    status: int,
    outcome: str,
    signature_valid: bool | None,
) -> dict[str, Any]:
    """The common shape of a refusal; returns its one ``ipn_events`` row."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["outcome"] == outcome
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == outcome
    assert SNAKE_CASE.match(body["error"]["code"])
    assert body["error"]["message"]

    assert credited_count(db) == 0
    [event] = recorded_deliveries(db)
    assert (event["source"], event["outcome"], event["http_status"]) == (
        "ipn",
        outcome,
        status,
    )
    assert event["error_code"] == outcome
    assert event["signature_valid"] is signature_valid
    return event


@pytest.fixture
def base(accumulator: Any, serve: Any, fixture_clients: Any) -> str:
    return str(serve(accumulator))


def test_the_unaltered_signed_body_is_credited(base: str, db: Database) -> None:
    # Every refusal below changes one thing in this body; this proves that
    # the body itself would be credited, so each refusal is the change's doing.
    response = post_ipn(base, ipn_body())

    assert (response.status_code, response.json()["outcome"]) == (200, "accumulated")
    assert credited_count(db) == 1


MALFORMED = {
    "not_json": b"payment_id=5077125051&payment_status=finished",
    "json_array": b"[" + ipn_body() + b"]",
    "json_string": json.dumps(ipn_body().decode()).encode(),
    "json_number": b"5077125051",
    "json_null": b"null",
    "empty": b"",
    "truncated": ipn_body()[:-12],
    "invalid_utf8": ipn_body(order_description='"caf\xe9"').replace(
        "\xe9".encode(), b"\xe9"
    ),
    "byte_order_mark": b"\xef\xbb\xbf" + ipn_body(),
    "nan_token": ipn_body(outcome_amount="NaN"),
    "infinity_token": ipn_body(outcome_amount="Infinity"),
    "minus_infinity_token": ipn_body(outcome_amount="-Infinity"),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_body_that_is_not_one_json_object_is_invalid(
    base: str, db: Database, body: bytes
) -> None:
    response = post_ipn(base, body)

    event = assert_refused(response, db, 400, "invalid", signature_valid=None)
    assert bytes(event["raw_body"]) == body
    assert event["body_size"] == len(body)


def test_malformed_body_is_invalid_before_its_signature_is_looked_at(
    base: str, db: Database
) -> None:
    response = post_ipn(base, b"{not json", signature=None)

    assert_refused(response, db, 400, "invalid", signature_valid=None)


WRONG_TYPES = {
    "outcome_amount_object": {"outcome_amount": '{"value":"0.0002734"}'},
    "outcome_amount_array": {"outcome_amount": "[0.0002734]"},
    "outcome_amount_true": {"outcome_amount": "true"},
    "outcome_amount_false": {"outcome_amount": "false"},
    "outcome_amount_abc": {"outcome_amount": '"abc"'},
    "outcome_amount_empty_string": {"outcome_amount": '""'},
    "payment_id_negative": {"payment_id": "-5077125051"},
    "payment_id_negative_string": {"payment_id": '"-5077125051"'},
    "payment_id_float": {"payment_id": "5077125051.5"},
    "payment_id_object": {"payment_id": '{"id":5077125051}'},
    "payment_status_number": {"payment_status": "1"},
    "order_id_without_prefix": {"order_id": '"6271402111|-1003296084379"'},
    "order_id_without_bar": {"order_id": '"PGP-6271402111-1003296084379"'},
    "order_id_without_channel": {"order_id": '"PGP-6271402111|"'},
    "order_id_letters": {"order_id": '"PGP-abc|-1003296084379"'},
    "order_id_number": {"order_id": "6271402111"},
    "channel_id_below_bigint": {"order_id": '"PGP-6271402111|-9223372036854775809"'},
    "channel_id_above_bigint": {"order_id": '"PGP-6271402111|9223372036854775808"'},
    "channel_id_twenty_digits": {"order_id": '"PGP-6271402111|-10000000000000000000"'},
    "user_id_above_bigint": {"order_id": '"PGP-9223372036854775808|-1003296084379"'},
    "outcome_currency_number": {"outcome_currency": "60"},
    "outcome_currency_symbols": {"outcome_currency": '"e$h"'},
    "price_amount_abc_on_usd_invoice": {"price_amount": '"abc"'},
}


@pytest.mark.parametrize("members", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_wrongly_typed_field_is_invalid(
    base: str, db: Database, members: dict[str, str]
) -> None:
    response = post_ipn(base, ipn_body(**members))

    assert_refused(response, db, 400, "invalid", signature_valid=True)


NOT_POSITIVE = {
    "outcome_amount_negative": {"outcome_amount": "-0.0002734"},
    "outcome_amount_negative_string": {"outcome_amount": '"-0.0002734"'},
    "outcome_amount_zero": {"outcome_amount": "0"},
    "outcome_amount_zero_decimal": {"outcome_amount": "0.000"},
    "outcome_amount_minus_zero": {"outcome_amount": "-0"},
    "outcome_amount_underflows_to_zero": {"outcome_amount": "1e-99999999999999999999"},
    "price_amount_negative": {"price_amount": "-1.35"},
}


@pytest.mark.parametrize("members", NOT_POSITIVE.values(), ids=NOT_POSITIVE.keys())
def test_negative_or_zero_amount_is_invalid(
    base: str, db: Database, members: dict[str, str]
) -> None:
    response = post_ipn(base, ipn_body(**members))

    assert_refused(response, db, 400, "invalid", signature_valid=True)


NON_FINITE_STRINGS = ["NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf", "-inf"]


@pytest.mark.parametrize("text", NON_FINITE_STRINGS)
def test_non_finite_amount_as_a_string_is_invalid(
    base: str, db: Database, text: str
) -> None:
    response = post_ipn(base, ipn_body(outcome_amount=json.dumps(text)))

    assert_refused(response, db, 400, "invalid", signature_valid=True)


BEYOND_COLUMNS = {
    # NUMERIC(38,18): 18 places and 20 integer digits at most.
    "nineteen_places": {"outcome_amount": "0.0000000000000000001"},
    "nineteen_places_string": {"outcome_amount": '"0.0000000000000000001"'},
    "nineteen_places_on_a_large_amount": {
        "outcome_amount": "12345678901234567890.1234567890123456789"
    },
    "1e21": {"outcome_amount": "1e21"},
    "1e21_string": {"outcome_amount": '"1e21"'},
    "1e20_integer": {"outcome_amount": "100000000000000000000"},
    "exponent_beyond_decimal": {"outcome_amount": "1e99999999999999999999"},
    # NUMERIC(24,10) for the invoice's USD amount.
    "price_amount_1e15": {"price_amount": "1e15"},
    "price_amount_1e100": {"price_amount": "1e100"},
}


@pytest.mark.parametrize("members", BEYOND_COLUMNS.values(), ids=BEYOND_COLUMNS.keys())
def test_amount_beyond_its_column_is_invalid(
    base: str, db: Database, members: dict[str, str]
) -> None:
    response = post_ipn(base, ipn_body(**members))

    assert_refused(response, db, 400, "invalid", signature_valid=True)


@pytest.mark.parametrize("field", REQUIRED)
def test_finished_ipn_without_a_required_field_is_invalid(
    base: str, db: Database, field: str
) -> None:
    response = post_ipn(base, ipn_body(**{field: None}))

    # Without a payment id or status the signature was still checked first.
    assert_refused(response, db, 400, "invalid", signature_valid=True)
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("field", REQUIRED)
def test_finished_ipn_with_a_required_field_null_is_invalid(
    base: str, db: Database, field: str
) -> None:
    response = post_ipn(base, ipn_body(**{field: "null"}))

    assert_refused(response, db, 400, "invalid", signature_valid=True)


BAD_SIGNATURES = {
    "missing": None,
    "empty": "",
    "other_secret": sign("another-secret", ipn_body()),
    "other_body": sign(IPN_SECRET, ipn_body(outcome_amount="0.0002735")),
    "secret_with_newline": sign(IPN_SECRET + "\n", ipn_body()),
    "truncated": sign(IPN_SECRET, ipn_body())[:64],
    "not_hex": "z" * 128,
}


@pytest.mark.parametrize(
    "signature", BAD_SIGNATURES.values(), ids=BAD_SIGNATURES.keys()
)
def test_bad_or_missing_signature_is_refused(
    base: str, db: Database, signature: str | None
) -> None:
    response = post_ipn(base, ipn_body(), signature=signature)

    assert_refused(response, db, 401, "bad_signature", signature_valid=False)


def test_invalid_content_with_a_bad_signature_is_refused_as_bad_signature(
    base: str, db: Database
) -> None:
    response = post_ipn(base, ipn_body(outcome_amount='"abc"'), signature="0" * 128)

    assert_refused(response, db, 401, "bad_signature", signature_valid=False)


def oversized_body(size: int) -> bytes:
    """A signed-able finished IPN padded to exactly ``size`` bytes."""
    padding = size - len(ipn_body(order_description='""'))
    body = ipn_body(order_description=json.dumps("x" * padding))
    assert len(body) == size
    return body


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 3 * MAX_BODY_BYTES])
def test_body_over_64_kib_is_413_and_recorded_truncated_with_its_true_size(
    base: str, db: Database, size: int
) -> None:
    body = oversized_body(size)

    response = post_ipn(base, body)

    event = assert_refused(response, db, 413, "invalid", signature_valid=None)
    assert bytes(event["raw_body"]) == body[:MAX_BODY_BYTES]
    assert event["body_size"] == size


def test_body_of_exactly_64_kib_is_accepted(base: str, db: Database) -> None:
    response = post_ipn(base, oversized_body(MAX_BODY_BYTES))

    assert (response.status_code, response.json()["outcome"]) == (200, "accumulated")
    assert credited_count(db) == 1


def test_unknown_route_is_404_in_the_error_shape(base: str) -> None:
    response = requests.post(f"{base}/no-such-route", data=b"{}", timeout=10)

    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert error["message"]


@pytest.mark.parametrize("path", ["/ipn", "/payments"])
def test_wrong_method_is_405_in_the_error_shape(base: str, path: str) -> None:
    response = requests.get(f"{base}{path}", timeout=10)

    assert response.status_code == 405
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert error["message"]


def post_chunked(base: str, body: bytes) -> requests.Response:
    """POST ``body`` signed, as a generator: chunked, with no Content-Length."""
    chunks = (body[start : start + 8192] for start in range(0, len(body), 8192))
    return requests.post(
        f"{base}/ipn",
        data=chunks,
        headers={"x-nowpayments-sig": sign(IPN_SECRET, body)},
        timeout=10,
    )


def test_chunked_body_over_64_kib_is_413_and_recorded_truncated(
    base: str, db: Database
) -> None:
    body = oversized_body(3 * MAX_BODY_BYTES)

    response = post_chunked(base, body)

    event = assert_refused(response, db, 413, "invalid", signature_valid=None)
    assert bytes(event["raw_body"]) == body[:MAX_BODY_BYTES]
    assert event["body_size"] > MAX_BODY_BYTES


def test_chunked_body_over_64_kib_is_recorded_with_its_true_size(
    base: str, db: Database
) -> None:
    body = oversized_body(3 * MAX_BODY_BYTES)

    post_chunked(base, body)

    [event] = recorded_deliveries(db)
    assert event["body_size"] == len(body)


@pytest.mark.parametrize("signature", ["sign", "0" * 128], ids=["signed", "unsigned"])
def test_deeply_nested_body_is_answered_and_recorded_not_a_500(
    base: str, db: Database, signature: str
) -> None:
    depth = 600
    nested = '{"a":' * depth + "1" + "}" * depth

    response = post_ipn(base, ipn_body(extra=nested), signature=signature)

    assert response.status_code < 500
    assert credited_count(db) <= 1
    [event] = recorded_deliveries(db)
    assert (event["outcome"], event["http_status"]) == (
        response.json()["outcome"],
        response.status_code,
    )
