-- The accumulator's SQL. Each block is one named, parameterised statement.

-- name: find_client
-- An order names the client's paid channel or its open channel.
SELECT client_id, payout_strategy
FROM clients
WHERE client_id = %(channel_id)s OR open_channel_id = %(channel_id)s
ORDER BY client_id = %(channel_id)s DESC
LIMIT 1;

-- name: insert_credit
-- The unique payment id makes a repeated or concurrent delivery insert
-- nothing: the second transaction waits for the first, then skips.
INSERT INTO payout_accumulation (
    nowpayments_payment_id, client_id, user_id, subscription_id,
    payment_amount_usd, usd_source, platform_fee_percent, accumulated_usd,
    accumulated_eth, outcome_currency
) VALUES (
    %(payment_id)s, %(client_id)s, %(user_id)s, %(subscription_id)s,
    %(payment_amount_usd)s, %(usd_source)s, %(platform_fee_percent)s,
    %(accumulated_usd)s, %(accumulated_eth)s, %(outcome_currency)s
)
ON CONFLICT (nowpayments_payment_id) DO NOTHING
RETURNING id;

-- name: find_credit
SELECT id, client_id, accumulated_eth, outcome_currency
FROM payout_accumulation
WHERE nowpayments_payment_id = %(payment_id)s;

-- name: record_delivery
INSERT INTO ipn_events (
    source, request_id, payment_id, payment_status, signature_valid,
    outcome, http_status, error_code, error_message, accumulation_id,
    raw_body, body_size
) VALUES (
    %(source)s, %(request_id)s, %(payment_id)s, %(payment_status)s,
    %(signature_valid)s, %(outcome)s, %(http_status)s, %(error_code)s,
    %(error_message)s, %(accumulation_id)s, %(raw_body)s, %(body_size)s
)
RETURNING id;
