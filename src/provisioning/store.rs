//! The SQL of `orchestrator_provisioning_runs` and `orchestrator_provisioning_steps`, checked at
//! compile time. Functions take an executor so a caller can put a state change and its audit row
//! in one transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

use super::request::ProvisionRequest;
use crate::db::{storable_json, storable_text};
use crate::domain::{DeploymentMode, OrgId, RunStatus, Step, StepStatus, TeamNodeId};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RunRow {
    pub id: Uuid,
    pub org_id: OrgId,
    pub team_node_id: TeamNodeId,
    pub status: RunStatus,
    /// `None` for a run the existing service recorded: it can be read, not resumed.
    pub request: Option<Json<ProvisionRequest>>,
    pub idempotency_key: Option<String>,
    pub current_step: Option<String>,
    /// The one-line error the existing service's clients read.
    pub error: Option<String>,
    pub error_detail: Option<Value>,
    /// The step summary keyed by step name (written when a run ends, and by the existing service).
    pub steps: Value,
    pub team_token_held: bool,
    pub actor_subject: Option<String>,
    pub actor_email: Option<String>,
    pub executions: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl RunRow {
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StepRow {
    #[serde(skip)]
    pub run_id: Uuid,
    #[serde(skip)]
    pub position: i16,
    pub name: Step,
    pub status: StepStatus,
    pub attempts: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
}

/// The columns of a [`RunRow`], for the one query built at run time (the filtered list).
const RUN_COLUMNS: &str = "id, org_id, team_node_id, status, request, idempotency_key, current_step, error,
    error_detail, steps, sealed_team_token IS NOT NULL AS team_token_held, actor_subject, actor_email, executions,
    created_at, updated_at, finished_at";

pub struct NewRun<'a> {
    pub id: Uuid,
    pub request: &'a ProvisionRequest,
    pub actor_subject: &'a str,
    pub actor_email: Option<&'a str>,
}

/// Inserts the run with all its steps; the steps that do not apply are `skipped` from the start.
/// `None` when a run with the same idempotency key already exists (a concurrent twin won).
pub async fn insert_run(conn: &mut PgConnection, new: NewRun<'_>) -> Result<Option<Uuid>, sqlx::Error> {
    let request = new.request;
    let inserted = sqlx::query_scalar!(
        "INSERT INTO orchestrator_provisioning_runs
             (id, org_id, team_node_id, status, request, request_hash, idempotency_key, actor_subject, actor_email)
         VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8)
         ON CONFLICT (org_id, team_node_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING id",
        new.id,
        request.org_id.as_str(),
        request.team_node_id.as_str(),
        Json(request) as _,
        request.hash(),
        request.idempotency_key,
        new.actor_subject,
        new.actor_email,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = inserted else { return Ok(None) };

    let applies = |step: Step| match step {
        Step::ConfigPatch | Step::TeamToken | Step::Bootstrap => true,
        Step::PipelineCronjob => request.wants_schedule(),
        Step::DedicatedDeployment => request.deployment_mode == DeploymentMode::Dedicated,
    };
    let positions: Vec<i16> = (0..Step::ALL.len() as i16).collect();
    let statuses: Vec<StepStatus> = Step::ALL
        .iter()
        .map(|step| {
            if applies(*step) {
                StepStatus::Pending
            } else {
                StepStatus::Skipped
            }
        })
        .collect();
    sqlx::query!(
        "INSERT INTO orchestrator_provisioning_steps (run_id, position, name, status)
         SELECT $1, * FROM UNNEST($2::smallint[], $3::text[], $4::text[])",
        id,
        &positions,
        Step::ALL as &[Step],
        &statuses as &[StepStatus],
    )
    .execute(&mut *conn)
    .await?;
    Ok(Some(id))
}

pub async fn get_run(executor: impl PgExecutor<'_>, id: Uuid) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as!(
        RunRow,
        r#"SELECT id, org_id AS "org_id: OrgId", team_node_id AS "team_node_id: TeamNodeId",
             status AS "status: RunStatus", request AS "request: Json<ProvisionRequest>", idempotency_key,
             current_step, error, error_detail, steps, sealed_team_token IS NOT NULL AS "team_token_held!",
             actor_subject, actor_email, executions, created_at, updated_at, finished_at
         FROM orchestrator_provisioning_runs WHERE id = $1"#,
        id
    )
    .fetch_optional(executor)
    .await
}

/// The run an idempotency key names, with the hash of its request (`None` for a run the existing
/// service recorded, which kept no request to compare).
pub async fn find_by_idempotency_key(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
    key: &str,
) -> Result<Option<(Uuid, Option<String>)>, sqlx::Error> {
    let found = sqlx::query!(
        "SELECT id, request_hash FROM orchestrator_provisioning_runs
         WHERE org_id = $1 AND team_node_id = $2 AND idempotency_key = $3",
        org,
        team,
        key
    )
    .fetch_optional(executor)
    .await?;
    Ok(found.map(|row| (row.id, row.request_hash)))
}

/// The newest run still going for a team: what a busy team's 409 points at. A run the existing
/// service left `running` (it died mid-request and never went back) is not one.
pub async fn running_run_for_team(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT id FROM orchestrator_provisioning_runs
         WHERE org_id = $1 AND team_node_id = $2 AND status = 'running' AND request IS NOT NULL
         ORDER BY created_at DESC LIMIT 1",
        org,
        team
    )
    .fetch_optional(executor)
    .await
}

pub async fn steps(executor: impl PgExecutor<'_>, run_id: Uuid) -> Result<Vec<StepRow>, sqlx::Error> {
    sqlx::query_as!(
        StepRow,
        r#"SELECT run_id, position, name AS "name: Step", status AS "status: StepStatus", attempts, started_at,
             finished_at, duration_ms, result, error
         FROM orchestrator_provisioning_steps WHERE run_id = $1 ORDER BY position"#,
        run_id
    )
    .fetch_all(executor)
    .await
}

pub async fn step_started(executor: impl PgExecutor<'_>, run_id: Uuid, position: i16) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "WITH step AS (
             UPDATE orchestrator_provisioning_steps
             SET status = 'running', started_at = now(), finished_at = NULL, duration_ms = NULL, error = NULL
             WHERE run_id = $1 AND position = $2 RETURNING name)
         UPDATE orchestrator_provisioning_runs SET current_step = (SELECT name FROM step), updated_at = now()
         WHERE id = $1",
        run_id,
        position
    )
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn step_attempt(
    executor: impl PgExecutor<'_>,
    run_id: Uuid,
    position: i16,
    attempts: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_steps SET attempts = $3 WHERE run_id = $1 AND position = $2",
        run_id,
        position,
        attempts
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// How a step's execution ended.
pub struct StepEnd<'a> {
    pub status: StepStatus,
    pub attempts: i32,
    /// Kept from before when `None` (the team token step recorded its intent there).
    pub result: Option<&'a Value>,
    pub error: Option<&'a Value>,
}

/// Records a step's end; the run's `updated_at` doubles as its heartbeat.
pub async fn step_finished(
    conn: &mut PgConnection,
    run_id: Uuid,
    position: i16,
    end: StepEnd<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "WITH step AS (
             UPDATE orchestrator_provisioning_steps
             SET status = $3, attempts = $4, finished_at = now(),
                 duration_ms = (EXTRACT(EPOCH FROM (now() - coalesce(started_at, now()))) * 1000)::bigint,
                 result = coalesce($5, result), error = $6
             WHERE run_id = $1 AND position = $2 RETURNING 1 AS done)
         UPDATE orchestrator_provisioning_runs SET updated_at = now() WHERE id = $1 AND EXISTS (SELECT 1 FROM step)",
        run_id,
        position,
        end.status.as_str(),
        end.attempts,
        end.result.map(storable_json),
        end.error.map(storable_json),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What a step recorded before acting (for the team token: the token ids that existed).
pub async fn step_result(
    executor: impl PgExecutor<'_>,
    run_id: Uuid,
    position: i16,
) -> Result<Option<Value>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT result FROM orchestrator_provisioning_steps WHERE run_id = $1 AND position = $2",
        run_id,
        position
    )
    .fetch_optional(executor)
    .await
    .map(Option::flatten)
}

pub async fn record_step_intent(
    executor: impl PgExecutor<'_>,
    run_id: Uuid,
    position: i16,
    intent: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_steps SET result = $3 WHERE run_id = $1 AND position = $2",
        run_id,
        position,
        intent
    )
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn seal_team_token(executor: impl PgExecutor<'_>, run_id: Uuid, sealed: &[u8]) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_runs SET sealed_team_token = $2 WHERE id = $1",
        run_id,
        sealed
    )
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn sealed_team_token(executor: impl PgExecutor<'_>, run_id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT sealed_team_token FROM orchestrator_provisioning_runs WHERE id = $1",
        run_id
    )
    .fetch_optional(executor)
    .await
    .map(Option::flatten)
}

/// Takes the sealed team token out of the run if it is still `sealed`: at most one caller ever
/// succeeds.
pub async fn take_team_token(executor: impl PgExecutor<'_>, run_id: Uuid, sealed: &[u8]) -> Result<bool, sqlx::Error> {
    let taken = sqlx::query!(
        "UPDATE orchestrator_provisioning_runs SET sealed_team_token = NULL WHERE id = $1 AND sealed_team_token = $2",
        run_id,
        sealed
    )
    .execute(executor)
    .await?;
    Ok(taken.rows_affected() == 1)
}

pub async fn erase_team_token(executor: impl PgExecutor<'_>, run_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_runs SET sealed_team_token = NULL WHERE id = $1",
        run_id
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// How a run ended: its status, the error (one line and as an object) and the step summary.
pub struct RunEnd<'a> {
    pub status: RunStatus,
    pub error: Option<&'a str>,
    pub error_detail: Option<&'a Value>,
    pub steps: &'a Value,
}

pub async fn finish_run(executor: impl PgExecutor<'_>, run_id: Uuid, end: RunEnd<'_>) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_runs SET status = $2, error = $3, error_detail = $4, steps = $5,
             current_step = CASE WHEN $2 = 'succeeded' THEN NULL ELSE current_step END,
             updated_at = now(), finished_at = now()
         WHERE id = $1",
        run_id,
        end.status.as_str(),
        end.error.map(storable_text),
        end.error_detail.map(storable_json),
        storable_json(end.steps),
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// The step summary the existing service kept (and its clients read): each step that ran, keyed
/// by name, with `ok` and the step's output; a failed step with its error. The derived
/// `slack_channel_map` entry is the existing service's too.
pub fn step_summary(steps: &[StepRow], request: &ProvisionRequest) -> Value {
    let mut summary = serde_json::Map::new();
    for step in steps {
        let mut entry = match step.status {
            StepStatus::Succeeded | StepStatus::RolledBack => {
                serde_json::Map::from_iter([("ok".to_string(), Value::Bool(true))])
            }
            StepStatus::Failed => serde_json::Map::from_iter([
                ("ok".to_string(), Value::Bool(false)),
                (
                    "error".to_string(),
                    step.error
                        .as_ref()
                        .and_then(|e| e.get("message"))
                        .cloned()
                        .unwrap_or(Value::Null),
                ),
            ]),
            StepStatus::Pending | StepStatus::Running | StepStatus::Skipped => continue,
        };
        if let Some(Value::Object(result)) = &step.result {
            for (key, value) in result {
                entry.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        if step.status == StepStatus::RolledBack {
            entry.insert("rolled_back".into(), Value::Bool(true));
        }
        summary.insert(step.name.as_str().to_string(), Value::Object(entry));
        if step.name == Step::ConfigPatch && step.status == StepStatus::Succeeded {
            let channels = request.routing.get("slack_channel_ids").map_or(0, Vec::len);
            summary.insert(
                "slack_channel_map".into(),
                serde_json::json!({"ok": true, "count": channels, "source": "config_service"}),
            );
        }
    }
    Value::Object(summary)
}

pub async fn mark_step_rolled_back(
    executor: impl PgExecutor<'_>,
    run_id: Uuid,
    position: i16,
    note: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_steps
         SET status = 'rolled_back', result = coalesce(result, '{}'::jsonb) || jsonb_build_object('rollback', $3::jsonb)
         WHERE run_id = $1 AND position = $2",
        run_id,
        position,
        note
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Puts a failed run back to running from its failed step. `false` if it was not failed (or is
/// the existing service's, which cannot be resumed).
pub async fn reopen_failed_run(conn: &mut PgConnection, run_id: Uuid) -> Result<bool, sqlx::Error> {
    let reopened = sqlx::query!(
        "UPDATE orchestrator_provisioning_runs
         SET status = 'running', error = NULL, error_detail = NULL, finished_at = NULL,
             executions = executions + 1, updated_at = now()
         WHERE id = $1 AND status = 'failed' AND request IS NOT NULL",
        run_id
    )
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if reopened {
        // A rolled-back step was undone: a retry must do it again, not skip it.
        sqlx::query!(
            "UPDATE orchestrator_provisioning_steps SET status = 'pending', error = NULL
             WHERE run_id = $1 AND status IN ('failed', 'rolled_back')",
            run_id
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(reopened)
}

pub async fn count_execution(executor: impl PgExecutor<'_>, run_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_runs SET executions = executions + 1, updated_at = now() WHERE id = $1",
        run_id
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// A run still marked running whose owner may have died.
pub struct StaleRun {
    pub id: Uuid,
    pub org_id: OrgId,
    pub team_node_id: TeamNodeId,
}

/// Runs still marked running and not touched for `idle_seconds`: candidates for resumption.
pub async fn stale_running_runs(
    executor: impl PgExecutor<'_>,
    idle_seconds: f64,
    limit: i64,
) -> Result<Vec<StaleRun>, sqlx::Error> {
    sqlx::query_as!(
        StaleRun,
        r#"SELECT id, org_id AS "org_id: OrgId", team_node_id AS "team_node_id: TeamNodeId"
         FROM orchestrator_provisioning_runs
         WHERE status = 'running' AND request IS NOT NULL AND updated_at < now() - make_interval(secs => $1)
         ORDER BY updated_at LIMIT $2"#,
        idle_seconds,
        limit
    )
    .fetch_all(executor)
    .await
}

pub struct RunFilter {
    pub org_id: Option<String>,
    pub team_node_id: Option<TeamNodeId>,
    pub status: Option<RunStatus>,
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// Runs, newest first. Built at run time: four optional filters would be sixteen static queries.
pub async fn list_runs(executor: impl PgExecutor<'_>, filter: &RunFilter) -> Result<Vec<RunRow>, sqlx::Error> {
    let mut sql = QueryBuilder::<Postgres>::new(format!(
        "SELECT {RUN_COLUMNS} FROM orchestrator_provisioning_runs WHERE TRUE"
    ));
    if let Some(org) = &filter.org_id {
        sql.push(" AND org_id = ").push_bind(org);
    }
    if let Some(team) = &filter.team_node_id {
        sql.push(" AND team_node_id = ").push_bind(team);
    }
    if let Some(status) = filter.status {
        sql.push(" AND status = ").push_bind(status);
    }
    if let Some((at, id)) = filter.before {
        sql.push(" AND (created_at, id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    sql.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(filter.limit);
    sql.build_query_as().fetch_all(executor).await
}
