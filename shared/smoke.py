"""After a deploy: does every service answer ``/health`` at the new version?

Each service is called with a Google ID token whose audience is its own
URL (Cloud Run refuses the processors' ``/health`` to anyone else), and
passes when it answers 200 with a JSON body whose ``status`` is ``ok`` or
``degraded`` (a late job or a stuck batch predates the deploy and has its
own alert), whose ``version`` is the one just deployed, and, when the
service was named, whose ``service`` is that name. The token is never
printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import requests

TokenSource = Callable[[str], str]  # audience -> ID token

HEALTHY = ("ok", "degraded")


@dataclass(frozen=True)
class Target:
    name: str | None  # the service's name, as /health reports it
    url: str

    @property
    def label(self) -> str:
        return self.name or self.url


@dataclass(frozen=True)
class Result:
    target: Target
    problem: str | None  # None: passed
    status: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None

    @property
    def line(self) -> str:
        if self.problem is not None:
            return f"{self.target.label}: FAILED: {self.problem}"
        return f"{self.target.label}: ok ({self.status})"


def parse_target(text: str) -> Target:
    """``NAME=URL`` or a bare ``URL``; the URL is the service's base."""
    name, sep, url = text.partition("=")
    if not sep or "://" in name:
        name, url = "", text
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{text!r} is not NAME=URL or an http(s) URL")
    return Target(name.strip() or None, url)


def google_token_source() -> TokenSource:
    """ID tokens from the environment's Google credentials (a service
    account key, the metadata server, or impersonation set up by gcloud)."""
    import google.auth.transport.requests
    import google.oauth2.id_token

    request = google.auth.transport.requests.Request()  # type: ignore[no-untyped-call]

    def fetch(audience: str) -> str:
        fetch_id_token = google.oauth2.id_token.fetch_id_token
        token: str = fetch_id_token(request, audience)  # type: ignore[no-untyped-call]
        return token

    return fetch


def check(
    target: Target, expected_version: str, tokens: TokenSource, timeout_s: float
) -> Result:
    try:
        token = tokens(target.url)
    except Exception as error:  # any credentials problem: say which, not the token
        return Result(target, f"no ID token for {target.url}: {type(error).__name__}")
    try:
        response = requests.get(
            f"{target.url}/health",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )
    except requests.RequestException as error:
        return Result(target, f"unreachable: {type(error).__name__}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        status = body.get("status") if isinstance(body, dict) else None
        return Result(target, f"HTTP {response.status_code} (status {status!r})")
    if not isinstance(body, dict):
        return Result(target, "the answer is not a JSON object")
    return _judge(target, body, expected_version)


def _judge(target: Target, body: dict[str, object], expected: str) -> Result:
    status = body.get("status")
    if status not in HEALTHY:
        return Result(target, f"status is {status!r}")
    if target.name is not None and body.get("service") != target.name:
        return Result(target, f"it says it is {body.get('service')!r}")
    version = body.get("version")
    if version != expected:
        return Result(target, f"version is {version!r}, expected {expected!r}")
    return Result(target, None, status=f"status {status}, version {version}")


def run(
    targets: Iterable[Target],
    expected_version: str,
    tokens: TokenSource,
    timeout_s: float = 10,
) -> list[Result]:
    return [check(target, expected_version, tokens, timeout_s) for target in targets]


def summary(results: list[Result]) -> str:
    failed = [result.target.label for result in results if not result.passed]
    if not failed:
        return f"smoke: all {len(results)} service(s) healthy"
    return f"smoke: {len(failed)} of {len(results)} failed: {', '.join(failed)}"
