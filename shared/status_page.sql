-- The status page's own SQL (shared/status_page.py); the rest of the page
-- reuses payoutctl status's queries (queries.sql) and the health report's
-- (health.sql). Every list is bounded: the page must stay cheap to refresh
-- every 30 seconds whatever the history holds.

-- name: recent_runs
-- Each job's newest runs, oldest first, for its timeline. By id, the order
-- runs started in; a run that is still running has no finish yet.
SELECT job.name AS job, run.id, run.slot, run.trigger, run.outcome,
       run.started_at, run.finished_at,
       extract(epoch FROM run.finished_at - run.started_at) AS took_s
FROM unnest(%(jobs)s::text[]) WITH ORDINALITY AS job(name, position)
CROSS JOIN LATERAL (
    SELECT id, slot, trigger, outcome, started_at, finished_at
    FROM job_runs
    WHERE job_runs.job = job.name
    ORDER BY id DESC
    LIMIT %(runs_per_job)s
) AS run
ORDER BY job.position, run.id;

-- name: clients_waiting
-- Per client, what waits: USD pending conversion (the partial index of
-- pending rows) and converted USDT no payout batch has claimed (the
-- payable index), against the client's threshold as /process judges it.
-- Those nearest a payout come first. The wallet is shortened here, so the
-- page never holds a full address. clients_waiting counts them all, before
-- the limit.
WITH pending AS (
    SELECT client_id, count(*) AS row_count, sum(accumulated_usd) AS usd
    FROM payout_accumulation
    WHERE conversion_status = 'pending'
    GROUP BY client_id
), unpaid AS (
    SELECT client_id, count(*) AS row_count, sum(accumulated_usdt) AS usdt
    FROM payout_accumulation
    WHERE conversion_status = 'converted' AND payout_batch_id IS NULL
    GROUP BY client_id
), waiting AS (
    SELECT client_id,
           coalesce(p.row_count, 0) AS pending_rows,
           coalesce(p.usd, 0) AS pending_usd,
           coalesce(u.row_count, 0) AS unpaid_rows,
           coalesce(u.usdt, 0) AS unpaid_usdt
    FROM pending p
    FULL JOIN unpaid u USING (client_id)
), judged AS (
    SELECT w.*, c.payout_strategy, c.payout_threshold_usd AS threshold_usd,
           c.payout_currency, c.payout_network,
           CASE
               WHEN c.wallet_address IS NULL THEN NULL
               WHEN length(c.wallet_address) >= 16
                   THEN left(c.wallet_address, 6) || '…'
                        || right(c.wallet_address, 4)
               ELSE left(c.wallet_address, 2) || '…'
                    || right(c.wallet_address, 2)
           END AS wallet_short,
           c.payout_strategy = 'threshold'
               AND w.unpaid_usdt >= c.payout_threshold_usd
               AND w.unpaid_usdt > 0 AS over_threshold,
           CASE WHEN c.payout_strategy = 'threshold'
                THEN round(100 * w.unpaid_usdt / c.payout_threshold_usd, 1)
           END AS threshold_percent
    FROM waiting w
    JOIN clients c USING (client_id)
)
SELECT *, count(*) OVER () AS clients_waiting
FROM judged
ORDER BY over_threshold DESC, threshold_percent DESC NULLS LAST,
         pending_usd DESC, client_id
LIMIT %(limit)s;
