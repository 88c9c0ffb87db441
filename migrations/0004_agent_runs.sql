-- Admin-triggered agent runs: opened before the agent is called, closed with their outcome on
-- every path (success, agent error, timeout, client gone), so no run is ever left open. Not to be
-- confused with the config service's `agent_runs` (the platform audit), which the orchestrator
-- only ever writes to through that service's API.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

CREATE TABLE orchestrator_agent_runs (
    id UUID PRIMARY KEY,
    correlation_id UUID NOT NULL,
    org_id TEXT NOT NULL,
    team_node_id TEXT NOT NULL,
    agent_name TEXT NOT NULL,
    -- admin (the proxy endpoint); webhook-triggered runs are recorded on their inbox event.
    trigger_source TEXT NOT NULL,
    actor_subject TEXT NOT NULL,
    actor_email TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    streaming BOOLEAN NOT NULL DEFAULT FALSE,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    duration_ms BIGINT,
    -- A bounded summary of the agent's answer, or the failure's code and message.
    summary JSONB,
    error JSONB
);

CREATE INDEX orchestrator_agent_runs_org_started_idx ON orchestrator_agent_runs (org_id, started_at DESC);
CREATE INDEX orchestrator_agent_runs_running_idx ON orchestrator_agent_runs (started_at) WHERE status = 'running';
