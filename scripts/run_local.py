"""``make run``: the whole local system in one terminal.

Starts the embedded PostgreSQL when ``DATABASE_URL`` is unset, applies the
migrations, then runs under honcho: the three services under gunicorn
(accumulator 8081, batch processor 8082, micro-batch processor 8083), the
sandbox executor (8084) and the local scheduler. Ctrl-C (or SIGTERM) stops
them all, then the embedded database. ``--port-base 18080`` moves every
port (the demo runs its own system that way). Variables already set in the
environment win over the local defaults.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from pathlib import Path

from honcho.manager import Manager

from shared import embedded, schema

ROOT = Path(__file__).resolve().parent.parent

# Local stand-ins for what production reads from Secret Manager and Cloud
# Run; never valid outside this machine (ENVIRONMENT=development).
LOCAL_ENV = {
    "ENVIRONMENT": "development",
    "SECRETS_BACKEND": "env",
    "AUTH_MODE": "token",
    "TASKS_BACKEND": "http",
    "PRICE_SOURCE": "static:3400",
    "NOWPAYMENTS_IPN_SECRET": "local-ipn-secret",
    "INTERNAL_AUTH_TOKEN": "local-internal-token",
    "MICRO_BATCH_THRESHOLD_USD": "20",
    # Short intervals so a newcomer sees money move within minutes.
    "CHECK_THRESHOLD_INTERVAL_S": "60",
    "PROCESS_INTERVAL_S": "60",
    "JOB_GRACE_S": "30",
    "SANDBOX_DELAY_S": "2",
    "WEB_CONCURRENCY": "2",
    "GUNICORN_THREADS": "4",
    "PYTHONUNBUFFERED": "1",
}

SERVICES = {
    # name: (port offset, WSGI entry)
    "accumulator": (1, "gcaccumulator.app:create_app()"),
    "batch": (2, "gcbatchprocessor.app:create_app()"),
    "microbatch": (3, "gcmicrobatchprocessor.app:create_app()"),
}
EXECUTOR_OFFSET = 4


def urls(port_base: int) -> dict[str, str]:
    """Where everything listens, as the services' variables name it."""

    def url(offset: int) -> str:
        return f"http://127.0.0.1:{port_base + offset}"

    return {
        "ACCUMULATOR_URL": url(1),
        "BATCH_PROCESSOR_URL": url(2),
        "MICRO_BATCH_PROCESSOR_URL": url(3),
        "SWAP_EXECUTOR_URL": url(EXECUTOR_OFFSET) + "/tasks",
        "PAYOUT_EXECUTOR_URL": url(EXECUTOR_OFFSET) + "/tasks",
    }


def _gunicorn(bin_dir: Path, port: int, entry: str) -> str:
    return shlex.join(
        [
            str(bin_dir / "gunicorn"),
            "-c",
            "python:shared.gunicorn_conf",
            "--bind",
            f"127.0.0.1:{port}",
            entry,
        ]
    )


def build_manager(env: dict[str, str], port_base: int) -> Manager:
    bin_dir = Path(sys.executable).parent
    manager = Manager()
    for name, (offset, entry) in SERVICES.items():
        port = port_base + offset
        service_env = {**env, "SERVICE_URL": f"http://127.0.0.1:{port}"}
        manager.add_process(
            name, _gunicorn(bin_dir, port, entry), env=service_env, cwd=str(ROOT)
        )
    # One worker: the sandbox remembers the tasks it has seen in memory.
    executor_env = {**env, "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "8"}
    executor = _gunicorn(
        bin_dir, port_base + EXECUTOR_OFFSET, "scripts.sandbox_executor:create_app()"
    )
    manager.add_process("executor", executor, env=executor_env, cwd=str(ROOT))
    scheduler = shlex.join([sys.executable, "-m", "scripts.local_scheduler"])
    manager.add_process("scheduler", scheduler, env=env, cwd=str(ROOT))
    return manager


def ports_in_use(port_base: int) -> list[int]:
    """The local system's ports that something already listens on."""
    offsets = [offset for offset, _ in SERVICES.values()] + [EXECUTOR_OFFSET]
    taken = []
    for port in sorted(port_base + offset for offset in offsets):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(port)
    return taken


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the local system.")
    parser.add_argument("--port-base", type=int, default=8080)
    args = parser.parse_args()

    # Checked before the database starts: stopping it on the way out would
    # pull it from under whatever already runs there (an earlier `make run`
    # whose terminal was killed, say).
    taken = ports_in_use(args.port_base)
    if taken:
        print(
            f"ports {', '.join(map(str, taken))} are in use: is another"
            " `make run` still running? (`pgrep -af gunicorn` finds it)",
            file=sys.stderr,
        )
        return 1
    env = {**LOCAL_ENV, **urls(args.port_base), **os.environ}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    started_embedded = not env.get("DATABASE_URL")
    env["DATABASE_URL"] = embedded.resolve_database_url(env.get("DATABASE_URL"))
    applied = schema.migrate(env["DATABASE_URL"])
    where = "embedded" if started_embedded else "DATABASE_URL"
    print(
        f"database ready ({where}); migrations applied now: {applied or 'none'}",
        flush=True,
    )
    manager = build_manager(env, args.port_base)
    try:
        manager.loop()  # returns once every process stopped (Ctrl-C, SIGTERM)
    finally:
        if started_embedded:
            embedded.stop()
    return int(manager.returncode or 0)


if __name__ == "__main__":
    sys.exit(main())
