-- The scheduled-run mechanism's SQL (shared/jobs.py).

-- name: take_lock
-- A transaction-level lock on the lock connection: released when that
-- transaction ends, or when the server ends the session because it sat
-- idle in the transaction longer than the run's bound.
SELECT set_config('idle_in_transaction_session_timeout', %(timeout)s, true),
       pg_try_advisory_xact_lock(%(namespace)s, %(key)s) AS locked;

-- name: slot_succeeded
SELECT id FROM job_runs
WHERE job = %(job)s AND slot = %(slot)s AND outcome = 'succeeded';

-- name: start_run
INSERT INTO job_runs (job, slot, trigger) VALUES (%(job)s, %(slot)s, %(trigger)s)
RETURNING id;

-- name: finish_run
UPDATE job_runs
SET outcome = %(outcome)s, figures = %(figures)s, error = %(error)s,
    finished_at = clock_timestamp()
WHERE id = %(id)s;

-- name: record_skip
-- A run that did nothing (lock busy, slot already done) is still recorded.
INSERT INTO job_runs (job, slot, trigger, outcome, finished_at)
VALUES (%(job)s, %(slot)s, %(trigger)s, %(outcome)s, clock_timestamp())
RETURNING id;
