-- A run's row is written at every step's end (its heartbeat, `updated_at`) and its steps' rows at
-- each end too. Measured with `scripts/bench provision`: every such write was a non-HOT update,
-- adding entries to all seven of the runs table's indexes, because the resumer's index held
-- `updated_at`. It now holds `created_at` (the few running runs are filtered by `updated_at` in
-- the scan), and both tables leave room on each page for the new versions of their rows, so these
-- updates stay on the page and touch no index.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

-- The table holds one row per run (thousands, not millions): rebuilding its partial index of
-- running runs inside the migration's transaction takes milliseconds.
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX IF EXISTS orchestrator_provisioning_runs_running_idx;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX orchestrator_provisioning_runs_running_idx
    ON orchestrator_provisioning_runs (created_at) WHERE status = 'running' AND request IS NOT NULL;

ALTER TABLE orchestrator_provisioning_runs SET (fillfactor = 80);
ALTER TABLE orchestrator_provisioning_steps SET (fillfactor = 70);
