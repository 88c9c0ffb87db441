-- Renews the leases ($1 event ids, $2 lease owners) this replica holds, by $3 seconds, and returns
-- the events whose lease another owner has taken. One primary-key lookup per lease: `status` is
-- not named (a held lease is a pending event's: an outcome clears the owner in the statement that
-- finishes it), or every partial index of pending events would be a candidate plan, and on an inbox
-- without statistics the generic plan walked one whole for every lease (seconds every renewal
-- under `scripts/bench pipeline` once a backlog formed, so leases expired while their events ran).
-- Never waits for a row lock (see `renew_leases` in src/webhooks/store.rs).
WITH held AS (
    SELECT e.id FROM orchestrator_webhook_events e
    JOIN unnest($1::uuid[], $2::uuid[]) AS l(id, owner) ON e.id = l.id AND e.lease_owner = l.owner
    FOR UPDATE OF e SKIP LOCKED),
renewed AS (
    UPDATE orchestrator_webhook_events e SET lease_until = now() + make_interval(secs => $3)
    FROM held WHERE e.id = held.id)
SELECT e.id AS "lost!" FROM orchestrator_webhook_events e
JOIN unnest($1::uuid[], $2::uuid[]) AS l(id, owner) ON e.id = l.id
WHERE e.lease_owner <> l.owner
