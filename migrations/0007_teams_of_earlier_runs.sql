-- Teams whose runs this service recorded before teams had records of their own (runs with a
-- `request`, which 0005's backfill of the existing service's runs did not cover): the team's last
-- run gives its status and run; what was asked stays unknown (NULL), so the next provisioning run
-- looks at the live objects rather than trust a guess.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

INSERT INTO orchestrator_teams (org_id, team_node_id, status, last_run_id, bootstrapped_at, created_at, updated_at)
SELECT DISTINCT ON (r.org_id, r.team_node_id)
    r.org_id,
    r.team_node_id,
    CASE r.status WHEN 'succeeded' THEN 'active' WHEN 'running' THEN 'provisioning' ELSE 'failed' END,
    r.id,
    (SELECT min(b.created_at) FROM orchestrator_provisioning_runs b
     WHERE b.org_id = r.org_id AND b.team_node_id = r.team_node_id AND b.steps -> 'bootstrap' ->> 'ok' = 'true'),
    r.created_at,
    r.updated_at
FROM orchestrator_provisioning_runs r
WHERE r.request IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM orchestrator_teams t WHERE t.org_id = r.org_id AND t.team_node_id = r.team_node_id)
ORDER BY r.org_id, r.team_node_id, r.created_at DESC
ON CONFLICT (org_id, team_node_id) DO NOTHING;
