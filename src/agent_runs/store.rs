//! The SQL of `agent_runs`.

use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::db::storable_json;
use crate::domain::AgentRunStatus;

/// A run as recorded when it opens; kept until it closes, which records it again if its opening
/// was lost (see [`open`]).
pub struct NewRun {
    pub id: Uuid,
    pub correlation_id: Uuid,
    pub org_id: String,
    pub team_node_id: String,
    pub agent_name: String,
    pub actor_subject: String,
    pub actor_email: Option<String>,
    pub streaming: bool,
}

/// Opens a run and writes its `agent_run.started` audit entry (with `audit_detail`) in one
/// statement, hence one transaction: this is on the proxy's critical path, where BEGIN, two
/// inserts and COMMIT were four round trips.
///
/// Its commit does not wait for the WAL flush (`set_config` applies to this statement's own
/// transaction): the flush was 0.13 to 0.4 ms of every proxied run, measured with pgbench on the
/// bench machine. The row is committed, and seen by every reader, before the agent is called;
/// only a crash of the database itself within its WAL writer's delay (at most 0.6 s by default)
/// can lose it, and then [`close`], whose commit waits, records the run whole.
pub async fn open(executor: impl PgExecutor<'_>, run: &NewRun, audit_detail: &Value) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "WITH run AS (
             INSERT INTO orchestrator_agent_runs
                 (id, correlation_id, org_id, team_node_id, agent_name, trigger_source, actor_subject, actor_email, status, streaming)
             VALUES ($1, $2, $3, $4, $5, 'admin', $6, $7, 'running', $8)
             RETURNING org_id, team_node_id, actor_subject, actor_email)
         INSERT INTO orchestrator_audit_events (actor_subject, actor_email, action, org_id, team_node_id, outcome, detail)
         SELECT actor_subject, actor_email, 'agent_run.started', org_id, team_node_id, 'accepted', $9
         FROM run, (SELECT set_config('synchronous_commit', 'off', true)) AS unflushed",
        run.id,
        run.correlation_id,
        run.org_id,
        run.team_node_id,
        run.agent_name,
        run.actor_subject,
        run.actor_email,
        run.streaming,
        storable_json(audit_detail),
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// How a run ended, for [`close`].
pub struct RunEnd<'a> {
    pub status: AgentRunStatus,
    pub duration_ms: i64,
    pub summary: Option<&'a Value>,
    pub error: Option<&'a Value>,
    /// The `agent_run.completed` audit entry's detail.
    pub audit_detail: &'a Value,
}

/// Closes a run once (a second close, or one after the sweeper's, changes nothing) and writes its
/// `agent_run.completed` audit entry, in one statement whose commit waits for the flush. A run
/// whose opening was lost to a database crash is recorded here whole, started `duration_ms` ago.
/// Returns whether this call closed it.
pub async fn close(executor: impl PgExecutor<'_>, run: &NewRun, end: &RunEnd<'_>) -> Result<bool, sqlx::Error> {
    let written = sqlx::query_scalar!(
        r#"WITH closed AS (
             INSERT INTO orchestrator_agent_runs AS r
                 (id, correlation_id, org_id, team_node_id, agent_name, trigger_source, actor_subject, actor_email,
                  status, streaming, started_at, finished_at, duration_ms, summary, error)
             VALUES ($1, $2, $3, $4, $5, 'admin', $6, $7, $8, $9, now() - make_interval(secs => $10::bigint / 1000.0),
                     now(), $10, $11, $12)
             ON CONFLICT (id) DO UPDATE
                 SET status = excluded.status, finished_at = excluded.finished_at, duration_ms = excluded.duration_ms,
                     summary = excluded.summary, error = excluded.error
                 WHERE r.status = 'running'
             RETURNING org_id, team_node_id, actor_subject, actor_email),
         audited AS (
             INSERT INTO orchestrator_audit_events (actor_subject, actor_email, action, org_id, team_node_id, outcome, detail)
             SELECT actor_subject, actor_email, 'agent_run.completed', org_id, team_node_id, $8, $13 FROM closed
             RETURNING 1)
         SELECT count(*) AS "written!" FROM audited"#,
        run.id,
        run.correlation_id,
        run.org_id,
        run.team_node_id,
        run.agent_name,
        run.actor_subject,
        run.actor_email,
        end.status as AgentRunStatus,
        run.streaming,
        end.duration_ms,
        end.summary.map(storable_json),
        end.error.map(storable_json),
        storable_json(end.audit_detail),
    )
    .fetch_one(executor)
    .await?;
    Ok(written == 1)
}

/// Runs still open long after any run could have finished: their process died before closing
/// them. Closes them as failed and returns their ids and orgs.
pub async fn close_stale(
    executor: impl PgExecutor<'_>,
    older_than: std::time::Duration,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let closed = sqlx::query!(
        "UPDATE orchestrator_agent_runs SET status = 'failed', finished_at = now(),
             error = jsonb_build_object('code', 'orphaned', 'message', 'the process running it stopped before the run was closed')
         WHERE status = 'running' AND started_at < now() - make_interval(secs => $1)
         RETURNING id, org_id",
        older_than.as_secs_f64()
    )
    .fetch_all(executor)
    .await?;
    Ok(closed.into_iter().map(|run| (run.id, run.org_id)).collect())
}
