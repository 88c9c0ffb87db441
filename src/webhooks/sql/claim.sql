-- Claims up to $1 due events tagged from $3 to $4 with a lease of $2 seconds, in fair-share tag
-- order (src/webhooks/fairness.rs). The lower bound skips the start of the fair index, where the
-- entries of finished events stay until a vacuum (see `ClaimScan` in src/webhooks/dispatch/mod.rs). Only the lease columns change, so with free room on the page the
-- update is HOT. An event waits while an earlier event with the
-- same ordering key is unfinished (a thread's events in order). Run on the queue pool, where
-- walking the fair index in order is the only plan it can get.
UPDATE orchestrator_webhook_events e
SET lease_owner = gen_random_uuid(), lease_until = now() + make_interval(secs => $2),
    attempts = e.attempts + 1, updated_at = now()
WHERE e.id IN (
    SELECT c.id FROM orchestrator_webhook_events c
    WHERE c.fair_tag >= $3 AND c.fair_tag <= $4
      AND c.next_attempt_at <= now()
      AND c.status = 'pending'
      AND (c.lease_until IS NULL OR c.lease_until < now())
      -- Written as OR, not an anti join, so it probes the ordering index per candidate instead
      -- of reading the whole backlog on every claim. In that index's order, not as NOT EXISTS
      -- (which drops an ORDER BY): on an inbox without statistics every partial index looks as
      -- cheap, and the probe became a walk of the whole fair index per candidate (under
      -- `scripts/bench pipeline`: 1.59 million buffers and 1.9 s for a claim of 20, and dispatch
      -- at 544 events a second against 4,134 accepted). Any other index needs a sort, which the
      -- queue pool forbids.
      AND (c.ordering_key IS NULL OR (
          SELECT p.id FROM orchestrator_webhook_events p
          WHERE p.ordering_key = c.ordering_key
            AND p.status = 'pending'
            AND (p.received_at, p.id) < (c.received_at, c.id)
          ORDER BY p.ordering_key, p.received_at
          LIMIT 1) IS NULL)
    ORDER BY c.fair_tag
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
RETURNING e.id, e.lease_owner AS "lease!", e.source, e.kind, e.delivery_id, e.headers, e.body, e.received_at,
    e.attempts, e.ordering_key, e.fair_tag
