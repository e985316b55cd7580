"""Parsing, quantizing and formatting amounts: the one place that does it.

Every amount is a ``Decimal``. The column each kind of amount lands in fixes
its scale and its largest value, so the helpers here are named after those
columns (DESIGN.md section 2):

* USD  ``NUMERIC(24,10)``: valuations are rounded half-up to 10^-10.
* crypto ``NUMERIC(38,18)``: stored exactly; too many places is invalid.
* USDT ``NUMERIC(24,6)``: USDT's on-chain unit is 10^-6.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext


class AmountError(ValueError):
    """An amount that cannot be read or does not fit where it must go."""


@dataclass(frozen=True)
class Column:
    """The shape of a NUMERIC(precision, scale) column."""

    name: str
    precision: int
    scale: int

    @property
    def unit(self) -> Decimal:
        return Decimal(1).scaleb(-self.scale)

    @property
    def limit(self) -> Decimal:
        """The first value too large for the column."""
        return Decimal(10) ** (self.precision - self.scale)


USD = Column("usd", 24, 10)
CRYPTO = Column("crypto", 38, 18)
USDT = Column("usdt", 24, 6)
PERCENT = Column("percent", 6, 4)

# A decimal number as JSON writes one (a leading "+" is not JSON), ASCII only.
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?", re.ASCII)

# Enough digits that no product or quotient of two column values is ever
# rounded before we round it on purpose.
_WORK_PRECISION = 80


def parse_amount(value: object, field: str = "amount") -> Decimal:
    """Read an amount from a request value: a decimal string or a JSON number.

    JSON numbers arrive here already as ``Decimal`` (we parse with
    ``parse_float=Decimal``) or ``int``; a Python ``float`` means someone
    parsed the body the wrong way, so it is refused rather than trusted.
    """
    if isinstance(value, bool) or value is None:
        raise AmountError(f"{field} must be a decimal number")
    if isinstance(value, float):
        raise AmountError(f"{field} arrived as a binary float; refusing to guess")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        # Decimal() alone would also take "1_000", "NaN" and non-ASCII digits.
        text = value.strip()
        if len(text) > 100 or not _DECIMAL_TEXT.fullmatch(text):
            raise AmountError(f"{field} must be a decimal number")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            # The pattern lets through only an exponent too large for Decimal.
            raise AmountError(f"{field} is out of range") from None
    else:
        raise AmountError(f"{field} must be a decimal number")
    if not amount.is_finite():
        raise AmountError(f"{field} must be a finite number")
    return amount


def exact(amount: Decimal, column: Column, field: str = "amount") -> Decimal:
    """Return ``amount`` unchanged if the column holds it exactly, else raise."""
    if amount.is_nan() or amount.is_infinite():
        raise AmountError(f"{field} must be a finite number")
    if amount.is_zero():
        # A zero may carry any exponent (0E+999999999999), far more than a
        # NUMERIC column accepts; every zero is the same amount.
        return Decimal(0)
    # copy_abs, not abs(): abs() rounds to the context, which raises
    # decimal.Overflow for an exponent like 1E+999999999999 instead of
    # letting us refuse the amount.
    if amount.copy_abs() >= column.limit:
        raise AmountError(f"{field} is too large (limit {column.limit:f})")
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent >= -column.scale:
        return amount
    # The default context's 28 digits cannot hold a NUMERIC(38,18) value at
    # full scale; quantizing there would raise instead of answering.
    with localcontext() as ctx:
        ctx.prec = _WORK_PRECISION
        quantized = amount.quantize(column.unit)
    if amount != quantized:
        raise AmountError(f"{field} has more than {column.scale} decimal places")
    return quantized


def quantize(amount: Decimal, column: Column, field: str = "amount") -> Decimal:
    """Round half-up to the column's unit, and check that it fits."""
    # Checked before rounding as well: a value far past the column (1e100)
    # has more digits at the column's scale than even the working precision.
    if amount.copy_abs() >= column.limit:
        raise AmountError(f"{field} is too large (limit {column.limit:f})")
    with localcontext() as ctx:
        ctx.prec = _WORK_PRECISION
        rounded = amount.quantize(column.unit, rounding=ROUND_HALF_UP)
    if abs(rounded) >= column.limit:
        raise AmountError(f"{field} is too large (limit {column.limit:f})")
    return rounded


def multiply(a: Decimal, b: Decimal) -> Decimal:
    """An exact product (no context rounding) of two column values."""
    with localcontext() as ctx:
        ctx.prec = _WORK_PRECISION
        return a * b


def divide(a: Decimal, b: Decimal) -> Decimal:
    """A quotient to 80 significant digits, for the caller to quantize."""
    with localcontext() as ctx:
        ctx.prec = _WORK_PRECISION
        return a / b


def percent_of(amount: Decimal, percent: Decimal, column: Column) -> Decimal:
    """``amount x percent / 100`` rounded half-up to the column's unit."""
    with localcontext() as ctx:
        ctx.prec = _WORK_PRECISION
        share = amount * percent / 100
    return quantize(share, column)


def to_text(amount: Decimal) -> str:
    """Format an amount for JSON or a log line: plain digits, never exponent."""
    if amount == 0:
        return "0"
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def to_display(amount: Decimal) -> str:
    """An amount for a person to read: exact like ``to_text``, with the
    thousands grouped (``1,234.5``)."""
    if amount == 0:
        return "0"
    text = format(amount, ",f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
