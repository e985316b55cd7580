-- The health report's SQL (shared/health.py). Ages come from the database's
-- clock, so a heartbeat aged in the database ages the report the same way.

-- name: job_heartbeats
-- Per job: the newest successful run's finish (the heartbeat) and the
-- oldest run still marked running. A run that started and never finished
-- is not a heartbeat. A run marked running that started before the last
-- run that succeeded is left out: that later run held the lock, so this one
-- had lost it (its worker died, or its bound ran out); it stays 'running'
-- forever, and counting it would leave the job hung in /health forever too.
-- Runs that succeed hold the lock one after another, so the last to finish
-- is the last to start, and the heartbeat index finds it.
SELECT job.name AS job,
       (SELECT max(finished_at) FROM job_runs
        WHERE job_runs.job = job.name AND outcome = 'succeeded') AS last_success_at,
       (SELECT min(started_at) FROM job_runs AS running
        WHERE running.job = job.name AND running.outcome = 'running'
          AND running.started_at >= coalesce(
              (SELECT last.started_at FROM job_runs AS last
               WHERE last.job = job.name AND last.outcome = 'succeeded'
               ORDER BY last.finished_at DESC LIMIT 1),
              '-infinity')) AS running_since,
       (SELECT created_at FROM suite_info) AS suite_created_at,
       now() AS now
FROM unnest(%(jobs)s::text[]) AS job(name);

-- name: open_batches
-- Conversions and payouts not finished, and those older than the stale bound.
SELECT
    (SELECT count(*) FROM batch_conversions
     WHERE status IN ('claimed', 'swapping')) AS conversions_open,
    (SELECT count(*) FROM batch_conversions
     WHERE status IN ('claimed', 'swapping')
       AND created_at < now() - make_interval(secs => %(stale_after_s)s))
        AS conversions_stuck,
    (SELECT min(created_at) FROM batch_conversions
     WHERE status IN ('claimed', 'swapping')) AS oldest_conversion_at,
    (SELECT count(*) FROM payout_batches
     WHERE status IN ('claimed', 'sent')) AS payouts_open,
    (SELECT count(*) FROM payout_batches
     WHERE status IN ('claimed', 'sent')
       AND created_at < now() - make_interval(secs => %(stale_after_s)s))
        AS payouts_stuck,
    (SELECT min(created_at) FROM payout_batches
     WHERE status IN ('claimed', 'sent')) AS oldest_payout_at;

-- name: undelivered_tasks
SELECT service, count(*) AS tasks, min(created_at) AS oldest_at,
       max(attempts) AS most_attempts
FROM outbox
WHERE sent_at IS NULL
GROUP BY service
ORDER BY service;
