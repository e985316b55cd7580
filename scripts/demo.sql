-- What the demo reads to decide it has settled and to print its tables.

-- name: unsettled
SELECT
    (SELECT count(*) FROM batch_conversions
     WHERE status IN ('claimed', 'swapping')) AS open_conversions,
    (SELECT count(*) FROM payout_batches
     WHERE status IN ('claimed', 'sent')) AS open_payouts,
    (SELECT coalesce(sum(accumulated_usd), 0) FROM payout_accumulation
     WHERE conversion_status = 'pending') AS pending_usd,
    (SELECT count(*) FROM (
        SELECT row.client_id
        FROM payout_accumulation AS row
        JOIN clients AS client USING (client_id)
        WHERE row.conversion_status = 'converted' AND row.payout_batch_id IS NULL
        GROUP BY row.client_id, client.payout_threshold_usd
        HAVING sum(row.accumulated_usdt) >= client.payout_threshold_usd
    ) AS due) AS clients_due;

-- name: per_client
SELECT client.client_id,
       client.payout_threshold_usd AS threshold_usd,
       count(row.id) AS payments,
       coalesce(sum(row.accumulated_eth), 0) AS credited_eth,
       coalesce(sum(row.accumulated_usd), 0) AS credited_usd,
       coalesce(sum(row.accumulated_usdt), 0) AS converted_usdt,
       coalesce(sum(row.accumulated_usdt) FILTER (WHERE row.is_paid_out), 0)
           AS paid_usdt,
       coalesce(sum(row.accumulated_usdt)
           FILTER (WHERE row.conversion_status = 'converted'
                   AND NOT row.is_paid_out), 0) AS unpaid_usdt,
       coalesce(sum(row.accumulated_eth)
           FILTER (WHERE row.conversion_status <> 'converted'), 0)
           AS pending_eth
FROM clients AS client
LEFT JOIN payout_accumulation AS row USING (client_id)
WHERE client.payout_strategy = 'threshold'
GROUP BY client.client_id, client.payout_threshold_usd
ORDER BY client.client_id;

-- name: batches
SELECT 'conversion' AS kind, batch_conversion_id::text AS id, status, row_count,
       trim_scale(total_eth)::text || ' eth -> '
           || coalesce(trim_scale(actual_usdt_received)::text || ' usdt', '-')
           AS amounts
FROM batch_conversions
UNION ALL
SELECT 'payout', batch_id::text, status, row_count,
       trim_scale(total_usdt)::text || ' usdt -> '
           || coalesce(trim_scale(amount_sent)::text || ' ' || sent_currency, '-')
FROM payout_batches
ORDER BY kind, status, id;

-- name: deliveries
SELECT outcome, http_status, count(*) AS deliveries
FROM ipn_events
GROUP BY outcome, http_status
ORDER BY outcome;
