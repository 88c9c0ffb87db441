//! The SQL of `agent_runs`.

use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::db::storable_json;
use crate::domain::AgentRunStatus;

pub struct NewRun<'a> {
    pub id: Uuid,
    pub correlation_id: Uuid,
    pub org_id: &'a str,
    pub team_node_id: &'a str,
    pub agent_name: &'a str,
    pub actor_subject: &'a str,
    pub actor_email: Option<&'a str>,
    pub streaming: bool,
}

pub async fn open(executor: impl PgExecutor<'_>, run: &NewRun<'_>) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO orchestrator_agent_runs
             (id, correlation_id, org_id, team_node_id, agent_name, trigger_source, actor_subject, actor_email, status, streaming)
         VALUES ($1, $2, $3, $4, $5, 'admin', $6, $7, 'running', $8)",
        run.id,
        run.correlation_id,
        run.org_id,
        run.team_node_id,
        run.agent_name,
        run.actor_subject,
        run.actor_email,
        run.streaming,
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Closes a run once; a second close changes nothing.
pub async fn close(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    status: AgentRunStatus,
    duration_ms: i64,
    summary: Option<&Value>,
    error: Option<&Value>,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE orchestrator_agent_runs SET status = $2, finished_at = now(), duration_ms = $3, summary = $4, error = $5
         WHERE id = $1 AND status = 'running'",
        id,
        status as AgentRunStatus,
        duration_ms,
        summary.map(storable_json),
        error.map(storable_json),
    )
    .execute(executor)
    .await?
    .rows_affected()
        == 1)
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
