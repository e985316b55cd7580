"""Configuration is read once at start, stripped, checked, and every bad
variable is named in one refusal; secrets come from the environment or from
Secret Manager (here an in-process fake client)."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from conftest import INTERNAL_TOKEN, IPN_SECRET

from gcaccumulator.app import create_app
from gcaccumulator.ipn import sign
from shared.config import ConfigError, load_config
from shared.db import Database
from shared.secrets import SecretError, SecretManagerSecrets

DATABASE = "postgresql://payouts@db.internal:5432/payouts"

ACCUMULATOR = {
    "ENVIRONMENT": "test",
    "DATABASE_URL": DATABASE,
    "NOWPAYMENTS_IPN_SECRET": IPN_SECRET,
    "INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN,
}
MICROBATCH = {
    "ENVIRONMENT": "test",
    "DATABASE_URL": DATABASE,
    "INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN,
    "MICRO_BATCH_THRESHOLD_USD": "20",
    "SERVICE_URL": "http://127.0.0.1:8083",
    "SWAP_EXECUTOR_URL": "http://127.0.0.1:8090/swap",
    "BATCH_PROCESSOR_URL": "http://127.0.0.1:8082",
}
BATCH = {
    "ENVIRONMENT": "test",
    "DATABASE_URL": DATABASE,
    "INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN,
    "SERVICE_URL": "http://127.0.0.1:8082",
    "PAYOUT_EXECUTOR_URL": "http://127.0.0.1:8090/payout",
    "MICRO_BATCH_PROCESSOR_URL": "http://127.0.0.1:8083",
}
SERVICES: dict[Any, dict[str, str]] = {
    "accumulator": ACCUMULATOR,
    "microbatch": MICROBATCH,
    "batch": BATCH,
}

FINISHED_IPN = (
    b'{"payment_id":5077125051,"payment_status":"finished",'
    b'"order_id":"PGP-6271402111|-1003296084379",'
    b'"outcome_amount":0.0002734,"outcome_currency":"eth"}'
)


def refused_names(service: Any, environ: dict[str, str], **kwargs: Any) -> set[str]:
    """The variables a refused configuration names."""
    with pytest.raises(ConfigError) as refused:
        load_config(service, environ, **kwargs)
    return {problem.split(":", 1)[0] for problem in refused.value.problems}


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_starts_from_its_complete_configuration(service: Any) -> None:
    config = load_config(service, SERVICES[service])

    assert config.service == service


def test_several_bad_variables_are_all_named_at_once() -> None:
    environ = {
        **MICROBATCH,
        "PLATFORM_FEE_PERCENT": "50",
        "DB_POOL_SIZE": "0",
        "LOG_LEVEL": "LOUD",
        "DATABASE_URL": "mysql://db/payouts",
        "PRICE_SOURCE": "static:-1",
        "SWAP_EXECUTOR_URL": "ftp://executor",
        "AUTH_MODE": "magic",
        "ALLOWED_INVOKERS": "not-an-email",
    }

    names = refused_names("microbatch", environ)

    assert names == {
        "PLATFORM_FEE_PERCENT",
        "DB_POOL_SIZE",
        "LOG_LEVEL",
        "DATABASE_URL",
        "PRICE_SOURCE",
        "SWAP_EXECUTOR_URL",
        "AUTH_MODE",
        "ALLOWED_INVOKERS",
    }


def test_a_bad_value_and_missing_variables_are_named_together() -> None:
    environ = {"DATABASE_URL": DATABASE, "PLATFORM_FEE_PERCENT": "50"}

    names = refused_names("microbatch", environ)

    assert names >= {
        "PLATFORM_FEE_PERCENT",
        "SERVICE_URL",
        "SWAP_EXECUTOR_URL",
        "BATCH_PROCESSOR_URL",
        "MICRO_BATCH_THRESHOLD_USD",
        "INTERNAL_AUTH_TOKEN",
    }


def test_missing_settings_and_missing_secrets_are_named_together() -> None:
    names = refused_names("microbatch", {"DATABASE_URL": DATABASE})

    assert names >= {
        "SERVICE_URL",
        "SWAP_EXECUTOR_URL",
        "BATCH_PROCESSOR_URL",
        "MICRO_BATCH_THRESHOLD_USD",
        "INTERNAL_AUTH_TOKEN",
    }


def test_values_are_stripped_and_blank_counts_as_unset() -> None:
    environ = {
        **MICROBATCH,
        "PLATFORM_FEE_PERCENT": " 2.5\n",
        "SERVICE_URL": "  http://127.0.0.1:8083/ \n",
        "DB_POOL_SIZE": "\t12 ",
        "PRICE_SOURCE": "   ",
        "MICRO_BATCH_THRESHOLD_USD": "20\n",
        "INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN + "\r\n",
    }

    config = load_config("microbatch", environ)

    settings = config.settings
    assert settings.platform_fee_percent == Decimal("2.5")
    assert settings.service_url == "http://127.0.0.1:8083"
    assert settings.db_pool_size == 12
    assert settings.price_source is None
    assert config.secrets.get("MICRO_BATCH_THRESHOLD_USD") == "20"
    assert config.secrets.get("INTERNAL_AUTH_TOKEN") == INTERNAL_TOKEN


def test_ipn_secret_with_a_trailing_newline_signs_without_it(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    base = serve(make_accumulator(NOWPAYMENTS_IPN_SECRET=IPN_SECRET + "\n"))

    def deliver(secret: str) -> requests.Response:
        return requests.post(
            f"{base}/ipn",
            data=FINISHED_IPN,
            headers={"x-nowpayments-sig": sign(secret, FINISHED_IPN)},
            timeout=10,
        )

    with_newline = deliver(IPN_SECRET + "\n")
    stripped = deliver(IPN_SECRET)

    assert (with_newline.status_code, with_newline.json()["outcome"]) == (
        401,
        "bad_signature",
    )
    assert (stripped.status_code, stripped.json()["outcome"]) == (200, "accumulated")


def test_internal_token_with_a_trailing_newline_is_compared_without_it(
    make_accumulator: Any, serve: Any, db: Database, fixture_clients: Any
) -> None:
    base = serve(make_accumulator(INTERNAL_AUTH_TOKEN=INTERNAL_TOKEN + "\n"))
    payment = {
        "nowpayments_payment_id": "1",
        "client_id": -1003296084379,
        "user_id": 1,
        "payment_amount_usd": "1",
        "outcome_amount": "0.001",
        "outcome_currency": "eth",
    }

    response = requests.post(
        f"{base}/payments",
        json=payment,
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
        timeout=10,
    )

    assert response.json()["outcome"] == "accumulated"


@pytest.mark.parametrize(
    "fee", ["50", "50.0", "75", "-1", "-0.0001", "abc", "2.12345", "NaN", "Infinity"]
)
def test_bad_platform_fee_is_refused(fee: str) -> None:
    names = refused_names("accumulator", {**ACCUMULATOR, "PLATFORM_FEE_PERCENT": fee})

    assert names == {"PLATFORM_FEE_PERCENT"}


@pytest.mark.parametrize("fee", ["0", "2.5", "49.9999"])
def test_platform_fee_from_zero_to_just_under_fifty_is_accepted(fee: str) -> None:
    config = load_config("accumulator", {**ACCUMULATOR, "PLATFORM_FEE_PERCENT": fee})

    assert config.settings.platform_fee_percent == Decimal(fee)


URL_VARIABLES = ["SERVICE_URL", "SWAP_EXECUTOR_URL", "BATCH_PROCESSOR_URL"]
BAD_URLS = [
    "ftp://127.0.0.1/x",
    "127.0.0.1:8083",
    "http://",
    "http://exa mple.com",
    "//127.0.0.1:8083",
    "not a url",
]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("variable", URL_VARIABLES)
def test_bad_url_is_refused(variable: str, url: str) -> None:
    names = refused_names("microbatch", {**MICROBATCH, variable: url})

    assert variable in names


@pytest.mark.parametrize("url", ["mysql://db/payouts", "http://db:5432/payouts"])
def test_database_url_must_be_postgresql(url: str) -> None:
    names = refused_names("accumulator", {**ACCUMULATOR, "DATABASE_URL": url})

    assert names == {"DATABASE_URL"}


REQUIRED = [
    ("microbatch", "SERVICE_URL"),
    ("microbatch", "SWAP_EXECUTOR_URL"),
    ("microbatch", "BATCH_PROCESSOR_URL"),
    ("microbatch", "MICRO_BATCH_THRESHOLD_USD"),
    ("microbatch", "INTERNAL_AUTH_TOKEN"),
    ("batch", "SERVICE_URL"),
    ("batch", "PAYOUT_EXECUTOR_URL"),
    ("batch", "MICRO_BATCH_PROCESSOR_URL"),
    ("batch", "INTERNAL_AUTH_TOKEN"),
    ("accumulator", "NOWPAYMENTS_IPN_SECRET"),
    ("accumulator", "INTERNAL_AUTH_TOKEN"),
]


@pytest.mark.parametrize(("service", "variable"), REQUIRED)
def test_service_refuses_to_start_without_its_variable(
    service: Any, variable: str
) -> None:
    environ = {k: v for k, v in SERVICES[service].items() if k != variable}

    assert refused_names(service, environ) == {variable}


def test_microbatch_names_all_its_missing_urls_together() -> None:
    environ = {
        k: v
        for k, v in MICROBATCH.items()
        if k not in ("SERVICE_URL", "SWAP_EXECUTOR_URL", "BATCH_PROCESSOR_URL")
    }

    names = refused_names("microbatch", environ)

    assert names == {"SERVICE_URL", "SWAP_EXECUTOR_URL", "BATCH_PROCESSOR_URL"}


@pytest.mark.parametrize("threshold", ["0", "-5", "abc", "NaN", "1e15", "  "])
def test_invalid_micro_batch_threshold_is_refused(threshold: str) -> None:
    environ = {**MICROBATCH, "MICRO_BATCH_THRESHOLD_USD": threshold}

    assert refused_names("microbatch", environ) == {"MICRO_BATCH_THRESHOLD_USD"}


def test_production_refuses_every_local_shortcut_naming_them_together() -> None:
    environ = {
        "ENVIRONMENT": "production",
        "NOWPAYMENTS_IPN_SECRET": IPN_SECRET,
        "INTERNAL_AUTH_TOKEN": INTERNAL_TOKEN,
        "AUTH_MODE": "token",
        "PRICE_SOURCE": "static:3400",
        "SECRETS_BACKEND": "env",
        "TASKS_BACKEND": "http",
    }

    names = refused_names("accumulator", environ)

    assert names >= {
        "DATABASE_URL",
        "AUTH_MODE",
        "PRICE_SOURCE",
        "SECRETS_BACKEND",
        "TASKS_BACKEND",
    }


OIDC = {
    "AUTH_MODE": "oidc",
    "SERVICE_URL": "https://gcaccumulator-4kq2x7-ew.a.run.app",
    "ALLOWED_INVOKERS": "router@project.iam.gserviceaccount.com",
}


@pytest.mark.parametrize("service", SERVICES)
def test_oidc_auth_starts_with_a_service_url_and_allowed_invokers(
    service: Any,
) -> None:
    environ = {k: v for k, v in SERVICES[service].items() if k != "INTERNAL_AUTH_TOKEN"}

    config = load_config(service, {**environ, **OIDC})

    assert config.settings.auth_mode == "oidc"
    assert config.settings.service_url == OIDC["SERVICE_URL"]
    assert config.settings.allowed_invokers == (OIDC["ALLOWED_INVOKERS"],)


def test_oidc_auth_without_service_url_and_invokers_names_both() -> None:
    environ = {**ACCUMULATOR, "AUTH_MODE": "oidc"}

    with pytest.raises(ConfigError) as refused:
        load_config("accumulator", environ)

    problems = refused.value.problems
    assert {problem.split(":", 1)[0] for problem in problems} == {
        "SERVICE_URL",
        "ALLOWED_INVOKERS",
    }
    assert any("audience" in problem for problem in problems)


@pytest.mark.parametrize("service", ["microbatch", "batch"])
def test_oidc_auth_names_a_missing_service_url_once_beside_the_invokers(
    service: Any,
) -> None:
    environ = {k: v for k, v in SERVICES[service].items() if k != "SERVICE_URL"}

    with pytest.raises(ConfigError) as refused:
        load_config(service, {**environ, "AUTH_MODE": "oidc"})

    names = [problem.split(":", 1)[0] for problem in refused.value.problems]
    assert sorted(names) == ["ALLOWED_INVOKERS", "SERVICE_URL"]


def test_secret_manager_backend_needs_a_project() -> None:
    environ = {**ACCUMULATOR, "SECRETS_BACKEND": "gcp"}

    assert refused_names("accumulator", environ) == {"GCP_PROJECT"}


# --- Secret Manager, through an in-process fake client ----------------------


class FakeSecretManager:
    """Answers ``access_secret_version`` from a dict; records each request."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.unreadable: set[str] = set()
        self.requests: list[str] = []

    def access_secret_version(self, request: dict[str, str], timeout: float) -> Any:
        path = request["name"]
        self.requests.append(path)
        name = path.split("/")[3]
        if name in self.unreadable or name not in self.values:
            raise PermissionError(f"403 on {path}")
        return SimpleNamespace(
            payload=SimpleNamespace(data=self.values[name].encode("utf-8"))
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


GCP = {
    "ENVIRONMENT": "test",
    "SECRETS_BACKEND": "gcp",
    "GCP_PROJECT": "payouts-prod",
    "PRICE_SOURCE": "static:3400",
    "LOG_LEVEL": "WARNING",
}


def test_secret_manager_reads_the_latest_version_stripped() -> None:
    client = FakeSecretManager({"NOWPAYMENTS_IPN_SECRET": "rotated\n"})
    secrets = SecretManagerSecrets("payouts-prod", client=client)

    assert secrets.get("NOWPAYMENTS_IPN_SECRET") == "rotated"
    assert client.requests == [
        "projects/payouts-prod/secrets/NOWPAYMENTS_IPN_SECRET/versions/latest"
    ]


def test_secret_manager_cache_shows_a_change_once_it_expires() -> None:
    client = FakeSecretManager({"MICRO_BATCH_THRESHOLD_USD": "20"})
    clock = Clock()
    secrets = SecretManagerSecrets("p", cache_s=60, client=client, clock=clock)
    assert secrets.get("MICRO_BATCH_THRESHOLD_USD") == "20"

    client.values["MICRO_BATCH_THRESHOLD_USD"] = "35"
    clock.now += 59
    cached = secrets.get("MICRO_BATCH_THRESHOLD_USD")
    clock.now += 1
    fresh = secrets.get("MICRO_BATCH_THRESHOLD_USD")

    assert (cached, fresh) == ("20", "35")
    assert len(client.requests) == 2


def test_secret_manager_failure_is_a_secret_error() -> None:
    client = FakeSecretManager({"INTERNAL_AUTH_TOKEN": "token"})
    client.unreadable.add("INTERNAL_AUTH_TOKEN")
    secrets = SecretManagerSecrets("p", client=client)

    with pytest.raises(SecretError):
        secrets.get("INTERNAL_AUTH_TOKEN")


@pytest.mark.parametrize("state", ["unreadable", "absent", "empty", "blank"])
def test_secret_that_cannot_be_read_at_start_is_a_config_error(
    database_url: str, state: str
) -> None:
    values = {"NOWPAYMENTS_IPN_SECRET": IPN_SECRET, "INTERNAL_AUTH_TOKEN": "token"}
    client = FakeSecretManager(values)
    if state == "unreadable":
        client.unreadable.add("NOWPAYMENTS_IPN_SECRET")
    elif state == "absent":
        del values["NOWPAYMENTS_IPN_SECRET"]
    else:
        values["NOWPAYMENTS_IPN_SECRET"] = "" if state == "empty" else " \n"
    secrets = SecretManagerSecrets("payouts-prod", client=client)

    with pytest.raises(ConfigError) as refused:
        create_app({**GCP, "DATABASE_URL": database_url}, secrets=secrets)

    assert [problem.split(":")[0] for problem in refused.value.problems] == [
        "NOWPAYMENTS_IPN_SECRET"
    ]


def test_rotated_ipn_secret_is_used_once_the_cache_expires(
    database_url: str, serve: Any, db: Database, fixture_clients: Any
) -> None:
    client = FakeSecretManager(
        {"NOWPAYMENTS_IPN_SECRET": "old-secret", "INTERNAL_AUTH_TOKEN": "token"}
    )
    clock = Clock()
    secrets = SecretManagerSecrets("payouts-prod", 60, client=client, clock=clock)
    base = serve(create_app({**GCP, "DATABASE_URL": database_url}, secrets=secrets))

    def deliver(payment_id: int, secret: str) -> str:
        body = FINISHED_IPN.replace(b"5077125051", str(payment_id).encode())
        response = requests.post(
            f"{base}/ipn",
            data=body,
            headers={"x-nowpayments-sig": sign(secret, body)},
            timeout=10,
        )
        return str(response.json()["outcome"])

    assert deliver(1, "old-secret") == "accumulated"
    client.values["NOWPAYMENTS_IPN_SECRET"] = "new-secret\n"
    assert deliver(2, "new-secret") == "bad_signature"  # still cached
    clock.now += 60
    assert deliver(3, "new-secret") == "accumulated"
    assert deliver(4, "old-secret") == "bad_signature"


def test_secret_unreadable_after_start_answers_503(
    database_url: str, serve: Any, db: Database, fixture_clients: Any
) -> None:
    client = FakeSecretManager(
        {"NOWPAYMENTS_IPN_SECRET": IPN_SECRET, "INTERNAL_AUTH_TOKEN": "token"}
    )
    clock = Clock()
    secrets = SecretManagerSecrets("payouts-prod", 60, client=client, clock=clock)
    base = serve(create_app({**GCP, "DATABASE_URL": database_url}, secrets=secrets))
    client.unreadable.add("NOWPAYMENTS_IPN_SECRET")
    clock.now += 60

    response = requests.post(
        f"{base}/ipn",
        data=FINISHED_IPN,
        headers={"x-nowpayments-sig": sign(IPN_SECRET, FINISHED_IPN)},
        timeout=10,
    )

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "secret_unavailable"
    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM payout_accumulation")
        assert cur.fetchone()["n"] == 0


def test_production_names_a_missing_secret_a_bad_fee_and_a_shortcut_at_once() -> None:
    # Otherwise a production-ready file: Secret Manager, OIDC, Cloud Tasks,
    # a real price source. Three causes, each of another kind.
    environ = {
        "ENVIRONMENT": "production",
        "DATABASE_URL": DATABASE,
        "SECRETS_BACKEND": "gcp",
        "GCP_PROJECT": "payouts-prod",
        "AUTH_MODE": "oidc",
        "SERVICE_URL": "https://gcaccumulator-1.europe-west1.run.app",
        "ALLOWED_INVOKERS": "router@payouts-prod.iam.gserviceaccount.com",
        "TASKS_BACKEND": "cloudtasks",
        "TASKS_QUEUE": "payouts-swaps",
        "TASKS_LOCATION": "europe-west1",
        "TASKS_SERVICE_ACCOUNT": "tasks@payouts-prod.iam.gserviceaccount.com",
        "PRICE_SOURCE": "static:3400",
        "PLATFORM_FEE_PERCENT": "55",
    }
    secrets = SecretManagerSecrets("payouts-prod", client=FakeSecretManager({}))

    names = refused_names("accumulator", environ, secrets=secrets)

    assert names == {"NOWPAYMENTS_IPN_SECRET", "PLATFORM_FEE_PERCENT", "PRICE_SOURCE"}
