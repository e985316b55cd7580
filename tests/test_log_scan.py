"""The log scanner the fault tests use catches a planted secret.

A scanner that found nothing would let every leak through: each test below
plants a secret the way a careless log line would, and checks that exactly
the offending lines come back.
"""

from __future__ import annotations

import json
import logging

from gcaccumulator.ipn import sign
from scripts.log_scan import find_secrets
from shared.logging import formatter

IPN_SECRET = "planted-ipn-secret"
TOKEN = "planted-internal-token-0123456789"
SIGNATURE = sign(IPN_SECRET, b'{"payment_id":1}')

CLEAN = [
    '{"severity": "INFO", "message": "payment_accumulated", "payment_id": "7"}',
    '{"severity": "WARNING", "message": "payment_refused", "error": "the '
    'x-nowpayments-sig signature does not match the body"}',
]


def log_line(message: str, **fields: object) -> str:
    """One line exactly as the services write it."""
    record = logging.LogRecord("payouts.test", logging.INFO, "", 0, message, (), None)
    record.__dict__.update(fields)
    return formatter().format(record)


def test_clean_logs_yield_nothing() -> None:
    assert find_secrets("\n".join(CLEAN), [IPN_SECRET, TOKEN, SIGNATURE]) == []


def test_a_planted_token_is_found_on_its_line_only() -> None:
    leak = log_line("task_sent", headers={"Authorization": f"Bearer {TOKEN}"})
    text = "\n".join([CLEAN[0], leak, CLEAN[1]])

    assert find_secrets(text, [TOKEN]) == [leak]


def test_a_secret_shorter_than_a_fragment_is_found_whole() -> None:
    short = "s3cr3t"
    leak = log_line("secret_read", value=short)

    assert find_secrets("\n".join([*CLEAN, leak]), [short]) == [leak]


def test_a_truncated_signature_still_counts_as_leaked() -> None:
    leak = log_line("payment_refused", signature=SIGNATURE[:32])

    assert find_secrets("\n".join([*CLEAN, leak]), [SIGNATURE]) == [leak]


def test_a_piece_shorter_than_a_fragment_is_not_a_leak() -> None:
    line = log_line("payment_refused", signature_prefix=SIGNATURE[:8])

    assert find_secrets(line, [SIGNATURE]) == []


def test_a_secret_escaped_inside_a_json_string_is_found() -> None:
    awkward = 'ipn"secret\\with-quotes'
    leak = log_line("config_loaded", secret=awkward)
    assert awkward not in leak  # JSON escaped it
    assert json.loads(leak)["secret"] == awkward

    assert find_secrets(leak, [awkward]) == [leak]


def test_each_offending_line_is_reported_once_in_order() -> None:
    first = log_line("one", token=TOKEN, again=TOKEN)
    second = log_line("two", sig=SIGNATURE)
    text = "\n".join([first, CLEAN[0], second])

    assert find_secrets(text, [TOKEN, SIGNATURE, ""]) == [first, second]


def test_a_signature_in_upper_case_hex_still_counts_as_leaked() -> None:
    leak = log_line("payment_refused", sig=SIGNATURE[:20].upper())

    assert find_secrets("\n".join([*CLEAN, leak]), [SIGNATURE]) == [leak]
