"""``AUTH_MODE=oidc``: an internal endpoint runs only for a Google ID token
that Google signed, that is current, issued by Google, meant for this
service's base URL, and carries a verified email from ``ALLOWED_INVOKERS``
(DESIGN.md section 6).

Nothing here reaches Google. A key generated per test session signs the
tokens, a small local HTTP server publishes its self-signed certificate in
the v1 certificates format, and the services' default certificate fetcher
is pointed at that server; any other attempt to fetch fails the test. The
services are the real apps, served over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import requests
from conftest import (
    FIXTURE_CLIENTS,
    MICROBATCH_ENV,
    RecordingSender,
    base_environ,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from flask import Flask, Response, jsonify
from google.auth import crypt, jwt
from payout_support import BATCH_ENV, make_batch_app

from shared import oidc
from shared.db import Database
from shared.logging import formatter
from shared.oidc import (
    CertificateSet,
    GoogleCertificates,
    OidcAuthenticator,
    cache_max_age,
    fetch_google_certificates,
)

INVOKER = "scheduler@payouts-prod.iam.gserviceaccount.com"
STRANGER = "someone@elsewhere.iam.gserviceaccount.com"
AUDIENCE = MICROBATCH_ENV["SERVICE_URL"]
ACCUMULATOR_URL = "http://accumulator.test"
CERTS_PATH = "/oauth2/v1/certs"
DROP = object()  # a claim left out of the token


@dataclass(frozen=True)
class SigningKey:
    """An RSA key standing in for one of Google's, with its certificate."""

    key_id: str
    private_pem: str
    certificate_pem: str

    def token(self, key_id: str | None = None, **changes: Any) -> str:
        """An ID token for ``INVOKER`` and ``AUDIENCE``, with ``changes``."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "azp": "107315243965384718291",
            "sub": "107315243965384718291",
            "email": INVOKER,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        claims.update(changes)
        claims = {name: value for name, value in claims.items() if value is not DROP}
        signer = crypt.RSASigner.from_string(self.private_pem, key_id=self.key_id)
        return jwt.encode(signer, claims, key_id=key_id).decode()


def new_signing_key(key_id: str) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key_id)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SigningKey(
        key_id,
        private_pem.decode(),
        certificate.public_bytes(serialization.Encoding.PEM).decode(),
    )


@pytest.fixture(scope="session")
def google_key() -> SigningKey:
    return new_signing_key("3f7a1c0e9b2d4c6a8e0f1a2b3c4d5e6f7a8b9c0d")


@pytest.fixture(scope="session")
def next_google_key() -> SigningKey:
    """The key Google rotates to during a test."""
    return new_signing_key("9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c")


@pytest.fixture(scope="session")
def forger_key() -> SigningKey:
    return new_signing_key("f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0")


class CertServer:
    """Google's v1 certificates endpoint, played by a local Flask app."""

    def __init__(self, *keys: SigningKey) -> None:
        self.certificates = {key.key_id: key.certificate_pem for key in keys}
        self.status = 200
        self.body: bytes | None = None  # replaces the JSON answer when set
        self.cache_control: str | None = "public, max-age=21600, must-revalidate"
        self.hits = 0
        self._lock = threading.Lock()

    def publish(self, key: SigningKey) -> None:
        self.certificates[key.key_id] = key.certificate_pem

    def app(self) -> Flask:
        app = Flask("google_certs")

        @app.get(CERTS_PATH)
        def certs() -> Response:
            with self._lock:
                self.hits += 1
            response = jsonify(self.certificates)
            if self.body is not None:
                response = Response(self.body, content_type="text/html")
            response.status_code = self.status
            if self.cache_control is not None:
                response.headers["Cache-Control"] = self.cache_control
            return response

        return app


def never_google() -> CertificateSet:
    raise AssertionError("a test tried to fetch Google's real certificates")


@pytest.fixture(autouse=True)
def _google_is_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oidc, "fetch_google_certificates", never_google)


@dataclass
class Certs:
    server: CertServer
    url: str

    def fetch(self) -> CertificateSet:
        return fetch_google_certificates(self.url)


@pytest.fixture
def certs(
    serve: Callable[[Flask], str],
    monkeypatch: pytest.MonkeyPatch,
    google_key: SigningKey,
) -> Certs:
    """A local certificates endpoint, the services' default from now on."""
    server = CertServer(google_key)
    local = Certs(server, serve(server.app()) + CERTS_PATH)
    monkeypatch.setattr(oidc, "fetch_google_certificates", local.fetch)
    return local


def oidc_environ(database_url: str, **overrides: str) -> dict[str, str]:
    return base_environ(
        database_url,
        **{
            **MICROBATCH_ENV,
            "AUTH_MODE": "oidc",
            "ALLOWED_INVOKERS": f"ops@payouts-prod.iam.gserviceaccount.com,{INVOKER}",
            **overrides,
        },
    )


@pytest.fixture
def microbatch(database_url: str, certs: Certs, db: Database) -> Iterator[Flask]:
    from gcmicrobatchprocessor.app import create_app

    app = create_app(environ=oidc_environ(database_url), sender=RecordingSender())
    yield app
    app.extensions["suite"].db.close()


@pytest.fixture
def base(microbatch: Flask, serve: Callable[[Flask], str]) -> str:
    return serve(microbatch)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def check_threshold(base: str, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{base}/check-threshold", headers=headers, timeout=15)


def assert_refused(response: requests.Response, *words: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    for word in words:
        assert word in error["message"]


class FakeClock:
    """Monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


# --- accepted ----------------------------------------------------------------


def test_a_valid_token_from_an_allowed_invoker_runs_the_job(
    base: str, google_key: SigningKey
) -> None:
    response = check_threshold(base, bearer(google_key.token()))

    assert response.status_code == 200, response.text


def test_the_installed_authenticator_is_oidc_with_the_service_url_as_audience(
    microbatch: Flask, google_key: SigningKey
) -> None:
    authenticator = microbatch.extensions["authenticator"]

    assert isinstance(authenticator, OidcAuthenticator)
    assert authenticator.verify(google_key.token()) == INVOKER


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"exp": -5, "iat": -3605}, id="expired_within_the_skew"),
        pytest.param({"iat": 5, "exp": 3605}, id="issued_just_ahead_of_our_clock"),
        pytest.param({"iss": "accounts.google.com"}, id="issuer_without_scheme"),
        pytest.param({"aud": AUDIENCE + "/"}, id="audience_with_trailing_slash"),
        pytest.param({"email": INVOKER.upper()}, id="email_in_other_case"),
    ],
)
def test_tokens_within_the_tolerances_pass(
    base: str, google_key: SigningKey, changes: dict[str, int | str]
) -> None:
    now = int(time.time())
    claims = {
        name: now + value if name in ("exp", "iat") else value
        for name, value in changes.items()
    }

    response = check_threshold(base, bearer(google_key.token(**claims)))

    assert response.status_code == 200, response.text


# --- refused: claims ---------------------------------------------------------

REFUSED_CLAIMS = {
    "expired_beyond_the_skew": ({"exp": -30, "iat": -3630}, "expired"),
    "issued_in_the_future": ({"iat": 120, "exp": 3720}, "future"),
    "no_expiry": ({"exp": DROP}, "expiry"),
    "expiry_as_text": ({"exp": "tomorrow"}, "expiry"),
    "audience_the_full_endpoint_url": (
        {"aud": AUDIENCE + "/check-threshold"},
        "audience",
    ),
    "audience_another_service": ({"aud": "http://batch.test"}, "audience"),
    "audience_a_list": ({"aud": [AUDIENCE]}, "audience"),
    "no_audience": ({"aud": DROP}, "audience"),
    "issuer_not_google": ({"iss": "https://issuer.example"}, "issued by Google"),
    "no_issuer": ({"iss": DROP}, "issued by Google"),
    "email_not_allowed": ({"email": STRANGER}, "ALLOWED_INVOKERS"),
    "no_email": ({"email": DROP}, "email"),
    "email_unverified": ({"email_verified": False}, "not verified"),
    "email_verified_missing": ({"email_verified": DROP}, "not verified"),
    "email_verified_as_text": ({"email_verified": "true"}, "not verified"),
}


@pytest.mark.parametrize(
    ("changes", "reason"), REFUSED_CLAIMS.values(), ids=REFUSED_CLAIMS.keys()
)
def test_a_token_failing_a_claim_check_is_refused_saying_why(
    base: str, google_key: SigningKey, changes: dict[str, Any], reason: str
) -> None:
    now = int(time.time())
    claims = {
        name: now + value if name in ("exp", "iat") and type(value) is int else value
        for name, value in changes.items()
    }

    response = check_threshold(base, bearer(google_key.token(**claims)))

    assert_refused(response, reason)


# --- refused: signature and form ---------------------------------------------


def with_claims(token: str, **changes: Any) -> str:
    """``token`` with its claims changed and its signature kept."""
    header, claims, signature = token.split(".")
    padded = claims + "=" * (-len(claims) % 4)
    payload = {**json.loads(base64.urlsafe_b64decode(padded)), **changes}
    encoded = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=")
    return f"{header}.{encoded.decode()}.{signature}"


def test_a_tampered_token_is_refused(base: str, google_key: SigningKey) -> None:
    stolen = google_key.token(email=STRANGER)
    tampered = with_claims(stolen, email=INVOKER)

    response = check_threshold(base, bearer(tampered))

    assert_refused(response, "signature")


def test_a_token_signed_by_another_key_under_googles_key_id_is_refused(
    base: str, google_key: SigningKey, forger_key: SigningKey
) -> None:
    forged = forger_key.token(key_id=google_key.key_id)

    response = check_threshold(base, bearer(forged))

    assert_refused(response, "signature")


def test_a_token_naming_a_key_google_does_not_publish_is_refused_without_hammering(
    base: str, certs: Certs, forger_key: SigningKey
) -> None:
    answers = [check_threshold(base, bearer(forger_key.token())) for _ in range(10)]

    for response in answers:
        assert_refused(response, "key Google does not publish")
    # The first request fetched; within the minute no forged key id refetches.
    assert certs.server.hits == 1


def alg_none_token() -> str:
    def encode(part: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")

    header = {"alg": "none", "typ": "JWT"}
    claims = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "email": INVOKER}
    return f"{encode(header)}.{encode(claims)}."


MALFORMED = {
    "no_header": {},
    "basic_scheme": {"Authorization": "Basic c2NoZWR1bGVyOnBhc3N3b3Jk"},
    "bearer_without_token": {"Authorization": "Bearer"},
    "bearer_blank": {"Authorization": "Bearer    "},
    "garbage": {"Authorization": "Bearer not-a-token"},
    "three_garbage_segments": {"Authorization": "Bearer a.b.c"},
    "segments_not_json": {"Authorization": "Bearer bm90.anNvbg.c2ln"},
    "far_too_long": {"Authorization": "Bearer " + "a" * 5000 + "." + "b" * 5000 + ".c"},
    "alg_none": {"Authorization": f"Bearer {alg_none_token()}"},
}


@pytest.mark.parametrize("headers", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_missing_or_malformed_bearer_token_is_refused(
    base: str, headers: dict[str, str]
) -> None:
    assert_refused(check_threshold(base, headers))


def test_a_token_claiming_another_algorithm_is_refused(
    base: str, google_key: SigningKey
) -> None:
    signer = crypt.RSASigner.from_string(google_key.private_pem, google_key.key_id)
    claims = {"iss": "https://accounts.google.com", "aud": AUDIENCE}
    token = jwt.encode(signer, claims, header={"alg": "HS256"}).decode()

    assert_refused(check_threshold(base, bearer(token)), "RS256")


# --- the certificates: unreachable, cached, rotated -------------------------


@pytest.mark.parametrize("failure", ["http_500", "not_json", "empty_map"])
def test_certificates_google_cannot_serve_answer_503(
    base: str, certs: Certs, google_key: SigningKey, failure: str
) -> None:
    if failure == "http_500":
        certs.server.status = 500
    elif failure == "not_json":
        certs.server.body = b"<html>maintenance</html>"
    else:
        certs.server.certificates = {}

    response = check_threshold(base, bearer(google_key.token()))

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "auth_certificates_unavailable"


def test_certificates_endpoint_refusing_connections_answers_503(
    microbatch: Flask, serve: Callable[[Flask], str], google_key: SigningKey
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}{CERTS_PATH}"
    fetch = partial(fetch_google_certificates, nowhere, 2.0)
    microbatch.extensions["authenticator"] = OidcAuthenticator(
        AUDIENCE, [INVOKER], GoogleCertificates(fetch)
    )
    base = serve(microbatch)

    response = check_threshold(base, bearer(google_key.token()))

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "auth_certificates_unavailable"


def test_certificates_are_fetched_once_for_many_concurrent_requests(
    base: str, certs: Certs, google_key: SigningKey
) -> None:
    token = google_key.token()

    def swap_callback(_: int) -> requests.Response:
        # Past authentication the empty body is refused: 400 means "let in".
        return requests.post(
            f"{base}/swap-executed", json={}, headers=bearer(token), timeout=15
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(swap_callback, range(48)))

    assert {response.status_code for response in answers} == {400}
    assert certs.server.hits == 1


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_base(
    microbatch: Flask, serve: Callable[[Flask], str], certs: Certs, clock: FakeClock
) -> str:
    """The micro-batch app with a certificate cache on the test's clock."""
    microbatch.extensions["authenticator"] = OidcAuthenticator(
        AUDIENCE, [INVOKER], GoogleCertificates(certs.fetch, clock)
    )
    return serve(microbatch)


def test_a_rotated_key_is_fetched_but_unknown_key_ids_refetch_once_a_minute(
    clocked_base: str,
    certs: Certs,
    clock: FakeClock,
    google_key: SigningKey,
    next_google_key: SigningKey,
    forger_key: SigningKey,
) -> None:
    def status(key: SigningKey) -> int:
        return check_threshold(clocked_base, bearer(key.token())).status_code

    assert status(google_key) == 200
    certs.server.publish(next_google_key)

    clock.now += 30
    assert status(next_google_key) == 401  # fetched 30 s ago: not yet again
    clock.now += 31
    assert status(next_google_key) == 200  # a minute on: refetched, found
    assert certs.server.hits == 2

    clock.now += 1
    assert [status(forger_key) for _ in range(5)] == [401] * 5
    assert certs.server.hits == 2
    clock.now += 60
    assert [status(forger_key) for _ in range(5)] == [401] * 5
    assert certs.server.hits == 3


def test_after_an_outage_requests_answer_503_at_once_then_recover(
    clocked_base: str, certs: Certs, clock: FakeClock, google_key: SigningKey
) -> None:
    certs.server.status = 503
    first = check_threshold(clocked_base, bearer(google_key.token()))
    again = check_threshold(clocked_base, bearer(google_key.token()))

    assert (first.status_code, again.status_code) == (503, 503)
    assert certs.server.hits == 1  # the second did not wait on Google again

    certs.server.status = 200
    clock.now += oidc.FAILED_FETCH_PAUSE_S
    recovered = check_threshold(clocked_base, bearer(google_key.token()))

    assert recovered.status_code == 200
    assert certs.server.hits == 2


@pytest.mark.parametrize(
    ("cache_control", "lifetime"),
    [
        ("public, max-age=600, must-revalidate, no-transform", 600),
        ("public, max-age=0", oidc.MIN_CACHE_S),
        ("no-cache", oidc.MIN_CACHE_S),
        (None, oidc.MIN_CACHE_S),
        ("max-age=31536000", oidc.MAX_CACHE_S),
    ],
)
def test_certificates_are_cached_for_their_max_age_within_bounds(
    certs: Certs,
    clock: FakeClock,
    google_key: SigningKey,
    cache_control: str | None,
    lifetime: int,
) -> None:
    certs.server.cache_control = cache_control
    cache = GoogleCertificates(certs.fetch, clock)

    assert cache.verifier(google_key.key_id) is not None
    clock.now += lifetime - 1
    cache.verifier(google_key.key_id)
    assert certs.server.hits == 1
    clock.now += 1
    cache.verifier(google_key.key_id)
    assert certs.server.hits == 2


def test_an_unreadable_certificate_is_skipped_and_the_others_serve(
    certs: Certs, clock: FakeClock, google_key: SigningKey
) -> None:
    certs.server.certificates["broken"] = "-----BEGIN CERTIFICATE-----\nnope\n"
    cache = GoogleCertificates(certs.fetch, clock)

    assert cache.verifier(google_key.key_id) is not None
    assert cache.verifier("broken") is None


@pytest.mark.parametrize(
    ("header", "max_age"),
    [
        ("public, max-age=19845, must-revalidate, no-transform", 19845),
        ("max-age=60", 60),
        ('MAX-AGE="120"', 120),
        ("s-maxage=600", None),
        ("no-store", None),
        ("", None),
    ],
)
def test_cache_control_max_age_is_read(header: str, max_age: int | None) -> None:
    assert cache_max_age(header) == max_age


# --- the other services ------------------------------------------------------


@pytest.fixture
def accumulator_base(
    database_url: str,
    certs: Certs,
    serve: Callable[[Flask], str],
    fixture_clients: Any,
) -> Iterator[str]:
    from gcaccumulator.app import create_app

    environ = oidc_environ(database_url, SERVICE_URL=ACCUMULATOR_URL)
    app = create_app(environ=environ)
    yield serve(app)
    app.extensions["suite"].db.close()


PAYMENT = {
    "nowpayments_payment_id": "6100000077",
    "client_id": FIXTURE_CLIENTS[0]["client_id"],
    "user_id": 6271402111,
    "payment_amount_usd": "12.50",
    "outcome_amount": "0.0037",
    "outcome_currency": "eth",
}


def test_the_accumulator_credits_a_router_payment_with_a_valid_token(
    accumulator_base: str, google_key: SigningKey
) -> None:
    token = google_key.token(aud=ACCUMULATOR_URL)

    response = requests.post(
        f"{accumulator_base}/payments", json=PAYMENT, headers=bearer(token), timeout=15
    )

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "accumulated"


def test_the_accumulator_refuses_and_records_a_token_for_another_service(
    accumulator_base: str, google_key: SigningKey, db: Database
) -> None:
    response = requests.post(
        f"{accumulator_base}/payments",
        json=PAYMENT,
        headers=bearer(google_key.token()),  # the micro-batch processor's
        timeout=15,
    )

    assert_refused(response, "audience")
    assert response.json()["outcome"] == "unauthorized"
    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM payout_accumulation")
        assert cur.fetchone()["n"] == 0


def test_the_accumulator_answers_503_without_google_and_leaves_nothing_to_replay(
    accumulator_base: str, certs: Certs, google_key: SigningKey, db: Database
) -> None:
    certs.server.status = 500

    response = requests.post(
        f"{accumulator_base}/payments",
        json=PAYMENT,
        headers=bearer(google_key.token(aud=ACCUMULATOR_URL)),
        timeout=15,
    )

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "auth_certificates_unavailable"
    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM payout_accumulation")
        assert cur.fetchone()["n"] == 0
        cur.execute("SELECT outcome FROM ipn_events")
        # Never authenticated, so never retry_later: a replay must not credit it.
        assert [row["outcome"] for row in cur.fetchall()] == ["unauthorized"]


def test_the_batch_processor_runs_for_a_valid_token_and_refuses_another(
    database_url: str,
    certs: Certs,
    serve: Callable[[Flask], str],
    db: Database,
    google_key: SigningKey,
) -> None:
    app = make_batch_app(
        database_url,
        sender=RecordingSender(),
        AUTH_MODE="oidc",
        ALLOWED_INVOKERS=INVOKER,
    )
    batch_url = serve(app)
    audience = BATCH_ENV["SERVICE_URL"]

    def process(token: str) -> requests.Response:
        return requests.post(f"{batch_url}/process", headers=bearer(token), timeout=15)

    try:
        accepted = process(google_key.token(aud=audience))
        refused = process(google_key.token(aud=audience, email=STRANGER))
    finally:
        app.extensions["suite"].db.close()

    assert accepted.status_code == 200, accepted.text
    assert_refused(refused, "ALLOWED_INVOKERS")


# --- logs ----------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every log line of every logger, formatted as the services write them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_refusals_are_logged_with_reason_and_caller_and_no_token_anywhere(
    base: str,
    log_lines: io.StringIO,
    google_key: SigningKey,
    forger_key: SigningKey,
) -> None:
    logging.getLogger().setLevel(logging.DEBUG)  # the app set WARNING at start
    now = int(time.time())
    tokens = [
        google_key.token(),
        google_key.token(exp=now - 60, iat=now - 3660),
        google_key.token(email=STRANGER),
        google_key.token(aud=AUDIENCE + "/check-threshold"),
        with_claims(google_key.token(email=STRANGER), email=INVOKER),
        forger_key.token(),
        "eyJhbGciOiJSUzI1NiJ9.eyJzZWNyZXQiOiJ5ZXMifQ.c2lnbmF0dXJl",
        "not-a-token-but-still-secret",
    ]

    bodies = [check_threshold(base, bearer(token)).text for token in tokens]

    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    refusals = [line for line in lines if line["message"] == "internal_call_refused"]
    assert len(refusals) == len(tokens) - 1
    assert {line["severity"] for line in refusals} == {"WARNING"}
    expired = next(
        line for line in refusals if line["reason"] == "the token has expired"
    )
    assert expired["caller"] == INVOKER
    stranger = next(line for line in refusals if "ALLOWED_INVOKERS" in line["reason"])
    assert stranger["caller"] == STRANGER
    everything = log_lines.getvalue() + "".join(bodies)
    for token in tokens:
        assert token not in everything
        assert token.rsplit(".", 1)[-1] not in everything
