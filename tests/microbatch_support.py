"""Helpers for the micro-batch tests: payments, invariants, fakes, logs.

Not a test module: the test files import what they need from here. Rows are
credited the way the accumulator credits them, each with its delivery in
``ipn_events``, so the invariants of DESIGN.md section 8 can be checked
after every test that moves money.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, ROUND_UP, Decimal, localcontext
from types import SimpleNamespace
from typing import Any

from conftest import INTERNAL_HEADERS
from flask import Flask
from google.api_core import exceptions as google_errors
from google.cloud import secretmanager, tasks_v2

from shared import reconcile
from shared.db import Database
from shared.logging import formatter

CLIENT_ID = -1003296084379
# No batch processor runs in these tests: with a day-long interval its job
# stays 'never' rather than turning 'down' in a long session, so the
# watchdog never sends it a task among the swap tasks a test counts.
QUIET_SIBLING = {"PROCESS_INTERVAL_S": "86400"}
USDT_UNIT = Decimal("0.000001")

_CLIENT = """
INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd,
    wallet_address, payout_currency, payout_network)
VALUES (%(client_id)s, 'threshold', 50,
    '0x2b5f1c9a7e3d4b6a8c0e1f2a3b4c5d6e7f8a9b0c', 'usdt', 'eth')
ON CONFLICT (client_id) DO NOTHING
"""

# One statement credits every payment and records its delivery, as the
# accumulator would: invariant 6 wants a delivery behind every row.
_CREDIT = """
WITH credited AS (
    INSERT INTO payout_accumulation (nowpayments_payment_id, client_id,
        user_id, payment_amount_usd, usd_source, platform_fee_percent,
        accumulated_usd, accumulated_eth, outcome_currency)
    SELECT payment_id, %(client_id)s, 6271402111, gross_usd, 'price',
           fee_percent, net_usd, crypto, currency
    FROM unnest(%(payment_ids)s::text[], %(gross_usd)s::numeric[],
                %(fee_percents)s::numeric[], %(net_usd)s::numeric[],
                %(crypto)s::numeric[], %(currencies)s::text[])
         AS p(payment_id, gross_usd, fee_percent, net_usd, crypto, currency)
    RETURNING id, nowpayments_payment_id
)
INSERT INTO ipn_events (source, payment_id, payment_status, outcome,
    http_status, accumulation_id, raw_body, body_size)
SELECT 'router', nowpayments_payment_id, 'finished', 'accumulated', 200, id,
       '\\x7b7d'::bytea, 2
FROM credited
RETURNING accumulation_id
"""


def add_pending(
    db: Database,
    payments: Sequence[tuple[str, str]],
    currency: str = "eth",
    fee_percent: str = "3",
    fee_percents: Sequence[str] | None = None,
) -> list[int]:
    """Credit ``(crypto, net usd)`` payments as pending rows; their ids."""
    fees = [Decimal(fee) for fee in fee_percents or [fee_percent] * len(payments)]
    net = [Decimal(usd) for _, usd in payments]
    with localcontext() as ctx:
        ctx.prec = 60
        gross = [
            (usd * 100 / (100 - fee)).quantize(Decimal("1e-10"), ROUND_UP)
            for usd, fee in zip(net, fees, strict=True)
        ]
    with db.transaction() as cur:
        cur.execute(_CLIENT, {"client_id": CLIENT_ID})
        cur.execute(
            _CREDIT,
            {
                "client_id": CLIENT_ID,
                "payment_ids": [f"np-{uuid.uuid4().hex}" for _ in payments],
                "gross_usd": gross,
                "fee_percents": fees,
                "net_usd": net,
                "crypto": [Decimal(crypto) for crypto, _ in payments],
                "currencies": [currency] * len(payments),
            },
        )
        ids = sorted(row["accumulation_id"] for row in cur.fetchall())
    return ids


def assert_invariants_hold(db: Database) -> None:
    """DESIGN.md section 8, over the whole database, in one snapshot."""
    with db.transaction() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        breaches = reconcile.find_breaches(cur)
    assert [breach.line for breach in breaches] == []


def query(db: Database, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute(statement, params)
        return [dict(row) for row in cur.fetchall()]


def conversions(db: Database) -> list[dict[str, Any]]:
    return query(db, "SELECT * FROM batch_conversions ORDER BY created_at")


def rows_by_status(db: Database) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for row in query(
        db, "SELECT id, conversion_status FROM payout_accumulation ORDER BY id"
    ):
        found.setdefault(row["conversion_status"], []).append(row["id"])
    return found


def job_runs(db: Database) -> list[dict[str, Any]]:
    return query(db, "SELECT * FROM job_runs ORDER BY id")


_MONEY_TABLES = {
    "payout_accumulation": "id",
    "batch_conversions": "batch_conversion_id",
    "batch_conversion_members": "batch_conversion_id, accumulation_id",
    "outbox": "id",
    "ipn_events": "id",
}


def snapshot(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Every money table, whole: to prove a request changed nothing."""
    return {
        table: query(db, f"SELECT * FROM {table} ORDER BY {order}")
        for table, order in _MONEY_TABLES.items()
    }


def run_now(app: Flask) -> Any:
    """``POST /check-threshold`` as an operator's run: its own slot, always."""
    return app.test_client().post(
        "/check-threshold", headers={**INTERNAL_HEADERS, "X-Trigger": "manual"}
    )


def close_app(app: Flask) -> None:
    """Give an app's idle connections back to the server."""
    app.extensions["suite"].db.close()


def free_port() -> int:
    """A local port nobody listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dead_database_url() -> str:
    """A PostgreSQL URL on a port nobody listens on: connecting fails at once."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


def app_database(app: Flask) -> Database:
    database: Database = app.extensions["suite"].db
    return database


# --- sharing, computed independently of the SQL ------------------------------


def usdt_units(amount: Decimal) -> int:
    return int(amount.scaleb(6))


def crypto_units(amount: Decimal) -> int:
    return int(amount.scaleb(18))


def fee_of(gross: Decimal, percent: Decimal) -> Decimal:
    """gross x percent / 100, rounded half-up to 10^-6 (DESIGN.md section 2)."""
    with localcontext() as ctx:
        ctx.prec = 100
        return (gross * percent / 100).quantize(USDT_UNIT, ROUND_HALF_UP)


def largest_remainder_units(received: Decimal, crypto: Sequence[Decimal]) -> list[int]:
    """Exact shares in 10^-6 units; leftover units go to the largest
    remainders (ties to the earlier row, as the rows were credited)."""
    total_units = usdt_units(received)
    weights = [crypto_units(amount) for amount in crypto]
    whole = sum(weights)
    shares = [total_units * weight // whole for weight in weights]
    remainders = [total_units * weight % whole for weight in weights]
    spare = total_units - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for index in order[:spare]:
        shares[index] += 1
    return shares


# --- fakes of Google's clients -----------------------------------------------


class FakeSecretManager:
    """An in-process Secret Manager client: ``access_secret_version`` only.

    ``values`` can be changed at any time; ``unreadable`` makes a secret's
    read raise; ``hold_next`` makes the next read of a secret wait.
    """

    def __init__(self, project: str, values: dict[str, str]) -> None:
        self.project = project
        self.values = dict(values)
        self.unreadable: dict[str, Exception] = {}
        self.reads: list[str] = []
        self._holds: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def hold_next(self, name: str) -> threading.Event:
        """The next read of ``name`` waits until the returned event is set."""
        gate = threading.Event()
        with self._lock:
            self._holds[name] = gate
        return gate

    def access_secret_version(
        self, request: dict[str, Any], timeout: float | None = None
    ) -> Any:
        checked = secretmanager.AccessSecretVersionRequest(request)
        prefix = f"projects/{self.project}/secrets/"
        assert checked.name.startswith(prefix), checked.name
        assert checked.name.endswith("/versions/latest"), checked.name
        assert timeout is not None and timeout > 0
        name = checked.name.removeprefix(prefix).removesuffix("/versions/latest")
        with self._lock:
            self.reads.append(name)
            gate = self._holds.pop(name, None)
        if gate is not None:
            gate.wait(timeout=30)
        if name in self.unreadable:
            raise self.unreadable[name]
        if name not in self.values:
            raise google_errors.NotFound(f"secret {name} not found")
        data = self.values[name].encode()
        return SimpleNamespace(payload=SimpleNamespace(data=data))


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeCloudTasks:
    """An in-process Cloud Tasks client: ``create_task`` only, no network.

    Named tasks behave as in Cloud Tasks: a second task with a name already
    used is refused with ``AlreadyExists``. ``lose_answers`` creates the
    task and then raises, as when the answer is lost on the way back.
    """

    def __init__(self) -> None:
        self.requests: list[tasks_v2.CreateTaskRequest] = []
        self.created: dict[str, tasks_v2.Task] = {}
        self.fail_with: Exception | None = None
        self.lose_answers = False
        self._lock = threading.Lock()

    def create_task(
        self, request: dict[str, Any], timeout: float | None = None
    ) -> tasks_v2.Task:
        checked = tasks_v2.CreateTaskRequest(request)  # refuses unknown fields
        assert timeout is not None and timeout > 0
        with self._lock:
            self.requests.append(checked)
            if self.fail_with is not None:
                raise self.fail_with
            name = checked.task.name
            if name in self.created:
                raise google_errors.AlreadyExists(f"task {name} already exists")
            self.created[name] = checked.task
            if self.lose_answers:
                raise google_errors.DeadlineExceeded("the answer was lost")
        return checked.task


# --- logs --------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Records every line of the suite's loggers (``payouts.*``).

    Attached to the ``payouts`` logger itself rather than the root: each
    app's start replaces the root's handlers, pytest's ``caplog`` included.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, message: str, level: int | None = None) -> list[dict[str, Any]]:
        """The JSON lines with this message, as Cloud Logging would read them."""
        return [
            json.loads(formatter().format(record))
            for record in self.records
            if record.getMessage() == message
            and (level is None or record.levelno == level)
        ]


@contextmanager
def capture_logs() -> Iterator[LogCapture]:
    logger = logging.getLogger("payouts")
    capture = LogCapture()
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(previous)


def wait_for(condition: Any, timeout_s: float = 10, message: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {message}")
        time.sleep(0.02)
