"""``POST /payout-completed``: the payout executor's outcome, applied once.

DESIGN.md sections 3 and 4: ``completed`` marks the rows paid and records
what reached the wallet; ``failed`` releases the rows for the next run and
keeps the membership; the same callback again changes nothing; one that
contradicts what was recorded, or spent another amount than the batch
holds, is refused with 409 and changes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
import requests
from conftest import INTERNAL_HEADERS, RecordingSender
from flask import Flask
from payout_support import (
    MANUAL_RUN,
    add_client,
    add_payments,
    assert_invariants_hold,
    batches,
    close_app,
    make_batch_app,
    members,
    query,
    rows,
    snapshot,
)

from shared.db import Database

CLIENT = -1003296084379
TX_HASH = "0x5e1f0c3a9b7d2e4f6a8c0b1d3e5f7a9c2b4d6e8f0a1c3e5b7d9f1a3c5e7b9d0f"


@pytest.fixture
def sender() -> RecordingSender:
    return RecordingSender()


@pytest.fixture
def app(database_url: str, sender: RecordingSender) -> Iterator[Flask]:
    app = make_batch_app(database_url, sender)
    yield app
    close_app(app)


def process(app: Flask) -> dict[str, Any]:
    run: Any = app.test_client().post("/process", headers=MANUAL_RUN)
    assert run.status_code == 200, run.json
    assert run.json["outcome"] == "succeeded", run.json
    figures: dict[str, Any] = run.json["figures"]
    return figures


@pytest.fixture
def batch(app: Flask, db: Database) -> dict[str, Any]:
    """One batch of two rows, 2.5 USDT, accepted by the executor."""
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["1.5", "1"])
    process(app)
    [claimed] = batches(db)
    assert claimed["status"] == "sent"
    return claimed


def completed(batch: dict[str, Any], **changes: Any) -> dict[str, Any]:
    body = {
        "batch_id": str(batch["batch_id"]),
        "status": "completed",
        "tx_hash": TX_HASH,
        "amount_usdt": "2.5",
        "amount_sent": "2.4871",
        "currency": "usdt",
    }
    body.update(changes)
    return body


def failed(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_id": str(batch["batch_id"]),
        "status": "failed",
        "tx_hash": None,
        "amount_usdt": None,
        "amount_sent": None,
        "currency": None,
    }


def callback(app: Flask, body: dict[str, Any]) -> Any:
    return app.test_client().post(
        "/payout-completed", headers=INTERNAL_HEADERS, json=body
    )


def errors_logged(caplog: pytest.LogCaptureFixture, message: str) -> list[Any]:
    return [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and record.getMessage() == message
    ]


def test_completed_marks_the_rows_paid_and_records_what_reached_the_wallet(
    app: Flask, db: Database, batch: dict[str, Any]
) -> None:
    answer = callback(app, completed(batch))

    assert answer.status_code == 200, answer.json
    assert answer.json["outcome"] == "completed"
    assert answer.json["row_count"] == 2
    assert answer.json["total_usdt"] == "2.5"
    [done] = batches(db)
    assert done["status"] == "completed"
    assert done["tx_hash"] == TX_HASH
    assert done["amount_sent"] == Decimal("2.4871")
    assert done["sent_currency"] == "usdt"
    assert done["finished_at"] is not None
    paid = rows(db)
    assert [row["is_paid_out"] for row in paid] == [True, True]
    assert all(row["paid_out_at"] is not None for row in paid)
    assert {row["payout_batch_id"] for row in paid} == {batch["batch_id"]}
    assert_invariants_hold(db)


def test_amounts_given_as_json_numbers_are_read_from_their_text(
    app: Flask, db: Database, batch: dict[str, Any]
) -> None:
    fields = json.dumps(
        {"batch_id": str(batch["batch_id"]), "status": "completed", "tx_hash": TX_HASH}
    )
    body = fields.replace(
        "}",
        ', "amount_usdt": 2.500000, "amount_sent": 0.000000000000000001,'
        ' "currency": "eth"}',
    )

    answer: Any = app.test_client().post(
        "/payout-completed",
        headers={**INTERNAL_HEADERS, "Content-Type": "application/json"},
        data=body,
    )

    assert answer.status_code == 200, answer.json
    [done] = batches(db)
    assert done["amount_sent"] == Decimal("1E-18")
    assert_invariants_hold(db)


def test_the_same_callback_again_answers_200_and_changes_nothing(
    app: Flask, db: Database, batch: dict[str, Any]
) -> None:
    callback(app, completed(batch))
    before = snapshot(db)

    again = callback(app, completed(batch, amount_sent="2.487100", currency="USDT"))

    assert again.status_code == 200, again.json
    assert again.json["outcome"] == "unchanged"
    assert again.json["status"] == "completed"
    assert snapshot(db) == before
    assert_invariants_hold(db)


def test_an_amount_other_than_the_batch_total_is_409_logged_and_changes_nothing(
    app: Flask,
    db: Database,
    batch: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = snapshot(db)

    answer = callback(app, completed(batch, amount_usdt="2.500001"))

    assert answer.status_code == 409
    assert answer.json["error"]["code"] == "conflict"
    assert snapshot(db) == before
    [line] = errors_logged(caplog, "payout_amount_mismatch")
    assert line.batch_id == str(batch["batch_id"])
    assert line.amount_usdt == Decimal("2.500001")
    assert line.total_usdt == Decimal("2.5")
    assert_invariants_hold(db)


@pytest.mark.parametrize(
    "change",
    [
        {"tx_hash": "0xother"},
        {"amount_sent": "2.4872"},
        {"currency": "usdc"},
        {"status": "failed"},
    ],
    ids=["other_tx_hash", "other_amount_sent", "other_currency", "then_failed"],
)
def test_a_repeat_that_contradicts_the_recorded_completion_is_409_and_pages(
    app: Flask,
    db: Database,
    batch: dict[str, Any],
    change: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    callback(app, completed(batch))
    before = snapshot(db)

    answer = callback(app, completed(batch, **change))

    assert answer.status_code == 409
    assert answer.json["error"]["code"] == "conflict"
    assert snapshot(db) == before
    # A second transfer, or a completion recorded that never happened.
    [line] = errors_logged(caplog, "payout_callback_conflict")
    assert line.batch_id == str(batch["batch_id"])
    assert_invariants_hold(db)


def test_failed_releases_the_rows_keeps_the_membership_and_the_next_run_pays(
    app: Flask, db: Database, batch: dict[str, Any], sender: RecordingSender
) -> None:
    held = [m["accumulation_id"] for m in members(db, batch["batch_id"])]

    answer = callback(app, failed(batch))

    assert answer.status_code == 200, answer.json
    assert answer.json["outcome"] == "failed"
    assert answer.json["rows_released"] == 2
    [dropped] = batches(db)
    assert dropped["status"] == "failed"
    assert dropped["finished_at"] is not None
    assert [row["payout_batch_id"] for row in rows(db)] == [None, None]
    assert not any(row["is_paid_out"] for row in rows(db))
    assert [m["accumulation_id"] for m in members(db, batch["batch_id"])] == held
    assert_invariants_hold(db)

    again = callback(app, failed(batch))
    assert again.status_code == 200
    assert again.json["outcome"] == "unchanged"

    figures = process(app)

    assert figures["batches_created"] == 1
    old, new = batches(db)
    assert old["batch_id"] == batch["batch_id"]
    assert (new["total_usdt"], new["row_count"]) == (Decimal("2.5"), 2)
    assert [m["accumulation_id"] for m in members(db, new["batch_id"])] == held
    assert [m["accumulation_id"] for m in members(db, old["batch_id"])] == held
    assert {row["payout_batch_id"] for row in rows(db)} == {new["batch_id"]}
    assert [task.dedup_key for task in sender.sent] == [
        str(old["batch_id"]),
        str(new["batch_id"]),
    ]
    assert_invariants_hold(db)

    paid = callback(app, completed(new))

    assert paid.status_code == 200, paid.json
    assert all(row["is_paid_out"] for row in rows(db))
    assert_invariants_hold(db)


def test_completed_after_failed_is_409_logged_at_error_and_changes_nothing(
    app: Flask,
    db: Database,
    batch: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    callback(app, failed(batch))
    process(app)  # the released rows are in a new batch now
    before = snapshot(db)

    answer = callback(app, completed(batch))

    assert answer.status_code == 409
    assert answer.json["error"]["code"] == "conflict"
    assert snapshot(db) == before
    [line] = errors_logged(caplog, "payout_completed_after_failure")
    assert line.batch_id == str(batch["batch_id"])
    assert line.client_id == CLIENT
    assert line.tx_hash == TX_HASH
    assert_invariants_hold(db)


def test_a_callback_for_an_unknown_batch_is_404(
    app: Flask, db: Database, batch: dict[str, Any]
) -> None:
    before = snapshot(db)
    unknown = {**batch, "batch_id": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"}

    answer = callback(app, completed(unknown))

    assert answer.status_code == 404
    assert answer.json["error"]["code"] == "not_found"
    assert snapshot(db) == before


MALFORMED = {
    "bad_uuid": lambda body: {**body, "batch_id": "batch-1"},
    "missing_batch_id": lambda body: {k: v for k, v in body.items() if k != "batch_id"},
    "bad_status": lambda body: {**body, "status": "done"},
    "seven_decimal_amount_usdt": lambda body: {**body, "amount_usdt": "2.5000001"},
    "negative_amount_usdt": lambda body: {**body, "amount_usdt": "-2.5"},
    "negative_amount_sent": lambda body: {**body, "amount_sent": "-0.1"},
    "amount_usdt_not_a_number": lambda body: {**body, "amount_usdt": "2.5 usdt"},
    "amount_usdt_a_boolean": lambda body: {**body, "amount_usdt": True},
    "amount_usdt_not_finite": lambda body: {**body, "amount_usdt": "NaN"},
    "amount_usdt_too_large": lambda body: {**body, "amount_usdt": "1e30"},
    "amount_sent_nineteen_decimals": lambda body: {
        **body,
        "amount_sent": "0.0000000000000000001",
    },
    "tx_hash_not_a_string": lambda body: {**body, "tx_hash": 12345},
    "bad_currency": lambda body: {**body, "currency": "us dt"},
    "completed_without_tx_hash": lambda body: {**body, "tx_hash": None},
    "completed_without_amount_usdt": lambda body: {
        k: v for k, v in body.items() if k != "amount_usdt"
    },
    "completed_without_amount_sent": lambda body: {**body, "amount_sent": None},
    "completed_without_currency": lambda body: {
        k: v for k, v in body.items() if k != "currency"
    },
}


@pytest.mark.parametrize("mangle", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_callback_is_400_and_changes_nothing(
    app: Flask, db: Database, batch: dict[str, Any], mangle: Any
) -> None:
    before = snapshot(db)

    answer = callback(app, mangle(completed(batch)))

    assert answer.status_code == 400
    assert answer.json["error"]["code"] == "invalid"
    assert isinstance(answer.json["error"]["message"], str)
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "raw",
    [b"status=completed", b"[]", b'{"batch_id": ', b"\xff\xfe"],
    ids=["form", "array", "truncated", "not_utf8"],
)
def test_a_body_that_is_not_a_json_object_is_400(
    app: Flask, db: Database, batch: dict[str, Any], raw: bytes
) -> None:
    before = snapshot(db)

    answer: Any = app.test_client().post(
        "/payout-completed",
        headers={**INTERNAL_HEADERS, "Content-Type": "application/json"},
        data=raw,
    )

    assert answer.status_code == 400
    assert answer.json["error"]["code"] == "invalid"
    assert snapshot(db) == before


class ExecutorCallingBackFirst:
    """An executor that pays and calls back before its 202 reaches us."""

    def __init__(self) -> None:
        self.app: Flask | None = None
        self.callbacks: list[int] = []

    def send(self, task: Any) -> None:
        assert self.app is not None
        answer = callback(self.app, completed(task.payload))
        self.callbacks.append(answer.status_code)


def test_a_callback_before_the_acceptance_is_taken_and_the_acceptance_changes_nothing(
    database_url: str, db: Database
) -> None:
    executor = ExecutorCallingBackFirst()
    app = executor.app = make_batch_app(database_url, executor)
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["1.5", "1"])

    try:
        figures = process(app)
    finally:
        close_app(app)

    assert figures["tasks_sent"] == 1  # the acceptance came after the callback
    assert executor.callbacks == [200]
    [done] = batches(db)
    assert done["status"] == "completed"
    assert done["tx_hash"] == TX_HASH
    assert done["accepted_at"] is None
    assert all(row["is_paid_out"] for row in rows(db))
    assert_invariants_hold(db)


def test_a_callback_for_a_batch_still_claimed_is_taken_and_stays_final(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["1.5", "1"])
    sender.fail_with = "timed out"  # the executor got it; its answer was lost
    process(app)
    [claimed] = batches(db)
    assert claimed["status"] == "claimed"

    answer = callback(app, completed(claimed))

    assert answer.status_code == 200, answer.json
    assert answer.json["outcome"] == "completed"
    sender.fail_with = None
    with db.transaction() as cur:
        cur.execute("UPDATE outbox SET next_attempt_at = now()")
    process(app)  # the retry is due: the task is closed one way or another

    [done] = batches(db)
    assert done["status"] == "completed"
    assert done["tx_hash"] == TX_HASH
    assert all(row["is_paid_out"] for row in rows(db))
    [task] = query(db, "SELECT sent_at FROM outbox")
    assert task["sent_at"] is not None
    assert_invariants_hold(db)


def test_ten_identical_callbacks_at_once_apply_once(
    app: Flask, db: Database, batch: dict[str, Any], serve: Any
) -> None:
    url = serve(app) + "/payout-completed"
    body = json.dumps(completed(batch))
    start = threading.Barrier(10)

    def post(_: int) -> requests.Response:
        start.wait()
        return requests.post(
            url,
            data=body,
            headers={**INTERNAL_HEADERS, "Content-Type": "application/json"},
            timeout=30,
        )

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(10)))

    assert [answer.status_code for answer in answers] == [200] * 10
    outcomes = sorted(answer.json()["outcome"] for answer in answers)
    assert outcomes == ["completed"] + ["unchanged"] * 9
    paid = rows(db)
    assert all(row["is_paid_out"] for row in paid)
    assert len({row["paid_out_at"] for row in paid}) == 1
    assert_invariants_hold(db)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic eA=="}],
    ids=["none", "wrong_token", "not_bearer"],
)
def test_a_callback_without_the_bearer_token_is_401_and_changes_nothing(
    app: Flask, db: Database, batch: dict[str, Any], headers: dict[str, str]
) -> None:
    before = snapshot(db)

    answer: Any = app.test_client().post(
        "/payout-completed", headers=headers, json=completed(batch)
    )

    assert answer.status_code == 401
    assert answer.json["error"]["code"] == "unauthorized"
    assert snapshot(db) == before
    assert query(db, "SELECT count(*) AS n FROM payout_batches")[0]["n"] == 1
