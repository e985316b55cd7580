"""`make demo` end to end: the whole local system, real processes and HTTP.

It starts the three services under gunicorn, the sandbox executor (which
fails a share of tasks and calls back twice at times) and the local
scheduler, replays signed IPNs, waits for conversions and payouts to settle,
and runs `payoutctl reconcile`. It exits 0 only when all of that held.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port_base() -> int:
    """A base whose next four ports are free right now."""
    for base in range(21000, 29000, 10):
        ports = [base + offset for offset in range(1, 5)]
        if all(_free(port) for port in ports):
            return base
    raise RuntimeError("no free ports for the demo")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_make_demo_settles_every_payment_and_reconciles_clean(admin_url: str) -> None:
    env = {**os.environ, "DEMO_PORT_BASE": str(free_port_base())}
    # The demo makes its own database on the same server the tests use.
    env["DATABASE_URL"] = admin_url

    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo passed" in result.stdout
    assert "reconcile: clean" in result.stdout
