-- The whole team lifecycle on one step engine: a run is a provision (create or change) or a
-- deprovision, it can be cancelled and has a deadline, and every team has a record of what was
-- asked of it and where it stands.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

-- Which workflow the run executes. The existing service's runs were all provisioning.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS workflow TEXT NOT NULL DEFAULT 'provision';
-- The team's desired state a provisioning run converges to: the request merged over what was
-- asked before, resolved once when the run is created so that a resumed run does the same thing.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS desired JSONB;
-- Past it, the run stops at its next step boundary as `timed_out` (ORCHESTRATOR_RUN_DEADLINE_SECONDS).
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS deadline_at TIMESTAMPTZ;
-- A cancel asked for: the executor stops at its next step boundary (undoing what the run did if
-- `cancel_undo`), wherever it runs.
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS cancel_requested_at TIMESTAMPTZ;
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS cancel_undo BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE orchestrator_provisioning_runs ADD COLUMN IF NOT EXISTS cancelled_by TEXT;

-- Every failed attempt's error, oldest first (`error` keeps the last): a step's history.
ALTER TABLE orchestrator_provisioning_steps ADD COLUMN IF NOT EXISTS attempt_errors JSONB NOT NULL DEFAULT '[]'::jsonb;

-- One row per team the orchestrator manages: what was asked (routing, schedule, deployment mode),
-- where it stands, and the run that last changed it. Written in the same transactions that start
-- and end that run.
CREATE TABLE orchestrator_teams (
    org_id TEXT NOT NULL,
    team_node_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('provisioning', 'active', 'failed', 'deprovisioning', 'deprovisioned')),
    -- NULL until this service provisions the team: what the existing service was asked is only
    -- partly known (see the backfill below).
    desired JSONB,
    last_run_id UUID,
    -- The AI pipeline's first ingestion ran: a change to the team does not run it again.
    bootstrapped_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    deprovisioned_at TIMESTAMPTZ,
    PRIMARY KEY (org_id, team_node_id)
);

-- The teams the existing service provisioned, from its runs: active if its last run succeeded;
-- a schedule or a dedicated agent if any succeeded run created one (it never removed either).
INSERT INTO orchestrator_teams (org_id, team_node_id, status, desired, bootstrapped_at, created_at, updated_at)
SELECT
    org_id,
    team_node_id,
    CASE WHEN (array_agg(status ORDER BY created_at DESC))[1] = 'succeeded' THEN 'active' ELSE 'failed' END,
    jsonb_build_object(
        'routing', '{}'::jsonb,
        'pipeline_schedule_enabled', coalesce(bool_or(steps -> 'pipeline_cronjob' ->> 'ok' = 'true'), FALSE),
        'pipeline_schedule', (array_agg(steps -> 'pipeline_cronjob' -> 'result' ->> 'schedule' ORDER BY created_at DESC)
            FILTER (WHERE steps -> 'pipeline_cronjob' -> 'result' ->> 'schedule' IS NOT NULL))[1],
        'deployment_mode', CASE WHEN coalesce(bool_or(steps -> 'dedicated_deployment' ->> 'ok' = 'true'), FALSE)
            THEN 'dedicated' ELSE 'shared' END,
        'inferred', TRUE
    ),
    min(created_at) FILTER (WHERE steps -> 'bootstrap' ->> 'ok' = 'true'),
    min(created_at),
    max(updated_at)
FROM orchestrator_provisioning_runs
WHERE request IS NULL
GROUP BY org_id, team_node_id
ON CONFLICT (org_id, team_node_id) DO NOTHING;
