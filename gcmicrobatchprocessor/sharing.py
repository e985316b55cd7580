"""The swap executor's callback: record the outcome, share the USDT received.

The callback is checked against the stored conversion under a row lock, so
concurrent or repeated callbacks are applied once: the same callback again
changes nothing and answers 2xx; one that contradicts what was recorded
answers 409; one for an unknown conversion 404. A conversion may still be
``claimed`` when its callback arrives (the executor called back before its
acceptance was seen); nothing leaves ``completed`` or ``failed``.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gcmicrobatchprocessor.conversion import QUERIES
from shared import money
from shared.db import Database
from shared.errors import ApiError, Conflict, NotFound

log = logging.getLogger("payouts.microbatch")

_TEXT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
FINAL = ("completed", "failed")


@dataclass(frozen=True)
class SwapOutcome:
    batch_conversion_id: str
    status: str
    swap_id: str | None
    tx_hash: str | None
    actual_usdt_received: Decimal | None


def read_callback(payload: dict[str, Any]) -> SwapOutcome:
    """Check the callback's fields; raise a 400 naming every problem."""
    problems = []
    conversion_id = payload.get("batch_conversion_id")
    try:
        conversion_id = str(uuid.UUID(str(conversion_id)))
    except ValueError:
        problems.append("batch_conversion_id must be a UUID")
    status = payload.get("status")
    if status not in FINAL:
        problems.append("status must be 'completed' or 'failed'")
    swap_id, tx_hash = (
        _optional_id(payload, name, problems) for name in ("swap_id", "tx_hash")
    )
    amount = None
    if payload.get("actual_usdt_received") is not None:
        try:
            amount = money.exact(
                money.parse_amount(
                    payload["actual_usdt_received"], "actual_usdt_received"
                ),
                money.USDT,
                "actual_usdt_received",
            )
            if amount < 0 or (amount == 0 and status == "completed"):
                # A completed swap that yielded nothing would convert the
                # rows to zero USDT: the executor is wrong, not the money.
                problems.append("actual_usdt_received must be greater than zero")
        except money.AmountError as error:
            problems.append(str(error))
    if status == "completed":
        for name, value in (
            ("swap_id", swap_id),
            ("tx_hash", tx_hash),
            ("actual_usdt_received", amount),
        ):
            if value is None and not any(
                problem.startswith(name) for problem in problems
            ):
                problems.append(f"{name} is required when the swap completed")
    if problems:
        raise ApiError("; ".join(problems), code="invalid")
    return SwapOutcome(str(conversion_id), str(status), swap_id, tx_hash, amount)


def _optional_id(payload: dict[str, Any], name: str, problems: list[str]) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _TEXT_ID.match(value):
        problems.append(f"{name} must be an identifier string")
        return None
    return value


def apply_callback(db: Database, outcome: SwapOutcome) -> dict[str, Any]:
    """Apply a swap outcome once; return the answer's body."""
    with db.transaction() as cur:
        cur.execute(
            QUERIES["conversion_for_update"],
            {"batch_conversion_id": outcome.batch_conversion_id},
        )
        conversion = cur.fetchone()
        if conversion is None:
            raise NotFound(f"no conversion {outcome.batch_conversion_id}")
        if conversion["status"] in FINAL:
            return _repeat(conversion, outcome)
        if conversion["swap_id"] is not None and outcome.swap_id not in (
            None,
            conversion["swap_id"],
        ):
            raise Conflict(
                f"conversion {outcome.batch_conversion_id} belongs to swap"
                f" {conversion['swap_id']}"
            )
        if outcome.status == "completed":
            body = _complete(cur, conversion, outcome)
        else:
            body = _fail(cur, outcome)
    log.info("conversion_" + outcome.status, extra=body)
    return body


def _complete(
    cur: Any, conversion: dict[str, Any], outcome: SwapOutcome
) -> dict[str, Any]:
    params = {
        "batch_conversion_id": outcome.batch_conversion_id,
        "swap_id": outcome.swap_id,
        "tx_hash": outcome.tx_hash,
        "actual_usdt_received": outcome.actual_usdt_received,
    }
    cur.execute(QUERIES["complete_conversion"], params)
    cur.execute(QUERIES["share_usdt"], params)
    shared_rows = cur.rowcount
    cur.execute(QUERIES["conversion_totals"], params)
    totals = cur.fetchone()
    # Invariant 3, checked before commit: a mismatch rolls everything back.
    if (
        totals["shared_usdt"] != outcome.actual_usdt_received
        or shared_rows != conversion["row_count"]
    ):
        raise RuntimeError(
            f"sharing conversion {outcome.batch_conversion_id} gave "
            f"{totals['shared_usdt']} over {shared_rows} rows for "
            f"{outcome.actual_usdt_received} over {conversion['row_count']}"
        )
    _check_rate(conversion, outcome)
    return {
        "outcome": "completed",
        "batch_conversion_id": outcome.batch_conversion_id,
        "row_count": shared_rows,
        "actual_usdt_received": money.to_text(
            outcome.actual_usdt_received or Decimal(0)
        ),
        "platform_fee_usdt": money.to_text(totals["fee_usdt"]),
        "total_eth": money.to_text(conversion["total_eth"]),
    }


# How far the USDT received may stray from the USD value the conversion was
# claimed at before someone is paged. Prices move and swaps slip, but not by
# half in minutes: past this, the callback (or its amount) is wrong.
IMPLAUSIBLE_RATIO = Decimal(2)


def _check_rate(conversion: dict[str, Any], outcome: SwapOutcome) -> None:
    """Page when the USDT received is far from what the crypto was worth.

    The amount is still taken: only the executor knows what arrived, and
    refusing would leave the conversion open. The shares it makes are what
    an operator then checks against the chain. Nor are payouts from these
    rows held back meanwhile: holding them needs a state for rows under
    review, which the schema does not have yet.
    """
    received = outcome.actual_usdt_received or Decimal(0)
    valued = conversion["total_usd"]
    if valued <= 0:
        return  # dust valued at nothing: no rate to compare
    if received * IMPLAUSIBLE_RATIO < valued or received > valued * IMPLAUSIBLE_RATIO:
        log.error(
            "swap_rate_implausible",
            extra={
                "batch_conversion_id": outcome.batch_conversion_id,
                "swap_id": outcome.swap_id,
                "total_usd": valued,
                "actual_usdt_received": received,
            },
        )


def _fail(cur: Any, outcome: SwapOutcome) -> dict[str, Any]:
    cur.execute(
        QUERIES["fail_conversion"],
        {
            "batch_conversion_id": outcome.batch_conversion_id,
            "swap_id": outcome.swap_id,
            "tx_hash": outcome.tx_hash,
            "failure_reason": "the swap executor reported failure",
        },
    )
    cur.execute(
        QUERIES["release_rows"], {"batch_conversion_id": outcome.batch_conversion_id}
    )
    return {
        "outcome": "failed",
        "batch_conversion_id": outcome.batch_conversion_id,
        "rows_released": cur.rowcount,
    }


def _repeat(conversion: dict[str, Any], outcome: SwapOutcome) -> dict[str, Any]:
    """A callback for a finished conversion: the same again, or a conflict."""
    recorded = conversion["status"]
    same = recorded == outcome.status and outcome.swap_id in (
        None,
        conversion["swap_id"],
    )
    if same and recorded == "completed":
        same = (
            outcome.tx_hash == conversion["tx_hash"]
            and outcome.actual_usdt_received == conversion["actual_usdt_received"]
        )
    if same:
        return {
            "outcome": "unchanged",
            "batch_conversion_id": outcome.batch_conversion_id,
            "status": recorded,
        }
    if outcome.status == "completed" and recorded == "failed":
        # The rows were released (by the executor's failure or an operator)
        # and may be in a new conversion already: the same crypto may have
        # been swapped twice. Someone must look now.
        log.error(
            "swap_completed_after_failure",
            extra={
                "batch_conversion_id": outcome.batch_conversion_id,
                "swap_id": outcome.swap_id,
                "tx_hash": outcome.tx_hash,
                "actual_usdt_received": outcome.actual_usdt_received,
            },
        )
    else:
        details = {
            "batch_conversion_id": outcome.batch_conversion_id,
            "recorded_status": recorded,
            "callback_status": outcome.status,
            "recorded_swap_id": conversion["swap_id"],
            "callback_swap_id": outcome.swap_id,
            "recorded_usdt": conversion["actual_usdt_received"],
            "callback_usdt": outcome.actual_usdt_received,
        }
        if "completed" in (recorded, outcome.status):
            # The executor and our record disagree about a completed swap:
            # a second swap, a forged or wrong first callback, or USDT that
            # never arrived. Shares may have been computed on a wrong amount.
            log.error("swap_callback_conflict", extra=details)
        else:
            log.warning("swap_callback_conflict", extra=details)
    raise Conflict(
        f"conversion {outcome.batch_conversion_id} is already {recorded}"
        " with other details; nothing was changed"
    )
