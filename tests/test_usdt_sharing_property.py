"""Sharing USDT among a conversion's rows, as a property of the real SQL.

For up to thousands of rows with crypto amounts from 10^-18 to 10^12, USDT
received from nothing to 10^12 and any fee percent below 50, the shares
computed by ``share_usdt`` (DESIGN.md section 2) must: sum exactly to the
amount received; each differ from its exact proportion by less than one
USDT unit (10^-6), the spare units going to the largest remainders; split
into a fee rounded half-up to 10^-6 and a net, neither negative, that add
back up to the gross share.

Rows are generated from a seed hypothesis draws, together with the shapes
that matter (how many rows, how far apart their amounts are, which fees):
drawing thousands of amounts one by one would be slow and shrink poorly.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from microbatch_support import (
    CLIENT_ID,
    assert_invariants_hold,
    crypto_units,
    fee_of,
    usdt_units,
)

from gcmicrobatchprocessor import sharing
from shared.db import Database

LARGEST_CRYPTO_EXPONENT = 12  # 10^12 of a coin, at most, in one payment
LARGEST_USDT_UNITS = 10**18  # 10^12 USDT


@dataclass(frozen=True)
class Swap:
    crypto: list[Decimal]
    fee_percents: list[Decimal]
    received: Decimal

    def __repr__(self) -> str:
        if len(self.crypto) <= 5:
            return f"Swap({self.crypto!r}, {self.fee_percents!r}, {self.received!r})"
        # Thousands of rows: say what shape they had (the failing example
        # itself is replayed from hypothesis's database).
        return (
            f"Swap({len(self.crypto)} rows, crypto {min(self.crypto)}.."
            f"{max(self.crypto)}, fees {min(self.fee_percents)}.."
            f"{max(self.fee_percents)}, received {self.received})"
        )


def crypto_amount(rng: random.Random, low: int, high: int) -> Decimal:
    """A positive amount of at most 18 decimals, of magnitude 10^low..10^high."""
    exponent = rng.randint(low, high)
    return Decimal(rng.randint(1, 10 ** (exponent + 18))).scaleb(-18)


def fee_percent(rng: random.Random, kind: str) -> Decimal:
    if kind == "none":
        return Decimal(0)
    if kind == "highest":
        return Decimal("49.9999")
    return Decimal(rng.randint(0, 499_999)).scaleb(-4)


@st.composite
def swaps(draw: Any) -> Swap:
    size = draw(st.sampled_from(["few", "some", "thousands"]))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    rows = {
        "few": rng.randint(1, 5),
        "some": rng.randint(6, 300),
        "thousands": rng.randint(1000, 3000),
    }[size]
    low = draw(st.integers(-18, LARGEST_CRYPTO_EXPONENT))
    high = draw(st.integers(low, LARGEST_CRYPTO_EXPONENT))
    equal = draw(st.booleans())  # every remainder the same: ties everywhere
    first = crypto_amount(rng, low, high)
    crypto = [first if equal else crypto_amount(rng, low, high) for _ in range(rows)]
    if draw(st.booleans()):  # a dust payment beside the largest there can be
        crypto[0] = Decimal("0.000000000000000001")
        crypto[-1] = Decimal(10) ** LARGEST_CRYPTO_EXPONENT
    kind = draw(st.sampled_from(["none", "highest", "mixed"]))
    fees = [fee_percent(rng, kind) for _ in range(rows)]
    received_units = draw(
        st.sampled_from(
            [0, 1, LARGEST_USDT_UNITS, rng.randint(0, 10 ** rng.randint(0, 18))]
        )
    )
    return Swap(crypto, fees, Decimal(received_units).scaleb(-6))


@st.composite
def fees_at_half_a_unit(draw: Any) -> Swap:
    """One row whose fee lies within 10^-10 of half a USDT unit, at any size.

    With one row the gross share is the amount received, so it can be chosen
    to put gross x percent / 100 right next to a rounding boundary. Drawn
    from a seeded generator: uniform magnitudes, where hypothesis's own
    integers lean towards small ones.
    """
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    percent_units = rng.choice([1, 3, 7, 9]) + 10 * rng.randint(0, 49_999)
    near_half = 500_000 + rng.randint(-100, 100)
    # Invertible modulo 10^6 (odd, no factor 5): solve for the low digits.
    low_units = near_half * pow(percent_units, -1, 10**6) % 10**6
    high_units = rng.randint(0, 10 ** rng.randint(0, 12))
    received_units = min(high_units * 10**6 + low_units, LARGEST_USDT_UNITS)
    return Swap(
        [crypto_amount(rng, -18, LARGEST_CRYPTO_EXPONENT)],
        [Decimal(percent_units).scaleb(-4)],
        Decimal(received_units).scaleb(-6),
    )


_CONVERSION = """
INSERT INTO batch_conversions (batch_conversion_id, outcome_currency, status,
    row_count, total_usd, total_eth, threshold_usd, accepted_at)
VALUES (%(conversion)s, 'eth', 'swapping', %(rows)s, %(rows)s, %(total)s, 10, now())
"""

# The rows a claim would have left: swapping, in the conversion, each with
# its delivery (invariant 6). One statement whatever the number of rows.
_SWAPPING_ROWS = """
WITH credited AS (
    INSERT INTO payout_accumulation (nowpayments_payment_id, client_id,
        user_id, payment_amount_usd, usd_source, platform_fee_percent,
        accumulated_usd, accumulated_eth, outcome_currency,
        conversion_status, batch_conversion_id)
    SELECT %(prefix)s || position, %(client_id)s, 1, 1, 'router', fee_percent,
           1, crypto, 'eth', 'swapping', %(conversion)s
    FROM unnest(%(crypto)s::numeric[], %(fee_percents)s::numeric[])
         WITH ORDINALITY AS r(crypto, fee_percent, position)
    RETURNING id, nowpayments_payment_id
)
INSERT INTO ipn_events (source, payment_id, payment_status, outcome,
    http_status, accumulation_id, raw_body, body_size)
SELECT 'router', nowpayments_payment_id, 'finished', 'accumulated', 200, id,
       '\\x'::bytea, 0
FROM credited
"""


def swapping_conversion(db: Database, swap: Swap) -> str:
    conversion = str(uuid.uuid4())
    with db.transaction() as cur:
        # The previous example's rows (DELETE: cheaper than TRUNCATE here).
        cur.execute(
            "DELETE FROM ipn_events; DELETE FROM payout_accumulation;"
            " DELETE FROM batch_conversions"
        )
        cur.execute(
            "INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd)"
            " VALUES (%s, 'threshold', 50) ON CONFLICT DO NOTHING",
            (CLIENT_ID,),
        )
        cur.execute(
            _CONVERSION,
            {
                "conversion": conversion,
                "rows": len(swap.crypto),
                "total": sum(swap.crypto),
            },
        )
        cur.execute(
            _SWAPPING_ROWS,
            {
                "prefix": f"prop-{conversion}-",
                "client_id": CLIENT_ID,
                "conversion": conversion,
                "crypto": swap.crypto,
                "fee_percents": swap.fee_percents,
            },
        )
    return conversion


def shares(db: Database, conversion: str) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute(
            "SELECT conversion_status, accumulated_eth, platform_fee_percent,"
            " accumulated_usdt, platform_fee_usdt FROM payout_accumulation"
            " WHERE batch_conversion_id = %s ORDER BY id",
            (conversion,),
        )
        return [dict(row) for row in cur.fetchall()]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(swap=st.one_of(swaps(), fees_at_half_a_unit()))
# A fee whose exact value is 149999700.25002449995: half-up to 10^-6 it is
# ...250024, but rounded once to 10^-10 on the way it would become ...250025.
@example(Swap([Decimal(1)], [Decimal("49.9999")], Decimal("300000000.500050")))
# The most USDT the column holds, on one row: no digit of it may be lost.
@example(Swap([Decimal(1)], [Decimal(0)], Decimal("999999999999999999.999999")))
@example(Swap([Decimal("1e-18")] * 3, [Decimal(3)] * 3, Decimal("0.000001")))
@example(Swap([Decimal("1e-18"), Decimal("1e12")], [Decimal(0)] * 2, Decimal("1e12")))
def test_usdt_shares_are_exact_proportional_and_split_into_fee_and_net(
    db: Database, swap: Swap
) -> None:
    conversion = swapping_conversion(db, swap)

    sharing.apply_callback(
        db,
        sharing.SwapOutcome(conversion, "completed", "swap-p", "0xp", swap.received),
    )

    rows = shares(db, conversion)
    received_units = usdt_units(swap.received)
    weights = [crypto_units(row["accumulated_eth"]) for row in rows]
    whole = sum(weights)
    gross_units = [
        usdt_units(row["accumulated_usdt"] + row["platform_fee_usdt"]) for row in rows
    ]
    assert len(rows) == len(swap.crypto)
    assert {row["conversion_status"] for row in rows} == {"converted"}
    assert sum(gross_units) == received_units
    rounded_up: list[int] = []
    rounded_down: list[int] = []
    for weight, units in zip(weights, gross_units, strict=True):
        exact = received_units * weight  # the exact share, times ``whole``
        assert -whole < units * whole - exact < whole  # less than one unit off
        remainder = exact % whole
        (rounded_up if units * whole > exact else rounded_down).append(remainder)
    if rounded_up and rounded_down:
        assert min(rounded_up) >= max(rounded_down)  # largest remainders first
    for row in rows:
        gross = row["accumulated_usdt"] + row["platform_fee_usdt"]
        assert row["platform_fee_usdt"] == fee_of(gross, row["platform_fee_percent"])
        assert row["accumulated_usdt"] >= 0
        assert row["platform_fee_usdt"] >= 0
    assert_invariants_hold(db)
