-- depends: 0002.pending-sum-index
-- Every check-threshold run looks for conversions unfinished past
-- SWAP_STALE_AFTER, and its watchdog for runs still marked running. Both
-- tables only grow: without these indexes each run reads every conversion
-- and every run ever recorded, and slows down as the history grows. With
-- them it reads only the few rows still open.
CREATE INDEX batch_conversions_unfinished
    ON batch_conversions (created_at)
    WHERE status IN ('claimed', 'swapping');
CREATE INDEX job_runs_running
    ON job_runs (job, started_at)
    WHERE outcome = 'running';
