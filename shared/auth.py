"""Who may call the internal endpoints (scheduler, tasks, callbacks, router).

``require_internal_auth`` asks the app's authenticator; the token mode
compares a bearer token with ``INTERNAL_AUTH_TOKEN`` in constant time; the
oidc mode (``shared.oidc``) verifies a Google ID token behind the same
interface.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from flask import Request, current_app, request

from shared.errors import Unauthorized
from shared.secrets import SecretSource


@dataclass(frozen=True)
class Caller:
    """Who called: an email in OIDC mode, ``internal`` in token mode."""

    identity: str


class Authenticator(Protocol):
    def authenticate(self, request: Request) -> Caller:
        """Return the caller or raise ``Unauthorized``."""
        ...


def bearer_token(request: Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required")
    return token.strip()


class TokenAuthenticator:
    """Local and test use: one shared token, never accepted in production."""

    def __init__(self, secrets: SecretSource) -> None:
        self._secrets = secrets

    def authenticate(self, request: Request) -> Caller:
        presented = bearer_token(request).encode()
        expected = self._secrets.get("INTERNAL_AUTH_TOKEN").encode()
        if not hmac.compare_digest(presented, expected):
            raise Unauthorized("the bearer token is not valid")
        return Caller("internal")


F = TypeVar("F", bound=Callable[..., Any])


def authenticate_request() -> Caller:
    authenticator = cast(Authenticator, current_app.extensions["authenticator"])
    return authenticator.authenticate(request)


def require_internal_auth(view: F) -> F:
    """Refuse the request with 401 unless an internal caller sent it."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        authenticate_request()
        return view(*args, **kwargs)

    return cast(F, wrapper)
