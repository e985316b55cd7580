"""The happy path of a conversion: claim at the threshold, swap, share."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from conftest import INTERNAL_HEADERS

from shared.db import Database


def add_pending(db: Database, eth_amounts: list[str], usd_each: str = "2.91") -> None:
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd)"
            " VALUES (-1001, 'threshold', 5) ON CONFLICT DO NOTHING"
        )
        for index, eth in enumerate(eth_amounts):
            cur.execute(
                """
                INSERT INTO payout_accumulation (nowpayments_payment_id, client_id,
                    user_id, payment_amount_usd, usd_source, platform_fee_percent,
                    accumulated_usd, accumulated_eth, outcome_currency)
                VALUES (%s, -1001, 1, 5, 'price', 3, %s, %s, 'eth')
                """,
                (f"flow-{index}-{eth}", usd_each, eth),
            )


def test_pending_usd_at_the_threshold_becomes_one_conversion_shared_exactly(
    microbatch: Any, db: Database, swap_sender: Any
) -> None:
    add_pending(db, ["0.001", "0.002", "0.004"], usd_each="3.34")  # 10.02 USD
    client = microbatch.test_client()

    run = client.post("/check-threshold", headers=INTERNAL_HEADERS)

    assert run.status_code == 200
    assert run.json["outcome"] == "succeeded"
    assert run.json["figures"]["conversions_created"] == 1
    [task] = swap_sender.sent
    assert task.payload["from_amount"] == "0.007"
    assert task.payload["from_currency"] == "eth"
    assert task.payload["row_count"] == 3
    assert task.dedup_key == task.payload["batch_conversion_id"]

    callback = {
        "batch_conversion_id": task.payload["batch_conversion_id"],
        "swap_id": "swap-1",
        "tx_hash": "0xfeed",
        "status": "completed",
        "actual_usdt_received": "23.000001",
    }
    done = client.post("/swap-executed", headers=INTERNAL_HEADERS, json=callback)

    assert done.status_code == 200, done.json
    with db.transaction() as cur:
        cur.execute(
            "SELECT accumulated_usdt + platform_fee_usdt AS gross, platform_fee_usdt"
            " FROM payout_accumulation ORDER BY accumulated_eth"
        )
        rows = cur.fetchall()
    # 23.000001 in proportion 1:2:4 is 3.2857144..., 6.5714288..., 13.142857...
    # in units of 10^-6: floors 3285714, 6571428, 13142857 leave 2 units for
    # the two largest remainders (4/7 and 2/7 of a unit before 1/7).
    assert [row["gross"] for row in rows] == [
        Decimal("3.285714"),
        Decimal("6.571429"),
        Decimal("13.142858"),
    ]
    assert sum(row["gross"] for row in rows) == Decimal("23.000001")
    assert [row["platform_fee_usdt"] for row in rows] == [
        Decimal("0.098571"),
        Decimal("0.197143"),
        Decimal("0.394286"),
    ]


def test_below_the_threshold_nothing_is_claimed(
    microbatch: Any, db: Database, swap_sender: Any
) -> None:
    add_pending(db, ["0.001", "0.002"], usd_each="4.99")  # 9.98 < 10

    run = microbatch.test_client().post("/check-threshold", headers=INTERNAL_HEADERS)

    assert run.status_code == 200
    assert run.json["figures"]["conversions_created"] == 0
    assert swap_sender.sent == []
    with db.transaction() as cur:
        cur.execute(
            "SELECT count(*) AS n FROM payout_accumulation"
            " WHERE conversion_status = 'pending'"
        )
        assert cur.fetchone()["n"] == 2
