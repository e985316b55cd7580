"""An executor that is down for a while: its task waits, is retried with
backoff, and is delivered once it is back, under one Idempotency-Key.

The processor runs under gunicorn; the stub executor first does not listen
at all (connections refused), then answers 503, then accepts. Every run of
the processor's own job re-sends what is due; the test moves a failed
task's next attempt to now where a real run would have waited the backoff
out, and reads the backoff the outbox chose from the row it wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from fault_support import (
    PROCESSORS,
    Gunicorn,
    Processes,
    Processor,
    StubExecutor,
    assert_reconcile_clean,
    make_due,
    outbox,
    query,
    scheduled_run,
)

from shared.db import Database
from shared.outbox import backoff_seconds


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


@pytest.fixture
def executor() -> Iterator[StubExecutor]:
    stub = StubExecutor()  # not started: nothing listens on its port yet
    yield stub
    stub.stop()


def the_task(db: Database) -> dict[str, Any]:
    [task] = outbox(db)
    return task


def database_now(db: Database) -> datetime:
    [row] = query(db, "SELECT now() AS now")
    now: datetime = row["now"]
    return now


def run_and_read_backoff(
    processor: Processor, service: Gunicorn, db: Database, number: int
) -> tuple[requests.Response, dict[str, Any]]:
    """Run slot ``number``; the task, checked to wait the backoff it earned.

    The failure was recorded between the two readings of the database's
    clock, so its next attempt lies the backoff after the one, at most the
    backoff after the other.
    """
    before = database_now(db)
    answer = scheduled_run(service.url, processor.job_path, number)
    after = database_now(db)
    task = the_task(db)
    delay = timedelta(seconds=backoff_seconds(task["attempts"]))
    assert before + delay <= task["next_attempt_at"] <= after + delay, (task, delay)
    return answer, task


@pytest.mark.slow
@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: p.name)
def test_tasks_for_a_down_executor_are_retried_with_backoff_then_sent_once(
    processor: Processor,
    processes: Processes,
    executor: StubExecutor,
    database_url: str,
    db: Database,
) -> None:
    service = processes.new(processor.entry, processor.name)
    service.start(processor.environ(database_url, service, executor))
    processor.add_work(db)

    first, task = run_and_read_backoff(processor, service, db, 1)

    assert first.status_code == 200, first.text
    [batch] = processor.batches(db)
    batch_id = str(batch[processor.batch_key])
    assert task["dedup_key"] == batch_id
    assert task["attempts"] == 1 and task["sent_at"] is None
    assert "Connection" in task["last_error"]

    # A run before the backoff has passed leaves the task alone.
    early = scheduled_run(service.url, processor.job_path, 2)
    assert early.json()["figures"]["tasks_failed"] == 0
    assert the_task(db)["attempts"] == 1

    # Still down: each attempt counts, says why, and waits longer.
    for number in (3, 4):
        make_due(db)
        answer, task = run_and_read_backoff(processor, service, db, number)
        assert answer.status_code == 200, answer.text
        assert answer.json()["figures"]["tasks_failed"] == 1
        assert task["attempts"] == number - 1
        assert "Connection" in task["last_error"]
    assert [backoff_seconds(attempts) for attempts in (1, 2, 3)] == [10, 20, 40]

    # Up, but refusing: one more failed attempt, with the executor's answer.
    executor.status = 503
    executor.start()
    make_due(db)
    _, task = run_and_read_backoff(processor, service, db, 5)
    assert task["attempts"] == 4 and task["last_error"].startswith("HTTP 503")
    assert task["sent_at"] is None

    # Accepting: delivered, and never again.
    executor.status = 202
    make_due(db)
    delivered = scheduled_run(service.url, processor.job_path, 6)
    assert delivered.json()["figures"]["tasks_sent"] == 1
    make_due(db)
    after = scheduled_run(service.url, processor.job_path, 7)
    assert after.json()["figures"]["tasks_sent"] == 0

    task = the_task(db)
    assert task["sent_at"] is not None and task["last_error"] is None
    assert task["attempts"] == 5
    [accepted] = executor.accepted
    assert accepted["body"][processor.batch_key] == batch_id
    assert len(executor.requests) == 2  # the refused one and the accepted one
    assert executor.keys() == {batch_id}
    [batch] = processor.batches(db)
    assert batch["status"] == ("swapping" if processor.name == "microbatch" else "sent")
    assert len(service.log_events("task_delivery_failed")) == 4

    assert_reconcile_clean(database_url)
    service.assert_logs_hold_no_secret()
