"""Tasks to other services, written with the change that needs them.

A task is a row in ``outbox`` inserted in the same transaction as the
conversion or payout it announces, so there is never a batch without its
task, nor a task for a batch that rolled back. After the commit the task is
sent; every scheduled run of the owning service sends again whatever is
still undelivered, with backoff, until the receiver accepts it. A service
only ever sends its own tasks.

The receiver sees the same ``Idempotency-Key`` (the batch id) on every
resend, so a task delivered twice (sent, then the acknowledgement lost) is
recognised there. Sending takes a lease on the row first, so two runs never
send the same task at the same moment.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import requests

from shared.db import Database, load_queries, to_json
from shared.secrets import SecretSource

QUERIES = load_queries(Path(__file__).with_name("outbox.sql"))

log = logging.getLogger("payouts.outbox")

# A task being sent is leased this long; a sender that dies mid-send leaves
# the task to be picked up again after it.
LEASE = timedelta(seconds=60)
# Backoff after a failed attempt: 10 s, 20 s, 40 s ... capped at 10 minutes.
BACKOFF_BASE_S = 10
BACKOFF_CAP_S = 600


@dataclass(frozen=True)
class Task:
    id: int
    service: str
    target_url: str
    payload: dict[str, Any]
    headers: dict[str, str]
    dedup_key: str
    attempts: int


class DeliveryFailed(Exception):
    """The receiver did not accept the task; it will be sent again."""


class Sender(Protocol):
    def send(self, task: Task) -> None:
        """Deliver ``task`` or raise ``DeliveryFailed``."""
        ...


def enqueue(
    cur: Any,
    service: str,
    target_url: str,
    payload: Mapping[str, Any],
    dedup_key: str,
    headers: Mapping[str, str] | None = None,
) -> int | None:
    """Add a task inside the caller's transaction; the id, or None if known."""
    cur.execute(
        QUERIES["enqueue"],
        {
            "service": service,
            "target_url": target_url,
            "payload": to_json(payload),
            "headers": to_json(dict(headers or {})),
            "dedup_key": dedup_key,
        },
    )
    row = cur.fetchone()
    return None if row is None else int(row["id"])


def backoff_seconds(attempts: int) -> int:
    return int(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


@dataclass
class DeliveryReport:
    sent: int = 0
    failed: int = 0
    withdrawn: int = 0

    def as_figures(self) -> dict[str, int]:
        return {
            "tasks_sent": self.sent,
            "tasks_failed": self.failed,
            "tasks_withdrawn": self.withdrawn,
        }


class Outbox:
    """One service's outbox: lease due tasks, send them, record the result."""

    def __init__(
        self,
        db: Database,
        service: str,
        sender: Sender,
        on_delivered: Callable[[Any, Task], None] | None = None,
        concurrency: int = 8,
        still_wanted: Callable[[Any, Task], bool] | None = None,
    ) -> None:
        self.db = db
        self.service = service
        self.sender = sender
        self.on_delivered = on_delivered
        self.still_wanted = still_wanted
        self.concurrency = concurrency

    def deliver_due(
        self,
        limit: int = 500,
        ids: Iterable[int] | None = None,
        budget_s: float | None = None,
    ) -> DeliveryReport:
        """Send this service's due tasks (or just ``ids``), ``limit`` at a time.

        With ``budget_s``, no new lease starts once that time has passed:
        a run must answer its scheduler in time, and the next run carries on.
        """
        report = DeliveryReport()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        if deadline is not None:
            # The budget is looked at between leases: keep them small enough
            # that a slow receiver cannot carry a run far past it.
            limit = min(limit, self.concurrency * 4)
        while deadline is None or time.monotonic() < deadline:
            tasks = self._lease(limit, ids)
            if not tasks:
                return report
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                for result in pool.map(self._deliver, tasks):
                    setattr(report, result, getattr(report, result) + 1)
            if ids is not None or len(tasks) < limit:
                return report
        return report

    def _lease(self, limit: int, ids: Iterable[int] | None) -> list[Task]:
        with self.db.transaction() as cur:
            cur.execute(
                QUERIES["lease_due"],
                {
                    "service": self.service,
                    "limit": limit,
                    "lease_s": LEASE.total_seconds(),
                    "ids": list(ids) if ids is not None else None,
                },
            )
            rows = cur.fetchall()
        return [
            Task(
                id=row["id"],
                service=row["service"],
                target_url=row["target_url"],
                payload=row["payload"],
                headers=row["headers"],
                dedup_key=row["dedup_key"],
                attempts=row["attempts"],
            )
            for row in rows
        ]

    def _deliver(self, task: Task) -> str:
        """Send one task; say whether it was sent, failed or withdrawn."""
        if self.still_wanted is not None and not self._check_wanted(task):
            return "withdrawn"
        try:
            self.sender.send(task)
        except Exception as error:  # any sender failure: the task waits
            if not isinstance(error, DeliveryFailed):
                error = DeliveryFailed(f"{type(error).__name__}: {error}")
            delay = backoff_seconds(task.attempts)
            with self.db.transaction() as cur:
                cur.execute(
                    QUERIES["record_failure"],
                    {"id": task.id, "error": str(error)[:500], "delay_s": delay},
                )
            # The sibling of a watchdog trigger is down and unreachable too:
            # nothing will run that job until someone looks.
            level = (
                logging.ERROR
                if task.payload.get("kind") == "watchdog"
                else logging.WARNING
            )
            log.log(
                level,
                "task_delivery_failed",
                extra={
                    "task_id": task.id,
                    "dedup_key": task.dedup_key,
                    "attempts": task.attempts,
                    "retry_in_s": delay,
                    "error": str(error)[:200],
                },
            )
            return "failed"
        with self.db.transaction() as cur:
            cur.execute(QUERIES["record_sent"], {"id": task.id})
            if self.on_delivered is not None:
                self.on_delivered(cur, task)
        return "sent"

    def _check_wanted(self, task: Task) -> bool:
        """Withdraw a task whose batch finished meanwhile, instead of sending it.

        A failed batch's rows may already sit in a new batch: a late resend
        of the old task would ask the executor to move that money again.
        """
        assert self.still_wanted is not None
        with self.db.transaction() as cur:
            if self.still_wanted(cur, task):
                return True
            cur.execute(QUERIES["withdraw"], {"id": task.id})
        log.warning(
            "task_withdrawn", extra={"task_id": task.id, "dedup_key": task.dedup_key}
        )
        return False


# --- senders -----------------------------------------------------------------


class HttpSender:
    """Posts the task straight to its target (``TASKS_BACKEND=http``)."""

    def __init__(self, secrets: SecretSource, timeout_s: float = 10) -> None:
        self._secrets = secrets
        self._timeout_s = timeout_s
        # One session per sending thread: sessions keep connections alive but
        # are not meant to be shared between threads.
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def send(self, task: Task) -> None:
        headers = {
            "Authorization": f"Bearer {self._secrets.get('INTERNAL_AUTH_TOKEN')}",
            "Idempotency-Key": task.dedup_key,
            **task.headers,
        }
        try:
            response = self._session().post(
                task.target_url,
                json=task.payload,
                headers=headers,
                timeout=self._timeout_s,
            )
        except requests.RequestException as error:
            raise DeliveryFailed(f"{type(error).__name__}: {error}") from error
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"HTTP {response.status_code}: {response.text[:200]}")


_TASK_NAME = re.compile(r"[^A-Za-z0-9_-]")
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,500}")


def cloud_task_id(dedup_key: str) -> str:
    """A Cloud Tasks task id from a dedup key: same key, same id, always.

    A key that is a valid id already is the id. Any other key is made valid
    and given a digest of itself: two keys must never share an id, or Cloud
    Tasks refuses the second task as a resend of the first and it is lost.
    """
    if _TASK_ID.fullmatch(dedup_key):
        return dedup_key
    digest = hashlib.sha256(dedup_key.encode()).hexdigest()[:32]
    return f"{_TASK_NAME.sub('_', dedup_key)[:400]}-{digest}"


class CloudTasksSender:
    """Creates a named Cloud Task per task (``TASKS_BACKEND=cloudtasks``).

    The task's name comes from its dedup key, so a resend is refused by
    Cloud Tasks as already existing: it was delivered to the queue before.
    Cloud Tasks then retries the HTTP call with the queue's retry settings
    and an OIDC token for ``service_account`` with the target's audience.
    """

    def __init__(
        self,
        project: str,
        location: str,
        queue: str,
        service_account: str | None,
        audience_for: Callable[[str], str],
        client: Any | None = None,
    ) -> None:
        self._queue_path = f"projects/{project}/locations/{location}/queues/{queue}"
        self._service_account = service_account
        self._audience_for = audience_for
        self._client = client

    def _tasks_client(self) -> Any:
        if self._client is None:
            from google.cloud import tasks_v2

            self._client = tasks_v2.CloudTasksClient()
        return self._client

    def send(self, task: Task) -> None:
        import json

        from google.api_core import exceptions

        http_request: dict[str, Any] = {
            "http_method": "POST",
            "url": task.target_url,
            "headers": {
                "Content-Type": "application/json",
                "Idempotency-Key": task.dedup_key,
                **task.headers,
            },
            "body": json.dumps(task.payload).encode(),
        }
        if self._service_account:
            http_request["oidc_token"] = {
                "service_account_email": self._service_account,
                "audience": self._audience_for(task.target_url),
            }
        cloud_task = {
            "name": f"{self._queue_path}/tasks/{cloud_task_id(task.dedup_key)}",
            "http_request": http_request,
        }
        try:
            self._tasks_client().create_task(
                request={"parent": self._queue_path, "task": cloud_task}, timeout=10
            )
        except exceptions.AlreadyExists:
            return  # queued by an earlier attempt whose answer we lost
        except exceptions.GoogleAPICallError as error:
            raise DeliveryFailed(f"Cloud Tasks: {error}") from error


def make_sender(config: Any) -> Sender:
    """The sender ``TASKS_BACKEND`` asks for."""
    settings = config.settings
    if settings.tasks_backend == "cloudtasks":
        return CloudTasksSender(
            project=settings.gcp_project,
            location=settings.tasks_location,
            queue=settings.tasks_queue,
            service_account=settings.tasks_service_account,
            audience_for=service_audience,
        )
    return HttpSender(config.secrets)


def service_audience(url: str) -> str:
    """The OIDC audience for a URL: the receiving service's base URL."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
