-- Durable provisioning runs. A run and its steps are the workflow's whole state: every step is
-- recorded as it starts and ends, with the external handles it created (token id, object names
-- and uids, pipeline run id), which is what makes re-running a step safe and undoing it possible.
--
-- The runs table is the one the service this one replaces created (`orchestrator_provisioning_runs`,
-- its `id`, `org_id`, `team_node_id`, `idempotency_key`, `status`, `steps`, `error`, `created_at`,
-- `updated_at` and its unique idempotency index), adopted in place: its runs stay readable by id and
-- their idempotency keys keep answering with the same run. On a new database it is created here in
-- the same shape. The columns added below are NULL on its rows (`request IS NULL` marks them).
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

-- (The existing service declared the text columns VARCHAR(128) and VARCHAR(32); TEXT here reads and
-- writes the same, and an adopted table keeps its declarations.)
CREATE TABLE IF NOT EXISTS orchestrator_provisioning_runs (
    id UUID PRIMARY KEY,
    org_id TEXT NOT NULL,
    team_node_id TEXT NOT NULL,
    idempotency_key TEXT,
    status TEXT NOT NULL DEFAULT 'running',
    -- The existing service's record of its steps, keyed by step name; this one writes the same
    -- summary when a run ends, so either can read the other's runs.
    steps JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- A one-line error, as the existing service wrote it.
    error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- A table of that name that is not the orchestrator's (another shape) must stop the migration with
-- a reason, not fail later on every request.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'orchestrator_provisioning_runs'
          AND column_name = 'id' AND data_type = 'uuid'
    ) THEN
        RAISE EXCEPTION 'orchestrator_provisioning_runs exists but has no uuid column "id": it is not the orchestrator''s runs table';
    END IF;
END
$$;

-- The validated request, normalised; never holds a credential. NULL on the existing service's runs.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS request JSONB;
-- SHA-256 of the normalised request: the same idempotency key with another request is refused.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS request_hash TEXT;
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS current_step TEXT;
-- The failure as an object (step, code, message); `error` keeps the one-line text.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS error_detail JSONB;
-- The team token issued by this run, sealed with AES-256-GCM (ORCHESTRATOR_SECRETS_KEY) until it is
-- handed out once, then erased.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS sealed_team_token BYTEA;
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS actor_subject TEXT;
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS actor_email TEXT;
-- How many times the run was started: 1, plus one per retry or resume.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS executions INTEGER NOT NULL DEFAULT 1;
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS finished_at TIMESTAMPTZ;

-- Idempotency keys are scoped to the org and team. The existing service's index (partial, or a plain
-- unique index from its ORM) serves the same conflict target; it is created only where missing.
CREATE UNIQUE INDEX IF NOT EXISTS ux_orch_provision_idempotency
    ON orchestrator_provisioning_runs (org_id, team_node_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The runs API lists newest first, filtered by org (and team, status).
CREATE INDEX IF NOT EXISTS orchestrator_provisioning_runs_org_created_idx
    ON orchestrator_provisioning_runs (org_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS orchestrator_provisioning_runs_created_idx
    ON orchestrator_provisioning_runs (created_at DESC, id DESC);
-- The resumer scans for runs of this service that are still going.
CREATE INDEX IF NOT EXISTS orchestrator_provisioning_runs_running_idx
    ON orchestrator_provisioning_runs (updated_at) WHERE status = 'running' AND request IS NOT NULL;
CREATE INDEX IF NOT EXISTS orchestrator_provisioning_runs_team_idx
    ON orchestrator_provisioning_runs (org_id, team_node_id, created_at DESC);

CREATE TABLE orchestrator_provisioning_steps (
    run_id UUID NOT NULL REFERENCES orchestrator_provisioning_runs (id) ON DELETE CASCADE,
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
