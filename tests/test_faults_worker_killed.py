"""A worker killed between the commit and the send loses no task and sends
none twice.

The processor runs under gunicorn against the test database, sending to a
stub executor that records every task. A failure point (shared/faults.py,
honoured only with ENVIRONMENT=test) ends the worker with ``os._exit`` right
after the batch and its task committed, before the outbox sent the task:
the scheduler sees its connection drop. gunicorn starts a new worker; the
next scheduled run finds the task undelivered and sends it, once, under the
batch's one Idempotency-Key. Reconcile is clean after it all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
import requests
from fault_support import (
    PROCESSORS,
    Processes,
    Processor,
    StubExecutor,
    assert_reconcile_clean,
    outbox,
    query,
    scheduled_run,
)

from shared import faults
from shared.config import ConfigError, FaultPoint, load_config
from shared.db import Database


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


@pytest.fixture
def executor() -> Iterator[StubExecutor]:
    stub = StubExecutor()
    stub.start()
    yield stub
    stub.stop()


@pytest.mark.slow
@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: p.name)
def test_a_worker_killed_after_the_commit_leaves_the_task_for_the_next_run(
    processor: Processor,
    processes: Processes,
    executor: StubExecutor,
    database_url: str,
    db: Database,
    tmp_path: Path,
) -> None:
    trigger = tmp_path / "fault-armed"
    trigger.touch()
    service = processes.new(processor.entry, processor.name)
    service.start(
        processor.environ(
            database_url,
            service,
            executor,
            TEST_FAULT_POINT=processor.fault_point,
            TEST_FAULT_TRIGGER_FILE=str(trigger),
        )
    )
    processor.add_work(db)

    with pytest.raises(requests.ConnectionError):
        scheduled_run(service.url, processor.job_path, 1)

    # The worker died after the commit: the batch and its task exist, the
    # task was never sent, and the failure point is spent.
    [batch] = processor.batches(db)
    assert batch["status"] == "claimed"
    [task] = outbox(db)
    assert task["dedup_key"] == str(batch[processor.batch_key])
    assert task["sent_at"] is None and task["attempts"] == 0
    assert executor.requests == []
    assert not trigger.exists()
    [fired] = service.log_events("test_fault_fired")
    assert fired["point"] == processor.fault_point
    assert service.log_shows(f"exited with code {faults.EXIT_STATUS}")

    service.wait_live()  # gunicorn's new worker, same variables, no trigger
    # Cloud Scheduler saw the run fail and retries the same slot.
    retry = scheduled_run(service.url, processor.job_path, 1)

    assert retry.status_code == 200, retry.text
    assert retry.json()["outcome"] == "succeeded"
    assert retry.json()["figures"]["tasks_sent"] == 1
    [received] = executor.requests
    assert received["headers"]["Idempotency-Key"] == str(batch[processor.batch_key])
    assert received["body"][processor.batch_key] == str(batch[processor.batch_key])

    # The next scheduled run has nothing left to send.
    following = scheduled_run(service.url, processor.job_path, 2)
    assert following.json()["figures"]["tasks_sent"] == 0
    assert len(executor.requests) == 1
    [task] = outbox(db)
    assert task["sent_at"] is not None and task["attempts"] == 1
    [batch] = processor.batches(db)
    assert batch["status"] == ("swapping" if processor.name == "microbatch" else "sent")

    # The dead run's record stays 'running'; long after, with runs that
    # succeeded since, it is history and no hang for /health to report.
    query(
        db,
        "UPDATE job_runs SET started_at = now() - interval '1 hour'"
        " WHERE outcome = 'running' RETURNING id",
    )
    health = requests.get(f"{service.url}/health", timeout=30).json()
    assert health["jobs"][processor.job]["hung"] is False
    assert health["status"] == "ok", health

    assert_reconcile_clean(database_url)
    service.assert_logs_hold_no_secret()


def test_a_failure_point_outside_environment_test_refuses_to_start(
    tmp_path: Path,
) -> None:
    environ = {
        "ENVIRONMENT": "development",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
        "INTERNAL_AUTH_TOKEN": "token",
        "TEST_FAULT_POINT": "after-payout-commit",
        "TEST_FAULT_TRIGGER_FILE": str(tmp_path / "armed"),
    }

    with pytest.raises(ConfigError) as refused:
        load_config("payoutctl", environ)

    assert refused.value.problems == [
        "TEST_FAULT_POINT: honoured only with ENVIRONMENT=test",
        "TEST_FAULT_TRIGGER_FILE: honoured only with ENVIRONMENT=test",
    ]


def test_a_failure_point_needs_its_trigger_file_and_a_known_name(
    tmp_path: Path,
) -> None:
    environ = {"ENVIRONMENT": "test", "TEST_FAULT_POINT": "after-payout-commit"}

    with pytest.raises(ConfigError) as refused:
        load_config("payoutctl", environ)
    assert refused.value.problems == [
        "TEST_FAULT_TRIGGER_FILE: required with TEST_FAULT_POINT"
    ]

    environ["TEST_FAULT_POINT"] = "somewhere-else"
    environ["TEST_FAULT_TRIGGER_FILE"] = str(tmp_path / "armed")
    with pytest.raises(ConfigError) as refused:
        load_config("payoutctl", environ)
    assert [p.split(":")[0] for p in refused.value.problems] == ["TEST_FAULT_POINT"]


def test_the_configured_points_are_the_points_the_code_knows() -> None:
    assert get_args(FaultPoint) == faults.POINTS


def test_a_point_without_its_trigger_file_does_nothing(tmp_path: Path) -> None:
    faults.arm("after-payout-commit", str(tmp_path / "never-created"))
    try:
        faults.reach("after-payout-commit")  # returns: the test goes on
        faults.reach("after-conversion-commit")
    finally:
        faults.arm(None, None)
