-- depends: 0001.schema
-- The micro-batch check sums accumulated_usd over pending rows every run.
-- Carrying the amount in the partial index lets that sum read the index
-- alone, never the table's history of converted and paid rows.
DROP INDEX payout_accumulation_pending;
CREATE INDEX payout_accumulation_pending
    ON payout_accumulation (outcome_currency) INCLUDE (accumulated_usd)
    WHERE conversion_status = 'pending';
