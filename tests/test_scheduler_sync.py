"""The scheduler declaration, the drift check and ensure, on a fake client."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from google.api_core import exceptions
from google.cloud import scheduler_v1
from google.rpc import status_pb2

from shared import scheduler_sync

ENV = {
    "GCP_PROJECT": "payouts-prod",
    "SCHEDULER_LOCATION": "europe-west1",
    "SCHEDULER_SERVICE_ACCOUNT": "scheduler@payouts-prod.iam.gserviceaccount.com",
    "MICRO_BATCH_PROCESSOR_URL": "https://gcmicrobatchprocessor-abc-ew.a.run.app",
    "BATCH_PROCESSOR_URL": "https://gcbatchprocessor-abc-ew.a.run.app/",
}
PARENT = "projects/payouts-prod/locations/europe-west1"


class FakeScheduler:
    """Cloud Scheduler's client, in memory: real Job messages, real errors."""

    def __init__(self) -> None:
        self.jobs: dict[str, scheduler_v1.Job] = {}
        self.calls: list[str] = []

    def get_job(self, name: str) -> scheduler_v1.Job:
        self.calls.append(f"get {name}")
        if name not in self.jobs:
            raise exceptions.NotFound(name)
        return copy.deepcopy(self.jobs[name])

    def create_job(self, parent: str, job: dict[str, Any]) -> scheduler_v1.Job:
        self.calls.append(f"create {job['name']}")
        created = scheduler_v1.Job(job)
        created.state = scheduler_v1.Job.State.ENABLED
        self.jobs[created.name] = created
        return created

    def update_job(self, job: dict[str, Any]) -> scheduler_v1.Job:
        self.calls.append(f"update {job['name']}")
        updated = scheduler_v1.Job(job)
        updated.state = self.jobs[updated.name].state
        self.jobs[updated.name] = updated
        return updated

    def resume_job(self, name: str) -> scheduler_v1.Job:
        self.calls.append(f"resume {name}")
        self.jobs[name].state = scheduler_v1.Job.State.ENABLED
        return self.jobs[name]


@pytest.fixture
def declaration() -> scheduler_sync.Declaration:
    return scheduler_sync.load(environ=ENV)


@pytest.fixture
def matching(declaration: scheduler_sync.Declaration) -> FakeScheduler:
    client = FakeScheduler()
    scheduler_sync.ensure(client, declaration)
    client.calls.clear()
    return client


def job_path(name: str) -> str:
    return f"{PARENT}/jobs/{name}"


def kinds(drifts: list[scheduler_sync.Drift]) -> set[tuple[str, str]]:
    return {(drift.job, drift.kind) for drift in drifts}


def test_the_declaration_names_both_jobs_every_five_minutes_in_utc(
    declaration: scheduler_sync.Declaration,
) -> None:
    assert declaration.parent == PARENT
    by_job = {job.job: job for job in declaration.jobs}
    assert set(by_job) == {"check-threshold", "process"}
    check = by_job["check-threshold"]
    assert check.schedule == "*/5 * * * *"
    assert check.time_zone == "Etc/UTC"
    assert check.uri == ENV["MICRO_BATCH_PROCESSOR_URL"] + "/check-threshold"
    # The audience is the service's base URL, not the full target URL.
    assert check.audience == ENV["MICRO_BATCH_PROCESSOR_URL"]
    assert by_job["process"].uri == "https://gcbatchprocessor-abc-ew.a.run.app/process"
    assert check.service_account == ENV["SCHEDULER_SERVICE_ACCOUNT"]
    assert check.retry_count > 0
    # Above the run's own bound (gunicorn's 120 s in Cloud Run).
    assert check.attempt_deadline_s > 120


def test_a_missing_variable_is_named() -> None:
    environ = {key: value for key, value in ENV.items() if key != "SCHEDULER_LOCATION"}

    with pytest.raises(scheduler_sync.DeclarationError, match="SCHEDULER_LOCATION"):
        scheduler_sync.load(environ=environ)


def test_check_reports_missing_jobs_on_an_empty_project(
    declaration: scheduler_sync.Declaration,
) -> None:
    drifts = scheduler_sync.check(FakeScheduler(), declaration)

    assert kinds(drifts) == {
        ("payouts-check-threshold", "missing"),
        ("payouts-process", "missing"),
    }


def test_ensure_creates_what_is_missing_and_then_nothing_drifts(
    declaration: scheduler_sync.Declaration,
) -> None:
    client = FakeScheduler()

    actions = scheduler_sync.ensure(client, declaration)

    assert sorted(actions) == [
        "payouts-check-threshold: created",
        "payouts-process: created",
    ]
    assert scheduler_sync.check(client, declaration) == []
    created = client.jobs[job_path("payouts-process")]
    assert (
        created.http_target.oidc_token.audience
        == "https://gcbatchprocessor-abc-ew.a.run.app"
    )
    assert created.attempt_deadline == timedelta(seconds=180)


def test_a_matching_cloud_has_no_drift_and_ensure_changes_nothing(
    matching: FakeScheduler, declaration: scheduler_sync.Declaration
) -> None:
    assert scheduler_sync.check(matching, declaration) == []
    assert scheduler_sync.ensure(matching, declaration) == []
    assert all(call.startswith("get ") for call in matching.calls)


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        (lambda job: setattr(job, "state", scheduler_v1.Job.State.PAUSED), "paused"),
        (
            lambda job: setattr(job, "state", scheduler_v1.Job.State.DISABLED),
            "disabled",
        ),
        (
            lambda job: setattr(job.http_target, "uri", "https://old.example/check"),
            "wrong_url",
        ),
        (lambda job: setattr(job, "schedule", "0 * * * *"), "wrong_schedule"),
        (lambda job: setattr(job, "time_zone", "Europe/Berlin"), "wrong_time_zone"),
        (
            lambda job: setattr(
                job.http_target.oidc_token, "audience", "https://x.example/check"
            ),
            "wrong_audience",
        ),
        (
            lambda job: setattr(
                job.http_target.oidc_token, "service_account_email", "a@b.c"
            ),
            "wrong_service_account",
        ),
        (lambda job: setattr(job.retry_config, "retry_count", 0), "wrong_retry_config"),
        (
            lambda job: setattr(job, "attempt_deadline", timedelta(seconds=15)),
            "wrong_attempt_deadline",
        ),
    ],
)
def test_each_drift_is_reported_and_ensure_repairs_it(
    matching: FakeScheduler,
    declaration: scheduler_sync.Declaration,
    change: Any,
    kind: str,
) -> None:
    name = job_path("payouts-check-threshold")
    change(matching.jobs[name])

    assert kinds(scheduler_sync.check(matching, declaration)) == {
        ("payouts-check-threshold", kind)
    }

    actions = scheduler_sync.ensure(matching, declaration)

    assert actions
    assert scheduler_sync.check(matching, declaration) == []


def test_a_failed_last_attempt_is_reported_and_left_for_the_next_attempt(
    matching: FakeScheduler, declaration: scheduler_sync.Declaration
) -> None:
    name = job_path("payouts-process")
    matching.jobs[name].status = status_pb2.Status(code=14, message="UNAVAILABLE")

    drifts = scheduler_sync.check(matching, declaration)

    assert kinds(drifts) == {("payouts-process", "last_attempt_failed")}
    assert "UNAVAILABLE" in drifts[0].line
    assert scheduler_sync.ensure(matching, declaration) == []


def test_payoutctl_scheduler_check_and_ensure_report_and_repair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from shared.cli import main

    client = FakeScheduler()
    monkeypatch.setattr(scheduler_sync, "make_client", lambda: client)
    runner = CliRunner()

    before = runner.invoke(main, ["scheduler", "check"], env=ENV)
    ensured = runner.invoke(main, ["scheduler", "ensure"], env=ENV)
    after = runner.invoke(main, ["scheduler", "check"], env=ENV)

    assert before.exit_code == 1
    assert "payouts-check-threshold: missing" in before.output
    assert ensured.exit_code == 0, ensured.output
    assert "payouts-process: created" in ensured.output
    assert (after.exit_code, after.output.strip()) == (
        0,
        "scheduler: 0 drift(s) over 2 jobs",
    )


def test_payoutctl_scheduler_names_what_the_declaration_lacks() -> None:
    from click.testing import CliRunner

    from shared.cli import main

    result = CliRunner().invoke(main, ["scheduler", "check"], env={"GCP_PROJECT": "p"})

    assert result.exit_code == 2
    assert "SCHEDULER_LOCATION" in result.output
