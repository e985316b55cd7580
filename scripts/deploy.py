"""Deploy the suite to Google Cloud from one file: ``scripts/deploy.toml``.

    python -m scripts.deploy --config scripts/deploy.toml --version V [--dry-run]

Steps, in order (each one needs what the one before made):

1. the APIs, when ``enable_apis`` is set;
2. a service account per service, the migrate job, the scheduler's and the
   tasks' identities (and Cloud SQL client for those that connect);
3. the secrets: created when missing, a first version added from the
   deploying machine's variable only when there is none (never a rotation,
   never printed), and secretAccessor per secret for exactly its readers;
4. the Cloud Tasks queues, enqueuer on each queue for the service that
   fills it, and actAs on the tasks identity for those services;
5. ``payoutctl migrate`` as a Cloud Run job execution, before any new code
   starts (the services refuse an older schema);
6. the three Cloud Run services;
7. run.invoker for exactly who calls what;
8. the Cloud Scheduler jobs, by ``payoutctl scheduler ensure``;
9. the log metrics, alert policies and uptime checks of scripts/monitoring;
10. ``payoutctl smoke`` against every service's ``/health``.

Every step describes before it creates, or uses a form that is idempotent
(``run deploy``, ``run jobs deploy``, ``add-iam-policy-binding``), so a
second run updates and changes nothing that is already right. With
``--dry-run`` every command is printed, shell-quoted, one a line, and none
is run; describes then answer "not found", so the output is the plan for an
empty project.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from scripts.deploy_config import (
    ROLES,
    TASK_SENDERS,
    Deploy,
    DeployConfigError,
    Role,
    load,
)
from shared import scheduler_sync

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "scripts" / "monitoring"

APIS = (
    "run.googleapis.com",
    "iam.googleapis.com",
    "secretmanager.googleapis.com",
    "cloudtasks.googleapis.com",
    "cloudscheduler.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "sqladmin.googleapis.com",
)

_PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")
# An image tag, and a label a person can read in /health.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DeployError(Exception):
    """A step that cannot go on; nothing after it has been run."""


@dataclass(frozen=True)
class Command:
    """One command. ``key`` names the resource a describe looks for and a
    create makes (for fakes); ``stdin_env`` names the variable whose value
    is the command's standard input, so the value is never on a line."""

    argv: tuple[str, ...]
    key: tuple[str, ...] | None = field(default=None, compare=False)
    creates: bool = field(default=False, compare=False)
    stdin_env: str | None = None

    @property
    def line(self) -> str:
        text = shlex.join(self.argv)
        if self.stdin_env:
            return f'printf %s "${self.stdin_env}" | {text}'
        return text


class Runner(Protocol):
    def note(self, text: str) -> None: ...

    def exists(self, command: Command) -> bool:
        """Run a describe: does the resource exist?"""
        ...

    def output(self, command: Command) -> str:
        """Run a read and return what it printed, stripped."""
        ...

    def run(self, command: Command) -> None:
        """Run a change; raise ``DeployError`` when it fails."""
        ...


class DryRun:
    """Prints every command and runs none; every describe says not found."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out

    def note(self, text: str) -> None:
        print(f"# {text}", file=self._out)

    def exists(self, command: Command) -> bool:
        print(command.line, file=self._out)
        return False

    def output(self, command: Command) -> str:
        print(command.line, file=self._out)
        return ""

    def run(self, command: Command) -> None:
        print(command.line, file=self._out)


class Subprocess:
    """Runs each command for real, printing it first (never a value)."""

    def __init__(self, environ: Mapping[str, str], out: TextIO = sys.stdout) -> None:
        bin_dir = Path(sys.executable).parent
        self._env = {**environ, "PATH": f"{bin_dir}{os.pathsep}{environ['PATH']}"}
        self._out = out

    def note(self, text: str) -> None:
        print(f"# {text}", file=self._out, flush=True)

    def exists(self, command: Command) -> bool:
        print(command.line, file=self._out, flush=True)
        done = subprocess.run(
            command.argv, capture_output=True, env=self._env, cwd=ROOT, check=False
        )
        return done.returncode == 0

    def output(self, command: Command) -> str:
        print(command.line, file=self._out, flush=True)
        done = subprocess.run(
            command.argv, capture_output=True, text=True, env=self._env, cwd=ROOT
        )
        if done.returncode != 0:
            raise DeployError(f"{command.line}: {done.stderr.strip()}")
        return done.stdout.strip()

    def run(self, command: Command) -> None:
        print(command.line, file=self._out, flush=True)
        value = None
        if command.stdin_env is not None:
            value = self._env.get(command.stdin_env, "").strip()
            if not value:
                raise DeployError(
                    f"{command.argv[3]} has no version yet: export "
                    f"{command.stdin_env} with its value and deploy again"
                )
        done = subprocess.run(
            command.argv, input=value, text=True, env=self._env, cwd=ROOT
        )
        if done.returncode != 0:
            raise DeployError(f"failed (exit {done.returncode}): {command.line}")


def _member(email: str) -> str:
    kind = "serviceAccount" if email.endswith(".gserviceaccount.com") else "user"
    return f"{kind}:{email}"


def _host(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _env_flag(name: str, env: Mapping[str, str]) -> str:
    """``--set-env-vars``; values with commas (ALLOWED_INVOKERS) need gcloud's
    other delimiter, written ``^;^`` before the list."""
    pairs = [f"{key}={value}" for key, value in env.items()]
    if any("," in value for value in env.values()):
        return f"{name}=^;^" + ";".join(pairs)
    return f"{name}=" + ",".join(pairs)


def _secrets_flag(mounts: Mapping[str, str]) -> str:
    return "--set-secrets=" + ",".join(
        f"{variable}={secret}:latest" for variable, secret in mounts.items()
    )


class Deployment:
    """The steps of one deploy of ``config`` at ``version`` through ``runner``."""

    def __init__(
        self, config: Deploy, version: str, runner: Runner, work_dir: Path
    ) -> None:
        self.config = config
        self.version = version
        self.runner = runner
        self.work_dir = work_dir
        self.scheduler_env = self._scheduler_env()
        # Checked now, so a declaration this config cannot fill stops the
        # deploy before its first command rather than at step 8.
        try:
            scheduler_sync.load(environ=self.scheduler_env)
        except scheduler_sync.DeclarationError as error:
            raise DeployConfigError([str(error)]) from None

    # --- helpers -------------------------------------------------------------

    def gcloud(self, *args: str) -> tuple[str, ...]:
        return ("gcloud", *args, f"--project={self.config.project}")

    def ensure(
        self,
        key: tuple[str, ...],
        describe: tuple[str, ...],
        create: tuple[str, ...],
        update: tuple[str, ...] | None = None,
    ) -> None:
        """Create when the describe fails; else update (when it can be)."""
        if self.runner.exists(Command(describe, key)):
            if update is not None:
                self.runner.run(Command(update, key))
            return
        self.runner.run(Command(create, key, creates=True))

    def bind(self, *args: str) -> None:
        self.runner.run(Command(self.gcloud(*args)))

    def path(self, file: Path) -> str:
        try:
            return str(file.relative_to(ROOT))
        except ValueError:
            return str(file)

    def _scheduler_env(self) -> dict[str, str]:
        return {
            "GCP_PROJECT": self.config.project,
            "SCHEDULER_LOCATION": self.config.location,
            "SCHEDULER_SERVICE_ACCOUNT": self.config.email(
                self.config.accounts.scheduler
            ),
            "MICRO_BATCH_PROCESSOR_URL": self.config.url("microbatch"),
            "BATCH_PROCESSOR_URL": self.config.url("batch"),
        }

    # --- the steps -----------------------------------------------------------

    def all(self) -> None:
        steps = [
            ("APIs", self.enable_apis),
            ("service accounts", self.service_accounts),
            ("secrets and who reads them", self.secrets),
            ("Cloud Tasks queues and who fills them", self.queues),
            ("migrations (payoutctl migrate as a Cloud Run job)", self.migrate),
            ("Cloud Run services", self.services),
            ("run.invoker: who may call what", self.invokers),
            ("Cloud Scheduler jobs (scripts/scheduler_jobs.toml)", self.scheduler),
            ("alerting (scripts/monitoring)", self.monitoring),
            ("smoke: each service's /health at the new version", self.smoke),
        ]
        for number, (title, step) in enumerate(steps, 1):
            self.runner.note(f"{number}. {title}")
            step()

    def enable_apis(self) -> None:
        if not self.config.enable_apis:
            self.runner.note("enable_apis is false: skipped")
            return
        self.runner.run(Command(self.gcloud("services", "enable", *APIS)))

    def _accounts(self) -> Iterator[tuple[str, str]]:
        """(account id, what it is) for every account the deploy owns."""
        for role in ROLES:
            service = self.config.services[role]
            yield service.account, f"payouts {service.name}"
        accounts = self.config.accounts
        yield accounts.migrate, "payouts migrations job"
        yield accounts.scheduler, "payouts Cloud Scheduler caller"
        yield accounts.tasks, "payouts Cloud Tasks caller"

    def service_accounts(self) -> None:
        for account, title in self._accounts():
            email = self.config.email(account)
            self.ensure(
                ("service-account", email),
                self.gcloud("iam", "service-accounts", "describe", email),
                self.gcloud(
                    "iam",
                    "service-accounts",
                    "create",
                    account,
                    f"--display-name={title}",
                ),
            )
        if self.config.cloudsql_instance is None:
            return
        connecting = [self.config.services[role].account for role in ROLES]
        for account in [*connecting, self.config.accounts.migrate]:
            self.bind(
                "projects",
                "add-iam-policy-binding",
                self.config.project,
                f"--member={_member(self.config.email(account))}",
                "--role=roles/cloudsql.client",
                "--condition=None",
            )

    def secrets(self) -> None:
        for secret in self.config.secrets:
            self.ensure(
                ("secret", secret.name),
                self.gcloud("secrets", "describe", secret.name),
                self.gcloud(
                    "secrets",
                    "create",
                    secret.name,
                    "--replication-policy=automatic",
                ),
            )
            versions = self.gcloud(
                "secrets",
                "versions",
                "list",
                secret.name,
                "--filter=state:enabled",
                "--limit=1",
                "--format=value(name)",
            )
            key = ("secret-version", secret.name)
            # Only a secret with no value gets one: a deploy never rotates.
            if not self.runner.output(Command(versions, key)):
                add = self.gcloud(
                    "secrets", "versions", "add", secret.name, "--data-file=-"
                )
                self.runner.run(
                    Command(add, key, creates=True, stdin_env=secret.value_env)
                )
            for account in self.config.readers(secret.name):
                self.bind(
                    "secrets",
                    "add-iam-policy-binding",
                    secret.name,
                    f"--member={_member(self.config.email(account))}",
                    "--role=roles/secretmanager.secretAccessor",
                )

    def queues(self) -> None:
        location = f"--location={self.config.region}"
        for name, queue in self.config.queues.items():
            settings = (
                location,
                f"--max-attempts={queue.max_attempts}",
                f"--max-retry-duration={queue.max_retry_duration_s}s",
                f"--min-backoff={queue.min_backoff_s}s",
                f"--max-backoff={queue.max_backoff_s}s",
                f"--max-doublings={queue.max_doublings}",
                f"--max-dispatches-per-second={queue.max_dispatches_per_second:g}",
                f"--max-concurrent-dispatches={queue.max_concurrent_dispatches}",
            )
            self.ensure(
                ("queue", name),
                self.gcloud("tasks", "queues", "describe", name, location),
                self.gcloud("tasks", "queues", "create", name, *settings),
                self.gcloud("tasks", "queues", "update", name, *settings),
            )
            for role in self.config.senders(name):
                sender = self.config.email(self.config.services[role].account)
                self.bind(
                    "tasks",
                    "queues",
                    "add-iam-policy-binding",
                    name,
                    location,
                    f"--member={_member(sender)}",
                    "--role=roles/cloudtasks.enqueuer",
                )
        tasks_identity = self.config.email(self.config.accounts.tasks)
        for role in TASK_SENDERS:
            service = self.config.services[role]
            # Creating a task with an OIDC token for the tasks identity is
            # acting as it.
            self.bind(
                "iam",
                "service-accounts",
                "add-iam-policy-binding",
                tasks_identity,
                f"--member={_member(self.config.email(service.account))}",
                "--role=roles/iam.serviceAccountUser",
            )

    def _cloudsql(self) -> tuple[str, ...]:
        instance = self.config.cloudsql_instance
        return (f"--set-cloudsql-instances={instance}",) if instance else ()

    def migrate(self) -> None:
        migrate = self.config.migrate
        region = f"--region={self.config.region}"
        env = {
            "ENVIRONMENT": "production",
            "APP_VERSION": self.version,
            "SECRETS_BACKEND": "gcp",
            "GCP_PROJECT": self.config.project,
        }
        self.runner.run(
            Command(
                self.gcloud(
                    "run",
                    "jobs",
                    "deploy",
                    migrate.job,
                    region,
                    f"--image={self.config.image_for(self.version)}",
                    f"--service-account={self.config.email(self.config.accounts.migrate)}",
                    "--command=payoutctl",
                    "--args=migrate",
                    _env_flag("--set-env-vars", env),
                    _secrets_flag(migrate.mount_secrets),
                    *self._cloudsql(),
                    # A failed migration is looked at, not retried blindly.
                    "--max-retries=0",
                    f"--task-timeout={migrate.task_timeout_s}s",
                    "--quiet",
                )
            )
        )
        self.runner.run(
            Command(
                self.gcloud(
                    "run", "jobs", "execute", migrate.job, region, "--wait", "--quiet"
                )
            )
        )

    def deploy_command(self, role: Role) -> tuple[str, ...]:
        service = self.config.services[role]
        access = (
            "--allow-unauthenticated"
            if service.public
            else ("--no-allow-unauthenticated")
        )
        flags = [
            f"--region={self.config.region}",
            f"--image={self.config.image_for(self.version)}",
            f"--service-account={self.config.email(service.account)}",
            _env_flag("--set-env-vars", self.config.environment(role, self.version)),
        ]
        if service.mount_secrets:
            flags.append(_secrets_flag(service.mount_secrets))
        flags += [
            access,
            f"--ingress={service.ingress}",
            f"--timeout={service.timeout_s}s",
            f"--concurrency={service.concurrency}",
            f"--cpu={service.cpu}",
            f"--memory={service.memory}",
            f"--min-instances={service.min_instances}",
            f"--max-instances={service.max_instances}",
            *self._cloudsql(),
            "--quiet",
        ]
        return self.gcloud("run", "deploy", service.name, *flags)

    def services(self) -> None:
        for role in ROLES:
            self.runner.run(Command(self.deploy_command(role)))

    def invoker_bindings(self) -> list[tuple[str, str, str]]:
        """(service, region, member) for every run.invoker the deploy grants."""
        config = self.config
        bindings = []
        for role in ROLES:
            service = config.services[role]
            members = [config.identity(name) for name in service.invokers]
            if not service.public:
                # The uptime checks of scripts/monitoring call /health as
                # Cloud Monitoring's agent; a public service needs no grant.
                members.append(config.uptime_agent)
            for email in members:
                bindings.append((service.name, config.region, _member(email)))
        tasks_identity = _member(config.email(config.accounts.tasks))
        for executor in (config.executors.swap, config.executors.payout):
            if executor.service is not None:
                region = executor.region or config.region
                bindings.append((executor.service, region, tasks_identity))
        return bindings

    def invokers(self) -> None:
        executors = {
            executor.service: executor.project
            for executor in (self.config.executors.swap, self.config.executors.payout)
        }
        for service, region, member in self.invoker_bindings():
            argv = self.gcloud(
                "run",
                "services",
                "add-iam-policy-binding",
                service,
                f"--region={region}",
                f"--member={member}",
                "--role=roles/run.invoker",
            )
            project = executors.get(service)
            if project:
                argv = (*argv[:-1], f"--project={project}")
            self.runner.run(Command(argv))

    def scheduler(self) -> None:
        assignments = [f"{key}={value}" for key, value in self.scheduler_env.items()]
        argv = ("env", *assignments, "payoutctl", "scheduler", "ensure")
        self.runner.run(Command(argv))

    # --- alerting ------------------------------------------------------------

    def placeholders(self) -> dict[str, str]:
        config = self.config
        return {
            "GCP_PROJECT": config.project,
            "NOTIFICATION_CHANNEL": config.notification_channel,
            "ACCUMULATOR_HOST": _host(config.url("accumulator")),
            "MICRO_BATCH_PROCESSOR_HOST": _host(config.url("microbatch")),
            "BATCH_PROCESSOR_HOST": _host(config.url("batch")),
        }

    def monitoring_file(self, name: str) -> list[dict[str, Any]]:
        """A file of scripts/monitoring with its placeholders filled."""
        values = self.placeholders()
        text = (MONITORING / f"{name}.json").read_text()
        unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
        if unknown:
            raise DeployConfigError(
                [f"scripts/monitoring/{name}.json: no value for {unknown}"]
            )
        filled = _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)
        entries: list[dict[str, Any]] = json.loads(filled)
        return entries

    def write(self, name: str, content: dict[str, Any]) -> str:
        folder = self.work_dir / "monitoring"
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / name
        file.write_text(json.dumps(content, indent=2) + "\n")
        return self.path(file)

    def monitoring(self) -> None:
        for metric in self.monitoring_file("log_metrics"):
            name = metric["name"]
            source = f"--config-from-file={self.write(f'metric-{name}.json', metric)}"
            self.ensure(
                ("log-metric", name),
                self.gcloud("logging", "metrics", "describe", name),
                self.gcloud("logging", "metrics", "create", name, source),
                self.gcloud("logging", "metrics", "update", name, source),
            )
        for number, policy in enumerate(self.monitoring_file("alert_policies"), 1):
            source = f"--policy-from-file={self.write(f'policy-{number}.json', policy)}"
            self._by_display_name(
                ("alert-policy", policy["displayName"]),
                ("monitoring", "policies"),
                ("list",),
                ("create", source),
                ("update", source),
            )
        for check in self.monitoring_file("uptime_checks"):
            create, update = _uptime_flags(check)
            self._by_display_name(
                ("uptime-check", check["displayName"]),
                ("monitoring", "uptime"),
                ("list-configs",),
                ("create", check["displayName"], *create),
                ("update", *update),
            )

    def _by_display_name(
        self,
        key: tuple[str, ...],
        group: tuple[str, ...],
        lister: tuple[str, ...],
        create: tuple[str, ...],
        update: tuple[str, ...],
    ) -> None:
        """Policies and uptime checks are named by Google: find ours by
        display name, update it when found, else create it."""
        found = self.runner.output(
            Command(
                self.gcloud(
                    *group,
                    *lister,
                    f'--filter=displayName="{key[1]}"',
                    "--format=value(name)",
                ),
                key,
            )
        )
        if found:
            name = found.splitlines()[0]
            self.runner.run(Command(self.gcloud(*group, update[0], name, *update[1:])))
            return
        self.runner.run(Command(self.gcloud(*group, *create), key, creates=True))

    def smoke(self) -> None:
        argv: list[str] = ["payoutctl", "smoke"]
        for role in ROLES:
            argv += [
                "--url",
                f"{self.config.services[role].name}={self.config.url(role)}",
            ]
        argv += ["--expect-version", self.version]
        self.runner.run(Command(tuple(argv)))


def _uptime_flags(check: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """gcloud's flags for an UptimeCheckConfig (gcloud takes no file)."""
    http = check["httpCheck"]
    labels = check["monitoredResource"]["labels"]
    classes = ",".join(
        entry["statusClass"].removeprefix("STATUS_CLASS_").lower()
        for entry in http["acceptedResponseStatusCodes"]
    )
    period_minutes = int(check["period"].removesuffix("s")) // 60
    common = [
        f"--path={http['path']}",
        f"--port={http['port']}",
        f"--request-method={http['requestMethod'].lower()}",
        f"--validate-ssl={str(http['validateSsl']).lower()}",
        "--service-agent-auth=oidc-token",
        f"--period={period_minutes}",
        f"--timeout={check['timeout'].removesuffix('s')}",
    ]
    resource = [
        "--resource-type=uptime-url",
        f"--resource-labels=host={labels['host']},project_id={labels['project_id']}",
        "--protocol=https" if http["useSsl"] else "--protocol=http",
    ]
    return (
        [*resource, *common, f"--status-classes={classes}"],
        [*common, f"--set-status-classes={classes}"],
    )


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(description="Deploy the suite to Google Cloud.")
    parser.add_argument("--config", type=Path, default=ROOT / "scripts/deploy.toml")
    parser.add_argument("--version", required=True, help="The version to deploy.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the commands; run none."
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / ".deploy",
        help="Where the filled-in monitoring files are written.",
    )
    args = parser.parse_args(argv)

    try:
        if not _VERSION.match(args.version):
            raise DeployConfigError(
                [f"--version: {args.version!r} is not an image tag"]
            )
        config = load(args.config)
        runner: Runner = DryRun(out) if args.dry_run else Subprocess(os.environ, out)
        deployment = Deployment(config, args.version, runner, args.work_dir)
        if args.dry_run:
            runner.note(
                f"dry run of {args.config.name} at version {args.version}: "
                "nothing is run; describes answer not found (an empty project)"
            )
        deployment.all()
    except DeployConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except DeployError as error:
        print(f"deploy stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
