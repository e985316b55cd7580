"""Find secrets and IPN signatures in the log lines of the local system.

No log line may hold a secret, a token or a signature (STYLE.md). The soak
test knows every one it configured or sent, so it can look for them in
what the processes wrote. A signature counts as leaked when its first
``PREFIX`` hex digits appear, alone or inside a longer run of hex digits:
that catches the whole signature and the usual truncation of one, with a
chance of a false match of 16**-16 per run of digits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = 16
_HEX_RUN = re.compile(rf"[0-9a-fA-F]{{{PREFIX},}}")


@dataclass(frozen=True)
class Leak:
    line_number: int
    what: str  # "secret 2" or "signature": never the value itself


def find_leaks(
    lines: Iterable[str], secrets: Iterable[str], signatures: Iterable[str]
) -> list[Leak]:
    """Every line holding one of ``secrets`` or the start of a signature."""
    wanted = [secret for secret in secrets if secret]
    prefixes = {signature[:PREFIX].lower() for signature in signatures}
    leaks = []
    for number, line in enumerate(lines, start=1):
        for index, secret in enumerate(wanted, start=1):
            if secret in line:
                leaks.append(Leak(number, f"secret {index}"))
        if prefixes and _holds_prefix(line, prefixes):
            leaks.append(Leak(number, "signature"))
    return leaks


def _holds_prefix(line: str, prefixes: set[str]) -> bool:
    for run in _HEX_RUN.findall(line):
        run = run.lower()
        for start in range(len(run) - PREFIX + 1):
            if run[start : start + PREFIX] in prefixes:
                return True
    return False
