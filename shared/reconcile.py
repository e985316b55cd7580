"""The invariants of DESIGN.md section 8, checked over the whole database.

Each invariant is one set-based query in ``queries.sql`` that returns one
row per breach with the ids and amounts involved; Python only words them.
All six run in one read-only snapshot, so work finishing meanwhile cannot
look like a breach.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg2.extras import RealDictCursor

from shared import money
from shared.clients import QUERIES
from shared.db import Database

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Breach:
    invariant: int
    message: str

    @property
    def line(self) -> str:
        return f"invariant {self.invariant}: {self.message}"


@dataclass(frozen=True)
class Report:
    breaches: list[Breach]
    scope: Row

    @property
    def clean(self) -> bool:
        return not self.breaches

    def summary(self) -> str:
        scope = (
            f"{_count(self.scope['row_count'], 'row')}, "
            f"{_count(self.scope['conversion_count'], 'conversion')}, "
            f"{_count(self.scope['payout_batch_count'], 'payout batch', 'es')}, "
            f"{_count(self.scope['delivery_count'], 'delivery', 'ies')}"
        )
        if self.clean:
            return f"reconcile: clean: invariants 1-6 hold over {scope}"
        counts = Counter(breach.invariant for breach in self.breaches)
        per_invariant = ", ".join(
            f"invariant {number}: {counts[number]}" for number in sorted(counts)
        )
        breaches = _count(len(self.breaches), "breach", "es")
        return f"reconcile: {breaches} ({per_invariant}) over {scope}"


def run(db: Database) -> Report:
    """Check every invariant in one consistent snapshot."""
    with db.transaction() as cur:
        cur.execute(QUERIES["reconcile_snapshot"])
        breaches = find_breaches(cur)
        cur.execute(QUERIES["reconcile_scope"])
        scope = cur.fetchone()
    assert scope is not None
    return Report(breaches, dict(scope))


def find_breaches(cur: RealDictCursor) -> list[Breach]:
    """Every breach visible to ``cur``'s transaction, invariant by invariant."""
    breaches = []
    for invariant, describe in _CHECKS:
        cur.execute(QUERIES[f"invariant_{invariant}"])
        breaches += [Breach(invariant, describe(row)) for row in cur.fetchall()]
    return breaches


# --- wording one breach -----------------------------------------------------


def _payment_credited_twice(row: Row) -> str:
    amounts = _amounts(row["amounts_usd"], "usd")
    if row["place"] == "rows":
        return (
            f"payment {row['payment_id']} is credited by rows "
            f"{_ids(row['row_ids'])} ({amounts})"
        )
    return (
        f"payment {row['payment_id']} has {len(row['event_ids'])} "
        f"'accumulated' deliveries: ipn_events {_ids(row['event_ids'])} "
        f"crediting rows {_ids(row['row_ids'])} ({amounts})"
    )


def _row_in_two_live_batches(row: Row) -> str:
    batches = ", ".join(
        f"{batch_id} {status} ({_amount(amount)} {row['unit']})"
        for batch_id, status, amount in zip(
            row["batch_ids"], row["statuses"], row["amounts"], strict=True
        )
    )
    kinds = _count(len(row["batch_ids"]), row["kind"], _PLURAL[row["kind"]])
    return f"row {row['accumulation_id']} is in {kinds} that have not failed: {batches}"


_PLURAL = {"conversion": "s", "payout batch": "es"}


def _conversion_usdt_differs(row: Row) -> str:
    message = (
        f"conversion {row['batch_conversion_id']} received "
        f"{_amount(row['actual_usdt_received'])} usdt but its "
        f"{_count(row['row_count'], 'row')} hold {_amount(row['held_usdt'])} "
        f"(net {_amount(row['net_usdt'])} + fee {_amount(row['fee_usdt'])})"
    )
    if row["rows_without_usdt"]:
        message += f"; {_count(row['rows_without_usdt'], 'row')} without usdt"
    return message


def _payout_total_differs(row: Row) -> str:
    batch = f"payout batch {row['batch_id']} ({row['status']})"
    total = _amount(row["total_usdt"])
    if row["problem"] == "members":
        members = _count(row["member_count"], "member")
        return (
            f"{batch} total_usdt {total} but its {members} sum to "
            f"{_amount(row['member_usdt'])}"
        )
    if row["problem"] == "rows":
        return (
            f"{batch} members recorded {_amount(row['member_usdt'])} usdt but "
            f"their rows hold {_amount(row['row_usdt'])} now; rows "
            f"{_ids(row['drifted_rows'])} changed"
        )
    claimed = _count(row["claimed_count"], "row")
    return (
        f"{batch} total_usdt {total} but the {claimed} claimed by it hold "
        f"{_amount(row['claimed_usdt'])}"
    )


def _paid_unconverted(row: Row) -> str:
    state = "paid" if row["is_paid_out"] else "claimed"
    conversion = row["batch_conversion_id"] or "none"
    if row["conversion_batch_status"]:
        conversion += f" {row['conversion_batch_status']}"
    return (
        f"row {row['id']} (client {row['client_id']}) is {state} in payout "
        f"batch {row['payout_batch_id'] or 'none'} but not converted: "
        f"conversion_status {row['conversion_status']}, accumulated_usdt "
        f"{_amount(row['accumulated_usdt'])}, conversion {conversion}"
    )


def _delivery_missing(row: Row) -> str:
    credited = (
        f"row {row['id']} (payment {row['nowpayments_payment_id']}, client "
        f"{row['client_id']}, {_amount(row['accumulated_eth'])} "
        f"{row['outcome_currency']}, {_amount(row['accumulated_usd'])} usd)"
    )
    if row["problem"] == "missing":
        return f"{credited} has no 'accumulated' delivery in ipn_events"
    return (
        f"{credited} is linked to ipn_events {row['event_id']}, a delivery "
        f"of payment {row['event_payment_id'] or 'none'}"
    )


_CHECKS: tuple[tuple[int, Callable[[Row], str]], ...] = (
    (1, _payment_credited_twice),
    (2, _row_in_two_live_batches),
    (3, _conversion_usdt_differs),
    (4, _payout_total_differs),
    (5, _paid_unconverted),
    (6, _delivery_missing),
)


def _amount(amount: Decimal | None) -> str:
    return "none" if amount is None else money.to_text(amount)


def _amounts(amounts: Iterable[Decimal | None], unit: str) -> str:
    return ", ".join(f"{_amount(amount)} {unit}" for amount in amounts)


def _ids(ids: Iterable[object]) -> str:
    return ", ".join(str(value) for value in ids)


def _count(number: int, noun: str, plural: str = "s") -> str:
    if number == 1:
        return f"1 {noun}"
    if plural == "ies":
        return f"{number} {noun[:-1]}ies"
    return f"{number} {noun}{plural}"
