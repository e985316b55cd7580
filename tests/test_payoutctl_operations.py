"""payoutctl's operations: status, releasing a stuck batch, running a job by
hand, and replaying recorded deliveries, on real PostgreSQL.

Money moves the way it does in production: payments are credited through
the accumulator, conversions and payouts are claimed by the services' own
runs and settled by their callbacks. After each test that moves money the
invariants of DESIGN.md section 8 must hold.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import (
    INTERNAL_HEADERS,
    INTERNAL_TOKEN,
    IPN_SECRET,
    RecordingSender,
    base_environ,
)
from flask import Flask

from gcaccumulator.ipn import sign
from shared import reconcile, release
from shared.cli import main
from shared.clients import Refused
from shared.db import Database
from shared.secrets import SecretError

CLIENT = -1003296084379  # fixture client: threshold 2, usdt on eth
OTHER = -1001000000002  # fixture client: threshold 5, shib on eth
UNKNOWN = -1009999999999  # the channel of the unknown_channel fixture
MANUAL_RUN = {**INTERNAL_HEADERS, "X-Trigger": "manual"}

Run = Callable[..., Result]


# --- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def run(database_url: str) -> Run:
    """Invoke payoutctl against the test database, with extra variables."""

    def invoke(*args: str, input: str | None = None, **env: str | None) -> Result:
        return CliRunner().invoke(
            main,
            list(args),
            input=input,
            env={"DATABASE_URL": database_url, **env},
            catch_exceptions=False,
        )

    return invoke


@pytest.fixture
def payout_sender() -> RecordingSender:
    return RecordingSender()


@pytest.fixture
def make_batch(
    database_url: str, payout_sender: RecordingSender
) -> Iterator[Callable[..., Flask]]:
    from gcbatchprocessor.app import create_app

    apps: list[Flask] = []

    def make(**overrides: str) -> Flask:
        environ = base_environ(
            database_url,
            SERVICE_URL="http://batch.test",
            PAYOUT_EXECUTOR_URL="http://executor.test/payout",
            MICRO_BATCH_PROCESSOR_URL="http://microbatch.test",
            **overrides,
        )
        app = create_app(environ=environ, sender=payout_sender)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["suite"].db.close()


@pytest.fixture
def batch(make_batch: Callable[..., Flask]) -> Flask:
    return make_batch()


def pay(
    accumulator: Flask,
    client_id: int,
    usd: str,
    crypto: str,
    currency: str = "eth",
) -> None:
    """Credit one payment through the accumulator's router endpoint."""
    response = accumulator.test_client().post(
        "/payments",
        json={
            "nowpayments_payment_id": str(uuid.uuid4().int)[:18],
            "client_id": client_id,
            "user_id": 6271402111,
            "payment_amount_usd": usd,
            "outcome_amount": crypto,
            "outcome_currency": currency,
        },
        headers=INTERNAL_HEADERS,
    )
    assert response.status_code == 200, response.json
    assert response.json["outcome"] == "accumulated", response.json


def check_threshold(microbatch: Flask) -> dict[str, Any]:
    answer = microbatch.test_client().post("/check-threshold", headers=MANUAL_RUN)
    assert answer.status_code == 200, answer.json
    assert answer.json["outcome"] == "succeeded", answer.json
    return dict(answer.json["figures"])


def process(batch: Flask) -> dict[str, Any]:
    answer = batch.test_client().post("/process", headers=MANUAL_RUN)
    assert answer.status_code == 200, answer.json
    assert answer.json["outcome"] == "succeeded", answer.json
    return dict(answer.json["figures"])


def swap_done(microbatch: Flask, conversion_id: str, usdt: str) -> Any:
    return microbatch.test_client().post(
        "/swap-executed",
        json={
            "batch_conversion_id": conversion_id,
            "swap_id": f"swap-{conversion_id[:8]}",
            "tx_hash": "0xfeed",
            "status": "completed",
            "actual_usdt_received": usdt,
        },
        headers=INTERNAL_HEADERS,
    )


def query(db: Database, statement: str, *params: Any) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute(statement, params)
        if cur.description is None:
            return []
        return [dict(row) for row in cur.fetchall()]


def only(rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(rows) == 1, rows
    return rows[0]


def conversion_of(db: Database, currency: str = "eth") -> str:
    row = only(
        query(
            db,
            "SELECT batch_conversion_id::text AS id FROM batch_conversions"
            " WHERE outcome_currency = %s AND status IN ('claimed', 'swapping')",
            currency,
        )
    )
    return str(row["id"])


def age_batch(db: Database, table: str, seconds: int) -> None:
    assert table in ("batch_conversions", "payout_batches")
    query(
        db,
        f"UPDATE {table} SET created_at = created_at - make_interval(secs => %s)",
        seconds,
    )


def assert_invariants_hold(db: Database) -> None:
    with db.transaction() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        breaches = reconcile.find_breaches(cur)
    assert [breach.line for breach in breaches] == []


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [
            record.getMessage()
            for record in self.records
            if record.levelno == logging.ERROR
        ]


@contextmanager
def suite_logs() -> Iterator[Lines]:
    # On the suite's logger, not the root: each app's start replaces the
    # root's handlers.
    logger = logging.getLogger("payouts")
    lines = Lines()
    logger.addHandler(lines)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)


def conversion_swapping(accumulator: Flask, microbatch: Flask, db: Database) -> str:
    """Three payments (14.55 usd net) claimed into a conversion whose task
    the swap executor accepted."""
    for crypto in ("0.001", "0.002", "0.004"):
        pay(accumulator, CLIENT, "5", crypto)
    assert check_threshold(microbatch)["conversions_created"] == 1
    return conversion_of(db)


# --- status ---------------------------------------------------------------------


def test_status_of_an_empty_database(run: Run) -> None:
    text = run("status", CHECK_THRESHOLD_INTERVAL_S="3600")
    machine = run("status", "--json", CHECK_THRESHOLD_INTERVAL_S="3600")

    assert text.exit_code == 0, text.output
    assert "pending conversion:\n  nothing" in text.output
    assert "0 clients, 0 rows, 0 usdt; 0 over their threshold" in text.output
    assert "open batches (0 stale, stale after 7200 s):\n  none" in text.output
    assert "undelivered tasks:\n  none" in text.output
    assert machine.exit_code == 0, machine.output
    body = json.loads(machine.output)
    assert body["pending_conversion"] == []
    assert body["converted_unpaid"] == {
        "clients": 0,
        "rows": 0,
        "usdt": "0",
        "clients_over_threshold": 0,
        "clients_over_threshold_without_wallet": 0,
    }
    assert body["jobs"]["check-threshold"] == {
        "state": "never",
        "last_success_at": None,
        "age_s": None,
        "interval_s": 3600,
        "running_since": None,
        "hung": False,
        "last_run": None,
    }
    assert body["open_batches"] == []
    assert body["undelivered_tasks"] == {}


def test_status_shows_what_waits_what_ran_and_what_is_stuck(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
    batch: Flask,
    swap_sender: RecordingSender,
) -> None:
    # Three payments of CLIENT and one of OTHER, converted at 5 usdt each.
    for crypto in ("0.001", "0.001", "0.001"):
        pay(accumulator, CLIENT, "5", crypto)
    pay(accumulator, OTHER, "5", "0.001")
    check_threshold(microbatch)
    assert swap_done(microbatch, conversion_of(db), "20").status_code == 200
    # CLIENT (14.55 net) is paid; OTHER (4.85) stays below 5, then not below 4.
    assert process(batch)["batches_created"] == 1
    assert run("clients", "set-threshold", f"--client-id={OTHER}", "4").exit_code == 0
    # An ltc conversion whose task cannot be delivered, three hours old.
    swap_sender.fail_with = "executor down"
    pay(accumulator, CLIENT, "20", "0.25", currency="ltc")
    pay(accumulator, CLIENT, "1", "0.0005")
    check_threshold(microbatch)
    stuck = conversion_of(db, "ltc")
    age_batch(db, "batch_conversions", 3 * 3600)
    [payout] = query(db, "SELECT batch_id::text AS id FROM payout_batches")

    result = run("status", "--json")
    text = run("status")

    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["pending_conversion"] == [
        {
            "outcome_currency": "eth",
            "rows": 1,
            "accumulated_usd": "0.97",
            "accumulated_eth": "0.0005",
        }
    ]
    assert body["converted_unpaid"] == {
        "clients": 1,
        "rows": 1,
        "usdt": "4.85",
        "clients_over_threshold": 1,
        "clients_over_threshold_without_wallet": 0,
    }
    check = body["jobs"]["check-threshold"]
    assert check["state"] == "up"
    assert check["last_run"]["outcome"] == "succeeded"
    assert check["last_run"]["trigger"] == "manual"
    assert check["last_success_at"] == check["last_run"]["finished_at"]
    assert 0 <= check["age_s"] < 60
    assert body["jobs"]["process"]["last_run"]["outcome"] == "succeeded"
    assert body["stale_after_s"] == 7200
    [conversion, paying] = body["open_batches"]
    assert conversion == {
        "kind": "conversion",
        "batch_id": stuck,
        "status": "claimed",
        "created_at": conversion["created_at"],
        "age_s": conversion["age_s"],
        "stale": True,
        "rows": 1,
        "outcome_currency": "ltc",
        "total_eth": "0.25",
        "total_usd": "19.4",
    }
    assert conversion["age_s"] >= 3 * 3600
    assert paying["kind"] == "payout"
    assert paying["batch_id"] == payout["id"]
    assert (paying["status"], paying["stale"]) == ("sent", False)
    assert (paying["client_id"], paying["total_usdt"], paying["rows"]) == (
        CLIENT,
        "14.55",
        3,
    )
    tasks = body["undelivered_tasks"]["gcmicrobatchprocessor"]
    assert (tasks["tasks"], tasks["most_attempts"]) == (1, 1)
    assert "executor down" in tasks["last_error"]
    assert list(body["undelivered_tasks"]) == ["gcmicrobatchprocessor"]
    assert text.exit_code == 0, text.output
    assert "open batches (1 stale, stale after 7200 s):" in text.output
    stale_line = next(line for line in text.output.splitlines() if stuck in line)
    assert stale_line.endswith("STALE")
    assert "0.25 ltc (19.4 usd), 1 row" in stale_line
    assert_invariants_hold(db)


def test_status_calls_a_job_down_once_its_heartbeat_is_too_old(
    run: Run, db: Database
) -> None:
    query(
        db,
        "INSERT INTO job_runs (job, slot, trigger, started_at, finished_at, outcome)"
        " VALUES ('process', now() - interval '20 minutes', 'scheduler',"
        " now() - interval '20 minutes', now() - interval '20 minutes',"
        " 'succeeded'),"
        " ('process', now() - interval '1 minute', 'watchdog',"
        " now() - interval '1 minute', now() - interval '1 minute', 'failed')",
    )

    body = json.loads(run("status", "--json").output)

    process_job = body["jobs"]["process"]
    assert process_job["state"] == "down"  # 1200 s > 2 x 300 + 60
    assert process_job["last_run"]["outcome"] == "failed"
    assert process_job["last_run"]["trigger"] == "watchdog"
    assert 1200 <= process_job["age_s"] < 1260


# --- batches release ------------------------------------------------------------


def test_releasing_a_stuck_conversion_returns_its_rows_and_a_late_completion_is_409(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
    swap_sender: RecordingSender,
) -> None:
    conversion_id = conversion_swapping(accumulator, microbatch, db)
    age_batch(db, "batch_conversions", 3 * 3600)
    held = query(
        db,
        "SELECT id FROM payout_accumulation WHERE batch_conversion_id = %s",
        conversion_id,
    )

    result = run(
        "batches",
        "release",
        conversion_id,
        "--reason",
        "swap never started",
        input="y\n",
    )

    assert result.exit_code == 0, result.output
    assert f"conversion {conversion_id}: swapping, created" in result.output
    assert "releases 3 rows: 0.007 eth (14.55 usd) back to pending conversion" in (
        result.output
    )
    assert "its task: delivered to the swap executor" in result.output
    assert "answered 409 and logged at ERROR as money that may have moved twice" in (
        result.output
    )
    assert "not stale yet" not in result.output
    assert f"Release conversion {conversion_id}? [y/N]: y" in result.output
    assert (
        f'released conversion {conversion_id}: marked failed ("released by '
        'operator: swap never started"), 3 rows back to pending conversion'
    ) in result.output
    batch_row = only(query(db, "SELECT * FROM batch_conversions"))
    assert batch_row["status"] == "failed"
    assert batch_row["failure_reason"] == "released by operator: swap never started"
    assert batch_row["finished_at"] is not None
    rows = query(
        db,
        "SELECT conversion_status, batch_conversion_id FROM payout_accumulation",
    )
    assert rows == [{"conversion_status": "pending", "batch_conversion_id": None}] * 3
    # The failed conversion still lists what it held.
    members = query(db, "SELECT accumulation_id AS id FROM batch_conversion_members")
    assert sorted(row["id"] for row in members) == sorted(row["id"] for row in held)

    with suite_logs() as logs:
        late = swap_done(microbatch, conversion_id, "14.55")

    assert late.status_code == 409, late.json
    assert late.json["error"]["code"] == "conflict"
    assert logs.errors() == ["swap_completed_after_failure"]
    assert only(query(db, "SELECT status FROM batch_conversions"))["status"] == "failed"
    assert_invariants_hold(db)

    # The released rows go into the next conversion, and only that one lives.
    assert check_threshold(microbatch)["rows_claimed"] == 3
    assert_invariants_hold(db)


def test_releasing_a_payout_batch_returns_its_rows_and_a_late_completion_is_409(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
    batch: Flask,
    payout_sender: RecordingSender,
) -> None:
    conversion_id = conversion_swapping(accumulator, microbatch, db)
    assert swap_done(microbatch, conversion_id, "14").status_code == 200
    assert process(batch)["batches_created"] == 1
    [task] = [task for task in payout_sender.sent if task.payload["kind"] == "payout"]
    batch_id = task.payload["batch_id"]

    result = run("batches", "release", batch_id, "--yes")

    assert result.exit_code == 0, result.output
    assert f"payout batch {batch_id}: sent, created" in result.output
    assert f"client {CLIENT}: 13.58 usdt in 3 rows, paid in usdt on eth" in (
        result.output
    )
    assert "releases 3 rows: 13.58 usdt back to awaiting payout" in result.output
    assert "not stale yet" in result.output  # created moments ago
    assert "if the payout executor did finish it after all" in result.output
    assert "[y/N]" not in result.output
    batch_row = only(query(db, "SELECT * FROM payout_batches"))
    assert batch_row["status"] == "failed"
    assert batch_row["failure_reason"] == "released by operator: no reason given"
    rows = query(
        db,
        "SELECT conversion_status, payout_batch_id, is_paid_out"
        " FROM payout_accumulation",
    )
    assert (
        rows
        == [
            {
                "conversion_status": "converted",
                "payout_batch_id": None,
                "is_paid_out": False,
            }
        ]
        * 3
    )

    with suite_logs() as logs:
        late = batch.test_client().post(
            "/payout-completed",
            json={
                "batch_id": batch_id,
                "status": "completed",
                "tx_hash": "0xbeef",
                "amount_usdt": "13.58",
                "amount_sent": "13.58",
                "currency": "usdt",
            },
            headers=INTERNAL_HEADERS,
        )

    assert late.status_code == 409, late.json
    assert logs.errors() == ["payout_completed_after_failure"]
    paid = query(db, "SELECT count(*) AS n FROM payout_accumulation WHERE is_paid_out")
    assert paid == [{"n": 0}]
    assert_invariants_hold(db)


def test_releasing_a_conversion_withdraws_its_undelivered_task(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
    swap_sender: RecordingSender,
) -> None:
    swap_sender.fail_with = "connection refused"
    conversion_id = conversion_swapping(accumulator, microbatch, db)

    result = run("batches", "release", conversion_id, "--yes", "--reason", "lost")

    assert result.exit_code == 0, result.output
    assert "its task: never delivered (1 attempt); the release withdraws it" in (
        result.output
    )
    assert "last error: connection refused" in result.output
    assert "its undelivered task was withdrawn" in result.output
    assert query(db, "SELECT * FROM outbox WHERE dedup_key = %s", conversion_id) == []
    # The executor never hears of the released conversion, only of the next.
    swap_sender.fail_with = None
    check_threshold(microbatch)
    swaps = [
        task.payload for task in swap_sender.sent if task.payload["kind"] == "swap"
    ]
    assert [swap["batch_conversion_id"] for swap in swaps] == [conversion_of(db)]
    assert conversion_of(db) != conversion_id
    assert_invariants_hold(db)


def test_answering_no_releases_nothing(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
) -> None:
    conversion_id = conversion_swapping(accumulator, microbatch, db)

    result = run("batches", "release", conversion_id, input="n\n")

    assert result.exit_code == 1
    assert "Aborted!" in result.output
    assert conversion_of(db) == conversion_id
    swapping = query(
        db,
        "SELECT count(*) AS n FROM payout_accumulation"
        " WHERE conversion_status = 'swapping'",
    )
    assert swapping == [{"n": 3}]


def test_release_refuses_finished_unknown_and_malformed_batches(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
) -> None:
    conversion_id = conversion_swapping(accumulator, microbatch, db)
    assert swap_done(microbatch, conversion_id, "14").status_code == 200
    unknown = str(uuid.uuid4())
    before = query(db, "SELECT * FROM payout_accumulation ORDER BY id")

    completed = run("batches", "release", conversion_id, "--yes")
    missing = run("batches", "release", unknown, "--yes")
    malformed = run("batches", "release", "batch-7", "--yes")

    assert completed.exit_code == 1
    assert completed.output == (
        f"Error: conversion {conversion_id} is already completed: nothing to release\n"
    )
    assert missing.exit_code == 1
    assert missing.output == f"Error: no conversion or payout batch {unknown}\n"
    assert malformed.exit_code == 2
    assert "'batch-7' is not a batch id (a UUID)" in malformed.output
    assert query(db, "SELECT * FROM payout_accumulation ORDER BY id") == before

    released = run("batches", "release", unknown.upper(), "--yes")
    assert released.exit_code == 1  # ids are read in any case
    assert unknown in released.output


def test_release_refuses_a_batch_released_twice(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
) -> None:
    conversion_id = conversion_swapping(accumulator, microbatch, db)

    first = run("batches", "release", conversion_id, "--yes", "--reason", "stuck")
    second = run("batches", "release", conversion_id, "--yes")

    assert first.exit_code == 0, first.output
    assert second.exit_code == 1
    assert second.output == (
        f"Error: conversion {conversion_id} is already failed (released by "
        "operator: stuck): nothing to release\n"
    )
    assert_invariants_hold(db)


def test_release_refuses_a_batch_that_changed_after_it_was_shown(
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
) -> None:
    conversion_id = conversion_swapping(accumulator, microbatch, db)
    shown = release.find(db, conversion_id)

    # The executor's callback lands while the operator reads.
    assert swap_done(microbatch, conversion_id, "14").status_code == 200

    with pytest.raises(Refused, match="already completed"):
        release.release(db, shown, "too late")
    assert only(query(db, "SELECT status FROM batch_conversions"))["status"] == (
        "completed"
    )
    assert_invariants_hold(db)


def test_release_refuses_a_conversion_whose_task_was_delivered_after_it_was_shown(
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
    swap_sender: RecordingSender,
) -> None:
    swap_sender.fail_with = "connection refused"
    conversion_id = conversion_swapping(accumulator, microbatch, db)
    shown = release.find(db, conversion_id)
    assert shown.task_undelivered

    # The next run re-sends the task, and the executor accepts it.
    swap_sender.fail_with = None
    query(db, "UPDATE outbox SET next_attempt_at = now()")
    check_threshold(microbatch)

    with pytest.raises(Refused, match="changed since it was shown"):
        release.release(db, shown, None)
    assert conversion_of(db) == conversion_id
    assert_invariants_hold(db)


# --- run ------------------------------------------------------------------------


def test_run_check_threshold_runs_the_job_on_its_service_as_manual(
    run: Run,
    db: Database,
    fixture_clients: Any,
    accumulator: Flask,
    microbatch: Flask,
    serve: Callable[[Flask], str],
) -> None:
    for crypto in ("0.001", "0.002", "0.004"):
        pay(accumulator, CLIENT, "5", crypto)
    base = serve(microbatch)
    env = {"MICRO_BATCH_PROCESSOR_URL": base, "INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN}

    first = run("run", "check-threshold", **env)
    second = run("run", "check-threshold", **env)

    assert first.exit_code == 0, first.output
    answer = json.loads(first.output)
    assert (answer["job"], answer["trigger"], answer["outcome"]) == (
        "check-threshold",
        "manual",
        "succeeded",
    )
    assert answer["figures"]["conversions_created"] == 1
    assert answer["figures"]["rows_claimed"] == 3
    assert answer["figures"]["threshold_usd"] == "10"
    # A manual run is its own slot: a second one runs rather than "repeated".
    assert second.exit_code == 0, second.output
    assert json.loads(second.output)["outcome"] == "succeeded"
    runs = query(db, "SELECT job, trigger, outcome FROM job_runs ORDER BY id")
    assert (
        runs
        == [{"job": "check-threshold", "trigger": "manual", "outcome": "succeeded"}] * 2
    )
    assert_invariants_hold(db)


def test_run_process_runs_on_the_batch_processor(
    run: Run, db: Database, batch: Flask, serve: Callable[[Flask], str]
) -> None:
    result = run(
        "run",
        "process",
        BATCH_PROCESSOR_URL=serve(batch),
        INTERNAL_AUTH_TOKEN=INTERNAL_TOKEN,
    )

    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert (answer["job"], answer["trigger"], answer["outcome"]) == (
        "process",
        "manual",
        "succeeded",
    )
    assert answer["figures"]["batches_created"] == 0
    assert query(db, "SELECT trigger FROM job_runs") == [{"trigger": "manual"}]


def test_run_refused_by_the_service_exits_1_with_its_error(
    run: Run, db: Database, microbatch: Flask, serve: Callable[[Flask], str]
) -> None:
    base = serve(microbatch)

    result = run(
        "run",
        "check-threshold",
        MICRO_BATCH_PROCESSOR_URL=base,
        INTERNAL_AUTH_TOKEN="not-the-token",
    )

    assert result.exit_code == 1
    assert (
        f"Error: {base}/check-threshold answered 401: unauthorized: the bearer "
        "token is not valid"
    ) in result.output
    assert query(db, "SELECT * FROM job_runs") == []


class Secrets:
    """Secrets that can be changed while the service runs."""

    def __init__(self, **values: str) -> None:
        self.values = values

    def get(self, name: str) -> str:
        value = self.values.get(name, "")
        if not value:
            raise SecretError("not set")
        return value


def test_a_failed_run_exits_1_and_shows_the_run(
    run: Run,
    db: Database,
    make_microbatch: Callable[..., Flask],
    serve: Callable[[Flask], str],
) -> None:
    secrets = Secrets(
        MICRO_BATCH_THRESHOLD_USD="10", INTERNAL_AUTH_TOKEN=INTERNAL_TOKEN
    )
    base = serve(make_microbatch(secrets=secrets))
    secrets.values["MICRO_BATCH_THRESHOLD_USD"] = "ten"

    result = run(
        "run",
        "check-threshold",
        MICRO_BATCH_PROCESSOR_URL=base,
        INTERNAL_AUTH_TOKEN=INTERNAL_TOKEN,
    )

    assert result.exit_code == 1
    body, error = result.output.split("\nError: ", 1)
    assert json.loads(body)["outcome"] == "failed"
    assert error.startswith(f"{base}/check-threshold answered 503: run_failed: ")
    assert "MICRO_BATCH_THRESHOLD_USD" in error
    assert query(db, "SELECT trigger, outcome FROM job_runs") == [
        {"trigger": "manual", "outcome": "failed"}
    ]


def test_run_without_its_service_url_exits_2_naming_the_variable(run: Run) -> None:
    micro = run("run", "check-threshold", INTERNAL_AUTH_TOKEN=INTERNAL_TOKEN)
    batch = run("run", "process", INTERNAL_AUTH_TOKEN=INTERNAL_TOKEN)

    assert micro.exit_code == 2
    assert micro.output == (
        "Error: invalid configuration:\n  - MICRO_BATCH_PROCESSOR_URL: required "
        "to run check-threshold: the micro-batch processor's base URL\n"
    )
    assert batch.exit_code == 2
    assert "  - BATCH_PROCESSOR_URL: required to run process" in batch.output


def test_run_without_a_token_exits_2(run: Run) -> None:
    result = run(
        "run",
        "process",
        BATCH_PROCESSOR_URL="http://127.0.0.1:9",
        INTERNAL_AUTH_TOKEN=None,
    )

    assert result.exit_code == 2
    assert result.output == (
        "Error: invalid configuration:\n  - INTERNAL_AUTH_TOKEN: not set\n"
    )


def test_run_against_a_service_that_is_not_there_exits_3(run: Run) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result = run(
        "run",
        "process",
        BATCH_PROCESSOR_URL=f"http://127.0.0.1:{port}",
        INTERNAL_AUTH_TOKEN=INTERNAL_TOKEN,
    )

    assert result.exit_code == 3
    assert result.output.startswith(
        f"Error: http://127.0.0.1:{port}/process cannot be reached"
    )


# --- deliveries replay ----------------------------------------------------------


def unknown_channel_case(ipn_cases: list[dict[str, Any]]) -> dict[str, Any]:
    return next(case for case in ipn_cases if case["name"] == "unknown_channel")


def post_ipn(
    accumulator: Flask, case: dict[str, Any], signature: str | None = None
) -> Any:
    return accumulator.test_client().post(
        "/ipn",
        data=case["raw_body"].encode("utf-8"),
        headers={"x-nowpayments-sig": signature or case["signature"]},
        content_type="application/json",
    )


def add_unknown_channels_client(run: Run, *flags: str) -> Result:
    flags = flags or ("--strategy", "threshold", "--threshold", "5")
    return run("clients", "add", "--client-id", str(UNKNOWN), *flags)


def events(db: Database) -> list[dict[str, Any]]:
    return query(
        db,
        "SELECT id, source, request_id, payment_id, signature_valid, outcome,"
        " accumulation_id, raw_body, replayed_at FROM ipn_events ORDER BY id",
    )


def test_replay_credits_a_payment_once_its_client_exists_and_never_twice(
    run: Run, db: Database, accumulator: Flask, ipn_cases: list[dict[str, Any]]
) -> None:
    case = unknown_channel_case(ipn_cases)
    # NOWPayments sent it twice while the channel had no client.
    for _ in range(2):
        response = post_ipn(accumulator, case)
        assert response.json["outcome"] == "unknown_client"
    first, retry = (event["id"] for event in events(db))

    early = run("deliveries", "replay")
    added = add_unknown_channels_client(run)
    dry = run("deliveries", "replay", "--dry-run")
    replayed = run("deliveries", "replay")
    again = run("deliveries", "replay")

    assert early.exit_code == 0, early.output
    assert f"still no client for channel {UNKNOWN}" in early.output
    assert early.output.endswith(
        "replay: 2 deliveries: 0 credited, 0 duplicate, 0 for instant clients, "
        "2 still waiting for their client\n"
    )
    assert added.exit_code == 0, added.output
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines()[1:] == [
        f"ipn_events {first} (ipn, payment 5077125058): would credit 0.0002734 eth"
        f" to client {UNKNOWN}",
        f"ipn_events {retry} (ipn, payment 5077125058): an earlier delivery above"
        " credits this payment: would be a duplicate",
        "replay (dry run, nothing written): 2 deliveries: 1 would be credited,"
        " 1 duplicate, 0 for instant clients, 0 still waiting for their client",
    ]
    assert replayed.exit_code == 0, replayed.output
    lines = replayed.output.splitlines()
    assert lines[0] == "crediting at a 3 % platform fee, static prices"
    assert lines[1].startswith(
        f"ipn_events {first} (ipn, payment 5077125058): accumulated as row "
    )
    assert (
        f"for client {UNKNOWN}: 0.0002734 eth, 0.9016732 usd net of the fee"
        in (lines[1])
    )
    assert lines[2].startswith(
        f"ipn_events {retry} (ipn, payment 5077125058): duplicate: "
    )
    assert lines[3] == (
        "replay: 2 deliveries: 1 credited, 1 duplicate, 0 for instant clients, "
        "0 still waiting for their client"
    )
    assert again.output.endswith("replay: no recorded delivery waits for its client\n")

    row = only(query(db, "SELECT * FROM payout_accumulation"))
    assert row["client_id"] == UNKNOWN
    assert row["nowpayments_payment_id"] == "5077125058"
    assert row["accumulated_eth"] == Decimal("0.0002734")
    assert row["outcome_currency"] == "eth"
    assert row["payment_amount_usd"] == Decimal("0.92956")  # 0.0002734 x 3400
    assert row["usd_source"] == "price"
    assert row["platform_fee_percent"] == Decimal(3)
    assert row["accumulated_usd"] == Decimal("0.9016732")
    assert row["conversion_status"] == "pending"
    recorded = events(db)
    assert [
        (e["source"], e["request_id"], e["outcome"], e["signature_valid"])
        for e in recorded[2:]
    ] == [
        ("ipn", f"replay:{first}", "accumulated", True),
        ("ipn", f"replay:{retry}", "duplicate", True),
    ]
    assert recorded[2]["accumulation_id"] == row["id"]
    assert all(bytes(e["raw_body"]) == case["raw_body"].encode() for e in recorded)
    # The originals keep their outcome and are marked answered.
    assert [e["outcome"] for e in recorded[:2]] == ["unknown_client"] * 2
    assert all(e["replayed_at"] is not None for e in recorded[:2])
    assert all(e["replayed_at"] is None for e in recorded[2:])
    assert_invariants_hold(db)

    # Even a replay of an answered delivery credits nothing again: the
    # payment id is unique.
    query(db, "UPDATE ipn_events SET replayed_at = NULL")
    forced = run("deliveries", "replay")

    assert forced.output.endswith(
        "replay: 2 deliveries: 0 credited, 2 duplicate, 0 for instant clients, "
        "0 still waiting for their client\n"
    )
    assert len(query(db, "SELECT id FROM payout_accumulation")) == 1
    assert_invariants_hold(db)


def test_replay_credits_a_router_delivery_at_the_routers_value(
    run: Run, db: Database, accumulator: Flask
) -> None:
    response = accumulator.test_client().post(
        "/payments",
        json={
            "nowpayments_payment_id": "6000000001",
            "client_id": UNKNOWN,
            "user_id": 42,
            "payment_amount_usd": "12.5",
            "outcome_amount": "0.000000000000000001",
            "outcome_currency": "eth",
            "subscription_id": "sub-1",
        },
        headers=INTERNAL_HEADERS,
    )
    assert response.json["outcome"] == "unknown_client"
    add_unknown_channels_client(run)

    result = run("deliveries", "replay", PLATFORM_FEE_PERCENT="2.5")

    assert result.exit_code == 0, result.output
    assert "crediting at a 2.5 % platform fee" in result.output
    assert "(router, payment 6000000001): accumulated as row" in result.output
    row = only(query(db, "SELECT * FROM payout_accumulation"))
    assert row["payment_amount_usd"] == Decimal("12.5")
    assert row["usd_source"] == "router"
    assert row["platform_fee_percent"] == Decimal("2.5")
    assert row["accumulated_usd"] == Decimal("12.1875")
    assert row["accumulated_eth"] == Decimal("0.000000000000000001")
    assert row["subscription_id"] == "sub-1"
    assert [(e["source"], e["outcome"]) for e in events(db)] == [
        ("router", "unknown_client"),
        ("router", "accumulated"),
    ]
    assert_invariants_hold(db)


def test_replay_leaves_refused_deliveries_alone(
    run: Run, db: Database, accumulator: Flask, ipn_cases: list[dict[str, Any]]
) -> None:
    case = unknown_channel_case(ipn_cases)
    forged = post_ipn(accumulator, case, signature="ab" * 64)
    assert forged.json["outcome"] == "bad_signature"
    add_unknown_channels_client(run)
    # A row no service writes: unknown_client without a valid signature.
    query(
        db,
        "INSERT INTO ipn_events (source, payment_id, signature_valid, outcome,"
        " http_status, raw_body, body_size) VALUES ('ipn', '5077125058', false,"
        " 'unknown_client', 200, %s, %s)",
        case["raw_body"].encode(),
        len(case["raw_body"].encode()),
    )

    result = run("deliveries", "replay")

    assert result.output.endswith("replay: no recorded delivery waits for its client\n")
    assert query(db, "SELECT * FROM payout_accumulation") == []
    assert len(events(db)) == 2


def test_replay_answers_a_delivery_whose_client_is_an_instant_client(
    run: Run, db: Database, accumulator: Flask, ipn_cases: list[dict[str, Any]]
) -> None:
    post_ipn(accumulator, unknown_channel_case(ipn_cases))
    add_unknown_channels_client(run, "--strategy", "instant")

    result = run("deliveries", "replay")
    again = run("deliveries", "replay")

    assert result.exit_code == 0, result.output
    assert f"instant_client: client {UNKNOWN} is paid per payment elsewhere" in (
        result.output
    )
    assert "0 credited, 0 duplicate, 1 for instant clients" in result.output
    assert again.output.endswith("replay: no recorded delivery waits for its client\n")
    assert query(db, "SELECT * FROM payout_accumulation") == []
    assert [e["outcome"] for e in events(db)] == ["unknown_client", "instant_client"]


def test_replay_in_production_refuses_static_prices(run: Run) -> None:
    result = run(
        "deliveries",
        "replay",
        ENVIRONMENT="production",
        SECRETS_BACKEND="gcp",
        GCP_PROJECT="payouts-test",
        PRICE_SOURCE="static:3400",
    )

    assert result.exit_code == 2
    assert "PRICE_SOURCE: production never credits at static prices" in result.output


def test_a_dry_run_says_a_payment_still_without_a_price_would_wait(
    run: Run,
    db: Database,
    make_accumulator: Callable[..., Flask],
    fixture_clients: list[dict[str, Any]],
) -> None:
    # No ETH price and a EUR invoice: nothing can value it on arrival.
    unpriced = "static:btc=1"
    body = json.dumps(
        {
            "payment_id": 7700001,
            "payment_status": "finished",
            "order_id": f"PGP-6271402111|{fixture_clients[0]['client_id']}",
            "outcome_amount": "0.0002734",
            "outcome_currency": "eth",
            "price_amount": "1.2",
            "price_currency": "eur",
        }
    ).encode()
    arrival = (
        make_accumulator(PRICE_SOURCE=unpriced)
        .test_client()
        .post("/ipn", data=body, headers={"x-nowpayments-sig": sign(IPN_SECRET, body)})
    )
    assert arrival.json["outcome"] == "retry_later"

    dry = run("deliveries", "replay", "--dry-run", PRICE_SOURCE=unpriced)
    credited_by_dry_run = query(db, "SELECT count(*) AS n FROM payout_accumulation")
    priced = run("deliveries", "replay", PRICE_SOURCE="static:3400")

    # A dry run promises what the real one would do: wait, and say so.
    assert dry.exit_code == 1, dry.output
    assert "no USD price now: would be left for a later replay" in dry.output
    assert "1 could not be replayed" in dry.output
    assert "would credit" not in dry.output
    assert credited_by_dry_run == [{"n": 0}]
    assert priced.exit_code == 0, priced.output
    assert "accumulated as row" in priced.output
