"""Running a scheduled job by hand: ``payoutctl run check-threshold|process``.

The job runs on its own service, through the mechanism every scheduled run
goes through (lock, slot, ``job_runs``, outbox re-sends), sent with
``X-Trigger: manual``: an operator's run is its own slot, so it runs even
when the scheduler's current slot already succeeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import requests

from shared.config import ConfigError, Settings
from shared.secrets import SecretError, SecretSource

# Each job: the setting holding its service's base URL, the service, and
# the endpoint.
ENDPOINTS = {
    "check-threshold": (
        "micro_batch_processor_url",
        "micro-batch processor",
        "/check-threshold",
    ),
    "process": ("batch_processor_url", "batch processor", "/process"),
}

CONNECT_TIMEOUT_S = 5


class Unreachable(Exception):
    """The service did not answer."""


@dataclass(frozen=True)
class Answer:
    url: str
    status: int
    body: dict[str, Any] | None  # None when the answer is not a JSON object
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error(self) -> str:
        """The service's error, in words, for a refused or failed run."""
        problem = (self.body or {}).get("error")
        if isinstance(problem, dict):
            return f"{problem.get('code')}: {problem.get('message')}"
        return self.text.strip()[:500] or "no body"


def endpoint(settings: Settings, job: str) -> tuple[str, str]:
    """The service's base URL (the OIDC audience) and the job's URL."""
    setting, service, path = ENDPOINTS[job]
    base: str | None = getattr(settings, setting)
    if base is None:
        raise ConfigError(
            [f"{setting.upper()}: required to run {job}: the {service}'s base URL"]
        )
    return base, base + path


def authorization(settings: Settings, secrets: SecretSource, audience: str) -> str:
    """The Authorization header the services accept (AUTH_MODE)."""
    if settings.auth_mode == "token":
        try:
            return f"Bearer {secrets.get('INTERNAL_AUTH_TOKEN')}"
        except SecretError as error:
            raise ConfigError([f"INTERNAL_AUTH_TOKEN: {error}"]) from None
    return f"Bearer {_id_token(audience)}"


def _id_token(audience: str) -> str:
    # Not exercised by the tests (no Google credentials here). It asks the
    # metadata server on Google Cloud, or the service account key named by
    # GOOGLE_APPLICATION_CREDENTIALS, for an ID token with the service's
    # base URL as audience, as Cloud Scheduler's jobs use.
    import google.auth.exceptions
    import google.auth.transport.requests
    from google.oauth2 import id_token

    try:
        token = id_token.fetch_id_token(  # type: ignore[no-untyped-call]
            google.auth.transport.requests.Request(), audience
        )
    except google.auth.exceptions.GoogleAuthError as error:
        raise ConfigError(
            [f"AUTH_MODE: oidc, but no ID token for {audience}: {error}"]
        ) from None
    return str(token)


def run_job(
    settings: Settings, secrets: SecretSource, job: str, timeout_s: float
) -> Answer:
    """POST the job's endpoint as a manual run; return the service's answer."""
    base, url = endpoint(settings, job)
    headers = {
        "Authorization": authorization(settings, secrets, base),
        "X-Trigger": "manual",
    }
    try:
        response = requests.post(
            url, headers=headers, timeout=(CONNECT_TIMEOUT_S, timeout_s)
        )
    except requests.exceptions.ReadTimeout:
        raise Unreachable(
            f"{url} gave no answer within {timeout_s:g} s; the run may still "
            "be going: see `payoutctl status`"
        ) from None
    except requests.RequestException as error:
        raise Unreachable(f"{url} cannot be reached: {type(error).__name__}") from None
    return Answer(url, response.status_code, _json_object(response.text), response.text)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        body = json.loads(text, parse_float=Decimal)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
