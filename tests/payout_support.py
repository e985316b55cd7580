"""Helpers for the payout tests: clients, converted payments, a stub executor.

Not a test module. Payments are written the way the accumulator and the
micro-batch processor would leave them: each row has its delivery in
``ipn_events`` and, once it is swapping or converted, a conversion whose
USDT is exactly what its rows hold, so every invariant of DESIGN.md
section 8 can be checked after a test that moves money.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

from conftest import INTERNAL_HEADERS, base_environ
from flask import Flask, request

from shared import reconcile
from shared.db import Database

BATCH_ENV = {
    "SERVICE_URL": "http://batch.test",
    "PAYOUT_EXECUTOR_URL": "http://executor.test/payouts",
    "MICRO_BATCH_PROCESSOR_URL": "http://microbatch.test",
}
WALLET = "0x2b5f1c9a7e3d4b6a8c0e1f2a3b4c5d6e7f8a9b0c"
OTHER_WALLET = "0x7c1e0d9b8a7f6e5d4c3b2a1908f7e6d5c4b3a291"
MANUAL_RUN = {**INTERNAL_HEADERS, "X-Trigger": "manual"}
FEE_PERCENT = Decimal(3)
USDT_UNIT = Decimal("0.000001")


def make_batch_app(database_url: str, sender: Any = None, **overrides: str) -> Flask:
    from gcbatchprocessor.app import create_app

    environ = base_environ(database_url, **{**BATCH_ENV, **overrides})
    return create_app(environ=environ, sender=sender)


def close_app(app: Flask) -> None:
    """Give an app's idle connections back to the server."""
    app.extensions["suite"].db.close()


def add_client(
    db: Database,
    client_id: int,
    threshold: str | None = "2",
    wallet: str | None = WALLET,
    strategy: str = "threshold",
    currency: str = "usdt",
    network: str = "eth",
) -> None:
    with db.transaction() as cur:
        cur.execute(
            """
            INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd,
                wallet_address, payout_currency, payout_network)
            VALUES (%s, %s, %s, %s, %s, %s)
            """,
            (
                client_id,
                strategy,
                threshold,
                wallet,
                currency if wallet else None,
                network if wallet else None,
            ),
        )


def fee_for(net_usdt: Decimal) -> Decimal:
    """The fee a row carries when the client's net share is ``net_usdt``."""
    with localcontext() as ctx:
        ctx.prec = 60
        gross = net_usdt * 100 / (100 - FEE_PERCENT)
        return (gross - net_usdt).quantize(USDT_UNIT, ROUND_HALF_UP)


def add_payments(
    db: Database, client_id: int, amounts: Sequence[str], status: str = "converted"
) -> list[int]:
    """Credit one payment per amount; their row ids, in order.

    ``converted``: each amount is the client's net USDT, from one completed
    conversion. ``swapping``: claimed by a conversion still swapping; the
    amount is the USD value. ``pending``: waiting for a conversion.
    """
    amounts_dec = [Decimal(amount) for amount in amounts]
    conversion_id = None if status == "pending" else str(uuid.uuid4())
    converted = status == "converted"
    fees = [fee_for(amount) if converted else None for amount in amounts_dec]
    with db.transaction() as cur:
        if conversion_id is not None:
            received = sum(
                (a + (f or 0) for a, f in zip(amounts_dec, fees, strict=True)),
                Decimal(0),
            )
            cur.execute(
                """
                INSERT INTO batch_conversions (batch_conversion_id,
                    outcome_currency, status, row_count, total_usd, total_eth,
                    threshold_usd, swap_id, tx_hash, actual_usdt_received,
                    finished_at)
                VALUES (%(id)s, 'eth', %(status)s, %(rows)s, %(usd)s, %(eth)s, 10,
                    %(swap_id)s, %(tx_hash)s, %(received)s,
                    CASE WHEN %(converted)s THEN now() END)
                """,
                {
                    "id": conversion_id,
                    "status": "completed" if converted else "swapping",
                    "rows": len(amounts_dec),
                    "usd": sum(amounts_dec),
                    "eth": Decimal("0.001") * len(amounts_dec),
                    "swap_id": f"swap-{conversion_id}" if converted else None,
                    "tx_hash": "0xswap" if converted else None,
                    "received": received if converted else None,
                    "converted": converted,
                },
            )
        ids = []
        for amount, fee in zip(amounts_dec, fees, strict=True):
            payment_id = f"np-{uuid.uuid4().hex}"
            cur.execute(
                """
                INSERT INTO payout_accumulation (nowpayments_payment_id,
                    client_id, user_id, payment_amount_usd, usd_source,
                    platform_fee_percent, accumulated_usd, accumulated_eth,
                    outcome_currency, conversion_status, batch_conversion_id,
                    accumulated_usdt, platform_fee_usdt)
                VALUES (%(payment_id)s, %(client_id)s, 6271402111, %(gross)s,
                    'price', %(fee_percent)s, %(net)s, 0.001, 'eth', %(status)s,
                    %(conversion_id)s, %(usdt)s, %(fee)s)
                RETURNING id
                """,
                {
                    "payment_id": payment_id,
                    "client_id": client_id,
                    "gross": amount + (fee or 0),
                    "fee_percent": FEE_PERCENT,
                    "net": amount,
                    "status": status,
                    "conversion_id": conversion_id,
                    "usdt": amount if converted else None,
                    "fee": fee,
                },
            )
            credited = cur.fetchone()
            assert credited is not None
            row_id = credited["id"]
            ids.append(row_id)
            cur.execute(
                """
                INSERT INTO ipn_events (source, payment_id, payment_status,
                    outcome, http_status, accumulation_id, raw_body, body_size)
                VALUES ('router', %s, 'finished', 'accumulated', 200, %s,
                    '\\x7b7d'::bytea, 2)
                """,
                (payment_id, row_id),
            )
            if conversion_id is not None:
                cur.execute(
                    """
                    INSERT INTO batch_conversion_members (batch_conversion_id,
                        accumulation_id, accumulated_eth, accumulated_usd)
                    VALUES (%s, %s, 0.001, %s)
                    """,
                    (conversion_id, row_id, amount),
                )
    return ids


def complete_conversion(db: Database, row_ids: Sequence[int], net_usdt: str) -> None:
    """Finish the swapping conversion of ``row_ids``: each row gets
    ``net_usdt``, as the micro-batch processor's callback would share it."""
    net = Decimal(net_usdt)
    fee = fee_for(net)
    with db.transaction() as cur:
        cur.execute(
            """
            UPDATE payout_accumulation
            SET conversion_status = 'converted', accumulated_usdt = %(net)s,
                platform_fee_usdt = %(fee)s, updated_at = now()
            WHERE id = ANY (%(ids)s) AND conversion_status = 'swapping'
            RETURNING batch_conversion_id
            """,
            {"ids": list(row_ids), "net": net, "fee": fee},
        )
        conversions = {row["batch_conversion_id"] for row in cur.fetchall()}
        assert len(conversions) == 1, conversions
        cur.execute(
            """
            UPDATE batch_conversions
            SET status = 'completed', swap_id = 'swap-late', tx_hash = '0xlate',
                actual_usdt_received = %(received)s, finished_at = now()
            WHERE batch_conversion_id = %(id)s
            """,
            {
                "id": conversions.pop(),
                "received": (net + fee) * len(row_ids),
            },
        )


def query(db: Database, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute(statement, params)
        return [dict(row) for row in cur.fetchall()]


def batches(db: Database) -> list[dict[str, Any]]:
    return query(db, "SELECT * FROM payout_batches ORDER BY created_at, client_id")


def rows(db: Database) -> list[dict[str, Any]]:
    return query(db, "SELECT * FROM payout_accumulation ORDER BY id")


def members(db: Database, batch_id: Any) -> list[dict[str, Any]]:
    return query(
        db,
        "SELECT accumulation_id, accumulated_usdt FROM payout_batch_members"
        " WHERE batch_id = %s ORDER BY accumulation_id",
        (str(batch_id),),
    )


_MONEY_TABLES = {
    "payout_accumulation": "id",
    "payout_batches": "batch_id",
    "payout_batch_members": "batch_id, accumulation_id",
    "batch_conversions": "batch_conversion_id",
    "outbox": "id",
}


def snapshot(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Every money table, whole: to prove a request changed nothing."""
    return {
        table: query(db, f"SELECT * FROM {table} ORDER BY {order}")
        for table, order in _MONEY_TABLES.items()
    }


def assert_invariants_hold(db: Database) -> None:
    """DESIGN.md section 8, over the whole database, in one snapshot."""
    with db.transaction() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        breaches = reconcile.find_breaches(cur)
    assert [breach.line for breach in breaches] == []


class StubExecutor:
    """A payout executor that accepts every task with 202 and keeps it."""

    def __init__(self, serve: Callable[[Flask], str]) -> None:
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        app = Flask("stub_executor")
        app.add_url_rule("/payouts", "payouts", self._accept, methods=["POST"])
        self.url = serve(app) + "/payouts"

    def _accept(self) -> tuple[str, int]:
        with self._lock:
            self.received.append(
                {
                    "headers": dict(request.headers),
                    "body": json.loads(request.get_data(), parse_float=Decimal),
                }
            )
        return "", 202
