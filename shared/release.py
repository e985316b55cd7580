"""An operator's release of a stuck batch: ``payoutctl batches release``.

A conversion or payout batch that never finishes is reported, never
released by itself (DESIGN.md section 3): an operator asks the executor,
then decides. Releasing does what the executor's ``failed`` callback does,
with the services' own statements: the batch is marked failed and its rows
go back for a later batch (a conversion's to ``pending``, a payout's to
awaiting payout). Its task is withdrawn if it was never delivered.

The command shows the batch first and asks; the release then locks the batch
row and checks that nothing changed since it was shown, so what the operator
agreed to is exactly what is released, and no lock is held while a person
reads and decides.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from gcbatchprocessor import payouts
from gcmicrobatchprocessor import conversion
from shared import money
from shared.clients import QUERIES, Refused
from shared.db import Database


@dataclass(frozen=True)
class Kind:
    """Where a kind of batch lives, and the owning service's statements."""

    name: str
    open_statuses: tuple[str, ...]
    service: str
    executor: str
    lock: str  # batch row FOR UPDATE
    fail: str
    release_rows: str
    preview: str  # in shared/queries.sql
    returns_rows_to: str


CONVERSION = Kind(
    name="conversion",
    open_statuses=("claimed", "swapping"),
    service=conversion.SERVICE,
    executor="swap executor",
    lock=conversion.QUERIES["conversion_for_update"],
    fail=conversion.QUERIES["fail_conversion"],
    release_rows=conversion.QUERIES["release_rows"],
    preview=QUERIES["conversion_to_release"],
    returns_rows_to="pending conversion",
)
PAYOUT = Kind(
    name="payout batch",
    open_statuses=("claimed", "sent"),
    service=payouts.SERVICE,
    executor="payout executor",
    lock=payouts.QUERIES["batch_for_update"],
    fail=payouts.QUERIES["fail_batch"],
    release_rows=payouts.QUERIES["release_batch_rows"],
    preview=QUERIES["payout_to_release"],
    returns_rows_to="awaiting payout",
)


@dataclass(frozen=True)
class Batch:
    """A batch as shown to the operator before the release."""

    kind: Kind
    row: dict[str, Any]
    task: dict[str, Any] | None

    @property
    def batch_id(self) -> str:
        return str(self.row["batch_id"])

    @property
    def task_undelivered(self) -> bool:
        return self.task is not None and self.task["sent_at"] is None

    def what_matters(self) -> tuple[Any, ...]:
        """What must not change between showing a batch and releasing it."""
        held = [value for name, value in self.row.items() if name.startswith("held_")]
        return (self.row["status"], *held, self.task_undelivered)


@dataclass(frozen=True)
class Released:
    batch: Batch
    rows_released: int
    failure_reason: str
    task_withdrawn: bool


def parse_batch_id(text: str) -> str:
    """A batch id in its canonical form; raises ValueError."""
    return str(uuid.UUID(text.strip()))


def failure_reason(reason: str | None) -> str:
    given = " ".join((reason or "").split())[:500]
    return f"released by operator: {given or 'no reason given'}"


def find(db: Database, batch_id: str) -> Batch:
    """The open batch to release; refuse an unknown or a finished one."""
    with db.transaction() as cur:
        batch = _read(cur, batch_id)
    if batch is None:
        raise Refused(f"no conversion or payout batch {batch_id}")
    _refuse_finished(batch)
    return batch


def release(db: Database, shown: Batch, reason: str | None) -> Released:
    """Mark the batch failed and return its rows, in one transaction."""
    kind = shown.kind
    # The services' statements name the id batch_conversion_id or batch_id.
    ids = {"batch_id": shown.batch_id, "batch_conversion_id": shown.batch_id}
    text = failure_reason(reason)
    with db.transaction() as cur:
        # The same lock the executor's callback takes: a callback arriving
        # now waits, then finds the batch failed.
        cur.execute(kind.lock, ids)
        batch = _read(cur, shown.batch_id)
        assert batch is not None  # a batch row is never deleted
        _refuse_finished(batch)
        if batch.what_matters() != shown.what_matters():
            raise Refused(
                f"{kind.name} {shown.batch_id} changed since it was shown "
                f"(now {_summary(batch)}); nothing was released: run the "
                "command again"
            )
        cur.execute(
            kind.fail, {**ids, "swap_id": None, "tx_hash": None, "failure_reason": text}
        )
        cur.execute(kind.release_rows, ids)
        rows_released = cur.rowcount
        if rows_released != batch.row["held_rows"]:
            # Rows only move under this lock; a difference is a bug.
            raise RuntimeError(
                f"releasing {kind.name} {shown.batch_id} freed {rows_released} "
                f"rows, not the {batch.row['held_rows']} it held; rolled back"
            )
        cur.execute(QUERIES["withdraw_task"], {**ids, "service": kind.service})
        withdrawn = cur.fetchone() is not None
        if withdrawn != batch.task_undelivered:
            raise Refused(
                f"the task of {kind.name} {shown.batch_id} was delivered "
                "meanwhile; nothing was released: ask the executor again"
            )
    return Released(batch, rows_released, text, withdrawn)


def _read(cur: Any, batch_id: str) -> Batch | None:
    for kind in (CONVERSION, PAYOUT):
        cur.execute(kind.preview, {"batch_id": batch_id})
        row = cur.fetchone()
        if row is not None:
            cur.execute(
                QUERIES["batch_task"], {"batch_id": batch_id, "service": kind.service}
            )
            task = cur.fetchone()
            return Batch(kind, dict(row), None if task is None else dict(task))
    return None


def _refuse_finished(batch: Batch) -> None:
    if batch.row["status"] in batch.kind.open_statuses:
        return
    reason = batch.row["failure_reason"]
    raise Refused(
        f"{batch.kind.name} {batch.batch_id} is already {batch.row['status']}"
        + (f" ({reason})" if reason else "")
        + ": nothing to release"
    )


def _summary(batch: Batch) -> str:
    row = batch.row
    summary = f"{row['status']}, holding {_rows(row['held_rows'])}"
    if batch.task_undelivered:
        summary += ", task undelivered"
    return summary


# --- what the operator reads ----------------------------------------------------


def describe(batch: Batch, stale_after_s: int) -> list[str]:
    """What the release would do, and what to know before agreeing."""
    row, kind = batch.row, batch.kind
    lines = [
        f"{kind.name} {batch.batch_id}: {row['status']}, created "
        f"{row['created_at']:%Y-%m-%d %H:%M:%SZ}, {row['age_s']} s ago"
    ]
    if kind is CONVERSION:
        lines.append(
            f"  recorded {_rows(row['row_count'])}, "
            f"{_amount(row['total_eth'])} {row['outcome_currency']} "
            f"({_amount(row['total_usd'])} usd)"
            + (f", swap {row['swap_id']}" if row["swap_id"] else "")
        )
        lines.append(
            f"  releases {_rows(row['held_rows'])}: "
            f"{_amount(row['held_eth'])} {row['outcome_currency']} "
            f"({_amount(row['held_usd'])} usd) back to {kind.returns_rows_to}"
        )
    else:
        lines.append(
            f"  client {row['client_id']}: {_amount(row['total_usdt'])} usdt in "
            f"{_rows(row['row_count'])}, paid in {row['payout_currency']} on "
            f"{row['payout_network']} to {row['wallet_address']}"
        )
        lines.append(
            f"  releases {_rows(row['held_rows'])}: "
            f"{_amount(row['held_usdt'])} usdt back to {kind.returns_rows_to}"
        )
    lines.append("  " + _task_line(batch))
    if row["age_s"] < stale_after_s:
        lines.append(
            f"warning: it is not stale yet ({row['age_s']} s old, stale after "
            f"{stale_after_s} s): the {kind.executor} may still be working on it"
        )
    lines.append(
        f"warning: if the {kind.executor} did finish it after all, its "
        "`completed` callback will be answered 409 and logged at ERROR as "
        "money that may have moved twice; ask the executor before releasing"
    )
    return lines


def _task_line(batch: Batch) -> str:
    task = batch.task
    if task is None:
        return "its task: none found"
    if task["sent_at"] is not None:
        return (
            f"its task: delivered to the {batch.kind.executor} at "
            f"{task['sent_at']:%Y-%m-%d %H:%M:%SZ}"
        )
    attempts = "1 attempt" if task["attempts"] == 1 else f"{task['attempts']} attempts"
    line = f"its task: never delivered ({attempts}); the release withdraws it"
    if task["last_error"]:
        line += f"; last error: {task['last_error'][:200]}"
    return line


def outcome_lines(released: Released) -> list[str]:
    batch = released.batch
    lines = [
        f"released {batch.kind.name} {batch.batch_id}: marked failed "
        f'("{released.failure_reason}"), {_rows(released.rows_released)} back '
        f"to {batch.kind.returns_rows_to}"
    ]
    if released.task_withdrawn:
        lines.append("its undelivered task was withdrawn")
    return lines


def _rows(count: int) -> str:
    return "1 row" if count == 1 else f"{count} rows"


def _amount(amount: Any) -> str:
    return money.to_text(amount)
