"""NOWPayments IPN bodies: parsing, the signature, and JavaScript's JSON.

NOWPayments signs an IPN with hex HMAC-SHA512 over ``JSON.stringify`` of the
payload after sorting its keys recursively. The body it sends is not always
that string (other key order, whitespace), so a signature is accepted when
it matches the raw body, or the payload re-serialised exactly as its
JavaScript does it. Nothing else is accepted.

Re-serialising needs JavaScript's numbers, which are doubles: this module's
formatter is the one place an IPN value passes through ``float``, and only to
print it the way JavaScript would. What is stored comes from the ``Decimal``
parse (which asks ``float`` only what a number too large or too small for
``Decimal`` is: an infinity or a zero, as in JavaScript).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

_HEX_SIGNATURE = re.compile(r"^[0-9a-fA-F]{128}$")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Keys a JavaScript object keeps first, in numeric order: array indices.
# \Z, not $: "$" also matches before a final newline, and "0\n" is no index.
_ARRAY_INDEX = re.compile(r"^(0|[1-9][0-9]{0,9})\Z")
_MAX_ARRAY_INDEX = 2**32 - 2


class NotJsonObject(ValueError):
    """The body is not one JSON object."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        # An exponent past Decimal's range (1e9999999999999999999) is still
        # JSON; JavaScript reads it as Infinity or 0, and so do we, instead of
        # failing the request.
        return Decimal(repr(float(text)))


def _parse_int(text: str) -> int | Decimal:
    try:
        return int(text)
    except ValueError:
        # Python refuses integers of more than 4300 digits by default (a guard
        # against slow conversion); JavaScript reads them, so the body is
        # still JSON and its signature must be checked. Decimal reads them in
        # linear time.
        return Decimal(text)


def parse_object(raw: bytes) -> dict[str, Any]:
    """Parse a body as one JSON object, numbers as ``Decimal`` and ``int``.

    Like JavaScript, any JSON number is accepted, however long: a number no
    ``Decimal`` can hold becomes an infinite or zero ``Decimal``.
    """
    try:
        text = raw.decode("utf-8")
        payload = json.loads(
            text,
            parse_float=_parse_decimal,
            parse_int=_parse_int,
            parse_constant=_refuse_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NotJsonObject("the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise NotJsonObject("the body must be a JSON object")
    return payload


# --- JavaScript's JSON.stringify -------------------------------------------


def _as_double(value: int | Decimal | float) -> float:
    """The double JavaScript holds for a JSON number (every number is one)."""
    try:
        return float(value)
    except OverflowError:
        # Only an int raises this, where a Decimal or a float would give an
        # infinity; JavaScript rounds such an integer to Infinity too.
        return math.inf if value > 0 else -math.inf


def js_number(value: int | Decimal | float) -> str:
    """Format a number as JavaScript's ``Number.prototype.toString`` does."""
    number = _as_double(value)
    if number != number or number in (float("inf"), float("-inf")):
        return "null"  # JSON.stringify(NaN) and of +-Infinity
    if number == 0:
        return "0"  # covers -0, which JavaScript prints as 0
    if number < 0:
        return "-" + js_number(-number)
    # repr() gives the shortest digits that round-trip, as JavaScript does;
    # only where the decimal point and the exponent go differs.
    sign, digit_tuple, exponent = Decimal(repr(number)).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0") or "0"
    assert isinstance(exponent, int) and sign == 0
    k = len(digits)
    # value = 0.digits x 10^n
    n = exponent + len(digit_tuple)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    power = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def js_string(text: str) -> str:
    """Quote a string as JSON.stringify does: non-ASCII stays as it is."""
    quoted = json.dumps(text, ensure_ascii=False)
    # A lone surrogate (only possible from a \\uD8xx escape in the body) is
    # written as an escape by JavaScript; Python would write it raw.
    return _SURROGATE.sub(_escape_surrogate, quoted)


def _utf16_order(key: str) -> bytes:
    # Array.prototype.sort() compares strings by UTF-16 code units, which
    # differs from code point order above U+FFFF.
    return key.encode("utf-16-be", "surrogatepass")


def _object_order(keys: list[str]) -> list[str]:
    """The order JavaScript iterates a fresh object's keys in.

    Keys inserted in sorted order come back in that order, except that keys
    that are array indices come first, in numeric order. ``__proto__`` does
    not become a key at all when assigned as ``result[key] = value``.
    """
    keys = sorted((key for key in keys if key != "__proto__"), key=_utf16_order)
    indices = [
        key for key in keys if _ARRAY_INDEX.match(key) and int(key) <= _MAX_ARRAY_INDEX
    ]
    index_set = set(indices)
    named = [key for key in keys if key not in index_set]
    return sorted(indices, key=int) + named


def canonical_json(value: Any, arrays_as_objects: bool) -> str:
    """``JSON.stringify(sortObject(value))`` as NOWPayments' JavaScript does it.

    NOWPayments' documented ``sortObject`` walks ``Object.keys`` and rebuilds
    into ``{}``, which turns an array into an object keyed "0", "1", ...;
    a sort that keeps arrays as arrays is the other form in use. Which one
    applies is chosen by ``arrays_as_objects``.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, Decimal, float)):
        return js_number(value)
    if isinstance(value, str):
        return js_string(value)
    if isinstance(value, list):
        if arrays_as_objects:
            value = {str(index): item for index, item in enumerate(value)}
        else:
            items = ",".join(canonical_json(item, arrays_as_objects) for item in value)
            return f"[{items}]"
    if isinstance(value, dict):
        members = ",".join(
            js_string(key) + ":" + canonical_json(value[key], arrays_as_objects)
            for key in _object_order(list(value))
        )
        return "{" + members + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _contains_array(value: Any) -> bool:
    if isinstance(value, list):
        return True
    if isinstance(value, dict):
        return any(_contains_array(item) for item in value.values())
    return False


def numbers_survive_javascript(value: Any) -> bool:
    """Whether every number in ``value`` reads back as JavaScript printed it.

    Two bodies whose numbers differ only past a double's precision (payment
    id 2**53 + 1, amount 12.000000000000000001) re-serialise to the same
    text, so a signature over that text cannot tell them apart: such a body
    is trusted only on a signature over its exact bytes.
    """
    if isinstance(value, dict):
        return all(numbers_survive_javascript(item) for item in value.values())
    if isinstance(value, list):
        return all(numbers_survive_javascript(item) for item in value)
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        printed = js_number(value)
        return printed != "null" and Decimal(printed) == Decimal(value)
    return True


def signed_forms(raw: bytes, payload: dict[str, Any]) -> list[bytes]:
    """Every byte string whose signature we accept for this delivery."""
    try:
        if not numbers_survive_javascript(payload):
            return [raw]
        forms = [raw, canonical_json(payload, arrays_as_objects=False).encode("utf-8")]
        if _contains_array(payload):
            forms.append(
                canonical_json(payload, arrays_as_objects=True).encode("utf-8")
            )
    except RecursionError:
        # Nested deeper than we re-serialise: no IPN looks like this, so
        # only a signature over the exact bytes can vouch for it.
        return [raw]
    return forms


def signature_matches(
    secret: str, raw: bytes, payload: dict[str, Any], signature: str | None
) -> bool:
    """Whether ``signature`` is NOWPayments' HMAC of this delivery.

    Every candidate is compared in constant time, and all of them are
    compared, so the time taken does not tell which form matched.
    """
    if signature is None or not _HEX_SIGNATURE.match(signature.strip()):
        return False
    presented = signature.strip().lower().encode("ascii")
    key = secret.encode("utf-8")
    matched = False
    for form in signed_forms(raw, payload):
        expected = hmac.new(key, form, hashlib.sha512).hexdigest().encode("ascii")
        matched |= hmac.compare_digest(expected, presented)
    return matched


def sign(secret: str, body: bytes) -> str:
    """The signature NOWPayments would send for ``body`` (tests, demo, bench)."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha512).hexdigest()
