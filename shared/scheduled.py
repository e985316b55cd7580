"""Flask glue for scheduled endpoints: one call from the route runs the job.

``answer_run`` identifies the run from the request, runs the work through
``shared.jobs.JobRunner`` (lock, slot, record, log), re-sends the service's
undelivered tasks as part of the run, and answers: 200 for succeeded,
busy and repeated runs (the scheduler must not retry those), 503 when the
run failed for a reason a retry may fix (database, secret, configuration
read at run time), 500 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

from flask import Response, jsonify, request

from shared import watchdog
from shared.config import ConfigError
from shared.db import DatabaseUnavailable
from shared.errors import ApiError, error_response
from shared.health import interval_of
from shared.jobs import BadRunRequest, JobRunner, RunIdentity, identify_run, utcnow
from shared.outbox import Outbox
from shared.secrets import SecretError
from shared.web import read_body, suite

_RETRYABLE = (DatabaseUnavailable, SecretError, ConfigError)


def answer_run(
    job: str, work: Callable[[RunIdentity], dict[str, Any]], tasks: Outbox
) -> tuple[Response, int]:
    # A run needs no body, but one past the limit is refused all the same.
    read_body()
    try:
        identity = identify_run(
            job,
            interval_of(suite().config.settings, job),
            utcnow(),
            schedule_time=request.headers.get("X-CloudScheduler-ScheduleTime"),
            trigger=request.headers.get("X-Trigger"),
        )
    except BadRunRequest as error:
        raise ApiError(str(error), code="invalid") from None

    settings = suite().config.settings
    heartbeat = watchdog.heartbeat_url(settings, job)

    def work_then_resend(identity: RunIdentity) -> dict[str, Any]:
        watchdog.ping(heartbeat, "/start")
        figures = work(identity)
        budget = settings.outbox_send_budget_s
        figures.update(tasks.deliver_due(budget_s=budget).as_figures())
        return figures

    runner = JobRunner(suite().db, lock_timeout_s=settings.job_lock_timeout_s)
    result = runner.run(identity, work_then_resend)
    if result.outcome == "succeeded":
        watchdog.ping(heartbeat)
    elif result.outcome == "failed":
        watchdog.ping(heartbeat, "/fail")
    if identity.trigger != "watchdog":
        # A run the watchdog started does not watch in turn. A database that
        # is down is already this run's failure, reported below.
        with suppress(DatabaseUnavailable):
            watch = watchdog.watch_sibling(suite().db, settings, job, tasks)
            result.figures.update(watch)
    if result.outcome != "failed":
        return jsonify(result.as_json()), 200
    retryable = isinstance(result.exception, _RETRYABLE)
    response = error_response(
        "run_failed",
        result.error or "the run failed",
        503 if retryable else 500,
        **result.as_json(),
    )
    return response, response.status_code
