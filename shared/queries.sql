-- payoutctl's SQL: clients first, then the reconciliation of DESIGN.md
-- section 8. Loaded once by shared.clients; values are always parameters.

-- name: lock_clients
-- The channel-id rules span rows (one client's open channel must not be
-- another client's id), so no constraint can hold them: two adds checking at
-- once would both pass. This mode conflicts with itself and with every
-- INSERT, UPDATE and DELETE on clients, while plain reads and the
-- foreign-key checks of new payments go on.
LOCK TABLE clients IN SHARE ROW EXCLUSIVE MODE;

-- name: channel_id_clashes
-- Clients whose ids collide with a new client's ids. An IPN's order_id
-- names one channel, paid or open, and it must lead to exactly one client.
SELECT client_id, open_channel_id
FROM clients
WHERE client_id IN (%(client_id)s, %(open_channel_id)s)
   OR open_channel_id IN (%(client_id)s, %(open_channel_id)s)
ORDER BY client_id;

-- name: insert_client
INSERT INTO clients (client_id, open_channel_id, payout_strategy,
    payout_threshold_usd, wallet_address, payout_currency, payout_network)
VALUES (%(client_id)s, %(open_channel_id)s, %(payout_strategy)s,
    %(payout_threshold_usd)s, %(wallet_address)s, %(payout_currency)s,
    %(payout_network)s);

-- name: list_clients
SELECT client_id, open_channel_id, payout_strategy, payout_threshold_usd,
       wallet_address, payout_currency, payout_network, created_at,
       updated_at
FROM clients
ORDER BY client_id;

-- name: client_for_update
SELECT client_id, payout_strategy
FROM clients
WHERE client_id = %(client_id)s
FOR UPDATE;

-- name: set_threshold
-- Setting the value a client already has changes nothing, updated_at
-- included.
UPDATE clients
SET payout_threshold_usd = %(payout_threshold_usd)s, updated_at = now()
WHERE client_id = %(client_id)s
  AND payout_threshold_usd IS DISTINCT FROM %(payout_threshold_usd)s;

-- name: set_wallet
UPDATE clients
SET wallet_address = %(wallet_address)s,
    payout_currency = %(payout_currency)s,
    payout_network = %(payout_network)s,
    updated_at = now()
WHERE client_id = %(client_id)s
  AND (wallet_address, payout_currency, payout_network)
      IS DISTINCT FROM (%(wallet_address)s::text, %(payout_currency)s::text,
                        %(payout_network)s::text);

-- name: reconcile_snapshot
-- Every check sees the same moment: a batch completing between two checks
-- must not show up as a breach.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- name: reconcile_scope
SELECT (SELECT count(*) FROM payout_accumulation) AS row_count,
       (SELECT count(*) FROM batch_conversions) AS conversion_count,
       (SELECT count(*) FROM payout_batches) AS payout_batch_count,
       (SELECT count(*) FROM ipn_events) AS delivery_count;

-- name: invariant_1
-- A payment id credited more than once: by two rows (the UNIQUE constraint
-- forbids it; checked all the same), or by two deliveries recorded as
-- 'accumulated'.
SELECT 'rows' AS place,
       nowpayments_payment_id AS payment_id,
       array_agg(id ORDER BY id) AS row_ids,
       NULL::bigint[] AS event_ids,
       array_agg(accumulated_usd ORDER BY id) AS amounts_usd
FROM payout_accumulation
GROUP BY nowpayments_payment_id
HAVING count(*) > 1
UNION ALL
SELECT 'deliveries',
       e.payment_id,
       array_agg(e.accumulation_id ORDER BY e.id),
       array_agg(e.id ORDER BY e.id),
       array_agg(r.accumulated_usd ORDER BY e.id)
FROM ipn_events e
LEFT JOIN payout_accumulation r ON r.id = e.accumulation_id
WHERE e.outcome = 'accumulated' AND e.payment_id IS NOT NULL
GROUP BY e.payment_id
HAVING count(*) > 1
ORDER BY payment_id, place;

-- name: invariant_2
-- Membership is kept after a failure, so a row may be listed by several
-- batches of a kind, but by one at most that has not failed.
SELECT 'conversion' AS kind,
       m.accumulation_id,
       min(r.outcome_currency) AS unit,
       array_agg(m.batch_conversion_id::text
                 ORDER BY b.created_at, m.batch_conversion_id) AS batch_ids,
       array_agg(b.status
                 ORDER BY b.created_at, m.batch_conversion_id) AS statuses,
       array_agg(m.accumulated_eth
                 ORDER BY b.created_at, m.batch_conversion_id) AS amounts
FROM batch_conversion_members m
JOIN batch_conversions b ON b.batch_conversion_id = m.batch_conversion_id
LEFT JOIN payout_accumulation r ON r.id = m.accumulation_id
WHERE b.status <> 'failed'
GROUP BY m.accumulation_id
HAVING count(*) > 1
UNION ALL
SELECT 'payout batch',
       m.accumulation_id,
       'usdt',
       array_agg(m.batch_id::text ORDER BY b.created_at, m.batch_id),
       array_agg(b.status ORDER BY b.created_at, m.batch_id),
       array_agg(m.accumulated_usdt ORDER BY b.created_at, m.batch_id)
FROM payout_batch_members m
JOIN payout_batches b ON b.batch_id = m.batch_id
WHERE b.status <> 'failed'
GROUP BY m.accumulation_id
HAVING count(*) > 1
ORDER BY accumulation_id, kind;

-- name: invariant_3
-- The rows a completed conversion shared its USDT among are those pointing
-- at it now. A row among them without USDT is a breach by itself.
SELECT c.batch_conversion_id::text AS batch_conversion_id,
       c.actual_usdt_received,
       count(r.id) AS row_count,
       coalesce(sum(r.accumulated_usdt), 0) AS net_usdt,
       coalesce(sum(r.platform_fee_usdt), 0) AS fee_usdt,
       coalesce(sum(r.accumulated_usdt), 0)
           + coalesce(sum(r.platform_fee_usdt), 0) AS held_usdt,
       count(r.id) FILTER (WHERE r.accumulated_usdt IS NULL
                              OR r.platform_fee_usdt IS NULL)
           AS rows_without_usdt
FROM batch_conversions c
LEFT JOIN payout_accumulation r
       ON r.batch_conversion_id = c.batch_conversion_id
WHERE c.status = 'completed'
GROUP BY c.batch_conversion_id
HAVING coalesce(sum(r.accumulated_usdt), 0)
           + coalesce(sum(r.platform_fee_usdt), 0) <> c.actual_usdt_received
    OR count(r.id) FILTER (WHERE r.accumulated_usdt IS NULL
                              OR r.platform_fee_usdt IS NULL) > 0
ORDER BY c.batch_conversion_id;

-- name: invariant_4
-- Three ways a payout batch's total can disagree with its rows: with the
-- members it recorded at claim, the members' rows with what was recorded,
-- and (unless it failed and released them) the rows pointing at it now,
-- which are the rows marked paid when it completes.
WITH members AS (
    SELECT m.batch_id,
           count(*) AS member_count,
           sum(m.accumulated_usdt) AS member_usdt,
           sum(r.accumulated_usdt) AS row_usdt,
           array_agg(m.accumulation_id ORDER BY m.accumulation_id)
               FILTER (WHERE r.accumulated_usdt
                             IS DISTINCT FROM m.accumulated_usdt)
               AS drifted_rows
    FROM payout_batch_members m
    LEFT JOIN payout_accumulation r ON r.id = m.accumulation_id
    GROUP BY m.batch_id
), claimed AS (
    SELECT payout_batch_id AS batch_id,
           count(*) AS claimed_count,
           sum(accumulated_usdt) AS claimed_usdt
    FROM payout_accumulation
    WHERE payout_batch_id IS NOT NULL
    GROUP BY payout_batch_id
), batches AS (
    SELECT b.batch_id, b.status, b.total_usdt,
           coalesce(m.member_count, 0) AS member_count,
           coalesce(m.member_usdt, 0) AS member_usdt,
           m.row_usdt,
           m.drifted_rows,
           coalesce(c.claimed_count, 0) AS claimed_count,
           coalesce(c.claimed_usdt, 0) AS claimed_usdt
    FROM payout_batches b
    LEFT JOIN members m ON m.batch_id = b.batch_id
    LEFT JOIN claimed c ON c.batch_id = b.batch_id
)
SELECT p.problem, b.batch_id::text AS batch_id, b.status, b.total_usdt,
       b.member_count, b.member_usdt, b.row_usdt, b.drifted_rows,
       b.claimed_count, b.claimed_usdt
FROM batches b
CROSS JOIN LATERAL (VALUES
    (1, 'members', b.total_usdt <> b.member_usdt),
    (2, 'rows', b.drifted_rows IS NOT NULL),
    (3, 'claimed', b.status <> 'failed' AND b.claimed_usdt <> b.total_usdt)
) AS p(position, problem, broken)
WHERE p.broken
ORDER BY b.batch_id, p.position;

-- name: invariant_5
-- Paid, or claimed for payout, without USDT from a completed conversion.
SELECT r.id,
       r.client_id,
       r.is_paid_out,
       r.payout_batch_id::text AS payout_batch_id,
       r.conversion_status,
       r.accumulated_usdt,
       r.batch_conversion_id::text AS batch_conversion_id,
       c.status AS conversion_batch_status
FROM payout_accumulation r
LEFT JOIN batch_conversions c
       ON c.batch_conversion_id = r.batch_conversion_id
WHERE (r.is_paid_out OR r.payout_batch_id IS NOT NULL)
  AND (r.conversion_status <> 'converted'
       OR r.accumulated_usdt IS NULL
       OR c.status IS DISTINCT FROM 'completed')
ORDER BY r.id;

-- name: invariant_6
-- Each row's delivery is the ipn_events row linked to it; it must be for
-- the payment the row credits.
SELECT CASE WHEN e.id IS NULL THEN 'missing' ELSE 'other_payment' END
           AS problem,
       r.id,
       r.nowpayments_payment_id,
       r.client_id,
       r.accumulated_eth,
       r.outcome_currency,
       r.accumulated_usd,
       e.id AS event_id,
       e.payment_id AS event_payment_id
FROM payout_accumulation r
LEFT JOIN ipn_events e
       ON e.accumulation_id = r.id AND e.outcome = 'accumulated'
WHERE e.id IS NULL
   OR e.payment_id IS DISTINCT FROM r.nowpayments_payment_id
ORDER BY r.id;

-- --- status (payoutctl status) ----------------------------------------------
-- Each block reads in the reconcile snapshot, so the figures are of one
-- moment. Ages are whole seconds at the snapshot's now().

-- name: status_now
SELECT now() AS now;

-- name: status_pending_conversion
-- What waits for the micro-batch threshold, per outcome currency (the
-- partial index of pending rows holds exactly these).
SELECT outcome_currency,
       count(*) AS row_count,
       sum(accumulated_usd) AS accumulated_usd,
       sum(accumulated_eth) AS accumulated_eth
FROM payout_accumulation
WHERE conversion_status = 'pending'
GROUP BY outcome_currency
ORDER BY outcome_currency;

-- name: status_converted_unpaid
-- Converted rows no payout batch has claimed yet, summed per client and
-- compared with each threshold client's own threshold, as /process does.
WITH per_client AS (
    SELECT client_id, count(*) AS row_count, sum(accumulated_usdt) AS usdt
    FROM payout_accumulation
    WHERE conversion_status = 'converted' AND payout_batch_id IS NULL
    GROUP BY client_id
), judged AS (
    SELECT p.row_count, p.usdt,
           c.payout_strategy = 'threshold'
               AND p.usdt >= c.payout_threshold_usd
               AND p.usdt > 0 AS over_threshold,
           c.wallet_address IS NULL AS without_wallet
    FROM per_client p
    JOIN clients c USING (client_id)
)
SELECT count(*) AS clients,
       coalesce(sum(row_count), 0)::bigint AS row_count,
       coalesce(sum(usdt), 0) AS usdt,
       count(*) FILTER (WHERE over_threshold) AS over_threshold,
       count(*) FILTER (WHERE over_threshold AND without_wallet)
           AS over_threshold_without_wallet
FROM judged;

-- name: status_last_runs
-- Each job's newest run, whatever its outcome (by id: the order runs
-- started in). Its state and heartbeat come from shared.health.
SELECT job.name AS job, last_run.outcome, last_run.trigger,
       last_run.started_at, last_run.finished_at
FROM unnest(%(jobs)s::text[]) AS job(name)
JOIN LATERAL (
    SELECT outcome, trigger, started_at, finished_at
    FROM job_runs
    WHERE job_runs.job = job.name
    ORDER BY id DESC
    LIMIT 1
) AS last_run ON true;

-- name: status_open_batches
-- Conversions and payout batches not finished, oldest first; stale is the
-- services' own rule (stale_conversions, stale_batches). payoutctl lists
-- them all (limit NULL); the status page shows the oldest few.
SELECT 'conversion' AS kind,
       batch_conversion_id::text AS batch_id,
       status, created_at,
       greatest(0, floor(extract(epoch FROM now() - created_at)))::bigint
           AS age_s,
       created_at < now() - make_interval(secs => %(stale_after_s)s) AS stale,
       row_count, outcome_currency, total_eth, total_usd,
       NULL::numeric AS total_usdt, NULL::bigint AS client_id
FROM batch_conversions
WHERE status IN ('claimed', 'swapping')
UNION ALL
SELECT 'payout', batch_id::text, status, created_at,
       greatest(0, floor(extract(epoch FROM now() - created_at)))::bigint,
       created_at < now() - make_interval(secs => %(stale_after_s)s),
       row_count, NULL, NULL, NULL, total_usdt, client_id
FROM payout_batches
WHERE status IN ('claimed', 'sent')
ORDER BY created_at, batch_id
LIMIT %(limit)s;

-- name: status_undelivered_tasks
SELECT service,
       count(*) AS tasks,
       min(created_at) AS oldest_at,
       greatest(0, floor(extract(epoch FROM now() - min(created_at))))::bigint
           AS oldest_age_s,
       max(attempts) AS most_attempts,
       (array_agg(last_error ORDER BY attempts DESC, id)
            FILTER (WHERE last_error IS NOT NULL))[1] AS last_error
FROM outbox
WHERE sent_at IS NULL
GROUP BY service
ORDER BY service;

-- --- releasing a stuck batch (payoutctl batches release) --------------------
-- The status change and the rows' release are the services' own statements
-- (fail_conversion and release_rows, fail_batch and release_batch_rows);
-- these only show what a release would take, and withdraw its task.

-- name: conversion_to_release
-- held_*: the rows release_rows would return to 'pending'.
SELECT c.batch_conversion_id::text AS batch_id, c.status, c.created_at,
       greatest(0, floor(extract(epoch FROM now() - c.created_at)))::bigint
           AS age_s,
       c.outcome_currency, c.row_count, c.total_eth, c.total_usd, c.swap_id,
       c.failure_reason, held.row_count AS held_rows,
       held.eth AS held_eth, held.usd AS held_usd
FROM batch_conversions c
CROSS JOIN LATERAL (
    SELECT count(*) AS row_count,
           coalesce(sum(accumulated_eth), 0) AS eth,
           coalesce(sum(accumulated_usd), 0) AS usd
    FROM payout_accumulation
    WHERE batch_conversion_id = c.batch_conversion_id
      AND conversion_status = 'swapping'
) AS held
WHERE c.batch_conversion_id = %(batch_id)s;

-- name: payout_to_release
-- held_*: the rows release_batch_rows would return to awaiting payout.
SELECT b.batch_id::text AS batch_id, b.status, b.created_at,
       greatest(0, floor(extract(epoch FROM now() - b.created_at)))::bigint
           AS age_s,
       b.client_id, b.wallet_address, b.payout_currency, b.payout_network,
       b.row_count, b.total_usdt, b.failure_reason,
       held.row_count AS held_rows, held.usdt AS held_usdt
FROM payout_batches b
CROSS JOIN LATERAL (
    SELECT count(*) AS row_count, coalesce(sum(accumulated_usdt), 0) AS usdt
    FROM payout_accumulation
    WHERE payout_batch_id = b.batch_id AND NOT is_paid_out
) AS held
WHERE b.batch_id = %(batch_id)s;

-- name: batch_task
-- A batch's task to its executor: its dedup key is the batch id.
SELECT id, attempts, sent_at, last_error
FROM outbox
WHERE service = %(service)s AND dedup_key = %(batch_id)s;

-- name: withdraw_task
-- A released batch's task must never reach the executor afterwards: the
-- executor would swap or pay rows that a later batch may hold by then. A
-- send already under way cannot be stopped; its callback then meets the
-- failed batch and is refused with 409 and an ERROR line.
DELETE FROM outbox
WHERE service = %(service)s AND dedup_key = %(batch_id)s AND sent_at IS NULL
RETURNING id, attempts;

-- --- replaying deliveries (payoutctl deliveries replay) ---------------------

-- name: deliveries_to_replay
-- Deliveries that were authenticated (an IPN whose signature matched, or a
-- router call let in) but named a channel no client owned, or could not be
-- valued (answered 503), not yet answered by a replay. Partial indexes on
-- both outcomes find them.
SELECT id, source, payment_id, raw_body, body_size, received_at
FROM ipn_events
WHERE outcome IN ('unknown_client', 'retry_later')
  AND replayed_at IS NULL
  AND (source = 'router' OR signature_valid)
ORDER BY received_at, id;

-- name: mark_replayed
UPDATE ipn_events
SET replayed_at = now()
WHERE id = %(id)s AND replayed_at IS NULL;
