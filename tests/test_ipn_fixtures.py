"""Every fixture delivery, in file order, over real HTTP, into one database."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import requests

from shared.db import Database


def test_each_fixture_gets_its_status_outcome_and_stored_amount(
    accumulator: Any, serve: Any, db: Database, fixture_clients: Any, ipn_cases: Any
) -> None:
    base = serve(accumulator)

    for case in ipn_cases:
        headers = {"Content-Type": "application/json"}
        if "signature" in case:
            headers["x-nowpayments-sig"] = case["signature"]
        response = requests.post(
            f"{base}/ipn",
            data=case["raw_body"].encode("utf-8"),
            headers=headers,
            timeout=10,
        )

        expect = case["expect"]
        body = response.json()
        assert (response.status_code, body["outcome"]) == (
            expect["http"],
            expect["outcome"],
        ), case["name"]
        if response.status_code >= 400:
            assert body["error"]["code"], case["name"]
        if "accumulated_eth" in expect:
            with db.transaction() as cur:
                cur.execute(
                    "SELECT accumulated_eth FROM payout_accumulation"
                    " WHERE nowpayments_payment_id = %s",
                    (body["payment_id"],),
                )
                stored = cur.fetchone()["accumulated_eth"]
            assert stored == Decimal(expect["accumulated_eth"]), case["name"]

    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM ipn_events")
        assert cur.fetchone()["n"] == len(ipn_cases)
        cur.execute("SELECT outcome, count(*) AS n FROM ipn_events GROUP BY 1")
        outcomes = {row["outcome"]: row["n"] for row in cur.fetchall()}
        cur.execute("SELECT count(*) AS n FROM payout_accumulation")
        credited = cur.fetchone()["n"]
    expected = {}
    for case in ipn_cases:
        outcome = case["expect"]["outcome"]
        expected[outcome] = expected.get(outcome, 0) + 1
    assert outcomes == expected
    assert credited == expected["accumulated"]
