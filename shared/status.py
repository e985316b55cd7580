"""What waits, what ran, what is stuck: ``payoutctl status``.

Every figure comes from one set-based query in ``queries.sql``, all read in
one read-only snapshot, so money moving meanwhile cannot be counted twice or
not at all. Amounts stay ``Decimal`` until they are written as exact strings.
Each job's state and heartbeat are the ones ``/health`` reports
(``shared.health``), read just before the snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from shared import health, money
from shared.clients import QUERIES
from shared.config import Settings
from shared.db import Database

Row = dict[str, Any]


@dataclass(frozen=True)
class Status:
    now: datetime
    stale_after_s: int
    pending_conversion: list[Row]
    converted_unpaid: Row
    jobs: dict[str, health.JobHealth]
    last_runs: dict[str, Row]
    open_batches: list[Row]
    undelivered_tasks: list[Row]

    @property
    def stale_batches(self) -> int:
        return sum(1 for batch in self.open_batches if batch["stale"])


def gather(db: Database, settings: Settings) -> Status:
    """Read every figure of the status; the money in one consistent snapshot."""
    stale_after_s = settings.swap_stale_after
    jobs = health.job_health(db, settings)
    with db.transaction() as cur:
        cur.execute(QUERIES["reconcile_snapshot"])
        cur.execute(QUERIES["status_now"])
        clock = cur.fetchone()
        cur.execute(QUERIES["status_pending_conversion"])
        pending = [dict(row) for row in cur.fetchall()]
        cur.execute(QUERIES["status_converted_unpaid"])
        unpaid = cur.fetchone()
        cur.execute(QUERIES["status_last_runs"], {"jobs": list(jobs)})
        last_runs = {row["job"]: dict(row) for row in cur.fetchall()}
        cur.execute(
            QUERIES["status_open_batches"],
            {"stale_after_s": stale_after_s, "limit": None},
        )
        batches = [dict(row) for row in cur.fetchall()]
        cur.execute(QUERIES["status_undelivered_tasks"])
        tasks = [dict(row) for row in cur.fetchall()]
    assert clock is not None and unpaid is not None
    return Status(
        now=clock["now"],
        stale_after_s=stale_after_s,
        pending_conversion=pending,
        converted_unpaid=dict(unpaid),
        jobs=jobs,
        last_runs=last_runs,
        open_batches=batches,
        undelivered_tasks=tasks,
    )


# --- JSON ---------------------------------------------------------------------


def as_json(status: Status) -> dict[str, Any]:
    """The status with amounts as exact decimal strings, times in ISO 8601."""
    unpaid = status.converted_unpaid
    return {
        "generated_at": _time(status.now),
        "pending_conversion": [
            {
                "outcome_currency": row["outcome_currency"],
                "rows": row["row_count"],
                "accumulated_usd": money.to_text(row["accumulated_usd"]),
                "accumulated_eth": money.to_text(row["accumulated_eth"]),
            }
            for row in status.pending_conversion
        ],
        "converted_unpaid": {
            "clients": unpaid["clients"],
            "rows": unpaid["row_count"],
            "usdt": money.to_text(unpaid["usdt"]),
            "clients_over_threshold": unpaid["over_threshold"],
            "clients_over_threshold_without_wallet": unpaid[
                "over_threshold_without_wallet"
            ],
        },
        "jobs": {
            job: {**state.as_json(), "last_run": _run_json(status.last_runs.get(job))}
            for job, state in status.jobs.items()
        },
        "stale_after_s": status.stale_after_s,
        "open_batches": [_batch_json(batch) for batch in status.open_batches],
        "undelivered_tasks": {
            row["service"]: {
                "tasks": row["tasks"],
                "oldest_at": _time(row["oldest_at"]),
                "oldest_age_s": row["oldest_age_s"],
                "most_attempts": row["most_attempts"],
                "last_error": row["last_error"],
            }
            for row in status.undelivered_tasks
        },
    }


def _run_json(run: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "outcome": run["outcome"],
        "trigger": run["trigger"],
        "started_at": _time(run["started_at"]),
        "finished_at": _time(run["finished_at"]),
    }


def _batch_json(batch: Mapping[str, Any]) -> dict[str, Any]:
    common = {
        "kind": batch["kind"],
        "batch_id": batch["batch_id"],
        "status": batch["status"],
        "created_at": _time(batch["created_at"]),
        "age_s": batch["age_s"],
        "stale": batch["stale"],
        "rows": batch["row_count"],
    }
    if batch["kind"] == "conversion":
        return {
            **common,
            "outcome_currency": batch["outcome_currency"],
            "total_eth": money.to_text(batch["total_eth"]),
            "total_usd": money.to_text(batch["total_usd"]),
        }
    return {
        **common,
        "client_id": batch["client_id"],
        "total_usdt": money.to_text(batch["total_usdt"]),
    }


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


# --- text ---------------------------------------------------------------------


def as_text(status: Status) -> str:
    """The status for a terminal: one section per concern."""
    sections = [
        _pending_text(status),
        _unpaid_text(status.converted_unpaid),
        _jobs_text(status),
        _batches_text(status),
        _tasks_text(status),
    ]
    return "\n\n".join(sections)


def _pending_text(status: Status) -> str:
    lines = ["pending conversion:"]
    for row in status.pending_conversion:
        lines.append(
            f"  {row['outcome_currency']}: {_count(row['row_count'], 'row')}, "
            f"{_amount(row['accumulated_eth'])} {row['outcome_currency']}, "
            f"{_amount(row['accumulated_usd'])} usd"
        )
    if len(lines) == 1:
        lines.append("  nothing")
    return "\n".join(lines)


def _unpaid_text(unpaid: Mapping[str, Any]) -> str:
    over = f"{unpaid['over_threshold']} over their threshold"
    if unpaid["over_threshold_without_wallet"]:
        over += f" ({unpaid['over_threshold_without_wallet']} without a wallet)"
    return (
        "converted, awaiting payout:\n"
        f"  {_count(unpaid['clients'], 'client')}, "
        f"{_count(unpaid['row_count'], 'row')}, {_amount(unpaid['usdt'])} usdt; "
        f"{over}"
    )


def _jobs_text(status: Status) -> str:
    lines = ["jobs:"]
    width = max(len(job) for job in status.jobs)
    for job, state in status.jobs.items():
        lines.append(
            f"  {job:<{width}}  {state.state:<5}  every {state.interval_s} s; "
            f"{_last_run_text(status.last_runs.get(job))}; {_success_text(state)}"
        )
    return "\n".join(lines)


def _last_run_text(run: Mapping[str, Any] | None) -> str:
    if run is None:
        return "never ran"
    text = (
        f"last run {run['outcome']} ({run['trigger']}), "
        f"started {_when(run['started_at'])}"
    )
    if run["finished_at"] is not None:
        text += f", finished {_when(run['finished_at'])}"
    return text


def _success_text(state: health.JobHealth) -> str:
    if state.last_success_at is None:
        text = "no success yet"
    else:
        text = f"last success {_when(state.last_success_at)}, {state.age_s} s ago"
    if state.hung and state.running_since is not None:
        text += f"; a run hangs since {_when(state.running_since)}"
    return text


def _batches_text(status: Status) -> str:
    lines = [
        f"open batches ({status.stale_batches} stale, "
        f"stale after {status.stale_after_s} s):"
    ]
    for batch in status.open_batches:
        if batch["kind"] == "conversion":
            holds = (
                f"{_amount(batch['total_eth'])} {batch['outcome_currency']} "
                f"({_amount(batch['total_usd'])} usd)"
            )
        else:
            holds = (
                f"{_amount(batch['total_usdt'])} usdt for client {batch['client_id']}"
            )
        flag = "  STALE" if batch["stale"] else ""
        lines.append(
            f"  {batch['kind']:<10}  {batch['batch_id']}  {batch['status']:<8}  "
            f"{holds}, {_count(batch['row_count'], 'row')}, "
            f"created {_when(batch['created_at'])}, {batch['age_s']} s ago{flag}"
        )
    if len(lines) == 1:
        lines.append("  none")
    return "\n".join(lines)


def _tasks_text(status: Status) -> str:
    lines = ["undelivered tasks:"]
    for row in status.undelivered_tasks:
        line = (
            f"  {row['service']}: {_count(row['tasks'], 'task')}, oldest "
            f"{_when(row['oldest_at'])} ({row['oldest_age_s']} s ago), "
            f"most attempts {row['most_attempts']}"
        )
        if row["last_error"]:
            line += f"; last error: {row['last_error'][:200]}"
        lines.append(line)
    if len(lines) == 1:
        lines.append("  none")
    return "\n".join(lines)


def _amount(amount: Decimal) -> str:
    return money.to_text(amount)


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
