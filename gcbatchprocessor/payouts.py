"""Payout batches: claiming what each client is owed, and the executor's answer.

``process`` is one scheduled run's work: one statement claims, for every
threshold client whose converted, unpaid USDT reaches the client's own
threshold, exactly those rows into one batch, with its payout task in the
outbox. ``apply_callback`` records the payout executor's outcome once:
the same callback again changes nothing, a contradicting one is refused.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from shared import faults, money, outbox
from shared.db import Database, load_queries
from shared.errors import ApiError, Conflict, NotFound

QUERIES = load_queries(Path(__file__).with_name("queries.sql"))

SERVICE = "gcbatchprocessor"
FINAL = ("completed", "failed")

_TEXT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_CURRENCY = re.compile(r"^[a-z0-9]{2,20}$")

log = logging.getLogger("payouts.batch")


@dataclass(frozen=True)
class PayoutSettings:
    service_url: str
    payout_executor_url: str
    stale_after_s: int
    # The claim's own time limit: the run's bound (JOB_LOCK_TIMEOUT_S).
    claim_timeout_s: int = 240


def process(db: Database, settings: PayoutSettings) -> dict[str, Any]:
    """Claim one batch per client over threshold, each with its payout task.

    The run that calls this sends the new tasks right after (shared.scheduled).
    Two runs overlapping past the job lock's bound could each take part of
    one client's rows; no row is ever in two batches, but that client could
    then get two smaller payouts.
    """
    with db.transaction() as cur:
        # The claim grows with the backlog (100,000 clients take seconds).
        # Under the service's per-request statement timeout, a backlog past
        # that size would fail every run and never drain.
        cur.execute(
            QUERIES["claim_timeout"],
            {"timeout": f"{settings.claim_timeout_s}s"},
        )
        cur.execute(
            QUERIES["claim_payouts"],
            {
                "service": SERVICE,
                "payout_executor_url": settings.payout_executor_url,
                "callback_url": f"{settings.service_url}/payout-completed",
            },
        )
        claimed = cur.fetchone()
        cur.execute(QUERIES["waiting_without_wallet"])
        waiting = cur.fetchone()
    assert claimed is not None and waiting is not None
    without_wallet = waiting["clients"]
    if claimed["batches"]:
        faults.reach("after-payout-commit")
        log.info(
            "payouts_claimed",
            extra={
                "batches": claimed["batches"],
                "rows": claimed["rows"],
                "total_usdt": claimed["total_usdt"],
            },
        )
    if without_wallet:
        log.warning("payout_waiting_for_wallet", extra={"clients": without_wallet})
    return {
        "batches_created": claimed["batches"],
        "rows_claimed": claimed["rows"],
        "usdt_claimed": money.to_text(claimed["total_usdt"]),
        "clients_without_wallet": without_wallet,
        "batches_stale": report_stale(db, settings.stale_after_s),
    }


def mark_accepted(cur: Any, task: outbox.Task) -> None:
    """Outbox hook: the payout executor accepted the task."""
    if task.payload.get("kind") == "payout":
        cur.execute(QUERIES["mark_sent"], {"batch_id": task.payload["batch_id"]})


def still_wanted(cur: Any, task: outbox.Task) -> bool:
    """Outbox hook: a payout task is sent only while its batch waits for it."""
    if task.payload.get("kind") != "payout":
        return True
    cur.execute(QUERIES["batch_status"], {"batch_id": task.payload["batch_id"]})
    row = cur.fetchone()
    return row is not None and row["status"] == "claimed"


def report_stale(db: Database, stale_after_s: int) -> int:
    """Log every payout unfinished past ``SWAP_STALE_AFTER``; never release."""
    with db.transaction() as cur:
        cur.execute(QUERIES["stale_batches"], {"stale_after_s": stale_after_s})
        stale = cur.fetchall()
    for batch in stale:
        log.error(
            "payout_stale",
            extra={
                "batch_id": str(batch["batch_id"]),
                "client_id": batch["client_id"],
                "status": batch["status"],
                "created_at": batch["created_at"],
                "total_usdt": batch["total_usdt"],
            },
        )
    return len(stale)


# --- the executor's callback --------------------------------------------------


@dataclass(frozen=True)
class PayoutOutcome:
    batch_id: str
    status: str
    tx_hash: str | None
    amount_usdt: Decimal | None
    amount_sent: Decimal | None
    currency: str | None


def _amount(
    payload: dict[str, Any], name: str, column: money.Column, problems: list[str]
) -> Decimal | None:
    if payload.get(name) is None:
        return None
    try:
        amount = money.exact(money.parse_amount(payload[name], name), column, name)
    except money.AmountError as error:
        problems.append(str(error))
        return None
    if amount < 0:
        problems.append(f"{name} must be zero or more")
    return amount


def read_callback(payload: dict[str, Any]) -> PayoutOutcome:
    """Check the callback's fields; raise a 400 naming every problem."""
    problems = []
    batch_id = payload.get("batch_id")
    try:
        batch_id = str(uuid.UUID(str(batch_id)))
    except ValueError:
        problems.append("batch_id must be a UUID")
    status = payload.get("status")
    if status not in FINAL:
        problems.append("status must be 'completed' or 'failed'")
    tx_hash = payload.get("tx_hash")
    if tx_hash is not None and not (
        isinstance(tx_hash, str) and _TEXT_ID.match(tx_hash)
    ):
        problems.append("tx_hash must be an identifier string")
        tx_hash = None
    currency = payload.get("currency")
    if currency is not None:
        currency = str(currency).strip().lower()
        if not _CURRENCY.match(currency):
            problems.append("currency is not a valid code")
    amount_usdt = _amount(payload, "amount_usdt", money.USDT, problems)
    amount_sent = _amount(payload, "amount_sent", money.CRYPTO, problems)
    if status == "completed":
        required = {
            "tx_hash": tx_hash,
            "amount_usdt": amount_usdt,
            "amount_sent": amount_sent,
            "currency": currency,
        }
        for name, value in required.items():
            if value is None and not any(p.startswith(name) for p in problems):
                problems.append(f"{name} is required when the payout completed")
    if problems:
        raise ApiError("; ".join(problems), code="invalid")
    return PayoutOutcome(
        str(batch_id), str(status), tx_hash, amount_usdt, amount_sent, currency
    )


def apply_callback(db: Database, outcome: PayoutOutcome) -> dict[str, Any]:
    """Apply a payout outcome once; return the answer's body."""
    with db.transaction() as cur:
        cur.execute(QUERIES["batch_for_update"], {"batch_id": outcome.batch_id})
        batch = cur.fetchone()
        if batch is None:
            raise NotFound(f"no payout batch {outcome.batch_id}")
        if (
            outcome.amount_usdt is not None
            and outcome.amount_usdt != batch["total_usdt"]
        ):
            # The executor spent another amount than the batch holds: money
            # may have moved wrongly. Nothing changes; someone must look.
            log.error(
                "payout_amount_mismatch",
                extra={
                    "batch_id": outcome.batch_id,
                    "total_usdt": batch["total_usdt"],
                    "amount_usdt": outcome.amount_usdt,
                    "callback_status": outcome.status,
                },
            )
            raise Conflict(
                f"batch {outcome.batch_id} holds {money.to_text(batch['total_usdt'])}"
                f" USDT, not {money.to_text(outcome.amount_usdt)}; nothing was changed"
            )
        if batch["status"] in FINAL:
            return _repeat(batch, outcome)
        if outcome.currency not in (None, batch["payout_currency"]):
            # Recorded as the executor says; the client asked for another
            # currency, which someone should look at, not a page.
            log.warning(
                "payout_currency_differs",
                extra={
                    "batch_id": outcome.batch_id,
                    "payout_currency": batch["payout_currency"],
                    "sent_currency": outcome.currency,
                },
            )
        if outcome.status == "completed":
            body = _complete(cur, batch, outcome)
        else:
            body = _fail(cur, outcome)
    log.info("payout_" + outcome.status, extra=body)
    return body


def _complete(
    cur: Any, batch: dict[str, Any], outcome: PayoutOutcome
) -> dict[str, Any]:
    params = {
        "batch_id": outcome.batch_id,
        "tx_hash": outcome.tx_hash,
        "amount_sent": outcome.amount_sent,
        "currency": outcome.currency,
    }
    cur.execute(QUERIES["complete_batch"], params)
    cur.execute(QUERIES["mark_rows_paid"], params)
    cur.execute(QUERIES["paid_totals"], params)
    paid = cur.fetchone()
    # Invariant 4, checked before commit: a mismatch rolls everything back.
    if (
        paid["total_usdt"] != batch["total_usdt"]
        or paid["row_count"] != batch["row_count"]
    ):
        raise RuntimeError(
            f"batch {outcome.batch_id} pays {paid['total_usdt']} over"
            f" {paid['row_count']} rows but holds {batch['total_usdt']} over"
            f" {batch['row_count']}"
        )
    return {
        "outcome": "completed",
        "batch_id": outcome.batch_id,
        "client_id": batch["client_id"],
        "row_count": paid["row_count"],
        "total_usdt": money.to_text(batch["total_usdt"]),
        "amount_sent": money.to_text(outcome.amount_sent or Decimal(0)),
        "currency": outcome.currency,
    }


def _fail(cur: Any, outcome: PayoutOutcome) -> dict[str, Any]:
    cur.execute(
        QUERIES["fail_batch"],
        {
            "batch_id": outcome.batch_id,
            "tx_hash": outcome.tx_hash,
            "failure_reason": "the payout executor reported failure",
        },
    )
    cur.execute(QUERIES["release_batch_rows"], {"batch_id": outcome.batch_id})
    return {
        "outcome": "failed",
        "batch_id": outcome.batch_id,
        "rows_released": cur.rowcount,
    }


def _repeat(batch: dict[str, Any], outcome: PayoutOutcome) -> dict[str, Any]:
    """A callback for a finished batch: the same again, or a conflict."""
    recorded = batch["status"]
    same = recorded == outcome.status
    if same and recorded == "completed":
        same = (
            outcome.tx_hash == batch["tx_hash"]
            and outcome.amount_sent == batch["amount_sent"]
            and outcome.currency == batch["sent_currency"]
        )
    if same:
        return {
            "outcome": "unchanged",
            "batch_id": outcome.batch_id,
            "status": recorded,
        }
    if outcome.status == "completed" and recorded == "failed":
        # Released rows may already sit in a new batch: the client may be
        # paid twice. Someone must look now.
        log.error(
            "payout_completed_after_failure",
            extra={
                "batch_id": outcome.batch_id,
                "client_id": batch["client_id"],
                "tx_hash": outcome.tx_hash,
                "amount_usdt": outcome.amount_usdt,
            },
        )
    else:
        details = {
            "batch_id": outcome.batch_id,
            "client_id": batch["client_id"],
            "recorded_status": recorded,
            "callback_status": outcome.status,
            "recorded_tx_hash": batch["tx_hash"],
            "callback_tx_hash": outcome.tx_hash,
            "recorded_amount_sent": batch["amount_sent"],
            "callback_amount_sent": outcome.amount_sent,
        }
        if "completed" in (recorded, outcome.status):
            # The executor and our record disagree about a completed payout:
            # a second transfer to the client, or a completion recorded that
            # did not happen. Someone must look now.
            log.error("payout_callback_conflict", extra=details)
        else:
            log.warning("payout_callback_conflict", extra=details)
    raise Conflict(
        f"batch {outcome.batch_id} is already {recorded} with other details;"
        " nothing was changed"
    )
