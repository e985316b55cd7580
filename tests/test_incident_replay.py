"""The incident this suite answers, replayed with time under the test's control.

Both jobs run every 5 minutes with 60 s grace. check-threshold's scheduler
stops after a run; a payment arrives; process keeps running. Heartbeats are
aged in the database, as an operator replaying the incident would.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from conftest import INTERNAL_TOKEN, MICROBATCH_ENV, RecordingSender, base_environ
from flask import Flask

from shared import reconcile
from shared.db import Database
from shared.jobs import current_slot

INTERVALS = {
    "CHECK_THRESHOLD_INTERVAL_S": "300",
    "PROCESS_INTERVAL_S": "300",
    "JOB_GRACE_S": "60",
}
MICRO_URL = "http://microbatch.test"
BATCH_URL = "http://batch.test"


class RoutingSender:
    """Delivers tasks to the in-process app their URL names; records the rest.

    A watchdog trigger from the batch processor reaches the micro-batch
    processor's endpoint as Cloud Tasks would deliver it.
    """

    def __init__(self) -> None:
        self.apps: dict[str, Flask] = {}
        self.executor = RecordingSender()
        self.delivered: list[tuple[str, int]] = []

    def send(self, task: Any) -> None:
        from shared.outbox import DeliveryFailed

        for base, app in self.apps.items():
            if task.target_url.startswith(base):
                path = task.target_url.removeprefix(base)
                headers = {"Authorization": f"Bearer {INTERNAL_TOKEN}", **task.headers}
                response = app.test_client().post(path, headers=headers)
                self.delivered.append((task.target_url, response.status_code))
                if response.status_code >= 500:
                    raise DeliveryFailed(f"HTTP {response.status_code}")
                return
        self.executor.send(task)


@pytest.fixture
def system(database_url: str) -> tuple[Flask, Flask, RoutingSender]:
    from gcbatchprocessor.app import create_app as create_batch
    from gcmicrobatchprocessor.app import create_app as create_micro

    sender = RoutingSender()
    micro = create_micro(
        environ=base_environ(
            database_url, **{**MICROBATCH_ENV, **INTERVALS, "SERVICE_URL": MICRO_URL}
        ),
        sender=sender,
    )
    batch = create_batch(
        environ=base_environ(
            database_url,
            **INTERVALS,
            SERVICE_URL=BATCH_URL,
            PAYOUT_EXECUTOR_URL="http://executor.test/payout",
            MICRO_BATCH_PROCESSOR_URL=MICRO_URL,
        ),
        sender=sender,
    )
    sender.apps = {MICRO_URL: micro, BATCH_URL: batch}
    return micro, batch, sender


def scheduler_post(app: Flask, path: str, slot: datetime) -> Any:
    headers = {
        "Authorization": f"Bearer {INTERNAL_TOKEN}",
        "X-CloudScheduler": "true",
        "X-CloudScheduler-JobName": "cloud-job-name-is-ignored",
        "X-CloudScheduler-ScheduleTime": slot.isoformat().replace("+00:00", "Z"),
    }
    return app.test_client().post(path, headers=headers)


def age_heartbeat(db: Database, job: str, seconds: float) -> None:
    """Make the job's newest success ``seconds`` old, by the database's clock."""
    with db.transaction() as cur:
        cur.execute(
            "UPDATE job_runs SET started_at = now() - make_interval(secs => %s),"
            " finished_at = now() - make_interval(secs => %s)"
            " WHERE job = %s AND outcome = 'succeeded'",
            (seconds + 1, seconds, job),
        )


def add_pending_payment(db: Database, usd: str) -> None:
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd)"
            " VALUES (-1001, 'threshold', 5) ON CONFLICT DO NOTHING"
        )
        cur.execute(
            """
            INSERT INTO payout_accumulation (nowpayments_payment_id, client_id,
                user_id, payment_amount_usd, usd_source, platform_fee_percent,
                accumulated_usd, accumulated_eth, outcome_currency)
            VALUES ('incident-1', -1001, 7, %s, 'price', 0, %s, 0.005, 'eth')
            RETURNING id
            """,
            (usd, usd),
        )
        # Its delivery record, as the accumulator writes it (invariant 6).
        cur.execute(
            "INSERT INTO ipn_events (source, payment_id, outcome, http_status,"
            " accumulation_id, raw_body, body_size)"
            " VALUES ('router', 'incident-1', 'accumulated', 200, %s, '', 0)",
            (cur.fetchone()["id"],),
        )


def health_of(app: Flask, job: str) -> tuple[int, str, Any]:
    response = app.test_client().get("/health")
    return response.status_code, response.json["jobs"][job]["state"], response.json


def overdue_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "job_overdue"]


def test_the_stopped_job_is_seen_late_then_down_announced_once_and_healed(
    system: tuple[Flask, Flask, RoutingSender],
    db: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    micro, batch, sender = system
    # The last runs happened in a slot before the outage began.
    slot = current_slot(datetime.now(UTC), 300) - timedelta(minutes=15)
    assert (
        scheduler_post(micro, "/check-threshold", slot).json["outcome"] == "succeeded"
    )
    assert scheduler_post(batch, "/process", slot).json["outcome"] == "succeeded"
    assert health_of(batch, "check-threshold")[:2] == (200, "up")

    # check-threshold's scheduler stops. Six minutes on, it is late.
    age_heartbeat(db, "check-threshold", 6 * 60 - 2)
    assert health_of(micro, "check-threshold")[:2] == (200, "up")
    age_heartbeat(db, "check-threshold", 6 * 60 + 1)
    status, state, body = health_of(batch, "check-threshold")
    assert (status, state, body["status"]) == (200, "late", "degraded")

    # A payment arrives; process keeps running and sees its sibling late:
    # no alarm yet.
    add_pending_payment(db, "25")
    age_heartbeat(db, "process", 1)
    caplog.set_level(logging.INFO)
    late_run = scheduler_post(batch, "/process", slot + timedelta(minutes=5))
    assert late_run.json["figures"]["sibling_state"] == "late"
    assert overdue_lines(caplog) == []

    # Eleven minutes after the last success it is down: 503 on every service.
    age_heartbeat(db, "check-threshold", 11 * 60 + 1)
    for app in (micro, batch):
        status, state, body = health_of(app, "check-threshold")
        assert (status, state, body["status"]) == (503, "down", "down")

    # The first process run after that announces it once and heals it.
    caplog.clear()
    run = batch.test_client().post(
        "/process",
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}", "X-Trigger": "manual"},
    )
    assert run.status_code == 200
    [overdue] = overdue_lines(caplog)
    assert overdue.levelname == "ERROR"
    assert overdue.job == "check-threshold"
    assert overdue.interval_s == 300
    assert overdue.age_s >= 11 * 60
    assert run.json["figures"]["watchdog_triggered"] is True
    assert (f"{MICRO_URL}/check-threshold", 200) in sender.delivered

    with db.transaction() as cur:
        cur.execute(
            "SELECT trigger, outcome, figures FROM job_runs"
            " WHERE job = 'check-threshold' ORDER BY id DESC LIMIT 1"
        )
        watchdog_run = cur.fetchone()
        cur.execute("SELECT status, total_usd, row_count FROM batch_conversions")
        [conversion] = cur.fetchall()
        assert reconcile.find_breaches(cur) == []
    assert (watchdog_run["trigger"], watchdog_run["outcome"]) == (
        "watchdog",
        "succeeded",
    )
    # The watchdog run does not watch its own sibling in turn.
    assert "sibling_state" not in watchdog_run["figures"]
    assert conversion["total_usd"] == Decimal("25")
    assert [task.payload["kind"] for task in sender.executor.sent] == ["swap"]

    # Health is back to up everywhere.
    for app in (micro, batch):
        status, state, body = health_of(app, "check-threshold")
        assert (status, state) == (200, "up")


def test_the_real_scheduler_resuming_in_the_watchdogs_slot_runs_nothing_twice(
    system: tuple[Flask, Flask, RoutingSender], db: Database
) -> None:
    micro, batch, _ = system
    slot = current_slot(datetime.now(UTC), 300)
    scheduler_post(micro, "/check-threshold", slot - timedelta(minutes=15))
    age_heartbeat(db, "check-threshold", 12 * 60)
    add_pending_payment(db, "25")

    batch.test_client().post(
        "/process",
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}", "X-Trigger": "manual"},
    )
    resumed = scheduler_post(micro, "/check-threshold", slot)

    assert resumed.json["outcome"] == "repeated"
    with db.transaction() as cur:
        cur.execute(
            "SELECT count(*) AS n FROM job_runs WHERE job = 'check-threshold'"
            " AND slot = %s AND outcome = 'succeeded'",
            (slot,),
        )
        assert cur.fetchone()["n"] == 1
        cur.execute("SELECT count(*) AS n FROM batch_conversions")
        assert cur.fetchone()["n"] == 1


def test_a_hung_run_is_reported_and_is_not_a_heartbeat(
    system: tuple[Flask, Flask, RoutingSender], db: Database
) -> None:
    micro, _, _ = system
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO job_runs (job, slot, trigger, started_at)"
            " VALUES ('check-threshold', now() - interval '20 minutes', 'scheduler',"
            " now() - interval '20 minutes')"
        )
        cur.execute("UPDATE suite_info SET created_at = now() - interval '1 hour'")

    status, state, body = health_of(micro, "check-threshold")

    assert (status, state) == (503, "down")
    job = body["jobs"]["check-threshold"]
    assert job["last_success_at"] is None
    assert job["running_since"] is not None
    assert job["hung"] is True


@pytest.mark.parametrize(
    ("created_seconds_ago", "expected"),
    [
        (60, (200, "never")),
        (2 * 300 + 60 - 5, (200, "never")),
        (2 * 300 + 60 + 5, (503, "down")),
    ],
)
def test_a_job_that_never_ran_after_a_deploy_turns_down_after_twice_its_interval(
    system: tuple[Flask, Flask, RoutingSender],
    db: Database,
    created_seconds_ago: int,
    expected: tuple[int, str],
) -> None:
    micro, _, _ = system
    with db.transaction() as cur:
        cur.execute(
            "UPDATE suite_info SET created_at = now() - make_interval(secs => %s)",
            (created_seconds_ago,),
        )

    assert health_of(micro, "process")[:2] == expected
