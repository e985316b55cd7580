"""``AUTH_MODE=oidc``: internal callers prove who they are with a Google ID
token (DESIGN.md section 6).

Cloud Scheduler, Cloud Tasks and a sibling service send ``Authorization:
Bearer <ID token>``, minted by Google for a service account with this
service's base URL (``SERVICE_URL``) as audience. The token is accepted when
Google signed it, it is current (10 seconds of clock skew either way), its
issuer is Google, its audience is this service, and its email is verified
and listed in ``ALLOWED_INVOKERS``.

Google's signing keys come from the v1 certificates endpoint: PEM x509
certificates keyed by key id, which ``google.auth.crypt.RSAVerifier`` reads
as they are (the JWKS v3 endpoint serves the same keys as modulus and
exponent, which we would have to turn into keys ourselves). They are cached
for the response's ``Cache-Control: max-age`` and shared by every request
thread.

Every refusal is a 401 whose message says what was wrong, logged at WARNING
with the caller's email once the signature proves it; the token itself is
never echoed or logged. Certificates that cannot be fetched answer 503: the
caller's retry may find Google reachable again.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import requests
from flask import Request
from google.auth import crypt, jwt

from shared.auth import Caller, bearer_token
from shared.errors import ApiError, Unauthorized

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})
CLOCK_SKEW_S = 10

# Google answers with a max-age of some hours. Below the floor a missing or
# zero max-age would refetch on every request; above the ceiling a key Google
# withdrew would stay trusted too long.
MIN_CACHE_S = 300
MAX_CACHE_S = 6 * 3600
# A token naming a key we do not hold refetches the certificates (Google may
# have rotated), but at most this often: a forged key id must not let anyone
# make us hammer Google.
UNKNOWN_KEY_REFETCH_S = 60
# After a failed fetch, requests answer 503 at once for this long instead of
# each waiting on Google's timeout in turn.
FAILED_FETCH_PAUSE_S = 5
FETCH_TIMEOUT_S = 5.0

# Google's ID tokens are about a kilobyte; anything far longer is not one,
# and is refused before any work is spent on it.
MAX_TOKEN_CHARS = 8192

log = logging.getLogger("payouts.oidc")


class FetchFailed(Exception):
    """Google's certificates could not be fetched or read."""


class CertificatesUnavailable(ApiError):
    status = 503
    code = "auth_certificates_unavailable"


@dataclass(frozen=True)
class CertificateSet:
    """Google's signing certificates, as one fetch returned them."""

    pems: Mapping[str, str]  # key id -> PEM x509 certificate
    max_age_s: int | None  # the response's Cache-Control max-age, if any


Fetch = Callable[[], CertificateSet]

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.I)


def cache_max_age(cache_control: str) -> int | None:
    """The max-age of a ``Cache-Control`` header, or None when it has none."""
    found = _MAX_AGE.search(cache_control)
    return int(found.group(1)) if found else None


def fetch_google_certificates(
    url: str = GOOGLE_CERTS_URL, timeout_s: float = FETCH_TIMEOUT_S
) -> CertificateSet:
    """GET the certificates; raise ``FetchFailed`` for anything but a map."""
    with requests.Session() as session:
        request = google.auth.transport.requests.Request(session)  # type: ignore[no-untyped-call]
        try:
            response = request(url, method="GET", timeout=timeout_s)
        except google.auth.exceptions.TransportError as error:
            raise FetchFailed(f"{url}: {error}") from None
    if response.status != 200:
        raise FetchFailed(f"{url} answered HTTP {response.status}")
    try:
        body = json.loads(response.data)
    except ValueError:
        raise FetchFailed(f"{url} answered something other than JSON") from None
    if (
        not isinstance(body, dict)
        or not body
        or not all(isinstance(pem, str) for pem in body.values())
    ):
        raise FetchFailed(f"{url} answered no map of key ids to certificates")
    max_age = cache_max_age(response.headers.get("Cache-Control", ""))
    return CertificateSet(pems=body, max_age_s=max_age)


class GoogleCertificates:
    """Google's signing keys by key id: cached, refreshed, thread-safe.

    One lock guards the cache and the fetch alike, so a refresh happens once
    while the other request threads wait for its result rather than each
    asking Google too. Expired keys are not used while a refresh fails: the
    request answers 503 and the caller's retry finds Google again.
    """

    def __init__(
        self,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch or fetch_google_certificates
        self._clock = clock
        self._lock = threading.Lock()
        self._verifiers: dict[str, crypt.Verifier] = {}
        self._fresh_until = float("-inf")
        self._last_attempt = float("-inf")
        self._last_failure: str | None = None

    def verifier(self, key_id: str) -> crypt.Verifier | None:
        """The verifier for ``key_id``, or None when Google publishes no such
        key; raises ``FetchFailed`` when the certificates are out of reach."""
        with self._lock:
            now = self._clock()
            stale = now >= self._fresh_until
            # Google may have rotated to a key we have not seen yet.
            unheard_of = (
                key_id not in self._verifiers
                and now - self._last_attempt >= UNKNOWN_KEY_REFETCH_S
            )
            if stale or unheard_of:
                self._refresh(now)
            return self._verifiers.get(key_id)

    def _refresh(self, now: float) -> None:
        if (
            self._last_failure is not None
            and now - self._last_attempt < FAILED_FETCH_PAUSE_S
        ):
            raise FetchFailed(self._last_failure)
        self._last_attempt = now
        try:
            fetched = self._fetch()
            verifiers = _verifiers(fetched.pems)
        except FetchFailed as error:
            self._last_failure = str(error)
            raise
        self._last_failure = None
        self._verifiers = verifiers
        max_age = fetched.max_age_s if fetched.max_age_s is not None else 0
        self._fresh_until = now + min(max(max_age, MIN_CACHE_S), MAX_CACHE_S)
        log.info(
            "oidc_certificates_fetched",
            extra={"key_ids": sorted(verifiers), "max_age_s": fetched.max_age_s},
        )


def _verifiers(pems: Mapping[str, str]) -> dict[str, crypt.Verifier]:
    verifiers: dict[str, crypt.Verifier] = {}
    for key_id, pem in pems.items():
        try:
            verifiers[key_id] = crypt.RSAVerifier.from_string(pem)  # type: ignore[no-untyped-call]
        except ValueError:
            # One odd entry must not shut every caller out; the others serve.
            log.warning("oidc_certificate_unreadable", extra={"key_id": key_id})
    if not verifiers:
        raise FetchFailed("no certificate in the answer could be read")
    return verifiers


def _seconds(value: Any) -> float | None:
    """A time claim in epoch seconds, or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) else None


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class OidcAuthenticator:
    """Verifies a Google ID token; the caller is the token's email."""

    def __init__(
        self,
        audience: str,
        invokers: Iterable[str],
        certificates: GoogleCertificates | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._audience = audience.rstrip("/")
        self._invokers = frozenset(email.lower() for email in invokers)
        self._certificates = certificates or GoogleCertificates()
        self._clock = clock

    def authenticate(self, request: Request) -> Caller:
        try:
            token = bearer_token(request)
        except Unauthorized as refusal:
            raise _refused(refusal.message) from None
        return Caller(self.verify(token))

    def verify(self, token: str) -> str:
        """The caller's email when ``token`` passes every check."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise _refused("the bearer token is not a JWT")
        try:
            header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
            claims = jwt.decode(token, verify=False)  # type: ignore[no-untyped-call]
            encoded_header, encoded_claims, encoded_signature = token.split(".")
            signed = f"{encoded_header}.{encoded_claims}".encode("ascii")
            signature = _b64url(encoded_signature)
        except ValueError:
            # google-auth's messages quote the token, so none is passed on.
            raise _refused("the bearer token is not a JWT") from None

        key_id = self._key_id(header)
        verifier = self._verifier(key_id)
        if not verifier.verify(signed, signature):  # type: ignore[no-untyped-call]
            raise _refused("the token's signature does not match Google's key")

        # From here the claims are Google's, so the email names the caller.
        return self._check_claims(claims)

    def _key_id(self, header: Mapping[str, Any]) -> str:
        if header.get("alg") != "RS256":
            raise _refused("the token is not signed with RS256")
        key_id = header.get("kid")
        if not isinstance(key_id, str) or not key_id:
            raise _refused("the token names no signing key")
        return key_id

    def _verifier(self, key_id: str) -> crypt.Verifier:
        try:
            verifier = self._certificates.verifier(key_id)
        except FetchFailed as error:
            log.warning("oidc_certificates_unavailable", extra={"error": str(error)})
            raise CertificatesUnavailable(
                "Google's signing certificates cannot be fetched; retry later"
            ) from None
        if verifier is None:
            raise _refused("the token is signed by a key Google does not publish")
        return verifier

    def _check_claims(self, claims: Mapping[str, Any]) -> str:
        email = claims.get("email")
        caller = email if isinstance(email, str) else None
        now = self._clock()
        expiry, issued = _seconds(claims.get("exp")), _seconds(claims.get("iat"))

        if expiry is None or issued is None:
            raise _refused("the token has no expiry or issue time", caller)
        if now > expiry + CLOCK_SKEW_S:
            raise _refused("the token has expired", caller)
        if issued > now + CLOCK_SKEW_S:
            raise _refused("the token is issued in the future", caller)
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise _refused("the token was not issued by Google", caller)
        audience = claims.get("aud")
        if not isinstance(audience, str) or audience.rstrip("/") != self._audience:
            raise _refused(
                "the token's audience is not this service's base URL",
                caller,
                audience=audience if isinstance(audience, str) else None,
            )
        if claims.get("email_verified") is not True:
            raise _refused("the token's email is not verified", caller)
        if caller is None:
            raise _refused("the token carries no email")
        if caller.lower() not in self._invokers:
            raise _refused("the caller is not in ALLOWED_INVOKERS", caller)
        return caller


def _refused(reason: str, caller: str | None = None, **fields: Any) -> Unauthorized:
    """The 401 for ``reason``, logged with whatever identifies the caller."""
    log.warning(
        "internal_call_refused",
        extra={"auth_mode": "oidc", "reason": reason, "caller": caller, **fields},
    )
    return Unauthorized(reason)
