"""Claiming pending payments into a conversion, and announcing it.

``check_threshold`` is one scheduled run's work: for each outcome currency
whose pending USD (net of the fee) reaches the micro-batch threshold, one
statement claims exactly the rows it summed into a new conversion, and the
swap task is written in the same transaction. Tasks are sent after commit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from shared import faults, money, outbox
from shared.config import read_threshold
from shared.db import Database, load_queries
from shared.secrets import SecretSource

QUERIES = load_queries(Path(__file__).with_name("queries.sql"))

SERVICE = "gcmicrobatchprocessor"

log = logging.getLogger("payouts.microbatch")


@dataclass(frozen=True)
class ConversionSettings:
    service_url: str
    swap_executor_url: str
    stale_after_s: int


def check_threshold(
    db: Database,
    secrets: SecretSource,
    settings: ConversionSettings,
    tasks: outbox.Outbox,
) -> dict[str, Any]:
    """Claim every currency's pending rows that reach the threshold."""
    # No default to fall back to: an unreadable or invalid threshold fails
    # the run (ConfigError), which answers 5xx and logs an ERROR.
    threshold = read_threshold(secrets)

    with db.transaction() as cur:
        cur.execute(QUERIES["pending_totals"])
        pending = cur.fetchall()

    created = []
    for currency in pending:
        if currency["total_usd"] >= threshold:
            conversion = _claim(db, currency["outcome_currency"], threshold, settings)
            if conversion is not None:
                created.append(conversion)

    if created:
        faults.reach("after-conversion-commit")
    task_ids = [conversion["task_id"] for conversion in created]
    delivery = tasks.deliver_due(ids=task_ids) if task_ids else outbox.DeliveryReport()
    stale = report_stale(db, settings.stale_after_s)
    return {
        "threshold_usd": money.to_text(threshold),
        "pending": {
            row["outcome_currency"]: {
                "rows": row["row_count"],
                "usd": money.to_text(row["total_usd"]),
            }
            for row in pending
        },
        "conversions_created": len(created),
        "rows_claimed": sum(conversion["row_count"] for conversion in created),
        "conversions_stale": stale,
        "swap_tasks_sent_now": delivery.sent,
    }


def _claim(
    db: Database, currency: str, threshold: Decimal, settings: ConversionSettings
) -> dict[str, Any] | None:
    batch_conversion_id = uuid.uuid4()
    with db.transaction() as cur:
        cur.execute(
            QUERIES["claim_pending"],
            {
                "batch_conversion_id": str(batch_conversion_id),
                "currency": currency,
                "threshold_usd": threshold,
            },
        )
        conversion = cur.fetchone()
        if conversion is None:
            return None  # a concurrent claim took the rows first
        payload = {
            "kind": "swap",
            "batch_conversion_id": str(batch_conversion_id),
            "from_currency": currency,
            "from_amount": money.to_text(conversion["total_eth"]),
            "to_currency": "usdt",
            "row_count": conversion["row_count"],
            "callback_url": f"{settings.service_url}/swap-executed",
        }
        task_id = outbox.enqueue(
            cur,
            SERVICE,
            settings.swap_executor_url,
            payload,
            dedup_key=str(batch_conversion_id),
        )
    log.info(
        "conversion_claimed",
        extra={
            "batch_conversion_id": str(batch_conversion_id),
            "outcome_currency": currency,
            "row_count": conversion["row_count"],
            "total_usd": conversion["total_usd"],
            "total_eth": conversion["total_eth"],
            "threshold_usd": threshold,
        },
    )
    return {**conversion, "task_id": task_id}


def mark_accepted(cur: Any, task: outbox.Task) -> None:
    """Outbox hook: the swap executor accepted the task."""
    if task.payload.get("kind") == "swap":
        cur.execute(
            QUERIES["mark_swapping"],
            {"batch_conversion_id": task.payload["batch_conversion_id"]},
        )


def still_wanted(cur: Any, task: outbox.Task) -> bool:
    """Outbox hook: a swap task is sent only while its conversion waits for it."""
    if task.payload.get("kind") != "swap":
        return True
    cur.execute(
        QUERIES["conversion_status"],
        {"batch_conversion_id": task.payload["batch_conversion_id"]},
    )
    row = cur.fetchone()
    return row is not None and row["status"] == "claimed"


def report_stale(db: Database, stale_after_s: int) -> int:
    """Log every conversion unfinished past ``SWAP_STALE_AFTER``; never release.

    An operator asks the executor what happened, then releases the batch by
    hand if the swap really failed (DESIGN.md section 3).
    """
    with db.transaction() as cur:
        cur.execute(QUERIES["stale_conversions"], {"stale_after_s": stale_after_s})
        stale = cur.fetchall()
    for conversion in stale:
        log.error(
            "conversion_stale",
            extra={
                "batch_conversion_id": str(conversion["batch_conversion_id"]),
                "status": conversion["status"],
                "created_at": conversion["created_at"],
                "row_count": conversion["row_count"],
                "total_eth": conversion["total_eth"],
                "outcome_currency": conversion["outcome_currency"],
            },
        )
    return len(stale)
