-- The micro-batch processor's SQL. Each block is one named statement.

-- name: pending_totals
-- What waits for conversion, per outcome currency (read from the partial
-- index alone: history is never scanned).
SELECT outcome_currency, count(*) AS row_count, sum(accumulated_usd) AS total_usd
FROM payout_accumulation
WHERE conversion_status = 'pending'
GROUP BY outcome_currency
ORDER BY outcome_currency;

-- name: claim_pending
-- One statement sums the pending rows of one currency and, when they reach
-- the threshold, claims exactly those rows: the sum and the claim see the
-- same snapshot, so a payment committed meanwhile is neither summed nor
-- taken. Rows a concurrent claim holds are skipped, and a row it already
-- took no longer matches 'pending' when rechecked.
WITH pending AS (
    SELECT id, accumulated_usd, accumulated_eth
    FROM payout_accumulation
    WHERE conversion_status = 'pending' AND outcome_currency = %(currency)s
    FOR UPDATE SKIP LOCKED
),
totals AS (
    SELECT count(*) AS row_count,
           sum(accumulated_usd) AS total_usd,
           sum(accumulated_eth) AS total_eth
    FROM pending
),
conversion AS (
    INSERT INTO batch_conversions (
        batch_conversion_id, outcome_currency, status, row_count,
        total_usd, total_eth, threshold_usd
    )
    SELECT %(batch_conversion_id)s, %(currency)s, 'claimed', row_count,
           total_usd, total_eth, %(threshold_usd)s
    FROM totals
    WHERE total_usd >= %(threshold_usd)s
    RETURNING batch_conversion_id, row_count, total_usd, total_eth
),
claimed AS (
    UPDATE payout_accumulation AS row
    SET conversion_status = 'swapping',
        batch_conversion_id = conversion.batch_conversion_id,
        updated_at = now()
    FROM pending, conversion
    WHERE row.id = pending.id
      -- True of every row in pending already. Said again so the planner
      -- reaches the rows through the pending partial index: joined on id
      -- alone, it hash-joins a sequential scan of the whole history.
      AND row.conversion_status = 'pending'
      AND row.outcome_currency = %(currency)s
    RETURNING row.id, row.accumulated_eth, row.accumulated_usd,
              conversion.batch_conversion_id
),
members AS (
    INSERT INTO batch_conversion_members (
        batch_conversion_id, accumulation_id, accumulated_eth, accumulated_usd
    )
    SELECT batch_conversion_id, id, accumulated_eth, accumulated_usd FROM claimed
)
SELECT batch_conversion_id, row_count, total_usd, total_eth FROM conversion;

-- name: mark_swapping
-- The executor accepted the task. Only a conversion still 'claimed' moves:
-- a late acceptance never undoes a callback already taken.
UPDATE batch_conversions
SET status = 'swapping', accepted_at = now(), updated_at = now()
WHERE batch_conversion_id = %(batch_conversion_id)s AND status = 'claimed';

-- name: stale_conversions
SELECT batch_conversion_id, status, created_at, row_count, total_eth,
       outcome_currency
FROM batch_conversions
WHERE status IN ('claimed', 'swapping')
  AND created_at < now() - make_interval(secs => %(stale_after_s)s)
ORDER BY created_at;

-- name: conversion_for_update
SELECT batch_conversion_id, outcome_currency, status, row_count, total_eth,
       total_usd, swap_id, tx_hash, actual_usdt_received
FROM batch_conversions
WHERE batch_conversion_id = %(batch_conversion_id)s
FOR UPDATE;

-- name: complete_conversion
UPDATE batch_conversions
SET status = 'completed', swap_id = %(swap_id)s, tx_hash = %(tx_hash)s,
    actual_usdt_received = %(actual_usdt_received)s,
    finished_at = now(), updated_at = now()
WHERE batch_conversion_id = %(batch_conversion_id)s;

-- name: share_usdt
-- Share the USDT received among the conversion's rows in proportion to the
-- crypto each contributed, exactly, in USDT's unit of 10^-6 (DESIGN.md
-- section 2). Everything is integer arithmetic on NUMERIC: each row's crypto
-- in its 10^-18 unit, the amount received in 10^-6 units. Each row gets the
-- floor of its exact share; the units left over (fewer than the number of
-- rows) go one each to the rows with the largest remainders, ties to the
-- lower id. Then each gross share is split into the platform fee (rounded
-- half-up to 10^-6 with the row's own fee percent) and the client's net.
WITH member AS (
    SELECT id, platform_fee_percent,
           accumulated_eth * 1000000000000000000 AS eth_units
    FROM payout_accumulation
    WHERE batch_conversion_id = %(batch_conversion_id)s
      AND conversion_status = 'swapping'
),
received AS (
    SELECT %(actual_usdt_received)s::numeric * 1000000 AS usdt_units,
           (SELECT sum(eth_units) FROM member) AS eth_units
),
floor_share AS (
    SELECT member.id, member.platform_fee_percent,
           div(received.usdt_units * member.eth_units, received.eth_units) AS units,
           mod(received.usdt_units * member.eth_units, received.eth_units) AS remainder
    FROM member, received
),
ranked AS (
    SELECT id, platform_fee_percent, units,
           row_number() OVER (ORDER BY remainder DESC, id) AS place,
           (SELECT usdt_units FROM received) - sum(units) OVER () AS spare_units
    FROM floor_share
),
gross AS (
    -- Multiplied by 10^-6, never divided by 10^6: numeric division keeps
    -- about 16 significant digits, so a share of 10^12 USDT or more would
    -- lose decimals. Multiplication is exact.
    SELECT id, platform_fee_percent,
           (units + CASE WHEN place <= spare_units THEN 1 ELSE 0 END)
               * 0.000001 AS gross_usdt
    FROM ranked
),
split AS (
    -- x 0.01 rather than / 100 for the same reason: a quotient rounded to
    -- 10 places first, then to 6, can round up what is below half a unit.
    SELECT id, gross_usdt,
           round(gross_usdt * platform_fee_percent * 0.01, 6) AS fee_usdt
    FROM gross
)
UPDATE payout_accumulation AS row
SET conversion_status = 'converted',
    platform_fee_usdt = split.fee_usdt,
    accumulated_usdt = split.gross_usdt - split.fee_usdt,
    updated_at = now()
FROM split
WHERE row.id = split.id;

-- name: conversion_totals
-- Checked after sharing, inside the same transaction (invariant 3).
SELECT count(*) AS row_count,
       coalesce(sum(accumulated_usdt + platform_fee_usdt), 0) AS shared_usdt,
       coalesce(sum(platform_fee_usdt), 0) AS fee_usdt
FROM payout_accumulation
WHERE batch_conversion_id = %(batch_conversion_id)s
  AND conversion_status = 'converted';

-- name: fail_conversion
UPDATE batch_conversions
SET status = 'failed', swap_id = coalesce(%(swap_id)s, swap_id),
    tx_hash = coalesce(%(tx_hash)s, tx_hash),
    failure_reason = %(failure_reason)s, finished_at = now(), updated_at = now()
WHERE batch_conversion_id = %(batch_conversion_id)s;

-- name: release_rows
-- A failed conversion returns its rows to 'pending' for a later batch; its
-- membership rows keep what it held.
UPDATE payout_accumulation
SET conversion_status = 'pending', batch_conversion_id = NULL, updated_at = now()
WHERE batch_conversion_id = %(batch_conversion_id)s
  AND conversion_status = 'swapping';

-- name: conversion_status
SELECT status FROM batch_conversions
WHERE batch_conversion_id = %(batch_conversion_id)s;
