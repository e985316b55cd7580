"""Scheduled runs of ``/check-threshold``: slots, the lock, the record, auth.

Every scheduled endpoint goes through one mechanism (DESIGN.md section 5):
a repeated delivery of a succeeded slot does not run twice, a per-job lock
bounded by ``JOB_LOCK_TIMEOUT_S`` keeps concurrent runs harmless, and each
run leaves one ``job_runs`` row and one log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2
import pytest
import requests
from conftest import INTERNAL_HEADERS, INTERNAL_TOKEN
from flask import Flask
from microbatch_support import (
    QUIET_SIBLING,
    FakeSecretManager,
    LogCapture,
    ManualClock,
    add_pending,
    assert_invariants_hold,
    close_app,
    conversions,
    job_runs,
    rows_by_status,
    wait_for,
)

from shared.db import Database
from shared.jobs import current_slot
from shared.secrets import SecretManagerSecrets

SLOT = "2025-06-01T10:05:00Z"
SLOT_TIME = datetime(2025, 6, 1, 10, 5, tzinfo=UTC)
# The advisory lock of the check-threshold job: (suite namespace, job key).
LOCK_NAMESPACE, LOCK_KEY = 0x5041, 1


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


def check(app: Flask, **headers: str) -> Any:
    return app.test_client().post(
        "/check-threshold", headers={**INTERNAL_HEADERS, **headers}
    )


def over_the_threshold(db: Database) -> list[int]:
    """Two pending payments worth 11 USD, over the test threshold of 10."""
    return add_pending(db, [("0.001", "4"), ("0.002", "7")])


def gcp_secrets(threshold: str) -> tuple[FakeSecretManager, SecretManagerSecrets]:
    client = FakeSecretManager(
        "p",
        {"INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN, "MICRO_BATCH_THRESHOLD_USD": threshold},
    )
    return client, SecretManagerSecrets(
        "p", cache_s=0, client=client, clock=ManualClock()
    )


@pytest.fixture
def lock_holder(database_url: str) -> Iterator[Any]:
    """A connection of the test's own, free to take the job's lock."""
    conn = psycopg2.connect(database_url)
    yield conn
    conn.close()


def lock_is_held(db: Database) -> bool:
    with db.transaction() as cur:
        cur.execute(
            "SELECT count(*) AS holders FROM pg_locks"
            " WHERE locktype = 'advisory' AND classid = %s AND objid = %s"
            " AND objsubid = 2 AND granted"
            " AND database = (SELECT oid FROM pg_database"
            "                 WHERE datname = current_database())",
            (LOCK_NAMESPACE, LOCK_KEY),
        )
        row = cur.fetchone()
    return bool(row and row["holders"])


# --- slots -------------------------------------------------------------------


def test_a_repeated_delivery_of_a_succeeded_slot_answers_repeated_and_runs_nothing(
    app: Flask, db: Database, swap_sender: Any
) -> None:
    over_the_threshold(db)
    first = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})
    assert first.status_code == 200
    assert first.json["outcome"] == "succeeded"
    assert first.json["figures"]["conversions_created"] == 1

    late_money = add_pending(db, [("0.01", "40")])  # alone over the threshold
    again = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})
    # The same instant written another way is the same slot.
    again_other_form = check(
        app, **{"X-CloudScheduler-ScheduleTime": "2025-06-01T12:05:00.000+02:00"}
    )

    for repeat in (again, again_other_form):
        assert repeat.status_code == 200
        assert repeat.json["outcome"] == "repeated"
        assert repeat.json["slot"] == SLOT
        assert "conversions_created" not in repeat.json["figures"]
    assert len(conversions(db)) == 1
    assert len(swap_sender.sent) == 1
    assert rows_by_status(db)["pending"] == late_money
    assert [(run["slot"], run["outcome"]) for run in job_runs(db)] == [
        (SLOT_TIME, "succeeded"),
        (SLOT_TIME, "repeated"),
        (SLOT_TIME, "repeated"),
    ]
    assert_invariants_hold(db)


def test_a_failed_slot_may_run_again(
    new_app: Callable[..., Flask], db: Database
) -> None:
    secret_manager, secrets = gcp_secrets("10")
    app = new_app(secrets=secrets, SECRETS_BACKEND="gcp", GCP_PROJECT="p")
    over_the_threshold(db)

    secret_manager.values["MICRO_BATCH_THRESHOLD_USD"] = "ten"
    failed = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})
    secret_manager.values["MICRO_BATCH_THRESHOLD_USD"] = "10"
    retried = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})

    assert failed.status_code == 503
    assert failed.json["error"]["code"] == "run_failed"
    assert retried.status_code == 200
    assert retried.json["outcome"] == "succeeded"
    assert retried.json["figures"]["conversions_created"] == 1
    assert [(run["slot"], run["outcome"]) for run in job_runs(db)] == [
        (SLOT_TIME, "failed"),
        (SLOT_TIME, "succeeded"),
    ]
    assert_invariants_hold(db)


def test_without_a_schedule_time_the_slot_is_the_current_interval(
    new_app: Callable[..., Flask], db: Database, swap_sender: Any
) -> None:
    # A day-long interval: the two calls cannot straddle a boundary in practice.
    app = new_app(CHECK_THRESHOLD_INTERVAL_S="86400")
    expected = current_slot(datetime.now(UTC), 86400)
    over_the_threshold(db)

    first = check(app)
    add_pending(db, [("0.01", "40")])
    second = check(app)

    slot = expected.isoformat().replace("+00:00", "Z")
    assert (first.json["outcome"], first.json["slot"]) == ("succeeded", slot)
    assert (second.json["outcome"], second.json["slot"]) == ("repeated", slot)
    assert second.status_code == 200
    assert len(conversions(db)) == 1
    assert len(swap_sender.sent) == 1
    assert_invariants_hold(db)


def test_a_manual_trigger_always_runs(app: Flask, db: Database) -> None:
    over_the_threshold(db)
    scheduled = check(app)
    more = add_pending(db, [("0.01", "40")])
    repeated = check(app)
    manual = check(app, **{"X-Trigger": "manual"})
    manual_again = check(app, **{"X-Trigger": "manual"})

    assert scheduled.json["outcome"] == "succeeded"
    assert repeated.json["outcome"] == "repeated"
    assert manual.status_code == manual_again.status_code == 200
    assert manual.json["outcome"] == manual_again.json["outcome"] == "succeeded"
    assert manual.json["figures"]["conversions_created"] == 1
    assert manual.json["figures"]["rows_claimed"] == len(more)
    assert manual_again.json["figures"]["conversions_created"] == 0
    assert [(run["trigger"], run["outcome"]) for run in job_runs(db)] == [
        ("scheduler", "succeeded"),
        ("scheduler", "repeated"),
        ("manual", "succeeded"),
        ("manual", "succeeded"),
    ]
    assert len(conversions(db)) == 2
    assert_invariants_hold(db)


def test_a_watchdog_trigger_is_recorded_as_watchdog(app: Flask, db: Database) -> None:
    over_the_threshold(db)

    run = check(app, **{"X-Trigger": "watchdog"})

    assert run.status_code == 200
    assert (run.json["trigger"], run.json["outcome"]) == ("watchdog", "succeeded")
    [recorded] = job_runs(db)
    assert (recorded["trigger"], recorded["outcome"]) == ("watchdog", "succeeded")
    assert_invariants_hold(db)


def test_the_job_is_the_endpoints_whatever_the_scheduler_job_name_says(
    app: Flask, db: Database
) -> None:
    run = check(app, **{"X-CloudScheduler-JobName": "process"})

    assert run.json["job"] == "check-threshold"
    assert [recorded["job"] for recorded in job_runs(db)] == ["check-threshold"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-CloudScheduler-ScheduleTime": "yesterday"},
        {"X-CloudScheduler-ScheduleTime": "2025-13-01T10:05:00Z"},
        {"X-CloudScheduler-ScheduleTime": "2025-06-01T10:05:00"},  # no zone
        {"X-Trigger": "cron"},
    ],
    ids=["not-a-time", "no-such-month", "no-time-zone", "unknown-trigger"],
)
def test_an_unreadable_scheduler_header_is_400_and_runs_nothing(
    app: Flask, db: Database, headers: dict[str, str]
) -> None:
    over_the_threshold(db)

    refused = check(app, **headers)

    assert refused.status_code == 400
    assert refused.json["error"]["code"] == "invalid"
    assert refused.json["error"]["message"]
    assert job_runs(db) == []
    assert conversions(db) == []


# --- the lock ----------------------------------------------------------------


def test_a_run_that_finds_the_lock_held_answers_busy_and_does_nothing(
    app: Flask, db: Database, lock_holder: Any, swap_sender: Any
) -> None:
    over_the_threshold(db)
    with lock_holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, LOCK_KEY))

    busy = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})
    lock_holder.rollback()  # the holder's transaction ends: the lock is free
    after = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})

    assert busy.status_code == 200
    assert busy.json["outcome"] == "busy"
    assert "conversions_created" not in busy.json["figures"]
    assert after.json["outcome"] == "succeeded"  # a busy slot is not done
    assert [
        (run["outcome"], run["figures"].get("conversions_created"))
        for run in job_runs(db)
    ] == [("busy", None), ("succeeded", 1)]
    assert all(run["finished_at"] is not None for run in job_runs(db))
    assert len(conversions(db)) == 1
    assert len(swap_sender.sent) == 1
    assert_invariants_hold(db)


def test_a_hung_run_loses_the_lock_once_job_lock_timeout_passes(
    new_app: Callable[..., Flask], db: Database, serve: Callable[[Flask], str]
) -> None:
    # The configuration's smallest bound; the hung run's work waits on a
    # secret read that does not come back until the test lets it.
    secret_manager, secrets = gcp_secrets("10")
    app = new_app(
        secrets=secrets, SECRETS_BACKEND="gcp", GCP_PROJECT="p", JOB_LOCK_TIMEOUT_S="5"
    )
    base = serve(app)
    over_the_threshold(db)
    release = secret_manager.hold_next("MICRO_BATCH_THRESHOLD_USD")

    def post() -> requests.Response:
        return requests.post(
            f"{base}/check-threshold",
            headers={**INTERNAL_HEADERS, "X-Trigger": "manual"},
            timeout=30,
        )

    hung: list[requests.Response] = []
    hung_thread = threading.Thread(target=lambda: hung.append(post()))
    hung_thread.start()
    try:
        wait_for(lambda: lock_is_held(db), message="the hung run takes the lock")
        taken = time.monotonic()
        busy = post()
        wait_for(lambda: not lock_is_held(db), 15, "the server ends the hung lock")
        held_for = time.monotonic() - taken
        after = post()
    finally:
        release.set()
        hung_thread.join(30)

    assert busy.json()["outcome"] == "busy"
    assert 4 <= held_for < 10
    assert after.status_code == 200
    assert after.json()["outcome"] == "succeeded"
    assert after.json()["figures"]["conversions_created"] == 1
    # The hung run finishes late, finds the rows taken, and claims nothing.
    assert hung[0].status_code == 200
    assert hung[0].json()["figures"]["conversions_created"] == 0
    assert len(conversions(db)) == 1
    assert sorted(run["outcome"] for run in job_runs(db)) == [
        "busy",
        "succeeded",
        "succeeded",
    ]
    assert_invariants_hold(db)


# --- the record of a run -----------------------------------------------------


def test_job_runs_rows_carry_outcome_figures_and_finished_at(
    app: Flask, db: Database
) -> None:
    claimed = over_the_threshold(db)

    run = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})

    [recorded] = job_runs(db)
    assert recorded["id"] == run.json["run_id"]
    assert recorded["job"] == "check-threshold"
    assert recorded["slot"] == SLOT_TIME
    assert recorded["trigger"] == "scheduler"
    assert recorded["outcome"] == "succeeded"
    assert recorded["error"] is None
    assert recorded["started_at"] <= recorded["finished_at"]
    figures = recorded["figures"]
    # What the run did is what it answered (the answer may say more: what
    # the service saw of its sibling's heartbeat after the run).
    assert run.json["figures"] | figures == run.json["figures"]
    assert figures["conversions_created"] == 1
    assert figures["rows_claimed"] == len(claimed)
    assert figures["threshold_usd"] == "10"
    assert figures["pending"] == {"eth": {"rows": 2, "usd": "11"}}
    assert figures["tasks_failed"] == 0
    assert_invariants_hold(db)


def test_each_run_logs_one_info_job_run_line_with_its_figures(
    app: Flask, db: Database, lock_holder: Any, logs: LogCapture
) -> None:
    over_the_threshold(db)
    succeeded = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})
    repeated = check(app, **{"X-CloudScheduler-ScheduleTime": SLOT})
    with lock_holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, LOCK_KEY))
    busy = check(app, **{"X-Trigger": "manual"})
    lock_holder.rollback()

    lines = logs.lines("job_run")
    assert [line["run_id"] for line in lines] == [
        succeeded.json["run_id"],
        repeated.json["run_id"],
        busy.json["run_id"],
    ]
    assert {line["severity"] for line in lines} == {"INFO"}
    assert [line["outcome"] for line in lines] == ["succeeded", "repeated", "busy"]
    assert all(line["job"] == "check-threshold" for line in lines)
    first = lines[0]
    assert first["trigger"] == "scheduler"
    assert first["conversions_created"] == 1
    assert first["rows_claimed"] == 2
    assert first["threshold_usd"] == "10"  # an amount is a string, never a float
    assert first["pending"] == {"eth": {"rows": 2, "usd": "11"}}
    assert isinstance(first["duration_ms"], int)
    assert logs.lines("job_run_failed") == []
    assert [r for r in logs.records if r.levelno >= logging.ERROR] == []
    assert_invariants_hold(db)


# --- who may run it ----------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Basic dGVzdDp0ZXN0", "Bearer ", INTERNAL_TOKEN],
    ids=["missing", "wrong-token", "basic", "empty-bearer", "no-scheme"],
)
def test_a_missing_or_wrong_bearer_token_is_401_and_records_no_run(
    app: Flask, db: Database, authorization: str | None
) -> None:
    over_the_threshold(db)
    headers = {} if authorization is None else {"Authorization": authorization}

    refused: Any = app.test_client().post("/check-threshold", headers=headers)

    assert refused.status_code == 401
    assert refused.json["error"]["code"] == "unauthorized"
    assert refused.json["error"]["message"]
    assert job_runs(db) == []
    assert conversions(db) == []


def test_a_run_request_with_a_body_over_64_kib_is_413_and_runs_nothing(
    app: Flask, db: Database
) -> None:
    over_the_threshold(db)

    refused = app.test_client().post(
        "/check-threshold", headers=INTERNAL_HEADERS, data=b"x" * (64 * 1024 + 1)
    )

    assert refused.status_code == 413
    assert refused.json["error"]["code"] == "body_too_large"
    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM job_runs")
        assert cur.fetchone()["n"] == 0
        cur.execute("SELECT count(*) AS n FROM batch_conversions")
        assert cur.fetchone()["n"] == 0
