-- Gives back leases ($1 event ids, $2 lease owners) of claimed events no worker started: claimable
-- again at once, and the claim does not count as an attempt. One primary-key lookup per lease;
-- `status` is not named, for the reason given in renew_leases.sql (a lease is only ever held on a
-- pending event).
UPDATE orchestrator_webhook_events e
SET lease_owner = NULL, lease_until = NULL, attempts = greatest(e.attempts - 1, 0), updated_at = now()
FROM unnest($1::uuid[], $2::uuid[]) AS l(id, owner)
WHERE e.id = l.id AND e.lease_owner = l.owner
