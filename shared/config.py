"""Typed configuration, read once at start.

``load_config(service)`` reads the environment, validates every variable the
service needs, reads the secrets it needs once, and raises ``ConfigError``
naming every bad variable at once. Nothing reads the environment at import
time; ``create_app`` calls this.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import money
from shared.secrets import SecretError, SecretSource, make_secret_source

Service = Literal["accumulator", "microbatch", "batch", "payoutctl"]
# shared.faults.POINTS
FaultPoint = Literal["after-conversion-commit", "after-payout-commit"]

_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CURRENCY = re.compile(r"^[a-z0-9]{2,20}$")


class ConfigError(Exception):
    """Configuration that must stop the process from starting."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid configuration:\n{lines}")


@dataclass(frozen=True)
class PriceSource:
    """Where USD prices for outcome currencies come from (``PRICE_SOURCE``)."""

    kind: Literal["static", "coingecko"]
    # static: one price for every currency (key "*") or one per currency.
    static_prices: Mapping[str, Decimal]


def parse_price_source(text: str) -> PriceSource:
    text = text.strip()
    if text == "coingecko":
        return PriceSource("coingecko", {})
    if not text.startswith("static:"):
        raise ValueError(
            "expected 'coingecko' or 'static:PRICE' or 'static:eth=PRICE,...'"
        )
    spec = text.removeprefix("static:")
    prices: dict[str, Decimal] = {}
    for part in spec.split(","):
        currency, sep, price_text = part.strip().rpartition("=")
        key = currency.strip().lower() if sep else "*"
        if sep and not _CURRENCY.match(key):
            raise ValueError(f"bad currency code {currency!r}")
        try:
            price = money.exact(money.parse_amount(price_text), money.USD, "price")
        except money.AmountError as error:
            raise ValueError(f"bad price {price_text!r}: {error}") from None
        if price <= 0:
            raise ValueError(f"price for {key} must be greater than zero")
        prices[key] = price
    return PriceSource("static", prices)


class Settings(BaseModel):
    """Every environment variable the suite reads (DESIGN.md section 6).

    Field names are the variables' names in lower case.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: Literal["development", "test", "production"] = "development"
    app_version: str | None = None
    k_revision: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    database_url: str | None = None
    db_pool_size: int = Field(default=8, ge=1, le=100)
    # Unset: each service's own default (the accumulator answers NOWPayments
    # within its 3-second limit, so it gives up on a statement sooner).
    db_statement_timeout_ms: int | None = Field(default=None, ge=100)

    secrets_backend: Literal["env", "gcp"] = "env"
    secrets_cache_s: int = Field(default=60, ge=0, le=3600)
    gcp_project: str | None = None

    auth_mode: Literal["token", "oidc"] = "token"
    allowed_invokers: tuple[str, ...] = ()
    service_url: str | None = None

    platform_fee_percent: Decimal = Field(default=Decimal(3), ge=0, lt=50)
    price_source: str | None = None
    price_timeout_ms: int = Field(default=1000, ge=50, le=2500)
    price_cache_s: int = Field(default=60, ge=0, le=3600)

    tasks_backend: Literal["http", "cloudtasks"] = "http"
    tasks_queue: str | None = None
    tasks_location: str | None = None
    tasks_service_account: str | None = None

    swap_executor_url: str | None = None
    payout_executor_url: str | None = None
    micro_batch_processor_url: str | None = None
    batch_processor_url: str | None = None

    check_threshold_interval_s: int = Field(default=300, ge=1)
    process_interval_s: int = Field(default=300, ge=1)
    job_grace_s: int = Field(default=60, ge=0)
    swap_stale_after: int = Field(default=7200, ge=60)
    # A run holding its job's lock longer than this loses it (DESIGN.md 5).
    job_lock_timeout_s: int = Field(default=240, ge=5)
    # How long a run spends re-sending tasks before it answers; the next run
    # carries on with the rest.
    outbox_send_budget_s: int = Field(default=20, ge=1, le=600)

    heartbeat_url_check_threshold: str | None = None
    heartbeat_url_process: str | None = None

    # Fault tests only (shared/faults.py): refused unless ENVIRONMENT=test.
    test_fault_point: FaultPoint | None = None
    test_fault_trigger_file: str | None = None

    @field_validator("allowed_invokers", mode="before")
    @classmethod
    def _split_invokers(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("allowed_invokers")
    @classmethod
    def _check_invokers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for email in value:
            if not _EMAIL.match(email):
                raise ValueError(f"{email!r} is not an email address")
        return value

    @field_validator(
        "service_url",
        "swap_executor_url",
        "payout_executor_url",
        "micro_batch_processor_url",
        "batch_processor_url",
        "heartbeat_url_check_threshold",
        "heartbeat_url_process",
    )
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not _URL.match(value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/") if value else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("platform_fee_percent")
    @classmethod
    def _check_fee(cls, value: Decimal) -> Decimal:
        try:
            return money.exact(value, money.PERCENT, "fee")
        except money.AmountError as error:
            raise ValueError(str(error)) from None

    @field_validator("price_source")
    @classmethod
    def _check_price_source(cls, value: str | None) -> str | None:
        if value is not None:
            parse_price_source(value)
        return value

    @property
    def version(self) -> str:
        return self.app_version or self.k_revision or "dev"

    @property
    def prices(self) -> PriceSource:
        default = "coingecko" if self.environment == "production" else "static:3400"
        return parse_price_source(self.price_source or default)

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None


@dataclass(frozen=True)
class Config:
    """Settings plus the secret source they chose, checked together."""

    settings: Settings
    secrets: SecretSource
    service: Service


# Which secrets each service cannot start without.
_SECRETS: dict[Service, tuple[str, ...]] = {
    "accumulator": ("NOWPAYMENTS_IPN_SECRET",),
    "microbatch": ("MICRO_BATCH_THRESHOLD_USD",),
    "batch": (),
    "payoutctl": (),
}

# Which settings each service cannot start without.
_REQUIRED: dict[Service, tuple[str, ...]] = {
    "accumulator": (),
    "microbatch": ("service_url", "swap_executor_url", "batch_processor_url"),
    "batch": ("service_url", "payout_executor_url", "micro_batch_processor_url"),
    "payoutctl": (),
}


def _describe(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "?"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {message}")
    return problems


def _service_problems(settings: Settings, service: Service) -> list[str]:
    problems = [
        f"{name.upper()}: required by the {service} service"
        for name in _REQUIRED[service]
        if getattr(settings, name) is None
    ]
    if service != "payoutctl":
        if settings.auth_mode == "oidc":
            # Without these every internal call would be refused: the tokens'
            # audience is the service URL, and no caller would be allowed.
            if settings.service_url is None and "service_url" not in _REQUIRED[service]:
                problems.append("SERVICE_URL: required as the OIDC audience")
            if not settings.allowed_invokers:
                problems.append("ALLOWED_INVOKERS: required when AUTH_MODE=oidc")
        if settings.tasks_backend == "cloudtasks":
            # Without the service account a task carries no OIDC token: Cloud
            # Tasks takes it, and every receiver refuses it with 401.
            names = (
                "gcp_project",
                "tasks_queue",
                "tasks_location",
                "tasks_service_account",
            )
            for name in names:
                if getattr(settings, name) is None:
                    problems.append(
                        f"{name.upper()}: required by TASKS_BACKEND=cloudtasks"
                    )
    if settings.secrets_backend == "gcp" and settings.gcp_project is None:
        problems.append("GCP_PROJECT: required by SECRETS_BACKEND=gcp")
    return problems


def _fault_problems(settings: Settings) -> list[str]:
    """A failure point kills workers on purpose: only ever in a test."""
    armed = [
        name
        for name in ("test_fault_point", "test_fault_trigger_file")
        if getattr(settings, name) is not None
    ]
    if armed and settings.environment != "test":
        return [
            f"{name.upper()}: honoured only with ENVIRONMENT=test" for name in armed
        ]
    if len(armed) == 1:
        other = {"test_fault_point", "test_fault_trigger_file"} - set(armed)
        return [f"{other.pop().upper()}: required with {armed[0].upper()}"]
    return []


def _production_problems(settings: Settings, service: Service) -> list[str]:
    if settings.environment != "production":
        return []
    problems = []
    if settings.database_url is None:
        problems.append("DATABASE_URL: production never runs on the embedded database")
    if settings.secrets_backend != "gcp":
        problems.append("SECRETS_BACKEND: production reads secrets from Secret Manager")
    if service == "payoutctl":
        return problems
    if settings.auth_mode != "oidc":
        problems.append("AUTH_MODE: production requires oidc, not token")
    if settings.tasks_backend != "cloudtasks":
        problems.append("TASKS_BACKEND: production sends tasks through cloudtasks")
    if service == "accumulator" and settings.prices.kind == "static":
        problems.append("PRICE_SOURCE: production never uses static prices")
    return problems


def _secret_problems(
    secrets: SecretSource, settings: Settings, service: Service
) -> list[str]:
    names = list(_SECRETS[service])
    if service != "payoutctl" and settings.auth_mode == "token":
        names.append("INTERNAL_AUTH_TOKEN")
    problems = []
    for name in names:
        try:
            secrets.get(name)
        except SecretError as error:
            problems.append(f"{name}: {error}")
    if "MICRO_BATCH_THRESHOLD_USD" in names and not problems:
        try:
            read_threshold(secrets)
        except ConfigError as error:
            problems.extend(error.problems)
    return problems


def read_threshold(secrets: SecretSource) -> Decimal:
    """The micro-batch threshold, validated: there is no default to fall to."""
    name = "MICRO_BATCH_THRESHOLD_USD"
    try:
        text = secrets.get(name)
        threshold = money.exact(money.parse_amount(text, name), money.USD, name)
    except (SecretError, money.AmountError) as error:
        raise ConfigError([f"{name}: {error}"]) from None
    if threshold <= 0:
        raise ConfigError([f"{name}: must be greater than zero"])
    return threshold


def load_config(
    service: Service,
    environ: Mapping[str, str] | None = None,
    secrets: SecretSource | None = None,
) -> Config:
    """Read and check everything ``service`` needs; raise naming every problem.

    A value that does not validate is reported and then left at its default
    for the remaining checks, so one bad variable never hides another.
    """
    env = dict(os.environ if environ is None else environ)
    settings, problems = _validate(_settings_kwargs(env))
    reported = {problem.split(":", 1)[0] for problem in problems}
    later = (
        _service_problems(settings, service)
        + _production_problems(settings, service)
        + _fault_problems(settings)
    )
    problems += [p for p in later if p.split(":", 1)[0] not in reported]
    if (
        secrets is None
        and "SECRETS_BACKEND" not in reported
        and not (settings.secrets_backend == "gcp" and settings.gcp_project is None)
    ):
        secrets = make_secret_source(
            settings.secrets_backend,
            env,
            settings.gcp_project,
            settings.secrets_cache_s,
        )
    if secrets is not None:
        problems += _secret_problems(secrets, settings, service)
    if problems:
        raise ConfigError(problems)
    assert secrets is not None
    return Config(settings=settings, secrets=secrets, service=service)


def _validate(kwargs: dict[str, str]) -> tuple[Settings, list[str]]:
    """Settings from ``kwargs``, with each invalid one reported and dropped."""
    try:
        return Settings.model_validate(kwargs), []
    except ValidationError as error:
        bad = {str(item["loc"][0]) for item in error.errors() if item["loc"]}
        good = {name: value for name, value in kwargs.items() if name not in bad}
        return Settings.model_validate(good), _describe(error)


def _settings_kwargs(env: Mapping[str, str]) -> dict[str, str]:
    """Our variables, stripped; a variable set to blanks counts as unset."""
    kwargs = {}
    for name in Settings.model_fields:
        value = env.get(name.upper(), "").strip()
        if value:
            kwargs[name] = value
    return kwargs
