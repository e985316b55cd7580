"""The scheduled-run mechanism every scheduled endpoint goes through.

A run is identified by its job (the endpoint's, whatever the scheduler's
job-name header says) and its slot: ``X-CloudScheduler-ScheduleTime`` when
present, else the start of the current interval. Then:

1. A per-job advisory lock is taken for the whole run. It lives in a
   transaction on its own connection with ``idle_in_transaction_session_
   timeout`` set, so a holder that hangs loses it when that runs out, and a
   holder that dies loses it with its connection. A run that finds the lock
   held answers "busy" and does nothing.
2. A slot that already succeeded is not run again ("repeated"); a failed
   slot may run again.
3. The run is recorded in ``job_runs`` as running, then as succeeded (with
   its figures) or failed (with its error), and logged in one line.

The work itself must still be safe if it ever ran twice at once (the lock
can expire under a run slower than its bound): claims are single
statements that take only rows still free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors

from shared.db import Database, DatabaseUnavailable, load_queries, to_json

QUERIES = load_queries(Path(__file__).with_name("jobs.sql"))

log = logging.getLogger("payouts.jobs")

JOBS = ("check-threshold", "process")
TRIGGERS = ("scheduler", "watchdog", "manual")
# Advisory lock keys: the suite's namespace and one number per job.
_LOCK_NAMESPACE = 0x5041
_LOCK_KEYS = {"check-threshold": 1, "process": 2}


class BadRunRequest(ValueError):
    """A scheduler header we cannot read."""


@dataclass(frozen=True)
class RunIdentity:
    job: str
    slot: datetime
    trigger: str


def parse_schedule_time(text: str) -> datetime:
    """Cloud Scheduler's ``X-CloudScheduler-ScheduleTime`` (RFC 3339)."""
    # RFC 3339 also allows a lower-case "z", which fromisoformat does not read.
    text = text.strip().upper().replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRunRequest(
            "X-CloudScheduler-ScheduleTime is not an RFC 3339 time"
        ) from None
    if moment.tzinfo is None:
        raise BadRunRequest("X-CloudScheduler-ScheduleTime has no time zone")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00:00+01:00 is a valid time whose UTC is in year 0.
        raise BadRunRequest(
            "X-CloudScheduler-ScheduleTime is outside the years 1 to 9999 in UTC"
        ) from None


def current_slot(now: datetime, interval_s: int) -> datetime:
    """The start of the interval ``now`` falls in (UTC, aligned to the epoch)."""
    seconds = int(now.timestamp())
    return datetime.fromtimestamp(seconds - seconds % interval_s, tz=UTC)


def identify_run(
    job: str,
    interval_s: int,
    now: datetime,
    schedule_time: str | None = None,
    trigger: str | None = None,
) -> RunIdentity:
    """A run's identity from the scheduler's headers (either may be absent)."""
    trigger = (trigger or "scheduler").strip().lower()
    if trigger not in TRIGGERS:
        raise BadRunRequest(f"X-Trigger must be one of {', '.join(TRIGGERS)}")
    if schedule_time:
        slot = parse_schedule_time(schedule_time)
    elif trigger == "manual":
        slot = now  # an operator's run is its own slot: it always runs
    else:
        slot = current_slot(now, interval_s)
    return RunIdentity(job=job, slot=slot, trigger=trigger)


@dataclass
class RunResult:
    identity: RunIdentity
    outcome: str  # succeeded, failed, busy, repeated
    run_id: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration_ms: int = 0
    # What made a failed run fail, so the caller can answer 503 or 500.
    exception: Exception | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.identity.job,
            "slot": self.identity.slot.isoformat().replace("+00:00", "Z"),
            "trigger": self.identity.trigger,
            "outcome": self.outcome,
            "run_id": self.run_id,
            "figures": self.figures,
            "duration_ms": self.duration_ms,
        }


class JobRunner:
    """Runs one job's work under the lock and records it."""

    def __init__(self, db: Database, lock_timeout_s: int) -> None:
        self.db = db
        self.lock_timeout_s = lock_timeout_s

    def run(
        self, identity: RunIdentity, work: Callable[[RunIdentity], dict[str, Any]]
    ) -> RunResult:
        started = time.perf_counter()
        with self.db.connection() as lock_conn:
            try:
                locked = self._try_lock(lock_conn, identity.job)
                if not locked:
                    result = RunResult(identity, "busy")
                elif self._slot_succeeded(identity):
                    result = RunResult(identity, "repeated")
                else:
                    result = self._run_locked(identity, work)
            finally:
                self._release(lock_conn)
        if result.run_id is None:
            result.run_id = self._record_skip(identity, result.outcome)
        result.duration_ms = int((time.perf_counter() - started) * 1000)
        self._log(result)
        return result

    # --- steps -----------------------------------------------------------------

    def _try_lock(self, conn: Any, job: str) -> bool:
        try:
            with conn.cursor() as cur:
                cur.execute(
                    QUERIES["take_lock"],
                    {
                        "namespace": _LOCK_NAMESPACE,
                        "key": _LOCK_KEYS[job],
                        "timeout": f"{self.lock_timeout_s}s",
                    },
                )
                row = cur.fetchone()
            return bool(row[1])
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as error:
            raise DatabaseUnavailable(str(error).strip()) from error

    def _release(self, conn: Any) -> None:
        # Ending the transaction releases the lock. If the server already cut
        # the session (the bound ran out), the pool discards the connection.
        try:
            conn.rollback()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            conn.close()

    def _slot_succeeded(self, identity: RunIdentity) -> bool:
        with self.db.transaction() as cur:
            cur.execute(
                QUERIES["slot_succeeded"], {"job": identity.job, "slot": identity.slot}
            )
            return cur.fetchone() is not None

    def _run_locked(
        self, identity: RunIdentity, work: Callable[[RunIdentity], dict[str, Any]]
    ) -> RunResult:
        with self.db.transaction() as cur:
            cur.execute(
                QUERIES["start_run"],
                {
                    "job": identity.job,
                    "slot": identity.slot,
                    "trigger": identity.trigger,
                },
            )
            run_id = _returned_id(cur)
        try:
            figures = work(identity)
        except Exception as error:
            message = f"{type(error).__name__}: {error}"[:1000]
            self._finish(run_id, "failed", {}, message)
            return RunResult(identity, "failed", run_id, error=message, exception=error)
        outcome = self._finish(run_id, "succeeded", figures, None)
        return RunResult(identity, outcome, run_id, figures)

    def _finish(
        self, run_id: int, outcome: str, figures: dict[str, Any], error: str | None
    ) -> str:
        try:
            with self.db.transaction() as cur:
                cur.execute(
                    QUERIES["finish_run"],
                    {
                        "id": run_id,
                        "outcome": outcome,
                        "figures": to_json(figures),
                        "error": error,
                    },
                )
        except psycopg2.errors.UniqueViolation:
            # Another run finished this slot first (possible only once the
            # lock's bound ran out); this one's work was harmless but late.
            with self.db.transaction() as cur:
                cur.execute(
                    QUERIES["finish_run"],
                    {
                        "id": run_id,
                        "outcome": "repeated",
                        "figures": to_json(figures),
                        "error": None,
                    },
                )
            return "repeated"
        except DatabaseUnavailable:
            if outcome == "failed":
                return outcome  # the original error is what propagates
            raise
        return outcome

    def _record_skip(self, identity: RunIdentity, outcome: str) -> int:
        with self.db.transaction() as cur:
            cur.execute(
                QUERIES["record_skip"],
                {
                    "job": identity.job,
                    "slot": identity.slot,
                    "trigger": identity.trigger,
                    "outcome": outcome,
                },
            )
            return _returned_id(cur)

    def _log(self, result: RunResult) -> None:
        # A failed run must page someone: money may be waiting on it.
        level = logging.ERROR if result.outcome == "failed" else logging.INFO
        log.log(
            level,
            "job_run_failed" if result.outcome == "failed" else "job_run",
            extra={
                "job": result.identity.job,
                "slot": result.identity.slot,
                "trigger": result.identity.trigger,
                "outcome": result.outcome,
                "run_id": result.run_id,
                "duration_ms": result.duration_ms,
                "error": result.error,
                **result.figures,
            },
        )


def _returned_id(cur: Any) -> int:
    row = cur.fetchone()
    assert row is not None
    return int(row["id"])


def utcnow() -> datetime:
    return datetime.now(UTC)
