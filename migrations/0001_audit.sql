-- The audit trail every capability writes to: who did what, to which org and team, with which
-- outcome. Rows are written in the same transaction as the state change they describe, so the
-- trail can never disagree with the state.
--
-- Every object the orchestrator creates is named `orchestrator_*`: its database is usually the
-- platform's shared Postgres, where other services' tables (the config service's `agent_runs`,
-- `team_tokens`, ...) live unprefixed in the same schema. The prefix is what the service this one
-- replaces used for its tables, which are adopted as they are (0002).
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

CREATE TABLE orchestrator_audit_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Principal subject and email; never a token.
    actor_subject TEXT NOT NULL,
    actor_email TEXT,
    action TEXT NOT NULL,
    org_id TEXT,
    team_node_id TEXT,
    provisioning_run_id UUID,
    webhook_event_id UUID,
    outcome TEXT NOT NULL,
    detail JSONB NOT NULL DEFAULT '{}'::jsonb
);

-- Listing is newest first, filtered by org (every admin read is org-scoped).
CREATE INDEX orchestrator_audit_events_org_time_idx ON orchestrator_audit_events (org_id, id DESC);
