"""The deploy script: what its dry run would do, and that a rerun is safe.

Nothing here reaches Google: the dry run prints, and the fake cloud below
answers describes from what earlier commands created.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from scripts import deploy
from scripts.deploy_config import DeployConfigError, parse
from shared import scheduler_sync
from shared.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "scripts" / "deploy.toml"
MONITORING = ROOT / "scripts" / "monitoring"
VERSION = "v1.4.0"
PROJECT = "payouts-prod"
SA = "@payouts-prod.iam.gserviceaccount.com"
UPTIME_AGENT = (
    "service-123456789012@gcp-sa-monitoring-notification.iam.gserviceaccount.com"
)
SECRET_VALUES = {
    "PAYOUTS_DATABASE_URL": "postgresql://payouts:sup3r-s3cret-pw@/payouts",
    "PAYOUTS_NOWPAYMENTS_IPN_SECRET": "ipn-hmac-key-never-printed",
    "PAYOUTS_MICRO_BATCH_THRESHOLD_USD": "987.654321",
}


def dry_run(tmp_path: Path) -> str:
    out = io.StringIO()
    code = deploy.main(
        [
            "--config",
            str(SAMPLE),
            "--version",
            VERSION,
            "--dry-run",
            "--work-dir",
            str(tmp_path),
        ],
        out=out,
    )
    assert code == 0
    return out.getvalue()


def commands(output: str) -> list[list[str]]:
    """The printed commands as argv lists (a piped secret: its gcloud part)."""
    argvs = []
    for line in output.splitlines():
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line.split(" | ", 1)[-1])
        argvs.append(argv)
    return argvs


def flags(argv: list[str]) -> dict[str, str]:
    found = {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            found[name] = value
    return found


def env_vars(flag_value: str) -> dict[str, str]:
    """gcloud's --set-env-vars value, with its ^;^ delimiter when present."""
    separator = ","
    if flag_value.startswith("^;^"):
        separator, flag_value = ";", flag_value.removeprefix("^;^")
    return dict(pair.split("=", 1) for pair in flag_value.split(separator))


def run_deploys(argvs: list[list[str]]) -> dict[str, list[str]]:
    return {argv[3]: argv for argv in argvs if argv[:3] == ["gcloud", "run", "deploy"]}


@pytest.fixture
def output(tmp_path: Path) -> str:
    return dry_run(tmp_path)


@pytest.fixture
def argvs(output: str) -> list[list[str]]:
    return commands(output)


def test_every_service_is_deployed_with_its_image_identity_and_version(
    argvs: list[list[str]],
) -> None:
    deployed = run_deploys(argvs)

    assert set(deployed) == {
        "gcaccumulator",
        "gcmicrobatchprocessor",
        "gcbatchprocessor",
    }
    accounts = {
        "gcaccumulator": "payouts-accumulator",
        "gcmicrobatchprocessor": "payouts-microbatch",
        "gcbatchprocessor": "payouts-batch",
    }
    for name, argv in deployed.items():
        given = flags(argv)
        assert given["--image"].endswith(f"/suite:{VERSION}")
        assert given["--service-account"] == accounts[name] + SA
        assert given["--project"] == PROJECT
        assert given["--region"] == "europe-west1"
        # The image's entry point serves the package SERVICE names.
        assert "--command" not in given and "--args" not in given
        assert given["--set-cloudsql-instances"] == "payouts-prod:europe-west1:payouts"
        assert "--quiet" in argv
        env = env_vars(given["--set-env-vars"])
        assert env["APP_VERSION"] == VERSION
        assert env["SERVICE"] == name
        assert env["ENVIRONMENT"] == "production"
        assert env["SERVICE_URL"] == f"https://{name}-123456789012.europe-west1.run.app"


def test_processors_are_private_and_the_accumulator_public_for_nowpayments(
    argvs: list[list[str]],
) -> None:
    deployed = run_deploys(argvs)

    accumulator = deployed["gcaccumulator"]
    assert "--allow-unauthenticated" in accumulator
    assert "--no-allow-unauthenticated" not in accumulator
    for processor in ("gcmicrobatchprocessor", "gcbatchprocessor"):
        assert "--no-allow-unauthenticated" in deployed[processor]
        assert "--allow-unauthenticated" not in deployed[processor]
        # Above gunicorn's 120 s, below the scheduler's attempt deadline.
        assert flags(deployed[processor])["--timeout"] == "150s"
    assert flags(accumulator)["--timeout"] == "30s"
    every_member = [flags(argv).get("--member", "") for argv in argvs]
    assert not any(m in ("allUsers", "allAuthenticatedUsers") for m in every_member)


def test_each_service_starts_with_what_the_real_config_loader_requires(
    argvs: list[list[str]],
) -> None:
    class Secrets:
        def get(self, name: str) -> str:
            return {"NOWPAYMENTS_IPN_SECRET": "k", "MICRO_BATCH_THRESHOLD_USD": "25"}[
                name
            ]

    roles = {
        "gcaccumulator": "accumulator",
        "gcmicrobatchprocessor": "microbatch",
        "gcbatchprocessor": "batch",
    }
    for name, argv in run_deploys(argvs).items():
        given = flags(argv)
        environ = env_vars(given["--set-env-vars"])
        mounted = dict(pair.split("=", 1) for pair in given["--set-secrets"].split(","))
        assert mounted == {"DATABASE_URL": "payouts-database-url:latest"}
        # What Cloud Run puts in the variable at start, here a stand-in.
        environ["DATABASE_URL"] = "postgresql://payouts@/payouts"

        config = load_config(roles[name], environ, secrets=Secrets())  # type: ignore[arg-type]

        assert config.settings.environment == "production"
        assert config.settings.version == VERSION


def invoker_grants(argvs: list[list[str]]) -> set[tuple[str, str]]:
    return {
        (argv[4], flags(argv)["--member"])
        for argv in argvs
        if argv[:4] == ["gcloud", "run", "services", "add-iam-policy-binding"]
        and flags(argv)["--role"] == "roles/run.invoker"
    }


def test_invoker_bindings_are_exactly_who_must_call_what(
    argvs: list[list[str]],
) -> None:
    scheduler = f"serviceAccount:payouts-scheduler{SA}"
    tasks = f"serviceAccount:payouts-tasks{SA}"
    uptime = f"serviceAccount:{UPTIME_AGENT}"

    assert invoker_grants(argvs) == {
        # The router's /payments (the service is public for /ipn).
        ("gcaccumulator", f"serviceAccount:payment-router{SA}"),
        # Scheduled runs, the sibling's watchdog trigger (a task), the
        # executor's callback, the uptime check on /health.
        ("gcmicrobatchprocessor", scheduler),
        ("gcmicrobatchprocessor", tasks),
        ("gcmicrobatchprocessor", f"serviceAccount:swap-executor{SA}"),
        ("gcmicrobatchprocessor", uptime),
        ("gcbatchprocessor", scheduler),
        ("gcbatchprocessor", tasks),
        ("gcbatchprocessor", f"serviceAccount:payout-executor{SA}"),
        ("gcbatchprocessor", uptime),
        # Our tasks reach the executors.
        ("swap-executor", tasks),
        ("payout-executor", tasks),
    }


def test_allowed_invokers_match_the_invoker_bindings_of_each_service(
    argvs: list[list[str]],
) -> None:
    grants = invoker_grants(argvs)

    for name, argv in run_deploys(argvs).items():
        allowed = env_vars(flags(argv)["--set-env-vars"])["ALLOWED_INVOKERS"]
        members = {
            member.removeprefix("serviceAccount:")
            for service, member in grants
            if service == name
        }
        # The uptime agent only reads /health, which needs no app-level auth.
        assert set(allowed.split(",")) == members - {UPTIME_AGENT}


def test_secrets_are_mounted_by_reference_and_no_value_is_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRET_VALUES.items():
        monkeypatch.setenv(name, value)

    output = dry_run(tmp_path)

    for value in SECRET_VALUES.values():
        assert value not in output
        for written in tmp_path.rglob("*"):
            if written.is_file():
                assert value not in written.read_text()
    adds = [line for line in output.splitlines() if "secrets versions add" in line]
    assert adds == [
        'printf %s "$PAYOUTS_DATABASE_URL" | gcloud secrets versions add '
        "payouts-database-url --data-file=- --project=payouts-prod",
        'printf %s "$PAYOUTS_NOWPAYMENTS_IPN_SECRET" | gcloud secrets versions '
        "add NOWPAYMENTS_IPN_SECRET --data-file=- --project=payouts-prod",
        'printf %s "$PAYOUTS_MICRO_BATCH_THRESHOLD_USD" | gcloud secrets versions '
        "add MICRO_BATCH_THRESHOLD_USD --data-file=- --project=payouts-prod",
    ]
    config = tomllib.loads(SAMPLE.read_text())
    assert not any(value in json.dumps(config) for value in SECRET_VALUES.values())


def test_each_secret_is_readable_only_by_the_accounts_that_read_it(
    argvs: list[list[str]],
) -> None:
    readers: dict[str, set[str]] = {}
    for argv in argvs:
        if argv[:3] == ["gcloud", "secrets", "add-iam-policy-binding"]:
            assert flags(argv)["--role"] == "roles/secretmanager.secretAccessor"
            member = flags(argv)["--member"].removeprefix("serviceAccount:")
            readers.setdefault(argv[3], set()).add(member.removesuffix(SA))

    assert readers == {
        "payouts-database-url": {
            "payouts-accumulator",
            "payouts-microbatch",
            "payouts-batch",
            "payouts-migrate",
        },
        "NOWPAYMENTS_IPN_SECRET": {"payouts-accumulator"},
        "MICRO_BATCH_THRESHOLD_USD": {"payouts-microbatch"},
    }


def test_queues_retry_longer_than_a_batch_takes_to_be_reported_stale(
    argvs: list[list[str]],
) -> None:
    created = {
        argv[4]: flags(argv)
        for argv in argvs
        if argv[:4] == ["gcloud", "tasks", "queues", "create"]
    }

    assert set(created) == {"payouts-swaps", "payouts-payouts"}
    for queue in created.values():
        assert queue["--location"] == "europe-west1"
        retry_s = int(queue["--max-retry-duration"].removesuffix("s"))
        assert retry_s > 7200  # SWAP_STALE_AFTER: the alert comes first
        assert int(queue["--max-attempts"]) >= 1
        assert queue["--min-backoff"] == "10s"
        assert queue["--max-backoff"] == "600s"
        assert "--max-doublings" in queue
    enqueuers = {
        (argv[4], flags(argv)["--member"])
        for argv in argvs
        if argv[:4] == ["gcloud", "tasks", "queues", "add-iam-policy-binding"]
    }
    assert enqueuers == {
        ("payouts-swaps", f"serviceAccount:payouts-microbatch{SA}"),
        ("payouts-payouts", f"serviceAccount:payouts-batch{SA}"),
    }
    act_as = {
        (argv[4], flags(argv)["--member"], flags(argv)["--role"])
        for argv in argvs
        if argv[:4] == ["gcloud", "iam", "service-accounts", "add-iam-policy-binding"]
    }
    assert act_as == {
        (
            f"payouts-tasks{SA}",
            f"serviceAccount:{who}{SA}",
            "roles/iam.serviceAccountUser",
        )
        for who in ("payouts-microbatch", "payouts-batch")
    }


def test_scheduler_ensure_runs_with_a_declaration_it_can_fill(
    argvs: list[list[str]],
) -> None:
    [ensure] = [
        argv for argv in argvs if argv[-3:] == ["payoutctl", "scheduler", "ensure"]
    ]
    assert ensure[0] == "env"
    environ = dict(pair.split("=", 1) for pair in ensure[1:-3])

    declaration = scheduler_sync.load(environ=environ)

    uris = {job.job: job.uri for job in declaration.jobs}
    assert uris == {
        "check-threshold": "https://gcmicrobatchprocessor-123456789012"
        ".europe-west1.run.app/check-threshold",
        "process": "https://gcbatchprocessor-123456789012.europe-west1.run.app/process",
    }
    assert {job.service_account for job in declaration.jobs} == {
        f"payouts-scheduler{SA}"
    }


def test_every_alerting_file_is_applied_filled_in(
    argvs: list[list[str]], tmp_path: Path
) -> None:
    metrics = json.loads((MONITORING / "log_metrics.json").read_text())
    policies = json.loads((MONITORING / "alert_policies.json").read_text())
    checks = json.loads((MONITORING / "uptime_checks.json").read_text())

    created_metrics = {
        argv[4]: flags(argv)["--config-from-file"]
        for argv in argvs
        if argv[:4] == ["gcloud", "logging", "metrics", "create"]
    }
    assert set(created_metrics) == {metric["name"] for metric in metrics}
    policy_files = [
        Path(flags(argv)["--policy-from-file"])
        for argv in argvs
        if argv[:4] == ["gcloud", "monitoring", "policies", "create"]
    ]
    applied = [json.loads(file.read_text()) for file in policy_files]
    assert [policy["displayName"] for policy in applied] == [
        policy["displayName"] for policy in policies
    ]
    for policy in applied:
        assert policy["notificationChannels"] == [
            "projects/payouts-prod/notificationChannels/4242424242424242"
        ]
    uptime = [
        argv
        for argv in argvs
        if argv[:4] == ["gcloud", "monitoring", "uptime", "create"]
    ]
    assert [argv[4] for argv in uptime] == [check["displayName"] for check in checks]
    for argv in uptime:
        given = flags(argv)
        assert given["--path"] == "/health"
        assert given["--service-agent-auth"] == "oidc-token"
        assert given["--status-classes"] == "2xx"
        assert re.match(
            r"host=gc[a-z]+-123456789012\.europe-west1\.run\.app,project_id=payouts-prod$",
            given["--resource-labels"],
        )
    for file in tmp_path.rglob("*.json"):
        assert "${" not in file.read_text()


def test_steps_run_in_an_order_where_each_finds_what_it_needs(
    output: str, argvs: list[list[str]]
) -> None:
    lines = [" ".join(argv) for argv in argvs]

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    def last(text: str) -> int:
        return max(i for i, line in enumerate(lines) if text in line)

    assert last("secrets add-iam-policy-binding") < first("run jobs deploy")
    assert last("tasks queues add-iam-policy-binding") < first("run jobs deploy")
    assert first("run jobs execute payouts-migrate") < first("gcloud run deploy")
    assert last("gcloud run deploy") < first("run services add-iam-policy-binding")
    assert last("run services add-iam-policy-binding") < first("scheduler ensure")
    assert first("scheduler ensure") < first("logging metrics")
    assert lines[-1].startswith("payoutctl smoke")
    smoke = argvs[-1]
    assert smoke[smoke.index("--expect-version") + 1] == VERSION
    assert argvs[-1].count("--url") == 3
    assert "nothing is run" in output.splitlines()[0]


class FakeCloud:
    """Answers describes from what earlier runs created; records the rest."""

    def __init__(self) -> None:
        self.created: set[tuple[str, ...]] = set()
        self.commands: list[deploy.Command] = []

    def note(self, text: str) -> None:
        pass

    def exists(self, command: deploy.Command) -> bool:
        self.commands.append(command)
        return command.key in self.created

    def output(self, command: deploy.Command) -> str:
        self.commands.append(command)
        if command.key in self.created:
            return f"projects/{PROJECT}/things/{abs(hash(command.key)) % 10**6}"
        return ""

    def run(self, command: deploy.Command) -> None:
        self.commands.append(command)
        if command.creates:
            assert command.key is not None
            self.created.add(command.key)

    def take(self) -> list[deploy.Command]:
        taken, self.commands = self.commands, []
        return taken


def deploy_with(cloud: FakeCloud, tmp_path: Path) -> list[deploy.Command]:
    config = deploy.load(SAMPLE)
    deploy.Deployment(config, VERSION, cloud, tmp_path).all()
    return cloud.take()


def verbs(done: list[deploy.Command]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for command in done:
        for verb in ("create", "update"):
            if verb in command.argv:
                counts[verb] = counts.get(verb, 0) + 1
    return counts


def test_a_second_deploy_updates_what_the_first_created(tmp_path: Path) -> None:
    cloud = FakeCloud()

    first = deploy_with(cloud, tmp_path)
    second = deploy_with(cloud, tmp_path)

    # 6 accounts, 3 secrets, 2 queues, 5 metrics, 6 policies, 3 uptime checks.
    assert verbs(first) == {"create": 25}
    assert verbs(second) == {"update": 2 + 5 + 6 + 3}
    assert not [c for c in second if "versions" in c.argv and "add" in c.argv]
    updated = [c.argv for c in second if "update" in c.argv]
    assert updated[7][:4] == ("gcloud", "monitoring", "policies", "update")
    assert updated[7][4].startswith(f"projects/{PROJECT}/")
    # The idempotent forms run again, the same.
    same = [c.argv for c in first if "add-iam-policy-binding" in c.argv]
    assert same == [c.argv for c in second if "add-iam-policy-binding" in c.argv]
    deploys = [c.argv for c in first if c.argv[1:3] == ("run", "deploy")]
    assert deploys == [c.argv for c in second if c.argv[1:3] == ("run", "deploy")]


def test_the_real_runner_never_puts_a_secret_value_on_a_line(
    tmp_path: Path,
) -> None:
    cloud = FakeCloud()

    done = deploy_with(cloud, tmp_path)

    piped = [c for c in done if c.stdin_env is not None]
    assert [c.stdin_env for c in piped] == list(SECRET_VALUES)
    for command in piped:
        assert command.argv[-2:] == ("--data-file=-", "--project=payouts-prod")


def sample() -> dict[str, Any]:
    raw: dict[str, Any] = tomllib.loads(SAMPLE.read_text())
    return raw


def problems_of(raw: Mapping[str, Any]) -> list[str]:
    with pytest.raises(DeployConfigError) as refused:
        parse(raw)
    return refused.value.problems


def test_a_config_missing_a_required_field_is_refused_naming_it() -> None:
    raw = sample()
    del raw["project_number"]
    del raw["services"]["batch"]["account"]

    problems = problems_of(raw)

    assert "project_number: Field required" in problems
    assert "services.batch.account: Field required" in problems


def test_the_cli_refuses_a_bad_config_before_running_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = SAMPLE.read_text().replace('queue = "payouts-payouts"\n', "")
    path = tmp_path / "deploy.toml"
    path.write_text(raw)
    out = io.StringIO()

    code = deploy.main(
        ["--config", str(path), "--version", VERSION, "--dry-run"], out=out
    )

    assert code == 2
    assert out.getvalue() == ""
    assert "services.batch.queue: Field required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda raw: raw["queues"]["payouts-swaps"].update(
                max_retry_duration_s=3600
            ),
            "queues.payouts-swaps.max_retry_duration_s: must outlast",
        ),
        (
            lambda raw: raw["services"]["batch"]["invokers"].remove("scheduler"),
            "services.batch.invokers: must include 'scheduler'",
        ),
        (
            lambda raw: raw["services"]["microbatch"].update(public=True),
            "services.microbatch.public: a processor is never public",
        ),
        (
            lambda raw: raw["services"]["batch"]["env"].update(SERVICE_URL="https://x"),
            "services.batch.env: set by the deploy: SERVICE_URL",
        ),
        (
            lambda raw: raw["services"]["accumulator"]["read_secrets"].append("NOPE"),
            "services.accumulator: secret 'NOPE' is not declared",
        ),
        (
            lambda raw: raw["services"]["microbatch"]["invokers"].append("stranger"),
            "services.microbatch.invokers: 'stranger' is no known identity",
        ),
    ],
)
def test_a_config_that_contradicts_itself_is_refused_naming_the_field(
    change: Any, named: str
) -> None:
    raw = sample()
    change(raw)

    problems = problems_of(raw)

    assert any(problem.startswith(named) for problem in problems), problems


def test_the_sample_config_is_valid_and_a_bad_version_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parse(sample())

    code = deploy.main(["--version", "v1;rm -rf /", "--dry-run"], out=io.StringIO())

    assert code == 2
    assert "--version" in capsys.readouterr().err
