-- The webhook inbox. An event is stored here, in the same statement that records its delivery id,
-- before the source gets its 200: nothing acknowledged is ever lost. Dispatch workers on every
-- replica claim events with FOR UPDATE SKIP LOCKED and a lease, so a worker that dies mid-dispatch
-- only delays its event until the lease expires.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

CREATE TABLE orchestrator_webhook_events (
    id UUID PRIMARY KEY,
    source TEXT NOT NULL,
    -- The provider's event type (Slack event type, X-GitHub-Event, PagerDuty event_type, ...).
    kind TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    -- Headers that matter for dispatch and operators; never a signature or a credential.
    headers JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- The raw body as verified; NULL once purged by retention.
    body BYTEA,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A claim only takes a lease (lease_owner, lease_until, attempts) and leaves the status alone:
    -- "processing" is shown for a pending event with a live lease. No indexed column changes, so
    -- with free room on the page a claim is a HOT update (one new heap tuple, no index entries).
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'skipped', 'unrouted', 'dead_letter')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_owner UUID,
    lease_until TIMESTAMPTZ,
    -- Thread, issue or incident: events sharing it are dispatched one at a time, in order.
    ordering_key TEXT,
    last_error TEXT,
    skip_reason TEXT,
    org_id TEXT,
    team_node_id TEXT,
    correlation_id TEXT,
    agent_result JSONB,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
) WITH (fillfactor = 70); -- room for the claimed version of a row next to it

-- Bodies are compressed inline; lz4 costs a fraction of pglz's CPU on every insert and read. A
-- server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE orchestrator_webhook_events ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available on this server; webhook bodies keep pglz';
END
$$;

-- What the workers claim: due events, oldest first. It matches the claim's ORDER BY exactly, so a
-- claim reads a few index entries instead of sorting the whole backlog.
CREATE INDEX orchestrator_webhook_events_due_idx ON orchestrator_webhook_events (next_attempt_at, received_at)
    WHERE status = 'pending';
-- The in-order check looks for earlier unfinished events with the same ordering key.
CREATE INDEX orchestrator_webhook_events_ordering_idx ON orchestrator_webhook_events (ordering_key, received_at)
    WHERE status = 'pending';
-- The operator views list newest first (filters on source and status are applied along it).
-- Kept to this one index on purpose: every index is written by every insert on the hot path.
CREATE INDEX orchestrator_webhook_events_received_idx ON orchestrator_webhook_events (received_at DESC, id DESC);
-- An org admin's view; org_id is set only once an event is routed, so inserts never touch it.
CREATE INDEX orchestrator_webhook_events_org_idx ON orchestrator_webhook_events (org_id, received_at DESC)
    WHERE org_id IS NOT NULL;

-- Delivery ids seen, kept at least a week after their event is purged, so a provider's late retry
-- is still recognised as a duplicate.
CREATE TABLE orchestrator_webhook_deliveries (
    source TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    event_id UUID NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, delivery_id)
);
CREATE INDEX orchestrator_webhook_deliveries_received_idx ON orchestrator_webhook_deliveries (received_at);
