"""Find secrets in captured log text (DESIGN.md: no secret, signature or
token in any log line).

``find_secrets(text, secrets)`` returns every line of ``text`` that holds
one of ``secrets`` whole, or a piece of one at least ``fragment``
characters long: a signature cut to its first 32 characters has still
leaked. Each secret is also looked for as JSON writes it inside a string
(quotes and backslashes escaped), since the suite's log lines are JSON.

The fault tests and the soak benchmark scan their processes' output with
it; it needs nothing but the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

FRAGMENT = 16
_HEX = re.compile(r"[0-9a-fA-F]+")


def _spellings(secret: str) -> set[str]:
    """The secret as written raw and inside a JSON string; a hex secret (a
    signature) in either case, since hex is case-blind."""
    spellings = {secret, json.dumps(secret, ensure_ascii=False)[1:-1]}
    if _HEX.fullmatch(secret):
        spellings |= {secret.lower(), secret.upper()}
    return spellings


def find_secrets(
    text: str, secrets: Iterable[str], fragment: int = FRAGMENT
) -> list[str]:
    """The lines of ``text`` that leak any of ``secrets``, in order, each once.

    Secrets shorter than ``fragment`` must appear whole to count; longer
    ones count as soon as any ``fragment`` consecutive characters of them
    appear. Empty secrets are ignored.
    """
    whole: set[str] = set()
    pieces: set[str] = set()
    for secret in secrets:
        for spelling in _spellings(secret):
            if not spelling:
                continue
            if len(spelling) < fragment:
                whole.add(spelling)
            else:
                pieces.update(
                    spelling[start : start + fragment]
                    for start in range(len(spelling) - fragment + 1)
                )
    return [line for line in text.splitlines() if _leaks(line, whole, pieces, fragment)]


def _leaks(line: str, whole: set[str], pieces: set[str], fragment: int) -> bool:
    if any(secret in line for secret in whole):
        return True
    if not pieces:
        return False
    # Every window of the line, looked up in one set: linear in the log's
    # size however many signatures a run sent.
    return any(
        line[start : start + fragment] in pieces
        for start in range(len(line) - fragment + 1)
    )
