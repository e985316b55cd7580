"""Our re-serialised IPN body against JavaScript's, on generated bodies.

NOWPayments signs ``JSON.stringify(sortObject(payload))``. ``ipn.py`` rebuilds
that string in Python; here node builds it too, from the same raw text, and
the two must agree byte for byte for both forms of ``sortObject`` in use.
The raw text is generated as text, so the spelling of numbers (``15.0``,
``1e-07``, ``1E+2``), string escapes and duplicate keys are under our
control, as they are under the sender's.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from gcaccumulator import ipn

SCRIPT = Path(__file__).resolve().parent / "js" / "canonical.js"
NODE = shutil.which("node") or "/usr/bin/node"
SECRET = "canonical-json-test-secret"
# Long enough for a slow CI machine, short enough that a stuck node fails.
ANSWER_TIMEOUT_SECONDS = 10

# --- the JavaScript side ----------------------------------------------------


class JavaScript:
    """One node process that answers a raw body with both canonical forms."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._requests: IO[bytes] = process.stdin
        self._answers: IO[bytes] = process.stdout
        # After a lost answer the pipe is out of step: every later answer
        # would belong to an earlier body, so fail them all with the cause.
        self._broken: str | None = None

    def canonical_forms(self, raw: str) -> tuple[str, str]:
        """``(arrays as objects, arrays kept)`` as node prints them for ``raw``."""
        if self._broken:
            pytest.fail(self._broken)
        try:
            self._requests.write(json.dumps(raw).encode("ascii") + b"\n")
            self._requests.flush()
        except BrokenPipeError:
            pass  # node has gone; reading gives nothing and says so below
        # Node writes each answer with one write, so once the pipe is readable
        # the whole line follows; the wait only catches a node that hangs.
        ready, _, _ = select.select([self._answers], [], [], ANSWER_TIMEOUT_SECONDS)
        line = self._answers.readline() if ready else b""
        if not line:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)  # an exit code, if it is exiting
            code = self.process.poll()
            self._broken = (
                f"node gave no answer in {ANSWER_TIMEOUT_SECONDS} s"
                if code is None
                else f"node exited with code {code} during the session"
            )
            pytest.fail(self._broken)
        answer = json.loads(line)
        if isinstance(answer, dict):
            pytest.fail(f"node refused a generated body: {answer['error']}")
        return answer[0], answer[1]


def _stop(process: subprocess.Popen[bytes]) -> None:
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        process.stdin.close()  # end of input: canonical.js exits by itself
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture(scope="session")
def javascript() -> Iterator[JavaScript]:
    # Node is part of this machine's contract, so its absence is a failure
    # to report, not a reason to skip the only check against the real thing.
    if not os.access(NODE, os.X_OK):
        pytest.fail(
            f"node was not found (looked on PATH and at {NODE}); these tests "
            "compare with JavaScript's JSON.stringify and need node 20",
            pytrace=False,
        )
    process = subprocess.Popen(
        [NODE, str(SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield JavaScript(process)
    finally:
        _stop(process)


# --- generated raw bodies ---------------------------------------------------

# Numbers where printing like JavaScript is easy to get wrong: the switch to
# exponent form at 1e21 and 1e-7, doubles at both ends of the range, integers
# past 2**53, and numbers no double or no Decimal can hold.
HARD_NUMBERS = [
    "0", "-0", "0.0", "-0.0", "0e0", "-0E-0", "15.0", "15.000", "1.0e+1",
    "1e-7", "1e-07", "1E-7", "1.5e-7", "2.5e-7", "2.5E-07", "1e-6", "0.000001",
    "4.1e-06", "4.1E-6", "0.0000041", "0.00000041", "1E+2", "1e+2", "1E2",
    "1e20", "1e+20", "100000000000000000000", "99999999999999999999.5",
    "1e21", "1e+21", "1000000000000000000000", "999999999999999999999",
    "123e18", "1.23e20", "123e19", "0.1", "0.30000000000000004",
    "5e-324", "4.9e-324", "2e-324", "2.4703282292062328e-324", "1e-400",
    "-5e-324", "2.2250738585072014e-308", "1.7976931348623157e308",
    "1.7976931348623158e308", "1.7976931348623159e308", "1e308", "1e309",
    "-1e309", "9007199254740991", "9007199254740992", "9007199254740993",
    "-9007199254740993", "18446744073709551615", "18446744073709551616",
    "123456789012345678901234567890", "1" + "0" * 309, "-1" + "0" * 400,
    str(2**1024 - 2**970), str(2**1024 - 2**970 - 1), "9" * 4301,
    "1e999999999999999999", "1e9999999999999999999", "-1e-9999999999999999999",
    "0e9999999999999999999", "0.0001e999999999999999999",
]  # fmt: skip

# Characters that JSON.stringify escapes, keeps raw, or orders by UTF-16
# code units: controls, quotes, U+2028/9, Cyrillic, accents, the last BMP
# characters, astral characters and surrogates (only ever written escaped).
HARD_CHARACTERS = [
    '"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x00", "\x1f", "\x7f",
    "\u2028", "\u2029", "é", "ñ", "Ж", "д", "я", "€", "\ufeff", "\ue000",
    "\ufb01", "\uff61", "\ufffd", "\uffff", "\U00010000", "\U0001f600",
    "\U0010ffff", "\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00",
    "a", "B", "0", " ", "_",
]  # fmt: skip

# Keys that a JavaScript object orders first (array indices up to 2**32 - 2),
# keys that look like indices but are not (a regular expression's "$" would
# let "0\n" through), keys whose UTF-16 order differs from their code point
# order, and keys that are special on objects.
HARD_KEYS = [
    "0", "1", "2", "10", "01", "-1", "1.0", " 1", "0\n", "7\n",
    "4294967294", "4294967295", "4294967296", "9007199254740993", "", "a",
    "b", "B", "é", "\ufffd", "\uffff", "\uff61", "\U00010000", "\U0001f600",
    "\ud800", "\udc00", "__proto__", "constructor", "toString", "payment_id",
    "price_amount",
]  # fmt: skip

SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}

WHITESPACE = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n  "])
# Strategies here are built once, at import: building one inside a composite
# on every draw cost more than the drawing.
INDEXES = st.integers(min_value=0, max_value=63)
# Two bits choose each character's spelling, for up to 16 characters (the
# longest string drawn); shrinking toward 0 gives the first spelling.
SPELLING_CHOICES = st.integers(min_value=0, max_value=4**16 - 1)


def _unicode_escapes(code: int) -> list[str]:
    return [f"\\u{code:04x}", f"\\u{code:04X}"]


def _spellings(character: str) -> list[str]:
    """The ways a JSON text may write ``character`` inside a string."""
    code = ord(character)
    spellings = []
    if character in SHORT_ESCAPES:
        spellings.append(SHORT_ESCAPES[character])
    is_surrogate = 0xD800 <= code <= 0xDFFF
    if code >= 0x20 and character not in '"\\' and not is_surrogate:
        spellings.append(character)
    if code <= 0xFFFF:
        return spellings + _unicode_escapes(code)
    high, low = divmod(code - 0x10000, 0x400)
    pairs = zip(
        _unicode_escapes(0xD800 + high), _unicode_escapes(0xDC00 + low), strict=True
    )
    return spellings + [first + second for first, second in pairs]


def _spell(text: str, choices: int) -> str:
    """``text`` as a JSON string literal, each character spelled its own way."""
    spelled = []
    for character in text:
        choices, choice = divmod(choices, 4)
        spellings = _spellings(character)
        spelled.append(spellings[choice % len(spellings)])
    return '"' + "".join(spelled) + '"'


def _texts(max_size: int) -> st.SearchStrategy[str]:
    """Ordinary text and hard characters, in either order.

    One st.text() over both alphabets would favour low code points, so that
    U+2028 or an emoji would almost never come; a list of characters drawn
    one by one is several times slower.
    """
    ordinary = st.text(max_size=max_size // 2)
    hard = st.text(st.sampled_from(HARD_CHARACTERS), max_size=max_size // 2)
    return st.one_of(
        st.builds(operator.add, ordinary, hard),
        st.builds(operator.add, hard, ordinary),
    )


json_strings = st.builds(_spell, _texts(max_size=8), SPELLING_CHOICES)
json_keys = st.builds(
    _spell, st.one_of(st.sampled_from(HARD_KEYS), _texts(max_size=4)), SPELLING_CHOICES
)

# A JSON number from its grammar: "15.0", "1e-07", "2.5E+0400".
composed_numbers = st.tuples(
    st.sampled_from(["", "-"]),
    st.integers(min_value=0, max_value=10**25).map(str),
    st.one_of(
        st.just(""),
        st.text("0123456789", min_size=1, max_size=20).map(lambda d: "." + d),
    ),
    st.one_of(
        st.just(""),
        st.tuples(
            st.sampled_from(["e", "E"]),
            st.sampled_from(["", "+", "-"]),
            st.sampled_from(["", "0", "00"]),
            st.integers(min_value=0, max_value=400).map(str),
        ).map("".join),
    ),
).map("".join)

# A double as Python writes it ("1e-07", "15.0") or with more digits.
spelled_floats = st.builds(
    str.format,
    st.sampled_from(["{!r}", "{:e}", "{:E}", "{:.17g}", "{:.3e}"]),
    st.floats(allow_nan=False, allow_infinity=False),
)

json_numbers = st.one_of(
    st.sampled_from(HARD_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    spelled_floats,
    composed_numbers,
)

scalars = st.one_of(
    json_numbers, json_strings, st.sampled_from(["true", "false", "null"])
)


def _array_text(items: list[str], space: str) -> str:
    return "[" + space + (space + "," + space).join(items) + space + "]"


def json_arrays(items: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(_array_text, st.lists(items, max_size=5), WHITESPACE)


@st.composite
def _object_texts(
    draw: st.DrawFn,
    members: st.SearchStrategy[list[tuple[str, str]]],
    values: st.SearchStrategy[str],
) -> str:
    pairs = draw(members)
    repeat_a_key = draw(st.booleans())
    if pairs and repeat_a_key:
        # The same key again, perhaps spelled alike: the last value wins.
        key, _ = pairs[draw(INDEXES) % len(pairs)]
        pairs.insert(draw(INDEXES) % (len(pairs) + 1), (key, draw(values)))
    space = draw(WHITESPACE)
    colon = space + ":" + space
    body = (space + "," + space).join(key + colon + value for key, value in pairs)
    return "{" + space + body + space + "}"


def json_objects(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Object texts whose keys are often hard, and sometimes come twice."""
    members = st.lists(st.tuples(json_keys, values), max_size=6)
    return _object_texts(members, values)


json_values = st.recursive(
    scalars,
    lambda children: st.one_of(json_arrays(children), json_objects(children)),
    max_leaves=20,
)
ipn_bodies = st.builds(
    lambda before, body, after: before + body + after,
    WHITESPACE,
    json_objects(json_values),
    WHITESPACE,
)


# --- the property -----------------------------------------------------------


def _alter_one_character(text: str, position: int) -> str:
    index = position % len(text)
    # Flipping the lowest bit never yields a surrogate from a character that
    # JSON.stringify writes raw, so the result still encodes as UTF-8.
    return text[:index] + chr(ord(text[index]) ^ 1) + text[index + 1 :]


@pytest.mark.slow
@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=ipn_bodies, position=st.integers(min_value=0))
def test_canonical_json_matches_javascript(
    javascript: JavaScript, raw: str, position: int
) -> None:
    note(f"raw body: {raw!r}")  # a failure shows the text, not how it was built
    js_objects, js_arrays = javascript.canonical_forms(raw)
    body = raw.encode("utf-8")
    payload = ipn.parse_object(body)

    assert ipn.canonical_json(payload, arrays_as_objects=True) == js_objects
    assert ipn.canonical_json(payload, arrays_as_objects=False) == js_arrays

    # A body whose numbers JavaScript would round is trusted only on a
    # signature over its exact bytes (see ipn.numbers_survive_javascript).
    faithful = ipn.numbers_survive_javascript(payload)
    for form in (js_objects, js_arrays):
        signature = ipn.sign(SECRET, form.encode("utf-8"))
        accepted = ipn.signature_matches(SECRET, body, payload, signature)
        assert accepted == (faithful or form.encode("utf-8") == body)

        altered = _alter_one_character(form, position).encode("utf-8")
        if altered == body:
            continue  # the raw body is signed material too: rightly accepted
        signature = ipn.sign(SECRET, altered)
        assert not ipn.signature_matches(SECRET, body, payload, signature)


# --- known values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        (Decimal("0.0000041"), "0.0000041"),
        (Decimal("4.1e-06"), "0.0000041"),
        (4.1e-06, "0.0000041"),
        (Decimal("1e-7"), "1e-7"),
        (Decimal("1.5e-7"), "1.5e-7"),
        (Decimal("15.0"), "15"),
        (Decimal("1e20"), "100000000000000000000"),
        (Decimal("1e21"), "1e+21"),
        (Decimal("123e18"), "123000000000000000000"),
        (Decimal("-0"), "0"),
        (-0.0, "0"),
        (0, "0"),
        (2**53 + 1, "9007199254740992"),
        (Decimal("5e-324"), "5e-324"),
        (Decimal("1.7976931348623157e308"), "1.7976931348623157e+308"),
        (10**400, "null"),
        (-(10**400), "null"),
        (Decimal("1e400"), "null"),
    ],
)
def test_js_number_prints_as_javascript_does(value: Any, printed: str) -> None:
    assert ipn.js_number(value) == printed


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("\ud800", '"\\ud800"'),
        ("\udc00x", '"\\udc00x"'),
        ("\u2028\u2029", '"\u2028\u2029"'),
        ("\x1f", '"\\u001f"'),
        ('\n\t"\\/', '"\\n\\t\\"\\\\/"'),
        ("Жé😀", '"Жé😀"'),
    ],
)
def test_js_string_quotes_as_javascript_does(text: str, quoted: str) -> None:
    assert ipn.js_string(text) == quoted


@pytest.mark.slow
@pytest.mark.parametrize(
    "number",
    ["1e9999999999999999999", "-1e-9999999999999999999", "9" * 4301],
)
def test_numbers_beyond_python_limits_are_read_as_javascript_reads_them(
    javascript: JavaScript, number: str
) -> None:
    raw = '{"price_amount":' + number + "}"
    js_objects, _ = javascript.canonical_forms(raw)

    payload = ipn.parse_object(raw.encode("utf-8"))

    assert ipn.canonical_json(payload, arrays_as_objects=True) == js_objects


@pytest.mark.parametrize(
    ("signed", "delivered"),
    [
        (
            '{"amount":12,"payment_id":1}',
            '{"payment_id":1,"amount":12.000000000000000001}',
        ),
        ('{"payment_id":9007199254740992}', '{"payment_id":9007199254740993}'),
        ('{"amount":1e+21}', '{"amount":1000000000000000000001}'),
    ],
)
def test_a_signature_is_not_reused_for_numbers_javascript_would_round(
    signed: str, delivered: str
) -> None:
    payload = ipn.parse_object(delivered.encode())
    assert ipn.canonical_json(payload, arrays_as_objects=False) == signed

    signature = ipn.sign(SECRET, signed.encode())

    assert not ipn.signature_matches(SECRET, delivered.encode(), payload, signature)


def test_numbers_javascript_prints_back_unchanged_keep_the_sorted_form_valid() -> None:
    delivered = b'{"payment_id":5077125051,"outcome_amount":0.0002734,"fee":15.0}'
    payload = ipn.parse_object(delivered)
    signed = ipn.canonical_json(payload, arrays_as_objects=False).encode()

    assert ipn.signature_matches(SECRET, delivered, payload, ipn.sign(SECRET, signed))
