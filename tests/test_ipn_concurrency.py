"""One payment delivered many times at once is credited exactly once.

NOWPayments retries, and the router may forward the same payment while its
IPN arrives: the deliveries below are released together by a barrier, over
real HTTP, with enough database connections that their transactions overlap.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from conftest import INTERNAL_TOKEN, IPN_SECRET

from gcaccumulator.ipn import sign
from shared.db import Database

DELIVERIES = 20

PAYMENT_ID = "5077125051"

IPN_BODY = (
    b'{"payment_id":5077125051,"payment_status":"finished",'
    b'"order_id":"PGP-6271402111|-1003296084379",'
    b'"outcome_amount":0.0002734,"outcome_currency":"eth",'
    b'"price_amount":1.35,"price_currency":"usd"}'
)

ROUTER_PAYMENT = {
    "nowpayments_payment_id": PAYMENT_ID,
    "client_id": -1003296084379,
    "user_id": 6271402111,
    "payment_amount_usd": "0.93",
    "outcome_amount": "0.0002734",
    "outcome_currency": "eth",
}


def send_ipn(base: str) -> requests.Response:
    return requests.post(
        f"{base}/ipn",
        data=IPN_BODY,
        headers={
            "Content-Type": "application/json",
            "x-nowpayments-sig": sign(IPN_SECRET, IPN_BODY),
        },
        timeout=30,
    )


def send_router_payment(base: str) -> requests.Response:
    return requests.post(
        f"{base}/payments",
        json=ROUTER_PAYMENT,
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
        timeout=30,
    )


def all_at_once(
    sends: list[Callable[[], requests.Response]],
) -> list[requests.Response]:
    """Run every send in its own thread, released together by a barrier."""
    barrier = threading.Barrier(len(sends))

    def run(send: Callable[[], requests.Response]) -> requests.Response:
        barrier.wait(timeout=30)
        return send()

    with ThreadPoolExecutor(max_workers=len(sends)) as pool:
        return list(pool.map(run, sends))


def stored_rows(db: Database) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The credited rows and the recorded deliveries."""
    with db.transaction() as cur:
        cur.execute(
            "SELECT id, nowpayments_payment_id, usd_source FROM payout_accumulation"
        )
        credits = [dict(row) for row in cur.fetchall()]
        cur.execute(
            "SELECT source, outcome, http_status, accumulation_id, payment_id"
            " FROM ipn_events ORDER BY id"
        )
        events = [dict(row) for row in cur.fetchall()]
    return credits, events


def test_twenty_concurrent_ipn_deliveries_credit_once(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    # As many connections as deliveries, so none waits for a free one and
    # all twenty inserts race inside PostgreSQL.
    base = serve(make_accumulator(DB_POOL_SIZE=str(DELIVERIES)))

    responses = all_at_once([lambda: send_ipn(base)] * DELIVERIES)

    assert [response.status_code for response in responses] == [200] * DELIVERIES
    outcomes = Counter(response.json()["outcome"] for response in responses)
    assert outcomes == {"accumulated": 1, "duplicate": DELIVERIES - 1}
    assert {response.json()["payment_id"] for response in responses} == {PAYMENT_ID}

    credits, events = stored_rows(db)
    [credit] = credits
    assert credit["nowpayments_payment_id"] == PAYMENT_ID
    assert len(events) == DELIVERIES
    assert Counter(event["outcome"] for event in events) == outcomes
    assert {event["http_status"] for event in events} == {200}
    [accumulated] = [event for event in events if event["outcome"] == "accumulated"]
    assert accumulated["accumulation_id"] == credit["id"]


def test_same_payment_through_ipn_and_router_at_once_is_credited_once(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    base = serve(make_accumulator(DB_POOL_SIZE=str(DELIVERIES)))
    half = DELIVERIES // 2
    sends = [lambda: send_ipn(base), lambda: send_router_payment(base)] * half

    responses = all_at_once(sends)

    assert [response.status_code for response in responses] == [200] * DELIVERIES
    outcomes = Counter(response.json()["outcome"] for response in responses)
    assert outcomes == {"accumulated": 1, "duplicate": DELIVERIES - 1}

    credits, events = stored_rows(db)
    [credit] = credits
    assert credit["nowpayments_payment_id"] == PAYMENT_ID
    # Whichever way won, its usd_source says which it was.
    [winner] = [
        response
        for response in responses
        if response.json()["outcome"] == "accumulated"
    ]
    assert credit["usd_source"] == winner.json()["usd_source"]
    assert Counter(event["source"] for event in events) == {
        "ipn": half,
        "router": half,
    }
    assert Counter(event["outcome"] for event in events) == outcomes
    assert {event["payment_id"] for event in events} == {PAYMENT_ID}
