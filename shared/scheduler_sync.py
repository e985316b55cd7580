"""Cloud Scheduler jobs as declared in ``scripts/scheduler_jobs.toml``.

``check`` lists every way the cloud differs from the declaration: a job
missing, paused, disabled by the system, pointing at the wrong URL, on the
wrong schedule or time zone, with the wrong identity, retries or deadline,
or whose last attempt failed. ``ensure`` creates, updates and resumes jobs
until only what it cannot fix remains (a failed last attempt clears with
the next good one). Both talk to a ``CloudSchedulerClient`` (or any object
with the same methods: the tests use an in-process fake).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

DECLARATION = Path(__file__).resolve().parent.parent / "scripts" / "scheduler_jobs.toml"

_PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")


class DeclarationError(ValueError):
    """The declaration file is incomplete for this environment."""


@dataclass(frozen=True)
class DeclaredJob:
    name: str  # the Cloud Scheduler job id
    job: str  # the suite's job (check-threshold, process)
    description: str
    schedule: str
    time_zone: str
    uri: str
    audience: str
    service_account: str
    attempt_deadline_s: int
    retry_count: int
    min_backoff_s: int
    max_backoff_s: int
    max_doublings: int
    max_retry_duration_s: int


@dataclass(frozen=True)
class Declaration:
    parent: str  # projects/P/locations/L
    jobs: list[DeclaredJob]

    def path(self, job: DeclaredJob) -> str:
        return f"{self.parent}/jobs/{job.name}"


@dataclass(frozen=True)
class Drift:
    job: str
    kind: str
    detail: str

    @property
    def line(self) -> str:
        return f"{self.job}: {self.kind}: {self.detail}"


def _fill(value: Any, environ: Mapping[str, str], missing: set[str]) -> Any:
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        found = environ.get(match.group(1), "").strip()
        if not found:
            missing.add(match.group(1))
        return found.rstrip("/")

    return _PLACEHOLDER.sub(replace, value)


def load(
    path: Path = DECLARATION, environ: Mapping[str, str] | None = None
) -> Declaration:
    """The declaration with its placeholders filled; names every one missing."""
    env = os.environ if environ is None else environ
    raw = tomllib.loads(path.read_text())
    missing: set[str] = set()
    project = _fill(raw["project"], env, missing)
    location = _fill(raw["location"], env, missing)
    jobs = []
    for entry in raw["jobs"]:
        merged = {**raw.get("defaults", {}), **entry}
        filled = {key: _fill(value, env, missing) for key, value in merged.items()}
        jobs.append(DeclaredJob(**filled))
    if missing:
        raise DeclarationError(
            "set these for the scheduler declaration: " + ", ".join(sorted(missing))
        )
    return Declaration(parent=f"projects/{project}/locations/{location}", jobs=jobs)


def desired_job(declaration: Declaration, job: DeclaredJob) -> dict[str, Any]:
    """The Cloud Scheduler Job resource for a declared job (as a dict)."""
    return {
        "name": declaration.path(job),
        "description": job.description,
        "schedule": job.schedule,
        "time_zone": job.time_zone,
        "http_target": {
            "uri": job.uri,
            "http_method": "POST",
            "oidc_token": {
                "service_account_email": job.service_account,
                "audience": job.audience,
            },
        },
        "retry_config": {
            "retry_count": job.retry_count,
            "min_backoff_duration": timedelta(seconds=job.min_backoff_s),
            "max_backoff_duration": timedelta(seconds=job.max_backoff_s),
            "max_doublings": job.max_doublings,
            "max_retry_duration": timedelta(seconds=job.max_retry_duration_s),
        },
        "attempt_deadline": timedelta(seconds=job.attempt_deadline_s),
    }


def _seconds(duration: Any) -> int:
    if isinstance(duration, timedelta):
        return int(duration.total_seconds())
    return int(getattr(duration, "seconds", 0) or 0)


def _state_name(job: Any) -> str:
    state = job.state
    return str(getattr(state, "name", state))


def differences(declared: DeclaredJob, actual: Any) -> list[Drift]:
    """How an existing job differs from its declaration."""
    drifts = []
    name = declared.name

    def drift(kind: str, want: Any, have: Any) -> None:
        drifts.append(Drift(name, kind, f"expected {want!r}, found {have!r}"))

    state = _state_name(actual)
    if state == "PAUSED":
        drifts.append(Drift(name, "paused", "the job is paused: it will not fire"))
    elif state in ("DISABLED", "UPDATE_FAILED"):
        drifts.append(Drift(name, "disabled", f"the system set the job {state}"))
    target = actual.http_target
    if target.uri.rstrip("/") != declared.uri:
        drift("wrong_url", declared.uri, target.uri)
    if actual.schedule != declared.schedule:
        drift("wrong_schedule", declared.schedule, actual.schedule)
    if actual.time_zone != declared.time_zone:
        drift("wrong_time_zone", declared.time_zone, actual.time_zone)
    oidc = target.oidc_token
    if oidc.service_account_email != declared.service_account:
        drift(
            "wrong_service_account",
            declared.service_account,
            oidc.service_account_email,
        )
    if oidc.audience.rstrip("/") != declared.audience:
        drift("wrong_audience", declared.audience, oidc.audience)
    retry = actual.retry_config
    have_retry = (
        retry.retry_count,
        _seconds(retry.min_backoff_duration),
        _seconds(retry.max_backoff_duration),
        retry.max_doublings,
        _seconds(retry.max_retry_duration),
    )
    want_retry = (
        declared.retry_count,
        declared.min_backoff_s,
        declared.max_backoff_s,
        declared.max_doublings,
        declared.max_retry_duration_s,
    )
    if have_retry != want_retry:
        drift("wrong_retry_config", want_retry, have_retry)
    if _seconds(actual.attempt_deadline) != declared.attempt_deadline_s:
        drift(
            "wrong_attempt_deadline",
            declared.attempt_deadline_s,
            _seconds(actual.attempt_deadline),
        )
    status: Any = actual.status
    if status is not None and status.code != 0:
        drifts.append(
            Drift(name, "last_attempt_failed", f"code {status.code}: {status.message}")
        )
    return drifts


def check(client: Any, declaration: Declaration) -> list[Drift]:
    """Every drift between the cloud and the declaration."""
    from google.api_core import exceptions

    drifts = []
    for job in declaration.jobs:
        try:
            actual = client.get_job(name=declaration.path(job))
        except exceptions.NotFound:
            drifts.append(Drift(job.name, "missing", "no such job in Cloud Scheduler"))
            continue
        drifts += differences(job, actual)
    return drifts


# Drift that ensure cannot fix by itself: the next good attempt clears it.
UNFIXABLE = frozenset({"last_attempt_failed"})


def ensure(client: Any, declaration: Declaration) -> list[str]:
    """Create, update and resume until the cloud matches; return the actions."""
    from google.api_core import exceptions

    actions = []
    for job in declaration.jobs:
        desired = desired_job(declaration, job)
        try:
            actual = client.get_job(name=declaration.path(job))
        except exceptions.NotFound:
            client.create_job(parent=declaration.parent, job=desired)
            actions.append(f"{job.name}: created")
            continue
        kinds = {drift.kind for drift in differences(job, actual)} - UNFIXABLE
        if kinds - {"paused", "disabled"}:
            client.update_job(job=desired)
            actions.append(f"{job.name}: updated ({', '.join(sorted(kinds))})")
        if kinds & {"paused", "disabled"}:
            client.resume_job(name=declaration.path(job))
            actions.append(f"{job.name}: resumed")
    return actions


def make_client() -> Any:
    from google.cloud import scheduler_v1

    return scheduler_v1.CloudSchedulerClient()
