"""Secrets behind one interface: the environment, or Google Secret Manager.

Values are stripped: a secret saved with a trailing newline (``echo`` into
``gcloud secrets versions add``) must not become part of an HMAC key or a
bearer token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol


class SecretError(Exception):
    """A secret that is missing, empty or unreadable right now."""


class SecretSource(Protocol):
    def get(self, name: str) -> str:
        """The current value of secret ``name``; raises ``SecretError``."""
        ...


class EnvSecrets:
    """Secrets from the environment, copied once: fixed until restart."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._values = dict(environ)

    def get(self, name: str) -> str:
        value = self._values.get(name, "").strip()
        if not value:
            raise SecretError("not set")
        return value


class SecretManagerSecrets:
    """Secrets from Secret Manager's ``latest`` version, cached briefly.

    The cache keeps a rotation or a threshold change effective within
    ``cache_s`` seconds without a redeploy, while a busy service does not
    call Secret Manager on every request.
    """

    def __init__(
        self,
        project: str,
        cache_s: float = 60,
        client: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._project = project
        self._cache_s = cache_s
        self._client = client
        self._clock = clock
        self._cache: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def _secret_client(self) -> Any:
        if self._client is None:
            from google.cloud import secretmanager

            self._client = secretmanager.SecretManagerServiceClient()
        return self._client

    def get(self, name: str) -> str:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        path = f"projects/{self._project}/secrets/{name}/versions/latest"
        try:
            response = self._secret_client().access_secret_version(
                request={"name": path}, timeout=5
            )
            value = str(response.payload.data.decode("utf-8")).strip()
        except Exception as error:  # any client or transport failure
            raise SecretError(
                f"unreadable from Secret Manager ({type(error).__name__})"
            ) from error
        if not value:
            raise SecretError("empty in Secret Manager")
        with self._lock:
            self._cache[name] = (now, value)
        return value


def make_secret_source(
    backend: str, environ: Mapping[str, str], project: str | None, cache_s: float
) -> SecretSource:
    if backend == "gcp":
        assert project is not None
        return SecretManagerSecrets(project, cache_s)
    return EnvSecrets(environ)
