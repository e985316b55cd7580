"""The deploy's one configuration file (``scripts/deploy.toml``), checked.

``load(path)`` reads the file, validates every field, and raises
``DeployConfigError`` naming every problem at once (``services.batch.queue:
Field required``), before a single command is run. What can be derived
(service URLs, service account emails, each service's environment) is
derived here, so the file holds choices only and cannot contradict itself.
Secret values are never in the file: a secret names the variable of the
deploying machine that holds its first value.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROLES = ("accumulator", "microbatch", "batch")
Role = Literal["accumulator", "microbatch", "batch"]
# The services that create tasks. The accumulator creates none, yet the
# production check of shared/config.py asks every service for
# TASKS_BACKEND=cloudtasks and its settings: it is given them, and no grant.
TASK_SENDERS: tuple[Role, ...] = ("microbatch", "batch")

# Variables the deploy sets itself; the file may not override them, or a
# service could be told it is somewhere it is not.
DERIVED_ENV = frozenset(
    {
        "SERVICE",
        "ENVIRONMENT",
        "APP_VERSION",
        "SECRETS_BACKEND",
        "GCP_PROJECT",
        "AUTH_MODE",
        "SERVICE_URL",
        "ALLOWED_INVOKERS",
        "TASKS_BACKEND",
        "TASKS_QUEUE",
        "TASKS_LOCATION",
        "TASKS_SERVICE_ACCOUNT",
        "SWAP_EXECUTOR_URL",
        "PAYOUT_EXECUTOR_URL",
        "MICRO_BATCH_PROCESSOR_URL",
        "BATCH_PROCESSOR_URL",
        "DATABASE_URL",
    }
)

_ACCOUNT_ID = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


class DeployConfigError(Exception):
    """The deploy configuration is incomplete or contradicts itself."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid deploy configuration:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Accounts(_Strict):
    """Service account ids the deploy creates besides the services' own."""

    scheduler: str
    tasks: str
    migrate: str


class Executor(_Strict):
    url: str = Field(pattern=r"^https://\S+$")
    # The executor's Cloud Run service, when it runs in Cloud Run: the tasks
    # identity is allowed to invoke it there. Unset: granted elsewhere.
    service: str | None = None
    project: str | None = None
    region: str | None = None


class Executors(_Strict):
    swap: Executor
    payout: Executor


class Secret(_Strict):
    name: str = Field(pattern=_SECRET.pattern)
    # The deploying machine's variable holding the first value, used only
    # when the secret has no version yet; never printed, never in this file.
    value_env: str = Field(pattern=_ENV_NAME.pattern)


class Queue(_Strict):
    max_attempts: int = Field(ge=1)
    max_retry_duration_s: int = Field(ge=1)
    min_backoff_s: int = Field(ge=1)
    max_backoff_s: int = Field(ge=1)
    max_doublings: int = Field(ge=0)
    max_dispatches_per_second: float = Field(gt=0)
    max_concurrent_dispatches: int = Field(ge=1)


class Migrate(_Strict):
    job: str = Field(pattern=_NAME.pattern)
    task_timeout_s: int = Field(ge=60)
    mount_secrets: dict[str, str]


class Service(_Strict):
    name: str = Field(pattern=_NAME.pattern)
    account: str
    # The package the image's entry point serves (SERVICE, Dockerfile).
    package: Literal["gcaccumulator", "gcbatchprocessor", "gcmicrobatchprocessor"]
    public: bool
    ingress: Literal["all", "internal", "internal-and-cloud-load-balancing"]
    timeout_s: int = Field(ge=1, le=3600)
    concurrency: int = Field(ge=1, le=1000)
    cpu: str
    memory: str
    min_instances: int = Field(ge=0)
    max_instances: int = Field(ge=1)
    invokers: list[str]
    mount_secrets: dict[str, str] = {}
    read_secrets: list[str] = []
    queue: str | None = None
    url: str | None = Field(default=None, pattern=r"^https://[^\s/]+$")
    env: dict[str, str] = {}


class Deploy(_Strict):
    project: str = Field(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
    project_number: str = Field(pattern=r"^[0-9]{6,20}$")
    region: str
    scheduler_location: str | None = None
    image: str
    enable_apis: bool = False
    cloudsql_instance: str | None = None
    notification_channel: str
    accounts: Accounts
    callers: dict[str, str]
    executors: Executors
    secrets: list[Secret]
    queues: dict[str, Queue]
    migrate: Migrate
    services: dict[Role, Service]

    @model_validator(mode="after")
    def _consistent(self) -> Deploy:
        problems = consistency_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived -----------------------------------------------------------

    def email(self, account_id: str) -> str:
        return f"{account_id}@{self.project}.iam.gserviceaccount.com"

    def url(self, role: Role) -> str:
        """A service's base URL: Cloud Run's deterministic one unless set."""
        service = self.services[role]
        if service.url:
            return service.url
        return f"https://{service.name}-{self.project_number}.{self.region}.run.app"

    def identity(self, name: str) -> str:
        """An invoker named in the file: one of ours, or a caller's email."""
        if name in ("scheduler", "tasks"):
            return self.email(getattr(self.accounts, name))
        return self.callers[name]

    @property
    def uptime_agent(self) -> str:
        """Cloud Monitoring's service agent: uptime checks call as it."""
        return (
            f"service-{self.project_number}"
            "@gcp-sa-monitoring-notification.iam.gserviceaccount.com"
        )

    @property
    def location(self) -> str:
        return self.scheduler_location or self.region

    def image_for(self, version: str) -> str:
        return self.image.replace("{version}", version)

    def secret_names(self) -> set[str]:
        return {secret.name for secret in self.secrets}

    def readers(self, secret: str) -> list[str]:
        """Account ids that read ``secret``, in a stable order."""
        readers = [
            service.account
            for service in self.services.values()
            if secret in service.mount_secrets.values()
            or secret in service.read_secrets
        ]
        if secret in self.migrate.mount_secrets.values():
            readers.append(self.accounts.migrate)
        return readers

    def senders(self, queue: str) -> list[Role]:
        """The services that create tasks in ``queue``."""
        return [role for role in TASK_SENDERS if self.services[role].queue == queue]

    def environment(self, role: Role, version: str) -> dict[str, str]:
        """Every variable the service starts with, besides mounted secrets."""
        service = self.services[role]
        env = {
            "SERVICE": service.package,
            "ENVIRONMENT": "production",
            "APP_VERSION": version,
            "SECRETS_BACKEND": "gcp",
            "GCP_PROJECT": self.project,
            "AUTH_MODE": "oidc",
            "SERVICE_URL": self.url(role),
            "ALLOWED_INVOKERS": ",".join(
                self.identity(name) for name in service.invokers
            ),
        }
        if service.queue is not None:
            env |= {
                "TASKS_BACKEND": "cloudtasks",
                "TASKS_QUEUE": service.queue,
                "TASKS_LOCATION": self.region,
                "TASKS_SERVICE_ACCOUNT": self.email(self.accounts.tasks),
            }
        if role == "microbatch":
            env["SWAP_EXECUTOR_URL"] = self.executors.swap.url
            env["BATCH_PROCESSOR_URL"] = self.url("batch")
        if role == "batch":
            env["PAYOUT_EXECUTOR_URL"] = self.executors.payout.url
            env["MICRO_BATCH_PROCESSOR_URL"] = self.url("microbatch")
        return env | service.env


def consistency_problems(config: Deploy) -> list[str]:
    """What the fields say that cannot all be true at once."""
    problems = []
    declared = config.secret_names()
    invoker_names = {"scheduler", "tasks", *config.callers}
    for email in config.callers.values():
        if not _EMAIL.match(email):
            problems.append(f"callers: {email!r} is not an email address")
    accounts = [config.accounts.scheduler, config.accounts.tasks]
    accounts += [config.accounts.migrate]
    accounts += [service.account for service in config.services.values()]
    for account in accounts:
        if not _ACCOUNT_ID.match(account):
            problems.append(f"{account!r} is not a service account id (6-30 chars)")
    if len(set(accounts)) != len(accounts):
        problems.append("accounts: each service and identity needs its own account")
    missing_roles = [role for role in ROLES if role not in config.services]
    for role in missing_roles:
        problems.append(f"services.{role}: Field required")
    for name in config.migrate.mount_secrets.values():
        if name not in declared:
            problems.append(f"migrate.mount_secrets: secret {name!r} is not declared")
    for role, service in config.services.items():
        where = f"services.{role}"
        for name in [*service.mount_secrets.values(), *service.read_secrets]:
            if name not in declared:
                problems.append(f"{where}: secret {name!r} is not declared")
        for name in service.invokers:
            if name not in invoker_names:
                problems.append(f"{where}.invokers: {name!r} is no known identity")
        overridden = sorted(DERIVED_ENV & set(service.env))
        if overridden:
            problems.append(f"{where}.env: set by the deploy: {', '.join(overridden)}")
        bad_values = [key for key, value in service.env.items() if ";" in value]
        if bad_values:
            problems.append(f"{where}.env: ';' is not allowed in {bad_values}")
        if service.queue is not None and service.queue not in config.queues:
            problems.append(f"{where}.queue: queue {service.queue!r} is not declared")
        problems += _role_problems(config, role, service)
    return problems


def _role_problems(config: Deploy, role: Role, service: Service) -> list[str]:
    where = f"services.{role}"
    problems = []
    scheduled = role in ("microbatch", "batch")
    if scheduled:
        # The incident this suite answers: a scheduled service that the
        # scheduler cannot call is a job that silently never runs.
        for needed in ("scheduler", "tasks"):
            if needed not in service.invokers:
                problems.append(f"{where}.invokers: must include {needed!r}")
        if service.public:
            problems.append(f"{where}.public: a processor is never public")
        if service.queue in config.queues:
            problems += _queue_problems(config, role, service)
    if service.queue is None:
        problems.append(f"{where}.queue: Field required")
    if role == "accumulator" and not service.public:
        problems.append(
            f"{where}.public: NOWPayments posts IPNs without a Google identity"
        )
    return problems


def _queue_problems(config: Deploy, role: Role, service: Service) -> list[str]:
    """A queue must keep retrying until the stale-batch alarm has fired."""
    assert service.queue is not None
    queue = config.queues[service.queue]
    stale_after = int(service.env.get("SWAP_STALE_AFTER", "7200"))
    problems = []
    if queue.max_retry_duration_s <= stale_after:
        problems.append(
            f"queues.{service.queue}.max_retry_duration_s: must outlast "
            f"SWAP_STALE_AFTER of {role} ({stale_after} s), or a task is "
            "dropped before anyone is told its batch is stuck"
        )
    if queue.min_backoff_s > queue.max_backoff_s:
        problems.append(f"queues.{service.queue}: min_backoff_s > max_backoff_s")
    return problems


def _describe(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(file)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "value_error" and not item["loc"]:
            problems += message.split("; ")
        else:
            problems.append(f"{where}: {message}")
    return problems


def parse(raw: Mapping[str, object]) -> Deploy:
    try:
        return Deploy.model_validate(raw)
    except ValidationError as error:
        raise DeployConfigError(_describe(error)) from None


def load(path: Path) -> Deploy:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise DeployConfigError([f"{path}: {error}"]) from None
    return parse(raw)
