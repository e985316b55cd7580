-- The batch processor's SQL. Each block is one named statement.

-- name: claim_timeout
-- For the claim's transaction only: it is bounded by the run, not by the
-- service's statement timeout meant for single requests.
SELECT set_config('statement_timeout', %(timeout)s, true);

-- name: claim_payouts
-- One statement finds every threshold client whose converted, unclaimed
-- USDT reaches the client's own threshold, and claims exactly those rows
-- into one payout batch per client, with the client's wallet as it is now,
-- the membership rows, and the payout task in the outbox. Sum and claim see
-- one snapshot: a row converted meanwhile is neither counted nor taken.
-- Rows pending conversion never count (one USDT is taken as one USD).
WITH payable AS (
    SELECT id, client_id, accumulated_usdt
    FROM payout_accumulation
    WHERE conversion_status = 'converted' AND payout_batch_id IS NULL
    FOR UPDATE SKIP LOCKED
),
per_client AS (
    SELECT client_id, sum(accumulated_usdt) AS total_usdt, count(*) AS row_count
    FROM payable
    GROUP BY client_id
),
due AS (
    SELECT gen_random_uuid() AS batch_id, client.client_id,
           client.wallet_address, client.payout_currency, client.payout_network,
           per_client.total_usdt, per_client.row_count
    FROM per_client
    JOIN clients AS client USING (client_id)
    WHERE client.payout_strategy = 'threshold'
      AND client.wallet_address IS NOT NULL
      AND per_client.total_usdt >= client.payout_threshold_usd
      AND per_client.total_usdt > 0
),
batches AS (
    INSERT INTO payout_batches (
        batch_id, client_id, wallet_address, payout_currency, payout_network,
        total_usdt, row_count, status
    )
    SELECT batch_id, client_id, wallet_address, payout_currency, payout_network,
           total_usdt, row_count, 'claimed'
    FROM due
    RETURNING batch_id, client_id, total_usdt, row_count
),
claimed AS (
    UPDATE payout_accumulation AS row
    SET payout_batch_id = batches.batch_id, updated_at = now()
    FROM payable, batches
    WHERE row.id = payable.id AND payable.client_id = batches.client_id
    RETURNING row.id, row.accumulated_usdt, batches.batch_id
),
members AS (
    INSERT INTO payout_batch_members (batch_id, accumulation_id, accumulated_usdt)
    SELECT batch_id, id, accumulated_usdt FROM claimed
),
tasks AS (
    INSERT INTO outbox (service, target_url, payload, dedup_key)
    SELECT %(service)s, %(payout_executor_url)s,
           jsonb_build_object(
               'kind', 'payout',
               'batch_id', due.batch_id,
               'client_id', due.client_id,
               'amount_usdt', trim_scale(due.total_usdt)::text,
               'payout_currency', due.payout_currency,
               'payout_network', due.payout_network,
               'wallet_address', due.wallet_address,
               'row_count', due.row_count,
               'callback_url', %(callback_url)s
           ),
           due.batch_id::text
    FROM due
)
SELECT count(*) AS batches, coalesce(sum(total_usdt), 0) AS total_usdt,
       coalesce(sum(row_count), 0) AS rows
FROM batches;

-- name: waiting_without_wallet
-- Threshold clients over their threshold who cannot be paid: no wallet.
SELECT count(*) AS clients
FROM (
    SELECT client_id, sum(accumulated_usdt) AS total_usdt
    FROM payout_accumulation
    WHERE conversion_status = 'converted' AND payout_batch_id IS NULL
    GROUP BY client_id
) AS per_client
JOIN clients AS client USING (client_id)
WHERE client.payout_strategy = 'threshold'
  AND client.wallet_address IS NULL
  AND per_client.total_usdt >= client.payout_threshold_usd;

-- name: mark_sent
-- The executor accepted the task. A late acceptance never undoes a
-- callback already taken.
UPDATE payout_batches
SET status = 'sent', accepted_at = now(), updated_at = now()
WHERE batch_id = %(batch_id)s AND status = 'claimed';

-- name: stale_batches
SELECT batch_id, client_id, status, created_at, total_usdt, row_count
FROM payout_batches
WHERE status IN ('claimed', 'sent')
  AND created_at < now() - make_interval(secs => %(stale_after_s)s)
ORDER BY created_at;

-- name: batch_for_update
SELECT batch_id, client_id, status, total_usdt, row_count, tx_hash,
       amount_sent, sent_currency, payout_currency
FROM payout_batches
WHERE batch_id = %(batch_id)s
FOR UPDATE;

-- name: complete_batch
UPDATE payout_batches
SET status = 'completed', tx_hash = %(tx_hash)s, amount_sent = %(amount_sent)s,
    sent_currency = %(currency)s, finished_at = now(), updated_at = now()
WHERE batch_id = %(batch_id)s;

-- name: mark_rows_paid
UPDATE payout_accumulation
SET is_paid_out = true, paid_out_at = now(), updated_at = now()
WHERE payout_batch_id = %(batch_id)s AND NOT is_paid_out;

-- name: paid_totals
-- Checked after marking rows paid, in the same transaction (invariant 4).
SELECT count(*) AS row_count, coalesce(sum(accumulated_usdt), 0) AS total_usdt
FROM payout_accumulation
WHERE payout_batch_id = %(batch_id)s AND is_paid_out;

-- name: fail_batch
UPDATE payout_batches
SET status = 'failed', tx_hash = coalesce(%(tx_hash)s, tx_hash),
    failure_reason = %(failure_reason)s, finished_at = now(), updated_at = now()
WHERE batch_id = %(batch_id)s;

-- name: release_batch_rows
-- A failed payout returns its rows for the next run; the membership rows
-- keep what the batch held.
UPDATE payout_accumulation
SET payout_batch_id = NULL, updated_at = now()
WHERE payout_batch_id = %(batch_id)s AND NOT is_paid_out;

-- name: batch_status
SELECT status FROM payout_batches WHERE batch_id = %(batch_id)s;
