-- What the soak test reads back once the traffic has stopped.

-- name: stored_payments
SELECT nowpayments_payment_id, count(*) AS row_count
FROM payout_accumulation
GROUP BY nowpayments_payment_id;

-- name: recorded_deliveries
SELECT count(*) AS delivery_count FROM ipn_events;

-- name: batch_states
SELECT 'conversion' AS kind, status, count(*) AS batch_count
FROM batch_conversions
GROUP BY status
UNION ALL
SELECT 'payout', status, count(*)
FROM payout_batches
GROUP BY status
ORDER BY kind, status;

-- name: paid_usdt
SELECT coalesce(sum(accumulated_usdt) FILTER (WHERE is_paid_out), 0)
           AS paid_usdt,
       count(*) FILTER (WHERE is_paid_out) AS paid_rows
FROM payout_accumulation;
