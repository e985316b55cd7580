-- The outbox's SQL (shared/outbox.py).

-- name: enqueue
-- The dedup key makes a second enqueue of the same task a no-op.
INSERT INTO outbox (service, target_url, payload, headers, dedup_key)
VALUES (%(service)s, %(target_url)s, %(payload)s, %(headers)s, %(dedup_key)s)
ON CONFLICT (dedup_key) DO NOTHING
RETURNING id;

-- name: lease_due
-- Take due tasks of one service and push their next attempt past the lease,
-- so a concurrent run skips them; SKIP LOCKED keeps two leasers apart.
UPDATE outbox
SET attempts = attempts + 1,
    next_attempt_at = now() + make_interval(secs => %(lease_s)s)
WHERE id IN (
    SELECT id FROM outbox
    WHERE service = %(service)s
      AND sent_at IS NULL
      AND next_attempt_at <= now()
      AND (%(ids)s::bigint[] IS NULL OR id = ANY (%(ids)s::bigint[]))
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, service, target_url, payload, headers, dedup_key, attempts;

-- name: record_failure
UPDATE outbox
SET last_error = %(error)s,
    next_attempt_at = now() + make_interval(secs => %(delay_s)s)
WHERE id = %(id)s AND sent_at IS NULL;

-- name: record_sent
UPDATE outbox SET sent_at = now(), last_error = NULL
WHERE id = %(id)s AND sent_at IS NULL;

-- name: undelivered
SELECT count(*) AS tasks, min(created_at) AS oldest, max(attempts) AS most_attempts
FROM outbox
WHERE service = %(service)s AND sent_at IS NULL;

-- name: withdraw
-- A task no longer wanted (its batch finished before it was delivered) is
-- closed without being sent; last_error says so.
UPDATE outbox
SET sent_at = now(), last_error = 'withdrawn: its batch finished before delivery'
WHERE id = %(id)s AND sent_at IS NULL;
