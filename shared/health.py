"""Job heartbeats and the health report every service serves.

A job's heartbeat is the finish of its newest successful run. Measured
against its interval and the grace (DESIGN.md section 5), a job is:

- ``up``: the heartbeat is at most interval + grace old;
- ``late``: older than that, at most 2 x interval + grace;
- ``down``: older still; or it never succeeded and 2 x interval + grace
  have passed since the suite's database was created;
- ``never``: it never succeeded, and that much time has not passed yet.

Ages are taken from the database's clock, so tests (and an operator
replaying an incident) can age a heartbeat in the database.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.db import Database, DatabaseUnavailable, load_queries

QUERIES = load_queries(Path(__file__).with_name("health.sql"))

JOBS = ("check-threshold", "process")


@dataclass(frozen=True)
class JobHealth:
    job: str
    state: str  # up, late, down, never
    last_success_at: datetime | None
    age_s: int | None
    interval_s: int
    # The oldest run still marked running, and whether it outlived the lock's
    # bound: such a run hung or died, and it is never a heartbeat.
    running_since: datetime | None
    hung: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "last_success_at": _iso(self.last_success_at),
            "age_s": self.age_s,
            "interval_s": self.interval_s,
            "running_since": _iso(self.running_since),
            "hung": self.hung,
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def interval_of(settings: Settings, job: str) -> int:
    if job == "check-threshold":
        return settings.check_threshold_interval_s
    return settings.process_interval_s


def job_state(age_s: float, interval_s: int, grace_s: int) -> str:
    if age_s <= interval_s + grace_s:
        return "up"
    if age_s <= 2 * interval_s + grace_s:
        return "late"
    return "down"


def job_health(db: Database, settings: Settings) -> dict[str, JobHealth]:
    with db.transaction() as cur:
        cur.execute(QUERIES["job_heartbeats"], {"jobs": list(JOBS)})
        rows = cur.fetchall()
    report = {}
    for row in rows:
        interval = interval_of(settings, row["job"])
        grace = settings.job_grace_s
        last = row["last_success_at"]
        if last is not None:
            age = (row["now"] - last).total_seconds()
            state = job_state(age, interval, grace)
        else:
            age = (row["now"] - row["suite_created_at"]).total_seconds()
            state = "down" if age > 2 * interval + grace else "never"
        running_since = row["running_since"]
        hung = running_since is not None and (
            (row["now"] - running_since).total_seconds() > settings.job_lock_timeout_s
        )
        report[row["job"]] = JobHealth(
            job=row["job"],
            state=state,
            last_success_at=last,
            age_s=int(age) if last is not None else None,
            interval_s=interval,
            running_since=running_since,
            hung=hung,
        )
    return report


def health_report(
    db: Database, settings: Settings, service: str
) -> tuple[dict[str, Any], int]:
    """The body and status of ``GET /health``: 503 if the database or a job is down."""
    body: dict[str, Any] = {
        "status": "ok",
        "service": service,
        "version": settings.version,
    }
    started = time.perf_counter()
    try:
        jobs = job_health(db, settings)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        with db.transaction() as cur:
            cur.execute(
                QUERIES["open_batches"], {"stale_after_s": settings.swap_stale_after}
            )
            batches = cur.fetchone()
            cur.execute(QUERIES["undelivered_tasks"])
            tasks = cur.fetchall()
    except DatabaseUnavailable:
        body.update(status="down", database={"ok": False, "latency_ms": None}, jobs={})
        return body, 503
    assert batches is not None
    body["database"] = {"ok": True, "latency_ms": latency_ms}
    body["jobs"] = {job: health.as_json() for job, health in jobs.items()}
    body["batches"] = {
        "conversions_open": batches["conversions_open"],
        "conversions_stuck": batches["conversions_stuck"],
        "oldest_conversion_at": _iso(batches["oldest_conversion_at"]),
        "payouts_open": batches["payouts_open"],
        "payouts_stuck": batches["payouts_stuck"],
        "oldest_payout_at": _iso(batches["oldest_payout_at"]),
        "stale_after_s": settings.swap_stale_after,
    }
    body["undelivered_tasks"] = {
        row["service"]: {
            "tasks": row["tasks"],
            "oldest_at": _iso(row["oldest_at"]),
            "most_attempts": row["most_attempts"],
        }
        for row in tasks
    }
    body["status"] = verdict(
        jobs, batches["conversions_stuck"] + batches["payouts_stuck"]
    )
    return body, 503 if body["status"] == "down" else 200


def verdict(jobs: dict[str, JobHealth], stuck_batches: int) -> str:
    """``down`` when a job is down, ``degraded`` when something needs a look."""
    states = {health.state for health in jobs.values()}
    if "down" in states:
        return "down"
    worrying = (
        # "never" is how every job starts after a deploy: not a worry yet.
        "late" in states
        or stuck_batches > 0
        or any(health.hung for health in jobs.values())
    )
    return "degraded" if worrying else "ok"
