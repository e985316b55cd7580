"""``POST /swap-executed``: the swap executor's callback, applied exactly once.

A completed swap shares the USDT received among the conversion's rows
(DESIGN.md section 2); a failed one returns the rows to pending. The same
callback again answers 2xx and changes nothing; one that contradicts what was
recorded answers 409; one for an unknown conversion 404; bad input 400
(section 4). A callback may arrive before the executor's acceptance was seen,
and a late acceptance never undoes it (section 3).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests
from conftest import INTERNAL_HEADERS
from flask import Flask
from microbatch_support import (
    QUIET_SIBLING,
    LogCapture,
    add_pending,
    assert_invariants_hold,
    close_app,
    conversions,
    fee_of,
    largest_remainder_units,
    query,
    run_now,
    snapshot,
)

from gcmicrobatchprocessor import conversion
from shared.db import Database
from shared.outbox import Task

CRYPTO = ["0.001", "0.002", "0.004"]
FEES = ["3", "0", "49.9999"]


@pytest.fixture
def app(make_microbatch: Callable[..., Flask]) -> Iterator[Flask]:
    made = make_microbatch(**QUIET_SIBLING)
    yield made
    close_app(made)


def claim(app: Flask, db: Database) -> str:
    """Three pending payments claimed into one conversion; its id."""
    add_pending(db, [(crypto, "4") for crypto in CRYPTO], fee_percents=FEES)
    return claim_pending(app, db)


def claim_pending(app: Flask, db: Database) -> str:
    """Claim what is pending into a new conversion; its id."""
    run = run_now(app)
    assert run.json["figures"]["conversions_created"] == 1, run.json
    return str(conversions(db)[-1]["batch_conversion_id"])


@pytest.fixture
def conversion_id(app: Flask, db: Database) -> str:
    return claim(app, db)


def completed(conversion_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "batch_conversion_id": conversion_id,
        "swap_id": "swap-7f3a",
        "tx_hash": "0x5e1d0c9b8a7f6e5d4c3b2a19",
        "status": "completed",
        "actual_usdt_received": "23.000001",
        **changes,
    }


def failed(conversion_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "batch_conversion_id": conversion_id,
        "swap_id": "swap-7f3a",
        "tx_hash": None,
        "status": "failed",
        "actual_usdt_received": None,
        **changes,
    }


def call_back(app: Flask, body: Any, headers: dict[str, str] | None = None) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return app.test_client().post(
        "/swap-executed",
        data=data,
        headers=INTERNAL_HEADERS if headers is None else headers,
        content_type="application/json",
    )


def shared_rows(db: Database, conversion_id: str) -> list[dict[str, Any]]:
    return query(
        db,
        "SELECT id, conversion_status, accumulated_eth, platform_fee_percent,"
        " accumulated_usdt, platform_fee_usdt FROM payout_accumulation"
        " WHERE batch_conversion_id = %s ORDER BY id",
        (conversion_id,),
    )


def assert_shared_exactly(db: Database, conversion_id: str, received: str) -> None:
    """Invariant 3, and each row's gross, fee and net to the last unit."""
    rows = shared_rows(db, conversion_id)
    total = Decimal(received)
    units = largest_remainder_units(total, [row["accumulated_eth"] for row in rows])
    for row, gross_units in zip(rows, units, strict=True):
        gross = Decimal(gross_units).scaleb(-6)
        fee = fee_of(gross, row["platform_fee_percent"])
        assert row["conversion_status"] == "converted"
        assert (row["accumulated_usdt"], row["platform_fee_usdt"]) == (gross - fee, fee)
    assert sum(row["accumulated_usdt"] + row["platform_fee_usdt"] for row in rows) == (
        total
    )


# --- completed ---------------------------------------------------------------


@pytest.mark.parametrize(
    "amount",
    [b'"23.000001"', b"23.000001", b'"23.0000010"'],
    ids=["string", "json-number", "trailing-zero"],
)
def test_a_completed_callback_shares_the_usdt_received_exactly(
    app: Flask, db: Database, conversion_id: str, amount: bytes
) -> None:
    body = json.dumps(completed(conversion_id, actual_usdt_received="AMOUNT"))
    raw = body.replace('"AMOUNT"', amount.decode()).encode()

    done = call_back(app, raw)

    assert done.status_code == 200, done.json
    assert done.json["outcome"] == "completed"
    assert done.json["row_count"] == 3
    assert done.json["actual_usdt_received"] == "23.000001"
    # 23.000001 over 1:2:4 is 3.285714|428..., 6.571428|857..., 13.142857|714...
    # in 10^-6 units: the two spare units go to the two largest remainders.
    grosses = [
        row["accumulated_usdt"] + row["platform_fee_usdt"]
        for row in shared_rows(db, conversion_id)
    ]
    assert grosses == [Decimal("3.285714"), Decimal("6.571429"), Decimal("13.142858")]
    assert_shared_exactly(db, conversion_id, "23.000001")
    [conversion] = conversions(db)
    assert conversion["status"] == "completed"
    assert conversion["swap_id"] == "swap-7f3a"
    assert conversion["tx_hash"] == "0x5e1d0c9b8a7f6e5d4c3b2a19"
    assert conversion["actual_usdt_received"] == Decimal("23.000001")
    assert conversion["finished_at"] is not None
    assert done.json["platform_fee_usdt"] == str(
        sum(row["platform_fee_usdt"] for row in shared_rows(db, conversion_id))
    )
    assert_invariants_hold(db)


@pytest.mark.parametrize("outcome", [completed, failed], ids=["completed", "failed"])
def test_the_same_callback_again_answers_200_unchanged_and_changes_nothing(
    app: Flask,
    db: Database,
    conversion_id: str,
    outcome: Callable[..., dict[str, Any]],
) -> None:
    first = call_back(app, outcome(conversion_id))
    assert first.status_code == 200
    before = snapshot(db)

    again = call_back(app, outcome(conversion_id))

    assert again.status_code == 200
    assert again.json["outcome"] == "unchanged"
    assert snapshot(db) == before
    assert_invariants_hold(db)


@pytest.mark.parametrize(
    ("recorded", "contradiction"),
    [
        (completed, {"actual_usdt_received": "23.000002"}),
        (completed, {"swap_id": "swap-other"}),
        (completed, {"tx_hash": "0xother"}),
        (completed, {"status": "failed"}),
        (failed, {"swap_id": "swap-other"}),
    ],
    ids=[
        "other-amount",
        "other-swap-id",
        "other-tx-hash",
        "failed-after-completed",
        "failed-with-other-swap-id",
    ],
)
def test_a_callback_contradicting_the_recorded_one_is_409_and_changes_nothing(
    app: Flask,
    db: Database,
    conversion_id: str,
    recorded: Callable[..., dict[str, Any]],
    contradiction: dict[str, Any],
    logs: LogCapture,
) -> None:
    assert call_back(app, recorded(conversion_id)).status_code == 200
    before = snapshot(db)

    refused = call_back(app, completed(conversion_id, **contradiction))

    assert refused.status_code == 409
    assert refused.json["error"]["code"] == "conflict"
    assert refused.json["error"]["message"]
    assert snapshot(db) == before
    # A completion on either side: the shares may rest on a wrong amount.
    [alarm] = logs.lines("swap_callback_conflict", logging.ERROR) + logs.lines(
        "swap_completed_after_failure", logging.ERROR
    )
    assert alarm["batch_conversion_id"] == conversion_id
    assert_invariants_hold(db)


# --- failed ------------------------------------------------------------------


def test_a_failed_callback_returns_the_rows_to_pending_for_a_later_conversion(
    app: Flask, db: Database, conversion_id: str
) -> None:
    rows = [row["id"] for row in shared_rows(db, conversion_id)]

    done = call_back(app, failed(conversion_id))

    assert done.status_code == 200
    assert (done.json["outcome"], done.json["rows_released"]) == ("failed", 3)
    [conversion] = conversions(db)
    assert conversion["status"] == "failed"
    assert conversion["finished_at"] is not None
    released = query(
        db,
        "SELECT id, conversion_status, batch_conversion_id, accumulated_usdt"
        " FROM payout_accumulation ORDER BY id",
    )
    assert [(row["id"], row["conversion_status"]) for row in released] == [
        (row_id, "pending") for row_id in rows
    ]
    assert {row["batch_conversion_id"] for row in released} == {None}
    assert_invariants_hold(db)

    second_id = claim_pending(app, db)
    members = query(
        db,
        "SELECT batch_conversion_id::text AS conversion, accumulation_id"
        " FROM batch_conversion_members ORDER BY 1, 2",
    )
    assert sorted(members, key=lambda m: m["conversion"] != conversion_id) == [
        {"conversion": conversion_id, "accumulation_id": row_id} for row_id in rows
    ] + [{"conversion": second_id, "accumulation_id": row_id} for row_id in rows]

    done_again = call_back(app, completed(second_id, swap_id="swap-8b4c"))

    assert done_again.status_code == 200
    assert_shared_exactly(db, second_id, "23.000001")
    assert_invariants_hold(db)


def test_a_completed_callback_after_a_failure_is_409_and_logged_at_error(
    app: Flask, db: Database, conversion_id: str, logs: LogCapture
) -> None:
    assert call_back(app, failed(conversion_id)).status_code == 200
    before = snapshot(db)

    refused = call_back(app, completed(conversion_id))

    assert refused.status_code == 409
    assert refused.json["error"]["code"] == "conflict"
    assert snapshot(db) == before
    [line] = logs.lines("swap_completed_after_failure", logging.ERROR)
    assert line["batch_conversion_id"] == conversion_id
    assert line["actual_usdt_received"] == "23.000001"
    assert_invariants_hold(db)


# --- refused -----------------------------------------------------------------


def test_a_callback_for_an_unknown_conversion_is_404_and_changes_nothing(
    app: Flask, db: Database, conversion_id: str
) -> None:
    before = snapshot(db)

    refused = call_back(app, completed(str(uuid.uuid4())))

    assert refused.status_code == 404
    assert refused.json["error"]["code"] == "not_found"
    assert snapshot(db) == before


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != name}


MALFORMED: dict[str, Callable[[str], Any]] = {
    "bad-uuid": lambda cid: completed(cid, batch_conversion_id=cid[:-1]),
    "no-uuid": lambda cid: without(completed(cid), "batch_conversion_id"),
    "bad-status": lambda cid: completed(cid, status="done"),
    "no-status": lambda cid: without(completed(cid), "status"),
    "negative-amount": lambda cid: completed(cid, actual_usdt_received="-23.000001"),
    "seven-decimals": lambda cid: completed(cid, actual_usdt_received="23.0000001"),
    "nan-amount": lambda cid: completed(cid, actual_usdt_received="NaN"),
    "amount-too-large": lambda cid: completed(cid, actual_usdt_received="1e30"),
    "amount-not-a-number": lambda cid: completed(cid, actual_usdt_received="lots"),
    "completed-without-amount": lambda cid: completed(cid, actual_usdt_received=None),
    "completed-without-tx-hash": lambda cid: completed(cid, tx_hash=None),
    "completed-without-swap-id": lambda cid: completed(cid, swap_id=None),
    "swap-id-not-a-string": lambda cid: completed(cid, swap_id=7),
    "not-json": lambda cid: b"status=completed&batch_conversion_id=" + cid.encode(),
    "json-array": lambda cid: [completed(cid)],
    "truncated-json": lambda cid: json.dumps(completed(cid)).encode()[:-1],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_callback_is_400_and_changes_nothing(
    app: Flask, db: Database, conversion_id: str, case: str
) -> None:
    before = snapshot(db)

    refused = call_back(app, MALFORMED[case](conversion_id))

    assert refused.status_code == 400
    assert refused.json["error"]["code"] == "invalid"
    assert refused.json["error"]["message"]
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token"], ids=["missing", "wrong"]
)
def test_a_callback_without_internal_auth_is_401_and_changes_nothing(
    app: Flask, db: Database, conversion_id: str, authorization: str | None
) -> None:
    before = snapshot(db)
    headers = {} if authorization is None else {"Authorization": authorization}

    refused = call_back(app, completed(conversion_id), headers=headers)

    assert refused.status_code == 401
    assert refused.json["error"]["code"] == "unauthorized"
    assert snapshot(db) == before


# --- order and concurrency ---------------------------------------------------


@pytest.mark.parametrize("outcome", [completed, failed], ids=["completed", "failed"])
def test_a_callback_before_the_acceptance_was_seen_is_taken_and_never_undone(
    app: Flask,
    db: Database,
    swap_sender: Any,
    outcome: Callable[..., dict[str, Any]],
) -> None:
    swap_sender.fail_with = "connection reset"  # the acceptance is never seen
    conversion_id = claim(app, db)
    assert conversions(db)[0]["status"] == "claimed"

    taken = call_back(app, outcome(conversion_id))

    assert taken.status_code == 200
    assert taken.json["outcome"] == outcome(conversion_id)["status"]
    finished = conversions(db)[0]
    assert finished["status"] == outcome(conversion_id)["status"]

    # The task's resend comes due: it is withdrawn, not sent, since the
    # conversion it asks for is already finished.
    swap_sender.fail_with = None
    query(db, "UPDATE outbox SET next_attempt_at = now() RETURNING id")
    run = run_now(app)

    assert run.status_code == 200
    assert conversion_id not in [task.dedup_key for task in swap_sender.sent]
    [task] = query(
        db,
        "SELECT sent_at, last_error FROM outbox WHERE dedup_key = %s",
        (conversion_id,),
    )
    assert task["sent_at"] is not None
    assert task["last_error"].startswith("withdrawn")

    # And should an acceptance be seen late all the same, it undoes nothing.
    with db.transaction() as cur:
        conversion.mark_accepted(
            cur,
            Task(
                1,
                "gcmicrobatchprocessor",
                "x",
                {"kind": "swap", "batch_conversion_id": conversion_id},
                {},
                conversion_id,
                1,
            ),
        )
    [after] = [
        row
        for row in conversions(db)
        if str(row["batch_conversion_id"]) == conversion_id
    ]
    assert after["status"] == finished["status"]
    assert after["accepted_at"] is None
    assert after["updated_at"] == finished["updated_at"]
    if after["status"] == "completed":
        assert_shared_exactly(db, conversion_id, "23.000001")
    assert_invariants_hold(db)


def test_ten_concurrent_identical_callbacks_apply_once(
    app: Flask,
    db: Database,
    conversion_id: str,
    serve: Callable[[Flask], str],
    logs: LogCapture,
) -> None:
    base = serve(app)
    start = threading.Barrier(10)
    body = completed(conversion_id)

    def call() -> requests.Response:
        start.wait(10)
        return requests.post(
            f"{base}/swap-executed", json=body, headers=INTERNAL_HEADERS, timeout=30
        )

    answers: list[requests.Response] = []
    threads = [
        threading.Thread(target=lambda: answers.append(call())) for _ in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert [answer.status_code for answer in answers] == [200] * 10
    outcomes = sorted(answer.json()["outcome"] for answer in answers)
    assert outcomes == ["completed"] + ["unchanged"] * 9
    assert len(logs.lines("conversion_completed")) == 1
    assert_shared_exactly(db, conversion_id, "23.000001")
    assert_invariants_hold(db)


@pytest.mark.parametrize("received", ["1000000", "5.5"], ids=["far_over", "far_under"])
def test_usdt_far_from_the_claimed_value_is_shared_and_pages(
    app: Flask, db: Database, conversion_id: str, logs: LogCapture, received: str
) -> None:
    # Claimed at 12 USD: a forged or mistaken amount must not pass quietly,
    # yet only the executor knows what arrived, so it is still shared.
    done = call_back(app, completed(conversion_id, actual_usdt_received=received))

    assert done.status_code == 200
    assert_shared_exactly(db, conversion_id, received)
    [alarm] = logs.lines("swap_rate_implausible", logging.ERROR)
    assert alarm["batch_conversion_id"] == conversion_id
    assert alarm["actual_usdt_received"] == received
    assert_invariants_hold(db)


def test_usdt_near_the_claimed_value_raises_no_alarm(
    app: Flask, db: Database, conversion_id: str, logs: LogCapture
) -> None:
    assert call_back(app, completed(conversion_id)).status_code == 200

    assert logs.lines("swap_rate_implausible") == []
