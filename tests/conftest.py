"""Fixtures shared by every test: a real PostgreSQL database and the apps.

The database is ``DATABASE_URL``'s server when set (CI: the machine's
PostgreSQL 15), else an embedded server under ``.data/test``. Each test
session creates its own database, migrates it once, and every test starts
from empty tables: tests commit for real, because concurrency is what many
of them are about, so rollback isolation would hide what they test.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from flask import Flask
from psycopg2 import sql
from werkzeug.serving import make_server

from shared import embedded, schema
from shared.db import Database

# A verbatim copy of the workspace's shared/fixtures, so a clone tests alone;
# test_fixtures_copy.py checks the copy against the original when present.
FIXTURES = Path(__file__).resolve().parent / "fixtures"

IPN_SECRET = "test-ipn-secret"
INTERNAL_TOKEN = "test-internal-token"

# The clients the fixtures assume (shared/fixtures/README.md).
FIXTURE_CLIENTS = [
    {
        "client_id": -1003296084379,
        "open_channel_id": -1002000000001,
        "payout_strategy": "threshold",
        "payout_threshold_usd": Decimal("2.00"),
        "wallet_address": "0x2b5f1c9a7e3d4b6a8c0e1f2a3b4c5d6e7f8a9b0c",
        "payout_currency": "usdt",
        "payout_network": "eth",
    },
    {
        "client_id": -1001000000002,
        "open_channel_id": -1002000000002,
        "payout_strategy": "threshold",
        "payout_threshold_usd": Decimal("5.00"),
        "wallet_address": "0x7c1e0d9b8a7f6e5d4c3b2a1908f7e6d5c4b3a291",
        "payout_currency": "shib",
        "payout_network": "eth",
    },
    {
        "client_id": -1001000000003,
        "open_channel_id": None,
        "payout_strategy": "instant",
        "payout_threshold_usd": None,
        "wallet_address": "0x3d4c5b6a79880716253443526170f8e9d0c1b2a3",
        "payout_currency": "eth",
        "payout_network": "eth",
    },
]

_KEEP = {"suite_info", "_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock"}


def _admin_url() -> str:
    configured = os.environ.get("DATABASE_URL", "").strip()
    if configured:
        return configured
    return embedded.start(embedded.DATA_DIR / "test", keep_running=False)


def _drop_database(admin_url: str, name: str) -> None:
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture(scope="session")
def admin_url() -> str:
    return _admin_url()


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    name = f"payouts_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = embedded.ensure_database(admin_url, name)
    schema.migrate(url)
    yield url
    _drop_database(admin_url, name)


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url, size=30, application_name="tests")
    yield database
    database.close()


@pytest.fixture(autouse=True)
def _empty_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "db" not in request.fixturenames:
        return
    database: Database = request.getfixturevalue("db")
    with database.transaction() as cur:
        cur.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        tables = [
            row["tablename"] for row in cur.fetchall() if row["tablename"] not in _KEEP
        ]
        cur.execute(
            sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(table) for table in tables)
            )
        )
        # Tests age the suite's creation to replay time passing; the next
        # test starts from a database created now.
        cur.execute("UPDATE suite_info SET created_at = now()")


def base_environ(database_url: str, **overrides: str) -> dict[str, str]:
    environ = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "NOWPAYMENTS_IPN_SECRET": IPN_SECRET,
        "INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN,
        "PRICE_SOURCE": "static:3400",
        "LOG_LEVEL": "WARNING",
    }
    environ.update(overrides)
    return environ


@pytest.fixture
def make_accumulator(database_url: str) -> Callable[..., Flask]:
    from gcaccumulator.app import create_app

    def make(**overrides: str) -> Flask:
        return create_app(environ=base_environ(database_url, **overrides))

    return make


@pytest.fixture
def accumulator(make_accumulator: Callable[..., Flask]) -> Flask:
    return make_accumulator()


class RecordingSender:
    """A task sender that keeps what it was given (or fails on request)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.fail_with: str | None = None

    def send(self, task: Any) -> None:
        from shared.outbox import DeliveryFailed

        if self.fail_with is not None:
            raise DeliveryFailed(self.fail_with)
        self.sent.append(task)


MICROBATCH_ENV = {
    "SERVICE_URL": "http://microbatch.test",
    "SWAP_EXECUTOR_URL": "http://executor.test/swap",
    "BATCH_PROCESSOR_URL": "http://batch.test",
    "MICRO_BATCH_THRESHOLD_USD": "10",
}


@pytest.fixture
def swap_sender() -> RecordingSender:
    return RecordingSender()


@pytest.fixture
def make_microbatch(
    database_url: str, swap_sender: RecordingSender
) -> Callable[..., Flask]:
    from gcmicrobatchprocessor.app import create_app

    def make(secrets: Any = None, sender: Any = None, **overrides: str) -> Flask:
        environ = base_environ(database_url, **{**MICROBATCH_ENV, **overrides})
        return create_app(
            environ=environ, secrets=secrets, sender=sender or swap_sender
        )

    return make


@pytest.fixture
def microbatch(make_microbatch: Callable[..., Flask]) -> Flask:
    return make_microbatch()


INTERNAL_HEADERS = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], str]]:
    """Serve an app over real HTTP on a free port; return its base URL."""
    servers = []

    def start(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def fixture_clients(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        for client in FIXTURE_CLIENTS:
            cur.execute(
                """
                INSERT INTO clients (client_id, open_channel_id,
                    payout_strategy, payout_threshold_usd, wallet_address,
                    payout_currency, payout_network)
                VALUES (%(client_id)s, %(open_channel_id)s, %(payout_strategy)s,
                    %(payout_threshold_usd)s, %(wallet_address)s, %(payout_currency)s,
                    %(payout_network)s)
                """,
                client,
            )
    return FIXTURE_CLIENTS


@pytest.fixture(scope="session")
def ipn_cases() -> list[dict[str, Any]]:
    with open(FIXTURES / "ipn_cases.json") as handle:
        cases: list[dict[str, Any]] = json.load(handle)
    return cases


@pytest.fixture
def logs() -> Iterator[Any]:
    """The suite's log lines during the test (``microbatch_support.LogCapture``)."""
    # Imported here: microbatch_support imports this module.
    from microbatch_support import capture_logs

    with capture_logs() as capture:
        yield capture
