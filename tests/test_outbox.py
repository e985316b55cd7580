"""The outbox: tasks written with their change, sent after it, until accepted.

A task exists exactly when the transaction that needed it committed; it is
sent, and re-sent by every run of its own service with backoff until the
receiver accepts it, never by another service and never twice at once
(DESIGN.md sections 3 and 5). Two senders carry it: a direct HTTP POST with
the internal token, and a named Cloud Task with an OIDC token (section 6).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from conftest import (
    INTERNAL_TOKEN,
    MICROBATCH_ENV,
    RecordingSender,
    base_environ,
)
from flask import Flask, jsonify, request
from google.api_core import exceptions as google_errors
from google.cloud import tasks_v2
from microbatch_support import (
    QUIET_SIBLING,
    FakeCloudTasks,
    add_pending,
    assert_invariants_hold,
    close_app,
    conversions,
    dead_database_url,
    free_port,
    query,
    run_now,
)

from gcmicrobatchprocessor.app import create_app
from gcmicrobatchprocessor.conversion import SERVICE
from shared.config import load_config
from shared.db import Database, DatabaseUnavailable
from shared.outbox import (
    CloudTasksSender,
    HttpSender,
    Outbox,
    Task,
    enqueue,
    make_sender,
    service_audience,
)
from shared.secrets import EnvSecrets

PAYLOAD = {
    "kind": "swap",
    "batch_conversion_id": "9b2f0c4e-6a51-4f0e-8d3c-2a7b1e9f0c11",
    "from_currency": "eth",
    "from_amount": "1.500000000000000001",
    "to_currency": "usdt",
    "row_count": 2,
    "callback_url": "http://microbatch.test/swap-executed",
}


def add_task(
    db: Database,
    dedup_key: str | None = None,
    service: str = SERVICE,
    target_url: str = "http://executor.test/swap",
    kind: str = "swap",
) -> int:
    key = dedup_key or str(uuid.uuid4())
    payload = {**PAYLOAD, "kind": kind, "batch_conversion_id": key}
    with db.transaction() as cur:
        task_id = enqueue(cur, service, target_url, payload, key)
    assert task_id is not None
    return task_id


def task_row(db: Database, task_id: int) -> dict[str, Any]:
    [row] = query(
        db,
        "SELECT *, next_attempt_at - now() AS wait FROM outbox WHERE id = %s",
        (task_id,),
    )
    return row


def make_due(db: Database) -> None:
    """Skip the backoff: every unsent task is due now."""
    query(db, "UPDATE outbox SET next_attempt_at = now() RETURNING id")


@pytest.fixture
def apps() -> Iterator[list[Flask]]:
    made: list[Flask] = []
    yield made
    for app in made:
        close_app(app)


# --- written with the change -------------------------------------------------


def test_a_task_enqueued_in_a_transaction_that_rolls_back_leaves_nothing(
    db: Database,
) -> None:
    with pytest.raises(RuntimeError), db.transaction() as cur:
        enqueue(cur, SERVICE, "http://executor.test/swap", PAYLOAD, "rolled-back")
        raise RuntimeError("the change that needed the task failed")

    assert query(db, "SELECT id FROM outbox") == []


def test_a_second_enqueue_with_the_same_dedup_key_is_a_no_op(db: Database) -> None:
    first = add_task(db, "conversion-1")
    with db.transaction() as cur:
        again = enqueue(
            cur, SERVICE, "http://elsewhere.test", {"kind": "other"}, "conversion-1"
        )

    assert again is None
    [row] = query(db, "SELECT id, target_url, payload FROM outbox")
    assert row["id"] == first
    assert row["target_url"] == "http://executor.test/swap"
    assert row["payload"]["batch_conversion_id"] == "conversion-1"


# --- sent, re-sent, never twice ----------------------------------------------


def test_a_failed_delivery_keeps_the_task_with_attempts_error_and_backoff(
    db: Database,
) -> None:
    sender = RecordingSender()
    sender.fail_with = "HTTP 503: executor restarting"
    outbox = Outbox(db, SERVICE, sender)
    task_id = add_task(db)

    first = outbox.deliver_due()
    after_first = task_row(db, task_id)
    make_due(db)
    outbox.deliver_due()
    after_second = task_row(db, task_id)

    assert (first.sent, first.failed) == (0, 1)
    assert after_first["attempts"] == 1
    assert after_first["last_error"] == "HTTP 503: executor restarting"
    assert after_first["sent_at"] is None
    assert 8 <= after_first["wait"].total_seconds() <= 10
    assert after_second["attempts"] == 2
    assert 18 <= after_second["wait"].total_seconds() <= 20  # backoff doubles
    assert outbox.deliver_due().as_figures() == {
        "tasks_sent": 0,
        "tasks_failed": 0,
        "tasks_withdrawn": 0,
    }


def test_an_undelivered_swap_task_is_resent_by_each_run_until_delivered_then_never(
    make_microbatch: Callable[..., Flask],
    apps: list[Flask],
    db: Database,
    swap_sender: RecordingSender,
) -> None:
    app = make_microbatch(**QUIET_SIBLING)
    apps.append(app)
    add_pending(db, [("0.001", "11")])
    swap_sender.fail_with = "connection refused"

    claimed = run_now(app)
    make_due(db)
    failed_again = run_now(app)
    swap_sender.fail_with = None
    make_due(db)
    delivered = run_now(app)
    make_due(db)
    later = run_now(app)

    assert claimed.json["figures"]["conversions_created"] == 1
    assert claimed.json["figures"]["swap_tasks_sent_now"] == 0
    assert failed_again.json["figures"]["tasks_failed"] == 1
    assert delivered.json["figures"]["tasks_sent"] == 1
    assert later.json["figures"]["tasks_sent"] == 0
    [task] = swap_sender.sent
    [conversion] = conversions(db)
    assert task.dedup_key == str(conversion["batch_conversion_id"])
    assert conversion["status"] == "swapping"  # accepted once delivered
    [row] = query(db, "SELECT attempts, sent_at, last_error FROM outbox")
    assert row["attempts"] == 3
    assert row["sent_at"] is not None
    assert row["last_error"] is None
    assert_invariants_hold(db)


class SlowSender:
    """Takes a while over each task, as a real receiver does."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sent: list[str] = []
        self._lock = threading.Lock()

    def send(self, task: Task) -> None:
        time.sleep(self.seconds)
        with self._lock:
            self.sent.append(task.dedup_key)


def test_two_concurrent_deliveries_never_send_the_same_task_twice(
    db: Database,
) -> None:
    task_ids = [add_task(db, f"task-{n:02}") for n in range(24)]
    senders = [SlowSender(0.1), SlowSender(0.1)]
    outboxes = [Outbox(db, SERVICE, sender, concurrency=4) for sender in senders]
    start = threading.Barrier(2)

    def deliver(outbox: Outbox) -> None:
        start.wait(10)
        outbox.deliver_due(limit=4)

    threads = [threading.Thread(target=deliver, args=(o,)) for o in outboxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    sent = senders[0].sent + senders[1].sent
    assert sorted(sent) == [f"task-{n:02}" for n in range(24)]  # each once
    assert senders[0].sent and senders[1].sent  # both really ran at once
    rows = query(db, "SELECT attempts, sent_at FROM outbox ORDER BY id")
    assert len(rows) == len(task_ids)
    assert {(row["attempts"], row["sent_at"] is not None) for row in rows} == {
        (1, True)
    }


def test_a_service_only_sends_its_own_tasks(
    make_microbatch: Callable[..., Flask],
    apps: list[Flask],
    db: Database,
    swap_sender: RecordingSender,
) -> None:
    app = make_microbatch(**QUIET_SIBLING)
    apps.append(app)
    # Not swap tasks: those are withdrawn unless their conversion waits.
    foreign = add_task(
        db,
        service="gcbatchprocessor",
        target_url="http://payout-executor.test",
        kind="probe",
    )
    own = add_task(db, kind="probe")

    run = run_now(app)
    app.extensions["outbox"].deliver_due()

    assert run.json["figures"]["tasks_sent"] == 1
    assert [task.id for task in swap_sender.sent] == [own]
    untouched = task_row(db, foreign)
    assert (untouched["attempts"], untouched["sent_at"]) == (0, None)


# --- the HTTP sender ---------------------------------------------------------


class Receiver:
    """A tiny executor over real HTTP: records requests, answers as told."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[int] = []  # statuses to answer, in order; then 202
        self.delay_s = 0.0
        self.app = Flask("receiver")
        self.app.add_url_rule("/swap", "swap", self._receive, methods=["POST"])

    def _receive(self) -> Any:
        self.requests.append(
            {
                "headers": dict(request.headers),
                "body": json.loads(request.get_data(), parse_float=Decimal),
            }
        )
        time.sleep(self.delay_s)
        status = self.answers.pop(0) if self.answers else 202
        return jsonify({"accepted": status < 300}), status


@pytest.fixture
def receiver(serve: Callable[[Flask], str]) -> tuple[Receiver, str]:
    made = Receiver()
    return made, f"{serve(made.app)}/swap"


def http_outbox(db: Database, timeout_s: float = 5) -> Outbox:
    secrets = EnvSecrets({"INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN})
    return Outbox(db, SERVICE, HttpSender(secrets, timeout_s=timeout_s))


def test_http_sender_posts_json_with_the_token_and_one_idempotency_key_throughout(
    db: Database, receiver: tuple[Receiver, str]
) -> None:
    executor, url = receiver
    executor.answers = [503]
    outbox = http_outbox(db)
    task_id = add_task(db, "9b2f0c4e-6a51-4f0e-8d3c-2a7b1e9f0c11", target_url=url)

    refused = outbox.deliver_due()
    make_due(db)
    accepted = outbox.deliver_due()

    assert (refused.failed, accepted.sent) == (1, 1)
    assert len(executor.requests) == 2
    for seen in executor.requests:
        assert seen["headers"]["Authorization"] == f"Bearer {INTERNAL_TOKEN}"
        assert (
            seen["headers"]["Idempotency-Key"] == "9b2f0c4e-6a51-4f0e-8d3c-2a7b1e9f0c11"
        )
        assert seen["headers"]["Content-Type"] == "application/json"
        assert seen["body"] == PAYLOAD  # amounts stay decimal strings
    assert task_row(db, task_id)["sent_at"] is not None


@pytest.mark.parametrize("status", [301, 400, 401, 404, 409, 500, 503])
def test_http_sender_counts_a_non_2xx_answer_as_a_failure(
    db: Database, receiver: tuple[Receiver, str], status: int
) -> None:
    executor, url = receiver
    executor.answers = [status]
    task_id = add_task(db, target_url=url)

    report = http_outbox(db).deliver_due()

    assert (report.sent, report.failed) == (0, 1)
    row = task_row(db, task_id)
    assert row["sent_at"] is None
    assert row["last_error"].startswith(f"HTTP {status}")


def test_http_sender_counts_a_refused_connection_as_a_failure(db: Database) -> None:
    task_id = add_task(db, target_url=f"http://127.0.0.1:{free_port()}/swap")

    report = http_outbox(db).deliver_due()

    assert (report.sent, report.failed) == (0, 1)
    row = task_row(db, task_id)
    assert row["sent_at"] is None
    assert "ConnectionError" in row["last_error"]


def test_http_sender_counts_a_receiver_slower_than_its_timeout_as_a_failure(
    db: Database, receiver: tuple[Receiver, str]
) -> None:
    executor, url = receiver
    executor.delay_s = 1.0
    task_id = add_task(db, target_url=url)

    report = http_outbox(db, timeout_s=0.2).deliver_due()

    assert (report.sent, report.failed) == (0, 1)
    assert "Timeout" in task_row(db, task_id)["last_error"]


def test_the_micro_batch_app_with_tasks_backend_http_posts_the_swap_task(
    database_url: str, db: Database, receiver: tuple[Receiver, str], apps: list[Flask]
) -> None:
    executor, url = receiver
    environ = base_environ(
        database_url, **{**MICROBATCH_ENV, **QUIET_SIBLING, "SWAP_EXECUTOR_URL": url}
    )
    app = create_app(environ=environ)  # the sender TASKS_BACKEND=http makes
    apps.append(app)
    add_pending(db, [("0.001", "11")])

    run = run_now(app)

    assert run.json["figures"]["swap_tasks_sent_now"] == 1
    [conversion] = conversions(db)
    conversion_id = str(conversion["batch_conversion_id"])
    [seen] = executor.requests
    assert seen["headers"]["Authorization"] == f"Bearer {INTERNAL_TOKEN}"
    assert seen["headers"]["Idempotency-Key"] == conversion_id
    assert seen["body"]["batch_conversion_id"] == conversion_id
    assert seen["body"]["from_amount"] == "0.001"
    assert conversion["status"] == "swapping"
    assert_invariants_hold(db)


# --- the Cloud Tasks sender --------------------------------------------------

QUEUE = "projects/payouts-prod/locations/europe-west1/queues/swaps"
INVOKER = "tasks-invoker@payouts-prod.iam.gserviceaccount.com"
EXECUTOR_URL = "https://swap-executor-4kq2x7-ew.a.run.app/swap"


def cloud_tasks_outbox(db: Database, client: FakeCloudTasks) -> Outbox:
    sender = CloudTasksSender(
        project="payouts-prod",
        location="europe-west1",
        queue="swaps",
        service_account=INVOKER,
        audience_for=service_audience,
        client=client,
    )
    return Outbox(db, SERVICE, sender)


def test_cloud_tasks_sender_creates_a_named_task_with_an_oidc_token_for_the_target(
    db: Database,
) -> None:
    client = FakeCloudTasks()
    key = "9b2f0c4e-6a51-4f0e-8d3c-2a7b1e9f0c11"
    task_id = add_task(db, key, target_url=EXECUTOR_URL)

    report = cloud_tasks_outbox(db, client).deliver_due()

    assert report.sent == 1
    [created] = client.requests
    assert created.parent == QUEUE
    assert created.task.name == f"{QUEUE}/tasks/{key}"
    call = created.task.http_request
    assert call.url == EXECUTOR_URL
    assert call.http_method == tasks_v2.HttpMethod.POST
    assert json.loads(call.body, parse_float=Decimal) == {
        **PAYLOAD,
        "batch_conversion_id": key,
    }
    assert call.headers["Idempotency-Key"] == key
    assert call.headers["Content-Type"] == "application/json"
    assert call.oidc_token.service_account_email == INVOKER
    assert call.oidc_token.audience == "https://swap-executor-4kq2x7-ew.a.run.app"
    assert task_row(db, task_id)["sent_at"] is not None


def test_cloud_tasks_names_follow_the_dedup_key_one_name_per_key(
    db: Database,
) -> None:
    client = FakeCloudTasks()
    outbox = cloud_tasks_outbox(db, client)
    keys = [
        "9b2f0c4e-6a51-4f0e-8d3c-2a7b1e9f0c11",
        "watchdog:process:2025-06-01T10:05:00Z",
        "watchdog_process_2025-06-01T10_05_00Z",
        "x" * 600 + "-1",
        "x" * 600 + "-2",
    ]
    for key in keys:
        add_task(db, key, target_url=EXECUTOR_URL)

    report = outbox.deliver_due()
    # Every task sent again, by a fresh sender, as after a lost answer.
    query(db, "UPDATE outbox SET sent_at = NULL, next_attempt_at = now() RETURNING id")
    second_client = FakeCloudTasks()
    cloud_tasks_outbox(db, second_client).deliver_due()

    assert report.sent == len(keys)
    names = {request.task.name for request in client.requests}
    assert len(names) == len(keys)  # distinct tasks never share a name
    for name in names:
        task_name = name.rsplit("/", 1)[1]
        assert len(task_name) <= 500
        assert all(c.isascii() and (c.isalnum() or c in "-_") for c in task_name)
    resent = {request.task.name for request in second_client.requests}
    assert resent == names  # the same key gives the same name, every time


def test_a_resend_refused_as_already_existing_counts_as_delivered(
    db: Database,
) -> None:
    client = FakeCloudTasks()
    outbox = cloud_tasks_outbox(db, client)
    task_id = add_task(db, target_url=EXECUTOR_URL)
    client.lose_answers = True  # queued, but the answer never comes back

    lost = outbox.deliver_due()
    make_due(db)
    client.lose_answers = False
    resent = outbox.deliver_due()

    assert (lost.failed, resent.sent) == (1, 1)
    assert len(client.requests) == 2
    assert len(client.created) == 1  # one task in the queue, not two
    row = task_row(db, task_id)
    assert (row["attempts"], row["sent_at"] is not None) == (2, True)


def test_a_cloud_tasks_error_keeps_the_task_for_a_resend(db: Database) -> None:
    client = FakeCloudTasks()
    client.fail_with = google_errors.ServiceUnavailable("queue unavailable")
    task_id = add_task(db, target_url=EXECUTOR_URL)

    report = cloud_tasks_outbox(db, client).deliver_due()

    assert report.failed == 1
    row = task_row(db, task_id)
    assert row["sent_at"] is None
    assert "Cloud Tasks" in row["last_error"]
    assert client.created == {}


def test_tasks_backend_cloudtasks_sends_through_the_configured_queue(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FakeCloudTasks()
    monkeypatch.setattr(tasks_v2, "CloudTasksClient", lambda: client)
    config = load_config(
        "microbatch",
        base_environ(
            database_url,
            **MICROBATCH_ENV,
            TASKS_BACKEND="cloudtasks",
            GCP_PROJECT="payouts-prod",
            TASKS_LOCATION="europe-west1",
            TASKS_QUEUE="swaps",
            TASKS_SERVICE_ACCOUNT=INVOKER,
        ),
    )
    key = str(uuid.uuid4())
    add_task(db, key, target_url=EXECUTOR_URL)

    report = Outbox(db, SERVICE, make_sender(config)).deliver_due()

    assert report.sent == 1
    [created] = client.requests
    assert created.task.name == f"{QUEUE}/tasks/{key}"
    assert created.task.http_request.oidc_token.service_account_email == INVOKER
    assert created.task.http_request.oidc_token.audience == service_audience(
        EXECUTOR_URL
    )


def test_the_outbox_answers_database_unavailable_rather_than_sending_blind(
    db: Database,
) -> None:
    sender = RecordingSender()
    add_task(db)
    cut_off = Database(dead_database_url(), size=1)

    with pytest.raises(DatabaseUnavailable):
        Outbox(cut_off, SERVICE, sender).deliver_due()

    assert sender.sent == []


def test_a_swap_task_whose_conversion_is_gone_or_finished_is_withdrawn_not_sent(
    make_microbatch: Callable[..., Flask],
    apps: list[Flask],
    db: Database,
    swap_sender: RecordingSender,
) -> None:
    app = make_microbatch(**QUIET_SIBLING)
    apps.append(app)
    orphan = add_task(db)  # a swap task for a conversion that is not waiting

    report = app.extensions["outbox"].deliver_due()

    assert swap_sender.sent == []
    assert (report.sent, report.withdrawn) == (0, 1)
    row = task_row(db, orphan)
    assert row["sent_at"] is not None
    assert row["last_error"].startswith("withdrawn")
