"""``make run``: the whole local system in one terminal.

Starts the embedded PostgreSQL when ``DATABASE_URL`` is unset, applies the
migrations, then runs every process of ``scripts/Procfile`` under honcho
with local settings. Ctrl-C stops them all, then the embedded database.
Variables already set in the environment win over the local defaults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
    "ACCUMULATOR_URL": "http://127.0.0.1:8081",
    "BATCH_PROCESSOR_URL": "http://127.0.0.1:8082",
    "MICRO_BATCH_PROCESSOR_URL": "http://127.0.0.1:8083",
    "SWAP_EXECUTOR_URL": "http://127.0.0.1:8084/tasks",
    "PAYOUT_EXECUTOR_URL": "http://127.0.0.1:8084/tasks",
    "WEB_CONCURRENCY": "2",
    "GUNICORN_THREADS": "4",
    "PYTHONUNBUFFERED": "1",
}


def main() -> int:
    env = {**LOCAL_ENV, **os.environ}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    started_embedded = not env.get("DATABASE_URL")
    env["DATABASE_URL"] = embedded.resolve_database_url(env.get("DATABASE_URL"))
    applied = schema.migrate(env["DATABASE_URL"])
    print(
        f"database ready ({'embedded' if started_embedded else 'DATABASE_URL'});"
        f" migrations applied now: {applied or 'none'}",
        flush=True,
    )
    procfile = ROOT / "scripts" / "Procfile"
    command = [str(bin_dir / "honcho"), "-f", str(procfile), "-d", str(ROOT), "start"]
    runner = subprocess.Popen(command, env=env)
    # Ctrl-C reaches honcho directly (same process group); a SIGTERM sent to
    # us alone is passed on, so the processes and the database stop either way.
    signal.signal(signal.SIGTERM, lambda *_: runner.send_signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return runner.wait()
    finally:
        if started_embedded:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
