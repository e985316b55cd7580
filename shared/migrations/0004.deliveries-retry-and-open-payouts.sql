-- depends: 0003.open-work-indexes
-- A delivery that could not be valued (no price, no USD invoice) is
-- answered 503 so the sender retries; it is now recorded too, as
-- 'retry_later', so nothing that arrives is lost even if the retries end.
ALTER TABLE ipn_events DROP CONSTRAINT ipn_events_outcome_check;
ALTER TABLE ipn_events ADD CONSTRAINT ipn_events_outcome_check CHECK (outcome IN (
    'accumulated', 'duplicate', 'not_final', 'unknown_client', 'instant_client',
    'bad_signature', 'unauthorized', 'invalid', 'retry_later'));
CREATE INDEX ipn_events_retry_later
    ON ipn_events (received_at) WHERE outcome = 'retry_later';

-- A declared Content-Length can exceed what an integer holds.
ALTER TABLE ipn_events ALTER COLUMN body_size TYPE bigint;

-- Health and status look for open payouts every time; like conversions,
-- the table only grows.
CREATE INDEX payout_batches_unfinished
    ON payout_batches (created_at)
    WHERE status IN ('claimed', 'sent');
