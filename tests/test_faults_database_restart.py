"""PostgreSQL stopped and restarted under a stream of IPNs.

The test owns its PostgreSQL server (its own data directory and port; the
machine's shared server is never touched). The accumulator runs under
gunicorn against it while two threads send signed IPNs without pause. The
server is stopped mid-stream and started again. While it is down every IPN
is answered 503 in the error shape, never 200 and never 4xx; once it is
back the same gunicorn workers credit again, without a restart. Every
payment acknowledged with 200 is in payout_accumulation exactly once, the
ones refused with 5xx are credited once on the sender's retry, and
reconcile is clean. Each processor, started against the same kind of
server, answers its scheduled run 503 while the server is down and runs the
retried slot once it is back, in the same worker.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import IPN_SECRET
from fault_support import (
    ACCUMULATOR_ENTRY,
    PROCESSORS,
    Gunicorn,
    OwnPostgres,
    Processor,
    StubExecutor,
    assert_reconcile_clean,
    query,
    scheduled_run,
    service_environ,
)
from payout_support import add_client

from gcaccumulator.ipn import sign
from shared import embedded, schema
from shared.db import Database

CLIENT_ID = -1003296084379


def ipn_body(payment_id: int) -> bytes:
    return (
        b'{"payment_id":%d,"payment_status":"finished",'
        b'"order_id":"PGP-6271402111|%d",'
        b'"outcome_amount":0.0002734,"outcome_currency":"eth",'
        b'"price_amount":1.35,"price_currency":"usd"}' % (payment_id, CLIENT_ID)
    )


@dataclass(frozen=True)
class Answer:
    payment_id: str
    # The phase when the IPN was sent and when its answer came back.
    sent_in: str
    answered_in: str
    status: int | None
    body: Any


class IpnStream:
    """Threads that send signed IPNs, each for a new payment, until stopped."""

    def __init__(self, base: str, threads: int = 2) -> None:
        self.base = base
        self.phase = "up"
        self.answers: list[Answer] = []
        self.signatures: list[str] = []
        self._ids = itertools.count(5_300_000_000)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send_until_stopped, daemon=True)
            for _ in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def send(self, payment_id: int) -> Answer:
        body = ipn_body(payment_id)
        signature = sign(IPN_SECRET, body)
        sent_in = self.phase
        try:
            response = requests.post(
                f"{self.base}/ipn",
                data=body,
                headers={"x-nowpayments-sig": signature},
                timeout=30,
            )
            status, answer = response.status_code, response.json()
        except (requests.RequestException, ValueError) as error:
            status, answer = None, repr(error)
        with self._lock:
            self.signatures.append(signature)
        return Answer(str(payment_id), sent_in, self.phase, status, answer)

    def _send_until_stopped(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                payment_id = next(self._ids)
            answer = self.send(payment_id)
            with self._lock:
                self.answers.append(answer)

    def count(self, matches: Callable[[Answer], bool]) -> int:
        with self._lock:
            return sum(1 for answer in self.answers if matches(answer))

    def wait_for(self, matches: Callable[[Answer], bool], count: int) -> None:
        deadline = time.monotonic() + 60
        while self.count(matches) < count:
            assert time.monotonic() < deadline, f"no {count} answers: {self.phase}"
            time.sleep(0.02)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def accumulator(
    own_postgres: OwnPostgres, tmp_path: Path
) -> Iterator[tuple[Gunicorn, str]]:
    url = embedded.ensure_database(own_postgres.admin_url, "payouts")
    schema.migrate(url)
    database = Database(url, size=2)
    add_client(database, CLIENT_ID)
    database.close()
    service = Gunicorn(ACCUMULATOR_ENTRY, tmp_path / "accumulator.log")
    try:
        service.start(service_environ(url, WEB_CONCURRENCY="2"))
        yield service, url
    finally:
        service.stop()


def accumulated(answer: Answer) -> bool:
    return answer.status == 200 and answer.body.get("outcome") == "accumulated"


@pytest.mark.slow
def test_the_accumulator_answers_503_while_postgres_is_down_and_recovers_alone(
    own_postgres: OwnPostgres, accumulator: tuple[Gunicorn, str]
) -> None:
    service, url = accumulator
    stream = IpnStream(service.url)
    stream.start()
    try:
        stream.wait_for(accumulated, 30)
        stream.phase = "stopping"
        own_postgres.stop()
        stream.phase = "down"
        stream.wait_for(lambda a: a.sent_in == a.answered_in == "down", 15)
        health_down = requests.get(f"{service.url}/health", timeout=30)
        stream.phase = "starting"
        own_postgres.start()
        stream.phase = "up again"
        stream.wait_for(lambda a: a.sent_in == "up again" and accumulated(a), 30)
    finally:
        stream.stop()
    health_up = requests.get(f"{service.url}/health", timeout=30)

    answers = stream.answers
    # An answer, every time: 200 or "retry later", never a refusal.
    assert [a for a in answers if a.status is None] == []
    assert [a for a in answers if a.status != 200 and a.status < 500] == []
    assert {a.body["outcome"] for a in answers if a.status == 200} == {"accumulated"}
    down = [a for a in answers if a.sent_in == a.answered_in == "down"]
    assert {a.status for a in down} == {503}
    for answer in down:
        assert answer.body["outcome"] == "retry_later"
        assert answer.body["error"]["code"] == "database_unavailable"
        assert isinstance(answer.body["error"]["message"], str)
    assert health_down.status_code == 503
    assert health_down.json()["database"]["ok"] is False
    assert health_up.json()["database"]["ok"] is True

    # Recovered by itself: the same master and the workers it first booted.
    assert service.process is not None and service.process.poll() is None
    assert service.workers_booted() == 2

    # NOWPayments retries what was not acknowledged; each retry is credited
    # now, or found already credited when only the answer was lost.
    refused = [a for a in answers if a.status != 200]
    retried = [stream.send(int(a.payment_id)) for a in refused]
    assert {a.status for a in retried} <= {200}
    assert {a.body["outcome"] for a in retried} <= {"accumulated", "duplicate"}

    database = Database(url, size=1)
    credited = query(
        database,
        "SELECT nowpayments_payment_id AS payment_id, count(*) AS times"
        " FROM payout_accumulation GROUP BY 1",
    )
    database.close()
    times = {row["payment_id"]: row["times"] for row in credited}
    assert set(times) == {a.payment_id for a in answers}
    assert set(times.values()) == {1}

    assert_reconcile_clean(url)
    service.assert_logs_hold_no_secret(stream.signatures)


@pytest.mark.slow
@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: p.name)
def test_a_processor_answers_503_while_postgres_is_down_and_runs_once_it_is_back(
    processor: Processor, own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    url = embedded.ensure_database(own_postgres.admin_url, "payouts")
    schema.migrate(url)
    seeding = Database(url, size=1)
    processor.add_work(seeding)
    seeding.close()
    executor = StubExecutor()
    executor.start()
    service = Gunicorn(processor.entry, tmp_path / f"{processor.name}.log")
    try:
        service.start(processor.environ(url, service, executor))
        own_postgres.stop()
        down = scheduled_run(service.url, processor.job_path, 1)
        health_down = requests.get(f"{service.url}/health", timeout=30)
        own_postgres.start()
        # Cloud Scheduler retries the slot it could not run.
        retried = scheduled_run(service.url, processor.job_path, 1)
        health_up = requests.get(f"{service.url}/health", timeout=30)
        database = Database(url, size=1)
        batches = processor.batches(database)
        database.close()
        workers = service.workers_booted()
    finally:
        service.stop()
        executor.stop()

    # A database out of reach is never "below threshold": 503, to retry.
    assert down.status_code == 503, down.text
    assert down.json()["error"]["code"] == "database_unavailable", down.text
    assert health_down.status_code == 503
    assert health_down.json()["database"]["ok"] is False
    # Back without a restart: the same worker runs the slot, once.
    assert retried.status_code == 200, retried.text
    assert retried.json()["outcome"] == "succeeded"
    assert health_up.json()["database"]["ok"] is True
    assert workers == 1
    [batch] = batches
    assert executor.keys() == {str(batch[processor.batch_key])}
    assert_reconcile_clean(url)
    service.assert_logs_hold_no_secret([])
