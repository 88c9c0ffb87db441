-- Outcomes from parallel arrays, each joined to its event by primary key and written only if the
-- writer still holds the event's lease. Run on the queue pool, where a lookup per row is the only
-- plan it can get. Its commit waits for the WAL flush, unlike the pool's other statements: an
-- outcome lost to a database crash would send its event to the agent again. `set_config` (local
-- to this statement's own transaction) does it in the one round trip; a volatile column is never
-- dropped from a subquery, so it runs even though nothing reads it.
UPDATE orchestrator_webhook_events e
SET status = o.status, next_attempt_at = coalesce(o.next_attempt_at, e.next_attempt_at),
    last_error = o.last_error, skip_reason = o.skip_reason, org_id = coalesce(o.org_id, e.org_id),
    team_node_id = coalesce(o.team_node_id, e.team_node_id),
    correlation_id = coalesce(o.correlation_id, e.correlation_id),
    agent_result = coalesce(o.agent_result::jsonb, e.agent_result),
    lease_owner = NULL, lease_until = NULL, updated_at = now(),
    finished_at = CASE WHEN o.status <> 'pending' THEN now() END
FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[])
    AS o(id, owner, status, next_attempt_at, last_error, skip_reason, org_id, team_node_id, correlation_id, agent_result),
    (SELECT set_config('synchronous_commit', 'on', true)) AS flushed
WHERE e.id = o.id AND e.lease_owner = o.owner
RETURNING e.id
