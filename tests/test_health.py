"""``/health`` and ``/livez``, and the service across a database outage.

The outage is made by pointing the running app's database at a port nothing
listens on (the shared PostgreSQL server keeps running for other tests), or
by having the server terminate the app's connections.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg2
import requests
from conftest import IPN_SECRET
from flask import Flask

from gcaccumulator.ipn import sign
from shared.db import Database

FINISHED_IPN = (
    b'{"payment_id":5077125051,"payment_status":"finished",'
    b'"order_id":"PGP-6271402111|-1003296084379",'
    b'"outcome_amount":0.0002734,"outcome_currency":"eth"}'
)


def app_database(app: Flask) -> Database:
    database: Database = app.extensions["suite"].db
    return database


def dead_database_url() -> str:
    """A URL whose port was free a moment ago: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def deliver_ipn(base: str) -> requests.Response:
    return requests.post(
        f"{base}/ipn",
        data=FINISHED_IPN,
        headers={"x-nowpayments-sig": sign(IPN_SECRET, FINISHED_IPN)},
        timeout=15,
    )


def health(base: str) -> requests.Response:
    return requests.get(f"{base}/health", timeout=15)


def test_health_reports_database_latency_service_and_version(
    make_accumulator: Any, serve: Any
) -> None:
    app = make_accumulator(APP_VERSION="v1.4.2", K_REVISION="gcaccumulator-00042")
    base = serve(app)

    response = health(base)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["status"] == "ok"
    assert body["service"] == "gcaccumulator"
    assert body["version"] == "v1.4.2"
    assert body["database"]["ok"] is True
    latency = body["database"]["latency_ms"]
    assert isinstance(latency, int | float) and not isinstance(latency, bool)
    assert 0 <= latency < 5000


def test_version_falls_back_to_the_cloud_run_revision(
    make_accumulator: Any, serve: Any
) -> None:
    base = serve(make_accumulator(K_REVISION="gcaccumulator-00042-xaz"))

    assert health(base).json()["version"] == "gcaccumulator-00042-xaz"


def test_livez_answers_200(accumulator: Flask, serve: Any) -> None:
    response = requests.get(f"{serve(accumulator)}/livez", timeout=10)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"


def test_unreachable_database_is_503_down_and_the_service_recovers(
    accumulator: Flask, serve: Any, db: Database, fixture_clients: Any
) -> None:
    base = serve(accumulator)
    database = app_database(accumulator)
    good_url = database.dsn
    assert health(base).status_code == 200

    database.dsn = dead_database_url()
    database.close()  # drop the idle connections to the live server
    down = health(base)
    refused_ipn = deliver_ipn(base)
    alive = requests.get(f"{base}/livez", timeout=10)

    assert down.status_code == 503
    assert down.json()["status"] == "down"
    assert down.json()["database"] == {"ok": False, "latency_ms": None}
    assert refused_ipn.status_code == 503
    assert refused_ipn.headers["Content-Type"] == "application/json"
    assert refused_ipn.json()["error"]["code"] == "database_unavailable"
    assert refused_ipn.json()["error"]["message"]
    assert refused_ipn.json()["outcome"] == "retry_later"
    assert alive.status_code == 200

    database.dsn = good_url
    up = health(base)
    retried_ipn = deliver_ipn(base)

    assert (up.status_code, up.json()["status"]) == (200, "ok")
    assert (retried_ipn.status_code, retried_ipn.json()["outcome"]) == (
        200,
        "accumulated",
    )
    with db.transaction() as cur:
        cur.execute("SELECT outcome FROM ipn_events")
        assert [row["outcome"] for row in cur.fetchall()] == ["accumulated"]


def terminate_connections(database_url: str, application_name: str) -> int:
    """Have the server end every connection of one application: a restart."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (application_name,),
            )
            (ended,) = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    return int(ended)


def test_connections_ended_by_the_server_are_replaced_after_one_failure(
    accumulator: Flask,
    serve: Any,
    db: Database,
    database_url: str,
    fixture_clients: Any,
) -> None:
    base = serve(accumulator)
    # Several requests at once leave several idle connections in the pool.
    with ThreadPoolExecutor(max_workers=6) as pool:
        warm = list(pool.map(lambda _: health(base).status_code, range(6)))
    assert warm == [200] * 6

    assert terminate_connections(database_url, "gcaccumulator") >= 1
    first = health(base)
    second = health(base)
    ipn = deliver_ipn(base)

    # A stale connection may cost the first request; never a second one.
    assert first.status_code in (200, 503)
    assert (second.status_code, second.json()["status"]) == (200, "ok")
    assert (ipn.status_code, ipn.json()["outcome"]) == (200, "accumulated")
