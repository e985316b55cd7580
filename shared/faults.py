"""Failure points for the fault tests, and nothing else.

A fault test needs a worker to die at one exact moment: just after a batch
and its task were committed, before the outbox sent the task. Two
variables arm that, and only with ``ENVIRONMENT=test`` (``shared.config``
refuses to start with them set in any other environment):

- ``TEST_FAULT_POINT``: the point, one of ``POINTS``;
- ``TEST_FAULT_TRIGGER_FILE``: a file whose removal fires the point.

Reaching an armed point removes the file and ends the process at once
(``os._exit``: no cleanup, no answer, as a killed worker). Removing the file
is atomic, so of every worker that reaches the point only one dies, and the
point is disarmed for the worker gunicorn starts in its place: the next run
finds the same variables but no file.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("payouts.faults")

# Where a point sits: after the commit of the conversion claim (micro-batch
# processor) or of the payout claim (batch processor), before the send.
POINTS = ("after-conversion-commit", "after-payout-commit")
# A status no other exit uses, so a test can tell this death from a crash.
EXIT_STATUS = 86

_armed: tuple[str, str] | None = None


def arm(point: str | None, trigger_file: str | None) -> None:
    """Arm ``point`` for this process (``None`` disarms); called at start."""
    global _armed
    _armed = (point, trigger_file) if point and trigger_file else None


def reach(point: str) -> None:
    """Die here if ``point`` is armed and its trigger file is still there."""
    if _armed is None or _armed[0] != point:
        return
    try:
        os.unlink(_armed[1])
    except FileNotFoundError:
        return  # fired already, by this worker's predecessor or a sibling
    log.warning("test_fault_fired", extra={"point": point, "pid": os.getpid()})
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(EXIT_STATUS)
