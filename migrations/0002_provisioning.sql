-- Durable provisioning runs. A run and its steps are the workflow's whole state: every step is
-- recorded as it starts and ends, with the external handles it created (token id, object names
-- and uids, pipeline run id), which is what makes re-running a step safe and undoing it possible.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

CREATE TABLE provisioning_runs (
    id UUID PRIMARY KEY,
    org_id TEXT NOT NULL,
    team_node_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'rolled_back')),
    -- The validated request, normalised; never holds a credential.
    request JSONB NOT NULL,
    -- SHA-256 of the normalised request: the same idempotency key with another request is refused.
    request_hash TEXT NOT NULL,
    idempotency_key TEXT,
    current_step TEXT,
    error JSONB,
    -- The team token issued by this run, sealed with AES-256-GCM (ORCHESTRATOR_SECRETS_KEY) until
    -- it is handed out once, then erased.
    sealed_team_token BYTEA,
    team_token_delivered BOOLEAN NOT NULL DEFAULT FALSE,
    actor_subject TEXT NOT NULL,
    actor_email TEXT,
    -- How many times the run was started: 1, plus one per retry or resume.
    executions INTEGER NOT NULL DEFAULT 1,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);

-- Idempotency keys are scoped to the org and team.
CREATE UNIQUE INDEX provisioning_runs_idempotency_idx
    ON provisioning_runs (org_id, team_node_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The runs API lists newest first, filtered by org (and team, status).
CREATE INDEX provisioning_runs_org_created_idx ON provisioning_runs (org_id, created_at DESC, id DESC);
CREATE INDEX provisioning_runs_created_idx ON provisioning_runs (created_at DESC, id DESC);
-- The resumer scans for runs that are still going.
CREATE INDEX provisioning_runs_running_idx ON provisioning_runs (updated_at) WHERE status = 'running';
CREATE INDEX provisioning_runs_team_idx ON provisioning_runs (org_id, team_node_id, created_at DESC);

CREATE TABLE provisioning_steps (
    run_id UUID NOT NULL REFERENCES provisioning_runs (id) ON DELETE CASCADE,
    position SMALLINT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'skipped', 'rolled_back')),
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    duration_ms BIGINT,
    -- Handles the step created and a summary of its result; never a secret.
    result JSONB,
    error JSONB,
    PRIMARY KEY (run_id, position)
);
