"""Executor callbacks forged, replayed, out of order and for unknown batches,
against the two processors running under gunicorn.

tests/test_swap_callback.py and tests/test_payout_callback.py check every
case in process through Flask's test client. This file sends a
representative set over real HTTP to real gunicorn workers, with batches
made by real scheduled runs, so what DESIGN.md sections 3 and 4 promise
holds in the processes that run in production too: a forged callback is
401, a replay is 200 and changes nothing, a completed after a failure is
409, an unknown batch is 404, and a swap callback that arrives before the
executor's acceptance was seen is taken and never undone. Reconcile is
clean after each, and no log line holds a secret.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import microbatch_support
import payout_support
import pytest
import requests
from conftest import INTERNAL_HEADERS, INTERNAL_TOKEN, IPN_SECRET
from fault_support import (
    BATCH,
    MICROBATCH,
    Gunicorn,
    Processes,
    Processor,
    StubExecutor,
    assert_reconcile_clean,
    make_due,
    manual_run,
    outbox,
)

from shared.db import Database

pytestmark = pytest.mark.slow

UNKNOWN_ID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
FORGED = {
    "no token": {},
    "wrong token": {"Authorization": "Bearer not-the-internal-token"},
    "the ipn secret": {"Authorization": f"Bearer {IPN_SECRET}"},
    "token as basic": {
        "Authorization": "Basic " + base64.b64encode(INTERNAL_TOKEN.encode()).decode()
    },
    "token without scheme": {"Authorization": INTERNAL_TOKEN},
}


@dataclass
class System:
    executor: StubExecutor
    microbatch: Gunicorn
    batch: Gunicorn


@pytest.fixture(scope="module")
def system(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    executor = StubExecutor()
    executor.start()
    processes = Processes(tmp_path_factory.mktemp("callbacks"))
    started = {}
    try:
        for processor in (MICROBATCH, BATCH):
            service = processes.new(processor.entry, processor.name)
            service.start(processor.environ(database_url, service, executor))
            started[processor.name] = service
        yield System(executor, started["microbatch"], started["batch"])
    finally:
        processes.stop_all()
        executor.stop()


@pytest.fixture(autouse=True)
def _fresh_executor(system: System) -> Iterator[None]:
    system.executor.status = 202
    system.executor.requests.clear()
    yield


def make_batch(processor: Processor, service: Gunicorn, db: Database) -> str:
    """One batch, made by a real run and accepted by the executor; its id."""
    processor.add_work(db)
    run = manual_run(service.url, processor.job_path)
    assert run.status_code == 200, run.text
    [batch] = processor.batches(db)
    return str(batch[processor.batch_key])


def swap_completed(conversion_id: str, received: str = "23.800001") -> dict[str, Any]:
    return {
        "batch_conversion_id": conversion_id,
        "swap_id": "swap-4c1e",
        "tx_hash": "0x9a8b7c6d5e4f30211203",
        "status": "completed",
        "actual_usdt_received": received,
    }


def swap_failed(conversion_id: str) -> dict[str, Any]:
    return {
        "batch_conversion_id": conversion_id,
        "swap_id": "swap-4c1e",
        "tx_hash": None,
        "status": "failed",
        "actual_usdt_received": None,
    }


def payout_completed(batch_id: str, amount: str = "2.75") -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "status": "completed",
        "tx_hash": "0x1f2e3d4c5b6a79880910",
        "amount_usdt": amount,
        "amount_sent": "2.749",
        "currency": "usdt",
    }


def payout_failed(batch_id: str) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "status": "failed",
        "tx_hash": None,
        "amount_usdt": None,
        "amount_sent": None,
        "currency": None,
    }


def call_back(
    service: Gunicorn,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> requests.Response:
    return requests.post(
        f"{service.url}{path}",
        json=body,
        headers=INTERNAL_HEADERS if headers is None else headers,
        timeout=30,
    )


def assert_refused(answer: requests.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert isinstance(answer.json()["error"]["message"], str)


def assert_clean(system: System, database_url: str) -> None:
    assert_reconcile_clean(database_url)
    system.microbatch.assert_logs_hold_no_secret()
    system.batch.assert_logs_hold_no_secret()


# --- the swap executor's callbacks ------------------------------------------


@pytest.mark.parametrize("forgery", FORGED)
def test_a_forged_swap_callback_is_401_and_changes_nothing(
    forgery: str, system: System, db: Database, database_url: str
) -> None:
    conversion_id = make_batch(MICROBATCH, system.microbatch, db)
    before = microbatch_support.snapshot(db)

    answer = call_back(
        system.microbatch,
        "/swap-executed",
        swap_completed(conversion_id),
        FORGED[forgery],
    )

    assert_refused(answer, 401, "unauthorized")
    assert microbatch_support.snapshot(db) == before
    assert_clean(system, database_url)


def test_a_replayed_swap_callback_is_200_and_changes_nothing(
    system: System, db: Database, database_url: str
) -> None:
    conversion_id = make_batch(MICROBATCH, system.microbatch, db)
    body = swap_completed(conversion_id)

    first = call_back(system.microbatch, "/swap-executed", body)
    after_first = microbatch_support.snapshot(db)
    replay = call_back(system.microbatch, "/swap-executed", body)

    assert first.status_code == 200, first.text
    assert replay.status_code == 200, replay.text
    assert microbatch_support.snapshot(db) == after_first
    [conversion] = MICROBATCH.batches(db)
    assert conversion["status"] == "completed"
    assert_clean(system, database_url)


def test_a_swap_completed_after_failed_is_409_and_changes_nothing(
    system: System, db: Database, database_url: str
) -> None:
    conversion_id = make_batch(MICROBATCH, system.microbatch, db)
    failed = call_back(system.microbatch, "/swap-executed", swap_failed(conversion_id))
    assert failed.status_code == 200, failed.text
    before = microbatch_support.snapshot(db)

    late = call_back(system.microbatch, "/swap-executed", swap_completed(conversion_id))

    assert_refused(late, 409, "conflict")
    assert microbatch_support.snapshot(db) == before
    assert [
        line["batch_conversion_id"]
        for line in system.microbatch.log_events("swap_completed_after_failure")
    ][-1] == conversion_id
    assert_clean(system, database_url)


def test_a_swap_callback_for_an_unknown_conversion_is_404(
    system: System, db: Database, database_url: str
) -> None:
    make_batch(MICROBATCH, system.microbatch, db)
    before = microbatch_support.snapshot(db)

    answer = call_back(system.microbatch, "/swap-executed", swap_completed(UNKNOWN_ID))

    assert_refused(answer, 404, "not_found")
    assert microbatch_support.snapshot(db) == before
    assert_clean(system, database_url)


def test_a_swap_callback_before_the_acceptance_is_taken_and_never_undone(
    system: System, db: Database, database_url: str
) -> None:
    # The executor swapped and called back, but its 2xx to the task never
    # reached us: here it answered 503, so the task is still undelivered.
    system.executor.status = 503
    conversion_id = make_batch(MICROBATCH, system.microbatch, db)
    [conversion] = MICROBATCH.batches(db)
    assert conversion["status"] == "claimed"

    answer = call_back(
        system.microbatch, "/swap-executed", swap_completed(conversion_id)
    )
    assert answer.status_code == 200, answer.text
    done = microbatch_support.snapshot(db)["batch_conversions"]

    # The next run would resend the task; it is withdrawn instead, and the
    # finished conversion stays as the callback left it.
    system.executor.status = 202
    make_due(db)
    run = manual_run(system.microbatch.url, MICROBATCH.job_path)

    assert run.json()["figures"]["tasks_withdrawn"] == 1
    assert system.executor.accepted == []
    assert microbatch_support.snapshot(db)["batch_conversions"] == done
    [conversion] = MICROBATCH.batches(db)
    assert conversion["status"] == "completed"
    [task] = outbox(db)
    assert task["last_error"].startswith("withdrawn")
    assert_clean(system, database_url)


# --- the payout executor's callbacks ----------------------------------------


@pytest.mark.parametrize("forgery", FORGED)
def test_a_forged_payout_callback_is_401_and_changes_nothing(
    forgery: str, system: System, db: Database, database_url: str
) -> None:
    batch_id = make_batch(BATCH, system.batch, db)
    before = payout_support.snapshot(db)

    answer = call_back(
        system.batch, "/payout-completed", payout_completed(batch_id), FORGED[forgery]
    )

    assert_refused(answer, 401, "unauthorized")
    assert payout_support.snapshot(db) == before
    assert_clean(system, database_url)


def test_a_replayed_payout_callback_is_200_and_changes_nothing(
    system: System, db: Database, database_url: str
) -> None:
    batch_id = make_batch(BATCH, system.batch, db)
    body = payout_completed(batch_id)

    first = call_back(system.batch, "/payout-completed", body)
    after_first = payout_support.snapshot(db)
    replay = call_back(system.batch, "/payout-completed", body)

    assert first.status_code == 200, first.text
    assert replay.status_code == 200, replay.text
    assert payout_support.snapshot(db) == after_first
    assert {row["is_paid_out"] for row in payout_support.rows(db)} == {True}
    assert_clean(system, database_url)


def test_a_payout_for_another_amount_is_409_and_changes_nothing(
    system: System, db: Database, database_url: str
) -> None:
    batch_id = make_batch(BATCH, system.batch, db)
    before = payout_support.snapshot(db)

    answer = call_back(
        system.batch, "/payout-completed", payout_completed(batch_id, "2.750001")
    )

    assert_refused(answer, 409, "conflict")
    assert payout_support.snapshot(db) == before
    assert_clean(system, database_url)


def test_a_payout_completed_after_failed_is_409_and_changes_nothing(
    system: System, db: Database, database_url: str
) -> None:
    batch_id = make_batch(BATCH, system.batch, db)
    failed = call_back(system.batch, "/payout-completed", payout_failed(batch_id))
    assert failed.status_code == 200, failed.text
    # The released rows go into a new batch, which the late completion of
    # the old one must not touch.
    rerun = manual_run(system.batch.url, BATCH.job_path)
    assert rerun.json()["figures"]["batches_created"] == 1
    before = payout_support.snapshot(db)

    late = call_back(system.batch, "/payout-completed", payout_completed(batch_id))

    assert_refused(late, 409, "conflict")
    assert payout_support.snapshot(db) == before
    assert_clean(system, database_url)


def test_a_payout_callback_for_an_unknown_batch_is_404(
    system: System, db: Database, database_url: str
) -> None:
    make_batch(BATCH, system.batch, db)
    before = payout_support.snapshot(db)

    answer = call_back(system.batch, "/payout-completed", payout_completed(UNKNOWN_ID))

    assert_refused(answer, 404, "not_found")
    assert payout_support.snapshot(db) == before
    assert_clean(system, database_url)
