"""``POST /process``: one payout batch per client whose converted USDT
reaches its threshold, with exactly the rows summed and its payout task.

DESIGN.md sections 2 to 5: only converted rows count, the wallet is the
one on record at claim time, concurrent runs never take a row twice, and a
payment converted while the claim runs is left for the next run.
"""

from __future__ import annotations

import threading
import time
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
    OTHER_WALLET,
    WALLET,
    StubExecutor,
    add_client,
    add_payments,
    assert_invariants_hold,
    batches,
    close_app,
    complete_conversion,
    make_batch_app,
    members,
    query,
    rows,
    snapshot,
)

from gcbatchprocessor import payouts
from shared.db import Database

CLIENT = -1003296084379
OTHER_CLIENT = -1001000000002
SLOT = "2025-06-01T10:05:00Z"


@pytest.fixture
def sender() -> RecordingSender:
    return RecordingSender()


@pytest.fixture
def app(database_url: str, sender: RecordingSender) -> Iterator[Flask]:
    app = make_batch_app(database_url, sender)
    yield app
    close_app(app)


def process(app: Flask) -> Any:
    """A run by hand: its own slot, so every call runs."""
    return app.test_client().post("/process", headers=MANUAL_RUN)


def run_figures(app: Flask) -> dict[str, Any]:
    run = process(app)
    assert run.status_code == 200, run.json
    assert run.json["outcome"] == "succeeded", run.json
    figures: dict[str, Any] = run.json["figures"]
    return figures


def test_converted_usdt_reaching_the_threshold_becomes_one_batch_of_those_rows(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    summed = add_payments(db, CLIENT, ["1.25", "0.5", "0.250001"])  # 2.000001

    run: Any = app.test_client().post(
        "/process",
        headers={**INTERNAL_HEADERS, "X-CloudScheduler-ScheduleTime": SLOT},
    )

    assert run.status_code == 200, run.json
    assert run.json["outcome"] == "succeeded"
    figures = run.json["figures"]
    assert figures["batches_created"] == 1
    assert figures["rows_claimed"] == 3
    assert figures["usdt_claimed"] == "2.000001"
    assert figures["clients_without_wallet"] == 0
    [batch] = batches(db)
    batch_id = str(batch["batch_id"])
    assert batch["client_id"] == CLIENT
    assert batch["total_usdt"] == Decimal("2.000001")
    assert batch["row_count"] == 3
    assert (batch["wallet_address"], batch["payout_currency"]) == (WALLET, "usdt")
    assert batch["payout_network"] == "eth"
    assert [m["accumulation_id"] for m in members(db, batch_id)] == summed
    assert [m["accumulated_usdt"] for m in members(db, batch_id)] == [
        Decimal("1.25"),
        Decimal("0.5"),
        Decimal("0.250001"),
    ]
    assert {str(row["payout_batch_id"]) for row in rows(db)} == {batch_id}
    assert not any(row["is_paid_out"] for row in rows(db))

    [task] = sender.sent
    assert task.dedup_key == batch_id
    assert task.target_url == "http://executor.test/payouts"
    assert task.payload == {
        "kind": "payout",
        "batch_id": batch_id,
        "client_id": CLIENT,
        "amount_usdt": "2.000001",
        "payout_currency": "usdt",
        "payout_network": "eth",
        "wallet_address": WALLET,
        "row_count": 3,
        "callback_url": "http://batch.test/payout-completed",
    }
    assert Decimal(task.payload["amount_usdt"]) == batch["total_usdt"]
    assert_invariants_hold(db)


def test_the_executor_gets_the_task_over_http_keyed_by_the_batch_id(
    database_url: str, db: Database, serve: Any
) -> None:
    executor = StubExecutor(serve)
    app = make_batch_app(database_url, PAYOUT_EXECUTOR_URL=executor.url)
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["1.5", "1"])

    try:
        figures = run_figures(app)
    finally:
        close_app(app)

    assert figures["tasks_sent"] == 1
    [batch] = batches(db)
    batch_id = str(batch["batch_id"])
    [delivery] = executor.received
    assert delivery["headers"]["Idempotency-Key"] == batch_id
    assert delivery["headers"]["Authorization"] == INTERNAL_HEADERS["Authorization"]
    assert delivery["body"] == {
        "kind": "payout",
        "batch_id": batch_id,
        "client_id": CLIENT,
        "amount_usdt": "2.5",
        "payout_currency": "usdt",
        "payout_network": "eth",
        "wallet_address": WALLET,
        "row_count": 2,
        "callback_url": "http://batch.test/payout-completed",
    }
    assert batch["status"] == "sent"
    assert batch["accepted_at"] is not None


def test_rows_pending_or_swapping_never_count_toward_the_threshold(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["1.99"])
    add_payments(db, CLIENT, ["100"], status="pending")
    add_payments(db, CLIENT, ["100"], status="swapping")
    before = snapshot(db)

    figures = run_figures(app)

    assert figures["batches_created"] == 0
    assert figures["rows_claimed"] == 0
    assert sender.sent == []
    assert snapshot(db) == before


def test_a_client_below_its_threshold_is_untouched_and_one_at_it_is_paid(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    at_threshold = add_payments(db, CLIENT, ["1.5", "0.5"])
    add_client(db, OTHER_CLIENT, threshold="2")
    below = add_payments(db, OTHER_CLIENT, ["1.5", "0.499999"])

    figures = run_figures(app)

    assert figures["batches_created"] == 1
    [batch] = batches(db)
    assert batch["client_id"] == CLIENT
    assert batch["total_usdt"] == Decimal(2)
    claimed = {row["id"]: row["payout_batch_id"] for row in rows(db)}
    assert [claimed[row_id] for row_id in at_threshold] == [batch["batch_id"]] * 2
    assert [claimed[row_id] for row_id in below] == [None, None]
    assert [task.payload["client_id"] for task in sender.sent] == [CLIENT]
    assert_invariants_hold(db)


def test_instant_clients_and_clients_without_a_wallet_are_never_paid(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    instant = -1001000000003
    add_client(db, instant, threshold=None, strategy="instant")
    add_payments(db, instant, ["50"])
    add_client(db, CLIENT, threshold="2", wallet=None)
    add_payments(db, CLIENT, ["50"])
    below_without_wallet = -1001000000004
    add_client(db, below_without_wallet, threshold="2", wallet=None)
    add_payments(db, below_without_wallet, ["1"])
    before = snapshot(db)

    figures = run_figures(app)

    assert figures["batches_created"] == 0
    assert figures["clients_without_wallet"] == 1
    assert sender.sent == []
    assert snapshot(db) == before

    with db.transaction() as cur:
        cur.execute(
            "UPDATE clients SET wallet_address = %s, payout_currency = 'usdt',"
            " payout_network = 'eth' WHERE client_id = %s",
            (WALLET, CLIENT),
        )
    figures = run_figures(app)

    assert figures["batches_created"] == 1
    assert figures["clients_without_wallet"] == 0
    assert [batch["client_id"] for batch in batches(db)] == [CLIENT]
    assert_invariants_hold(db)


def test_a_batch_keeps_the_wallet_on_record_when_it_was_claimed(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    first_rows = add_payments(db, CLIENT, ["3"])
    sender.fail_with = "HTTP 503: executor restarting"
    run_figures(app)  # claimed; the task is not delivered yet
    [first] = batches(db)

    with db.transaction() as cur:
        cur.execute(
            "UPDATE clients SET wallet_address = %s, payout_currency = 'shib',"
            " payout_network = 'bsc' WHERE client_id = %s",
            (OTHER_WALLET, CLIENT),
        )
        # The retry is due now, as it would be once its backoff has passed.
        cur.execute("UPDATE outbox SET next_attempt_at = now()")
    second_rows = add_payments(db, CLIENT, ["4"])
    sender.fail_with = None
    figures = run_figures(app)

    assert figures["batches_created"] == 1
    assert figures["tasks_sent"] == 2
    old, new = batches(db)
    assert old["batch_id"] == first["batch_id"]
    assert (old["wallet_address"], old["payout_currency"]) == (WALLET, "usdt")
    assert old["payout_network"] == "eth"
    assert (new["wallet_address"], new["payout_currency"]) == (OTHER_WALLET, "shib")
    assert new["payout_network"] == "bsc"
    assert [m["accumulation_id"] for m in members(db, old["batch_id"])] == first_rows
    assert [m["accumulation_id"] for m in members(db, new["batch_id"])] == second_rows
    sent = {task.dedup_key: task.payload for task in sender.sent}
    resent = sent[str(old["batch_id"])]
    assert (resent["wallet_address"], resent["payout_currency"]) == (WALLET, "usdt")
    assert resent["payout_network"] == "eth"
    fresh = sent[str(new["batch_id"])]
    assert (fresh["wallet_address"], fresh["payout_currency"]) == (
        OTHER_WALLET,
        "shib",
    )
    assert fresh["payout_network"] == "bsc"
    assert_invariants_hold(db)


def _twenty_clients_over_threshold(db: Database) -> dict[int, list[int]]:
    owed = {}
    for number in range(20):
        client_id = -1005000000000 - number
        add_client(db, client_id, threshold="2")
        owed[client_id] = add_payments(db, client_id, ["1", "0.75", "0.5"])
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["1.5"])  # below: never claimed
    return owed


def _assert_each_row_claimed_once(db: Database, owed: dict[int, list[int]]) -> None:
    claims = query(
        db,
        "SELECT accumulation_id, count(*) AS batches FROM payout_batch_members"
        " GROUP BY accumulation_id",
    )
    assert {claim["batches"] for claim in claims} == {1}
    assert sorted(claim["accumulation_id"] for claim in claims) == sorted(
        row_id for row_ids in owed.values() for row_id in row_ids
    )
    totals = query(
        db,
        """
        SELECT b.batch_id, b.total_usdt, b.row_count,
               sum(r.accumulated_usdt) AS held, count(r.id) AS held_rows
        FROM payout_batches b
        JOIN payout_accumulation r ON r.payout_batch_id = b.batch_id
        GROUP BY b.batch_id
        """,
    )
    for total in totals:
        assert total["total_usdt"] == total["held"]
        assert total["row_count"] == total["held_rows"]


def test_concurrent_process_calls_never_put_a_row_in_two_batches(
    app: Flask, db: Database, sender: RecordingSender, serve: Any
) -> None:
    owed = _twenty_clients_over_threshold(db)
    url = serve(app) + "/process"
    start = threading.Barrier(10)

    def call(_: int) -> requests.Response:
        start.wait()
        return requests.post(url, headers=MANUAL_RUN, timeout=60)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(call, range(10)))

    assert [answer.status_code for answer in answers] == [200] * 10
    outcomes = [answer.json()["outcome"] for answer in answers]
    assert set(outcomes) <= {"succeeded", "busy"}
    created = sum(
        answer.json()["figures"].get("batches_created", 0) for answer in answers
    )
    assert created == 20
    assert sorted(batch["client_id"] for batch in batches(db)) == sorted(owed)
    _assert_each_row_claimed_once(db, owed)
    keys = [task.dedup_key for task in sender.sent]
    assert sorted(keys) == sorted(str(batch["batch_id"]) for batch in batches(db))
    assert_invariants_hold(db)


def test_claims_running_at_once_without_the_job_lock_take_each_row_once(
    app: Flask, db: Database
) -> None:
    # The job lock can expire under a run slower than its bound; the claim
    # statement must then still be safe on its own. Overlapping claims skip
    # each other's locked rows, so one of them may leave a client's rows for
    # the next run (never a row twice): the run after them takes the rest.
    owed = _twenty_clients_over_threshold(db)
    settings = app.extensions["payout_settings"]
    start = threading.Barrier(10)

    def claim(_: int) -> dict[str, Any]:
        start.wait()
        return payouts.process(db, settings)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(claim, range(10)))
    claimed = query(
        db,
        "SELECT accumulation_id FROM payout_batch_members"
        " GROUP BY accumulation_id HAVING count(*) > 1",
    )
    assert claimed == []  # no row twice, while they overlapped
    assert_invariants_hold(db)
    results.append(payouts.process(db, settings))

    assert sum(result["rows_claimed"] for result in results) == 60
    _assert_each_row_claimed_once(db, owed)
    assert_invariants_hold(db)


@pytest.fixture
def slow_claims(db: Database) -> Iterator[None]:
    """Every batch insert sleeps a second: the claim statement runs long."""
    with db.transaction() as cur:
        cur.execute(
            """
            CREATE FUNCTION test_slow_payout_claim() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_sleep(1);
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_slow_payout_claim
                BEFORE INSERT ON payout_batches
                FOR EACH ROW EXECUTE FUNCTION test_slow_payout_claim();
            """
        )
    try:
        yield
    finally:
        with db.transaction() as cur:
            cur.execute(
                "DROP TRIGGER test_slow_payout_claim ON payout_batches;"
                " DROP FUNCTION test_slow_payout_claim();"
            )


def _claim_is_sleeping(db: Database) -> bool:
    found = query(
        db,
        "SELECT 1 FROM pg_stat_activity"
        " WHERE application_name = %s AND wait_event = 'PgSleep'",
        (payouts.SERVICE,),
    )
    return bool(found)


def _wait_until(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.usefixtures("slow_claims")
def test_a_payment_converted_while_the_claim_runs_is_not_swept_in(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    summed = add_payments(db, CLIENT, ["1.5", "1"])
    [late] = add_payments(db, CLIENT, ["3"], status="swapping")
    answers: list[Any] = []
    run = threading.Thread(target=lambda: answers.append(process(app)))

    run.start()
    _wait_until(lambda: _claim_is_sleeping(db))
    complete_conversion(db, [late], "3")  # committed mid-statement
    still_running = run.is_alive() and _claim_is_sleeping(db)
    run.join(timeout=30)

    assert still_running
    [answer] = answers
    assert answer.status_code == 200, answer.json
    assert answer.json["figures"]["rows_claimed"] == 2
    assert answer.json["figures"]["usdt_claimed"] == "2.5"
    [batch] = batches(db)
    assert batch["total_usdt"] == Decimal("2.5")
    assert [m["accumulation_id"] for m in members(db, batch["batch_id"])] == summed
    [late_row] = [row for row in rows(db) if row["id"] == late]
    assert late_row["conversion_status"] == "converted"
    assert late_row["payout_batch_id"] is None
    [task] = sender.sent
    assert task.payload["amount_usdt"] == "2.5"
    assert_invariants_hold(db)

    figures = run_figures(app)  # the next run pays it

    assert figures["rows_claimed"] == 1
    assert figures["usdt_claimed"] == "3"
    assert_invariants_hold(db)


@pytest.mark.usefixtures("slow_claims")
def test_a_claim_slower_than_the_services_statement_timeout_still_completes(
    database_url: str, db: Database
) -> None:
    # A large backlog makes the claim slow (200,000 clients take longer than
    # the 15 s default). Were the claim held to the per-request timeout,
    # every run would fail the same way and the backlog would never drain.
    app = make_batch_app(database_url, RecordingSender(), DB_STATEMENT_TIMEOUT_MS="300")
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["2.5"])

    try:
        figures = run_figures(app)
        with app.extensions["suite"].db.transaction() as cur:
            cur.execute("SHOW statement_timeout")
            afterwards = cur.fetchone()["statement_timeout"]
    finally:
        close_app(app)

    assert figures["batches_created"] == 1
    assert afterwards == "300ms"  # the claim's limit was its transaction's only
    assert_invariants_hold(db)


def test_the_executors_acceptance_moves_the_batch_to_sent(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["2.5"])
    sender.fail_with = "HTTP 503: executor restarting"

    figures = run_figures(app)

    assert (figures["batches_created"], figures["tasks_failed"]) == (1, 1)
    [batch] = batches(db)
    assert (batch["status"], batch["accepted_at"]) == ("claimed", None)
    [task_row] = query(db, "SELECT * FROM outbox")
    assert task_row["sent_at"] is None
    assert task_row["last_error"] == "HTTP 503: executor restarting"

    sender.fail_with = None
    with db.transaction() as cur:
        cur.execute("UPDATE outbox SET next_attempt_at = now()")
    figures = run_figures(app)

    assert (figures["batches_created"], figures["tasks_sent"]) == (0, 1)
    [batch] = batches(db)
    assert batch["status"] == "sent"
    assert batch["accepted_at"] is not None
    [task] = sender.sent
    assert task.dedup_key == str(batch["batch_id"])
    assert_invariants_hold(db)


def test_process_without_the_bearer_token_is_401_and_claims_nothing(
    app: Flask, db: Database, sender: RecordingSender
) -> None:
    add_client(db, CLIENT, threshold="2")
    add_payments(db, CLIENT, ["2.5"])

    answer: Any = app.test_client().post("/process", headers={"X-Trigger": "manual"})

    assert answer.status_code == 401
    assert answer.json["error"]["code"] == "unauthorized"
    assert batches(db) == []
    assert sender.sent == []
