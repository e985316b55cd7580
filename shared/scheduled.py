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
from typing import Any

from flask import Response, jsonify, request

from shared.config import ConfigError
from shared.db import DatabaseUnavailable
from shared.errors import ApiError, error_response
from shared.jobs import BadRunRequest, JobRunner, RunIdentity, identify_run, utcnow
from shared.outbox import Outbox
from shared.secrets import SecretError
from shared.web import suite

_RETRYABLE = (DatabaseUnavailable, SecretError, ConfigError)


def interval_of(job: str) -> int:
    settings = suite().config.settings
    if job == "check-threshold":
        return settings.check_threshold_interval_s
    return settings.process_interval_s


def answer_run(
    job: str, work: Callable[[RunIdentity], dict[str, Any]], tasks: Outbox
) -> tuple[Response, int]:
    try:
        identity = identify_run(
            job,
            interval_of(job),
            utcnow(),
            schedule_time=request.headers.get("X-CloudScheduler-ScheduleTime"),
            trigger=request.headers.get("X-Trigger"),
        )
    except BadRunRequest as error:
        raise ApiError(str(error), code="invalid") from None

    def work_then_resend(identity: RunIdentity) -> dict[str, Any]:
        figures = work(identity)
        budget = suite().config.settings.outbox_send_budget_s
        figures.update(tasks.deliver_due(budget_s=budget).as_figures())
        return figures

    settings = suite().config.settings
    runner = JobRunner(suite().db, lock_timeout_s=settings.job_lock_timeout_s)
    result = runner.run(identity, work_then_resend)
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
