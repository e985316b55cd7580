"""``POST /check-threshold``: claim exactly the pending rows that were summed.

Per outcome currency, when the pending USD (net of the fee) reaches the
threshold read from the secret ``MICRO_BATCH_THRESHOLD_USD``, one statement
claims those rows into one conversion and writes its swap task in the same
transaction (DESIGN.md sections 2 to 4). Concurrent runs, a payment arriving
mid-claim, a bad threshold and a database outage must never make a second
conversion, sweep in an unsummed row or leave half a claim behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests
from conftest import INTERNAL_HEADERS, INTERNAL_TOKEN
from flask import Flask
from google.api_core import exceptions as google_errors
from microbatch_support import (
    QUIET_SIBLING,
    FakeSecretManager,
    LogCapture,
    ManualClock,
    add_pending,
    app_database,
    assert_invariants_hold,
    close_app,
    conversions,
    dead_database_url,
    job_runs,
    query,
    rows_by_status,
    run_now,
    snapshot,
    wait_for,
)

from gcmicrobatchprocessor.conversion import check_threshold
from shared.db import Database
from shared.secrets import SecretManagerSecrets

THRESHOLD = "MICRO_BATCH_THRESHOLD_USD"


@pytest.fixture
def new_app(make_microbatch: Callable[..., Flask]) -> Iterator[Callable[..., Flask]]:
    made: list[Flask] = []

    def make(**kwargs: Any) -> Flask:
        app = make_microbatch(**{**QUIET_SIBLING, **kwargs})
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


@pytest.fixture
def app(new_app: Callable[..., Flask]) -> Flask:
    return new_app()


class SlowInsert:
    """Makes every insert into ``table`` sleep inside its statement: a
    BEFORE INSERT trigger that calls ``pg_sleep``. On ``batch_conversions``
    it catches a claim after it took its rows and before it commits."""

    def __init__(self, db: Database, table: str, seconds: float) -> None:
        assert table in ("batch_conversions", "outbox")
        self.db = db
        self.table = table
        with db.transaction() as cur:
            cur.execute(
                "CREATE FUNCTION test_slow_insert() RETURNS trigger"
                " LANGUAGE plpgsql AS $$ BEGIN"
                f" PERFORM pg_sleep({float(seconds)}); RETURN NEW; END $$"
            )
            cur.execute(
                f"CREATE TRIGGER test_slow_insert BEFORE INSERT ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION test_slow_insert()"
            )

    def sleeping(self) -> int | None:
        """The server process of an insert asleep in the trigger, if any."""
        rows = query(
            self.db,
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event = 'PgSleep'"
            " AND query LIKE %s",
            (f"%INSERT INTO {self.table} %",),
        )
        return rows[0]["pid"] if rows else None

    def remove(self) -> None:
        with self.db.transaction() as cur:
            cur.execute(f"DROP TRIGGER IF EXISTS test_slow_insert ON {self.table}")
            cur.execute("DROP FUNCTION IF EXISTS test_slow_insert()")


@pytest.fixture
def slow_insert(db: Database) -> Iterator[Callable[[str], SlowInsert]]:
    made: list[SlowInsert] = []

    def make(table: str) -> SlowInsert:
        made.append(SlowInsert(db, table, seconds=2))
        return made[-1]

    yield make
    for slow in made:
        slow.remove()


@pytest.fixture
def slow_claim(slow_insert: Callable[[str], SlowInsert]) -> SlowInsert:
    return slow_insert("batch_conversions")


def gcp_app(
    new_app: Callable[..., Flask], threshold: str, cache_s: float = 0
) -> tuple[Flask, FakeSecretManager, ManualClock]:
    """An app reading its secrets from an in-process Secret Manager."""
    client = FakeSecretManager(
        "p", {"INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN, THRESHOLD: threshold}
    )
    clock = ManualClock()
    secrets = SecretManagerSecrets("p", cache_s=cache_s, client=client, clock=clock)
    app = new_app(secrets=secrets, SECRETS_BACKEND="gcp", GCP_PROJECT="p")
    return app, client, clock


def members_of(db: Database, batch_conversion_id: Any) -> list[int]:
    rows = query(
        db,
        "SELECT accumulation_id FROM batch_conversion_members"
        " WHERE batch_conversion_id = %s ORDER BY accumulation_id",
        (batch_conversion_id,),
    )
    return [row["accumulation_id"] for row in rows]


def sums_of_members(db: Database, batch_conversion_id: Any) -> dict[str, Any]:
    [sums] = query(
        db,
        "SELECT count(*) AS row_count, sum(accumulated_usd) AS total_usd,"
        " sum(accumulated_eth) AS total_eth FROM payout_accumulation"
        " WHERE batch_conversion_id = %s",
        (batch_conversion_id,),
    )
    return sums


# --- concurrency -------------------------------------------------------------


@pytest.mark.parametrize("how", ["manual", "distinct-slots", "same-slot"])
def test_ten_concurrent_runs_make_exactly_one_conversion_and_one_swap_task(
    app: Flask,
    db: Database,
    serve: Callable[[Flask], str],
    swap_sender: Any,
    how: str,
) -> None:
    pending = add_pending(db, [(f"0.00{n}", "1.5") for n in range(1, 10)])
    base = serve(app)
    start = threading.Barrier(10)

    def run(n: int) -> requests.Response:
        headers = dict(INTERNAL_HEADERS)
        if how == "manual":
            headers["X-Trigger"] = "manual"
        else:
            minute = n if how == "distinct-slots" else 0
            headers["X-CloudScheduler-ScheduleTime"] = f"2025-06-01T10:{minute:02}:00Z"
        start.wait(10)
        return requests.post(f"{base}/check-threshold", headers=headers, timeout=30)

    answers: list[requests.Response] = []
    threads = [
        threading.Thread(target=lambda n=n: answers.append(run(n))) for n in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert [answer.status_code for answer in answers] == [200] * 10
    bodies = [answer.json() for answer in answers]
    assert {body["outcome"] for body in bodies} <= {"succeeded", "busy", "repeated"}
    created = [body["figures"].get("conversions_created", 0) for body in bodies]
    assert sorted(created) == [0] * 9 + [1]
    [conversion] = conversions(db)
    assert members_of(db, conversion["batch_conversion_id"]) == pending
    assert len(swap_sender.sent) == 1
    assert query(db, "SELECT count(*) AS tasks FROM outbox") == [{"tasks": 1}]
    assert len(job_runs(db)) == 10
    assert_invariants_hold(db)


def test_two_claims_running_at_once_never_take_a_row_twice(
    app: Flask, db: Database, slow_claim: SlowInsert
) -> None:
    # The job lock keeps runs apart; once a hung run's lock has expired, two
    # runs' work can overlap, and the claim itself must still be safe.
    pending = add_pending(db, [(f"0.00{n}", "3") for n in range(1, 9)])
    start = threading.Barrier(2)
    created: list[dict[str, Any]] = []

    def work() -> None:
        start.wait(10)
        created.append(
            check_threshold(
                app_database(app),
                app.extensions["suite"].config.secrets,
                app.extensions["conversion_settings"],
                app.extensions["outbox"],
            )
        )

    runs = [threading.Thread(target=work) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(30)

    assert len(created) == 2
    claims = query(
        db,
        "SELECT accumulation_id, count(*) AS claims FROM batch_conversion_members"
        " GROUP BY accumulation_id ORDER BY accumulation_id",
    )
    assert {row["claims"] for row in claims} <= {1}
    for made in conversions(db):
        conversion_id = made["batch_conversion_id"]
        assert sums_of_members(db, conversion_id) == {
            "row_count": made["row_count"],
            "total_usd": made["total_usd"],
            "total_eth": made["total_eth"],
        }
    still_pending = rows_by_status(db).get("pending", [])
    assert sorted(still_pending + [row["accumulation_id"] for row in claims]) == (
        pending
    )
    assert_invariants_hold(db)


def test_a_payment_arriving_during_the_claim_is_not_swept_in(
    app: Flask, db: Database, serve: Callable[[Flask], str], slow_claim: SlowInsert
) -> None:
    summed = add_pending(db, [("0.001", "4"), ("0.002", "7")])
    base = serve(app)
    answers: list[requests.Response] = []
    runner = threading.Thread(
        target=lambda: answers.append(
            requests.post(
                f"{base}/check-threshold",
                headers={**INTERNAL_HEADERS, "X-Trigger": "manual"},
                timeout=30,
            )
        )
    )
    runner.start()
    claim = wait_for(slow_claim.sleeping, message="the claim is under way")

    [late] = add_pending(db, [("0.5", "1700")])  # committed at once
    still_claiming = slow_claim.sleeping()
    runner.join(30)

    assert still_claiming == claim  # the payment committed in mid-claim
    assert answers[0].status_code == 200
    assert answers[0].json()["figures"]["conversions_created"] == 1
    [conversion] = conversions(db)
    conversion_id = conversion["batch_conversion_id"]
    assert members_of(db, conversion_id) == summed
    assert rows_by_status(db)["pending"] == [late]
    assert sums_of_members(db, conversion_id) == {
        "row_count": conversion["row_count"],
        "total_usd": conversion["total_usd"],
        "total_eth": conversion["total_eth"],
    }
    assert (conversion["row_count"], conversion["total_usd"]) == (2, Decimal(11))
    assert conversion["total_eth"] == Decimal("0.003")
    assert_invariants_hold(db)

    slow_claim.remove()
    later = run_now(app)

    assert later.json["figures"]["rows_claimed"] == 1
    assert rows_by_status(db).get("pending") is None
    assert_invariants_hold(db)


@pytest.mark.parametrize(
    ("pending_usd", "claimed"),
    [(["6", "4"], True), (["6", "3.9999999999"], False)],
    ids=["exactly-the-threshold", "one-unit-below"],
)
def test_the_threshold_is_reached_at_equality_of_net_usd(
    app: Flask, db: Database, pending_usd: list[str], claimed: bool
) -> None:
    add_pending(db, [("0.001", usd) for usd in pending_usd])

    run = run_now(app)

    assert run.status_code == 200
    assert run.json["figures"]["conversions_created"] == int(claimed)
    assert bool(conversions(db)) is claimed
    assert_invariants_hold(db)


def test_each_currency_over_the_threshold_gets_a_conversion_of_its_own(
    app: Flask, db: Database, swap_sender: Any
) -> None:
    eth = add_pending(db, [("0.001", "5"), ("0.002", "6")], currency="eth")
    shib = add_pending(db, [("1000000", "7"), ("2500000.5", "8")], currency="shib")
    doge = add_pending(db, [("30", "9.99")], currency="doge")  # below

    run = run_now(app)

    assert run.json["figures"]["conversions_created"] == 2
    by_currency = {row["outcome_currency"]: row for row in conversions(db)}
    assert set(by_currency) == {"eth", "shib"}
    assert members_of(db, by_currency["eth"]["batch_conversion_id"]) == eth
    assert members_of(db, by_currency["shib"]["batch_conversion_id"]) == shib
    assert by_currency["shib"]["total_eth"] == Decimal("3500000.5")
    assert by_currency["shib"]["total_usd"] == Decimal(15)
    tasks = {task.payload["from_currency"]: task.payload for task in swap_sender.sent}
    assert set(tasks) == {"eth", "shib"}
    assert tasks["eth"]["from_amount"] == "0.003"
    assert tasks["shib"]["from_amount"] == "3500000.5"
    assert rows_by_status(db)["pending"] == doge
    assert_invariants_hold(db)


# --- the threshold -----------------------------------------------------------


def test_a_threshold_changed_in_secret_manager_applies_without_restart(
    new_app: Callable[..., Flask], db: Database
) -> None:
    app, secret_manager, clock = gcp_app(new_app, "100", cache_s=60)
    add_pending(db, [("0.01", "30"), ("0.02", "20")])  # 50 USD

    before = run_now(app)
    secret_manager.values[THRESHOLD] = "40"
    clock.advance(59)
    cached = run_now(app)
    clock.advance(2)
    after = run_now(app)

    assert before.json["figures"]["threshold_usd"] == "100"
    assert before.json["figures"]["conversions_created"] == 0
    assert cached.json["figures"]["threshold_usd"] == "100"
    assert cached.json["figures"]["conversions_created"] == 0
    assert after.json["figures"]["threshold_usd"] == "40"
    assert after.json["figures"]["conversions_created"] == 1
    [conversion] = conversions(db)
    assert conversion["threshold_usd"] == Decimal(40)
    assert_invariants_hold(db)


@pytest.mark.parametrize(
    "value",
    ["", "  \n", "abc", "0", "-5", "NaN", "Infinity", "1e400", "10.00000000001"],
    ids=[
        "empty",
        "blank",
        "not-a-number",
        "zero",
        "negative",
        "nan",
        "infinity",
        "too-large",
        "too-many-decimals",
    ],
)
def test_an_invalid_threshold_fails_the_run_loudly_and_claims_nothing(
    new_app: Callable[..., Flask], db: Database, logs: LogCapture, value: str
) -> None:
    app, secret_manager, _ = gcp_app(new_app, "10")
    # Any default at all would claim this much.
    add_pending(db, [("1", "3400"), ("2", "6800")])
    before = snapshot(db)
    secret_manager.values[THRESHOLD] = value

    run = run_now(app)

    assert_the_run_failed_on_the_threshold(run, db, logs)
    assert snapshot(db) == before


def test_an_unreadable_threshold_fails_the_run_loudly_and_claims_nothing(
    new_app: Callable[..., Flask], db: Database, logs: LogCapture
) -> None:
    app, secret_manager, _ = gcp_app(new_app, "10")
    add_pending(db, [("1", "3400"), ("2", "6800")])
    before = snapshot(db)
    secret_manager.unreadable[THRESHOLD] = google_errors.PermissionDenied("no access")

    run = run_now(app)

    assert_the_run_failed_on_the_threshold(run, db, logs)
    assert snapshot(db) == before

    del secret_manager.unreadable[THRESHOLD]
    recovered = run_now(app)
    assert recovered.json["figures"]["conversions_created"] == 1
    assert_invariants_hold(db)


def assert_the_run_failed_on_the_threshold(
    run: Any, db: Database, logs: LogCapture
) -> None:
    assert 500 <= run.status_code < 600
    assert run.json["error"]["code"] == "run_failed"
    assert THRESHOLD in run.json["error"]["message"]
    [recorded] = job_runs(db)
    assert recorded["outcome"] == "failed"
    assert THRESHOLD in recorded["error"]
    assert recorded["finished_at"] is not None
    [line] = logs.lines("job_run_failed", logging.ERROR)
    assert line["severity"] == "ERROR"
    assert THRESHOLD in line["error"]
    assert conversions(db) == []


def test_a_threshold_saved_with_a_trailing_newline_is_read_as_its_number(
    new_app: Callable[..., Flask], db: Database
) -> None:
    app, secret_manager, _ = gcp_app(new_app, "10")
    add_pending(db, [("0.001", "12")])
    secret_manager.values[THRESHOLD] = "12\n"

    run = run_now(app)

    assert run.json["figures"]["threshold_usd"] == "12"
    assert conversions(db)[0]["threshold_usd"] == Decimal(12)
    assert_invariants_hold(db)


# --- the database going away -------------------------------------------------


def test_the_database_unreachable_at_a_run_answers_503_and_changes_nothing(
    app: Flask, db: Database, swap_sender: Any
) -> None:
    add_pending(db, [("0.001", "4"), ("0.002", "7")])
    before = snapshot(db)
    database = app_database(app)
    good_url = database.dsn
    database.dsn = dead_database_url()
    database.close()

    down = run_now(app)

    assert down.status_code == 503
    assert down.json["error"]["code"] == "database_unavailable"
    assert down.json["error"]["message"]
    assert snapshot(db) == before
    assert job_runs(db) == []
    assert swap_sender.sent == []

    database.dsn = good_url
    back = run_now(app)

    assert back.json["figures"]["conversions_created"] == 1
    assert_invariants_hold(db)


@pytest.mark.parametrize(
    "table", ["batch_conversions", "outbox"], ids=["in-the-claim", "at-the-task"]
)
def test_the_database_lost_mid_run_answers_503_and_leaves_nothing_half_done(
    app: Flask,
    db: Database,
    serve: Callable[[Flask], str],
    slow_insert: Callable[[str], SlowInsert],
    swap_sender: Any,
    table: str,
) -> None:
    # The connection is cut while the claim inserts its conversion, or while
    # it writes the conversion's task: never a conversion without its task.
    add_pending(db, [("0.001", "4"), ("0.002", "7")])
    before = snapshot(db)
    slow = slow_insert(table)
    base = serve(app)
    answers: list[requests.Response] = []
    runner = threading.Thread(
        target=lambda: answers.append(
            requests.post(
                f"{base}/check-threshold",
                headers={**INTERNAL_HEADERS, "X-Trigger": "manual"},
                timeout=30,
            )
        )
    )
    runner.start()
    writer = wait_for(slow.sleeping, message=f"the insert into {table}")

    # The server ends that connection mid-statement, as a restart would.
    query(db, "SELECT pg_terminate_backend(%s) AS ended", (writer,))
    runner.join(30)

    assert answers[0].status_code == 503
    assert answers[0].json()["error"]["code"] == "run_failed"
    assert snapshot(db) == before  # no conversion, no member, no task
    [recorded] = job_runs(db)
    assert recorded["outcome"] == "failed"
    assert "DatabaseUnavailable" in recorded["error"]
    assert swap_sender.sent == []

    slow.remove()
    retried = run_now(app)

    assert retried.json["figures"]["conversions_created"] == 1
    assert len(swap_sender.sent) == 1
    assert_invariants_hold(db)


# --- what is sent, what is recorded -------------------------------------------


def test_the_swap_task_carries_the_crypto_total_exactly_as_designed(
    new_app: Callable[..., Flask], db: Database, swap_sender: Any
) -> None:
    app = new_app(**{THRESHOLD: "12.345"})
    # USD and crypto differ by orders of magnitude: a USD figure in
    # from_amount cannot pass for the crypto total.
    add_pending(db, [("1.5", "5100"), ("0.000000000000000001", "0.0000000034")])

    run = run_now(app)

    [conversion] = conversions(db)
    conversion_id = str(conversion["batch_conversion_id"])
    [task] = swap_sender.sent
    assert task.payload == {
        "kind": "swap",
        "batch_conversion_id": conversion_id,
        "from_currency": "eth",
        "from_amount": "1.500000000000000001",
        "to_currency": "usdt",
        "row_count": 2,
        "callback_url": "http://microbatch.test/swap-executed",
    }
    assert task.target_url == "http://executor.test/swap"
    assert task.dedup_key == conversion_id
    [stored] = query(db, "SELECT payload FROM outbox")
    assert stored["payload"] == task.payload
    assert conversion["threshold_usd"] == Decimal("12.345")
    assert run.json["figures"]["threshold_usd"] == "12.345"
    assert conversion["total_eth"] == Decimal("1.500000000000000001")
    assert conversion["total_usd"] == Decimal("5100.0000000034")
    assert conversion["status"] == "swapping"  # the executor accepted the task
    assert_invariants_hold(db)


def test_a_conversion_stuck_past_swap_stale_after_is_logged_every_run_not_released(
    new_app: Callable[..., Flask], db: Database, swap_sender: Any, logs: LogCapture
) -> None:
    app = new_app()
    add_pending(db, [("0.001", "11")])
    run_now(app)  # accepted: swapping
    swap_sender.fail_with = "executor down"
    add_pending(db, [("0.002", "12")])
    run_now(app)  # never accepted: still claimed
    swap_sender.fail_with = None
    add_pending(db, [("0.003", "13")])
    run_now(app)  # swapping, younger than SWAP_STALE_AFTER
    swapping, claimed, young = conversions(db)
    assert (swapping["status"], claimed["status"]) == ("swapping", "claimed")
    for conversion, age_s in ((swapping, 7300), (claimed, 7201), (young, 7100)):
        query(
            db,
            "UPDATE batch_conversions"
            " SET created_at = now() - make_interval(secs => %s)"
            " WHERE batch_conversion_id = %s RETURNING 1",
            (age_s, conversion["batch_conversion_id"]),
        )
    held = {
        conversion["batch_conversion_id"]: sorted(
            row["id"]
            for row in query(
                db,
                "SELECT id FROM payout_accumulation WHERE batch_conversion_id = %s",
                (conversion["batch_conversion_id"],),
            )
        )
        for conversion in (swapping, claimed, young)
    }
    before = conversions(db)
    logs.records.clear()
    swap_sender.fail_with = "executor still down"  # keeps 'claimed' claimed

    runs = [run_now(app), run_now(app)]

    stale = [
        line["batch_conversion_id"]
        for line in logs.lines("conversion_stale", logging.ERROR)
    ]
    expected = [
        str(swapping["batch_conversion_id"]),
        str(claimed["batch_conversion_id"]),
    ]
    assert stale == expected * 2  # on each run, oldest first
    assert [run.json["figures"]["conversions_stale"] for run in runs] == [2, 2]
    after = conversions(db)
    assert [(c["status"], c["updated_at"]) for c in after] == [
        (c["status"], c["updated_at"]) for c in before
    ]
    for conversion_id, rows in held.items():
        still = query(
            db,
            "SELECT id, conversion_status FROM payout_accumulation"
            " WHERE batch_conversion_id = %s ORDER BY id",
            (conversion_id,),
        )
        assert [row["id"] for row in still] == rows
        assert {row["conversion_status"] for row in still} == {"swapping"}
    assert_invariants_hold(db)
