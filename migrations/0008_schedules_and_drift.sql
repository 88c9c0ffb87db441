-- Schedules the operator controls, and what the reconciler found.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

-- One row per team and schedule type: the CronJob it owns, its cron expression, whether it runs
-- (a disabled schedule's CronJob is suspended, not deleted). The existing service's design named
-- this table and its columns; it never created it. A row exists exactly when its CronJob should.
CREATE TABLE IF NOT EXISTS orchestrator_pipeline_schedules (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id TEXT NOT NULL,
    team_node_id TEXT NOT NULL,
    schedule_type TEXT NOT NULL CHECK (schedule_type IN ('ingestion', 'dependency_discovery')),
    cron_expression TEXT NOT NULL,
    k8s_cronjob_name TEXT,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    -- The CronJob's last scheduled run, as Kubernetes last reported it to the reconciler.
    last_run_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (org_id, team_node_id, schedule_type)
);

-- What the reconciler does with drift of the team's objects: NULL is the service's default
-- (ORCHESTRATOR_DRIFT_POLICY). The last drift it found stays visible in the team view.
ALTER TABLE orchestrator_teams ADD COLUMN IF NOT EXISTS drift_policy TEXT CHECK (drift_policy IN ('repair', 'report'));
ALTER TABLE orchestrator_teams ADD COLUMN IF NOT EXISTS last_drift JSONB;
ALTER TABLE orchestrator_teams ADD COLUMN IF NOT EXISTS last_drift_at TIMESTAMPTZ;

-- The ingestion schedules of teams this service provisioned before this table: what their last
-- succeeded run applied. Not for teams inferred from the existing service's runs: what it left
-- (its sync-cronjobs changed CronJobs without a run) is adopted from the cluster as it is.
INSERT INTO orchestrator_pipeline_schedules (org_id, team_node_id, schedule_type, cron_expression, k8s_cronjob_name)
SELECT t.org_id, t.team_node_id, 'ingestion',
       coalesce(last.schedule, t.desired ->> 'pipeline_schedule', '0 2 * * *'), last.name
FROM orchestrator_teams t
LEFT JOIN LATERAL (
    SELECT r.steps -> 'pipeline_cronjob' -> 'result' ->> 'schedule' AS schedule,
           r.steps -> 'pipeline_cronjob' -> 'result' ->> 'name' AS name
    FROM orchestrator_provisioning_runs r
    WHERE r.org_id = t.org_id AND r.team_node_id = t.team_node_id AND r.status = 'succeeded'
      AND r.steps -> 'pipeline_cronjob' -> 'result' ->> 'schedule' IS NOT NULL
    ORDER BY r.created_at DESC
    LIMIT 1
) last ON TRUE
WHERE t.status <> 'deprovisioned' AND coalesce((t.desired ->> 'pipeline_schedule_enabled')::boolean, FALSE)
  AND NOT coalesce((t.desired ->> 'inferred')::boolean, FALSE)
ON CONFLICT (org_id, team_node_id, schedule_type) DO NOTHING;
