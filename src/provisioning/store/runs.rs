//! `orchestrator_provisioning_runs` and `orchestrator_provisioning_steps`.
//!
//! The executor's writes are fenced by the run's `executions` count: a replica that takes a run
//! over (its owner's lock session died) counts one more execution first, so a write of the
//! previous owner, still alive somewhere, finds no row and that owner stops.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::db::{storable_json, storable_text};
use crate::domain::{OrgId, RunStatus, Step, StepStatus, TeamNodeId, TeamStatus, Workflow};
use crate::provisioning::request::{ProvisionRequest, TeamSpec};
use crate::provisioning::workflow::{self, RunInput};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RunRow {
    pub id: Uuid,
    pub workflow: Workflow,
    pub org_id: OrgId,
    pub team_node_id: TeamNodeId,
    pub status: RunStatus,
    /// The request as asked (a provisioning or a deprovisioning request, by `workflow`). `None`
    /// for a run the existing service recorded: it can be read, not resumed.
    pub request: Option<Value>,
    /// What a provisioning run converges the team to.
    pub desired: Option<Json<TeamSpec>>,
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
    /// How many times the run was started; the executor's writes are fenced by it.
    pub executions: i32,
    pub deadline_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub cancel_undo: bool,
    pub cancelled_by: Option<String>,
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
    /// The last attempt's error.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// Every failed attempt's error, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub attempt_errors: Value,
}

/// The columns of a [`RunRow`], for the one query built at run time (the filtered list).
const RUN_COLUMNS: &str = "id, workflow, org_id, team_node_id, status, request, desired, idempotency_key, current_step,
    error, error_detail, steps, sealed_team_token IS NOT NULL AS team_token_held, actor_subject, actor_email, executions,
    deadline_at, cancel_requested_at, cancel_undo, cancelled_by, created_at, updated_at, finished_at";

pub struct NewRun<'a> {
    pub id: Uuid,
    pub workflow: Workflow,
    pub org_id: &'a OrgId,
    pub team_node_id: &'a TeamNodeId,
    pub request: Value,
    pub request_hash: String,
    pub desired: Option<&'a TeamSpec>,
    pub idempotency_key: Option<&'a str>,
    pub actor_subject: &'a str,
    pub actor_email: Option<&'a str>,
    pub deadline_seconds: f64,
    /// Each step of the workflow, `Pending` or `Skipped`.
    pub steps: Vec<(Step, StepStatus)>,
    /// The team's status while the run goes (its record is created or updated with the run).
    pub team_status: TeamStatus,
    /// The audit row of the request.
    pub audit_action: &'a str,
    pub audit_detail: Value,
}

impl<'a> NewRun<'a> {
    /// A provisioning run of `request` for a team with nothing asked before, as the handler would
    /// create it (tests fabricate orphans with it).
    pub fn provision(
        id: Uuid,
        request: &'a ProvisionRequest,
        spec: &'a TeamSpec,
        actor_subject: &'a str,
        deadline_seconds: f64,
    ) -> NewRun<'a> {
        let input = RunInput::Provision {
            request: request.clone(),
            spec: spec.clone(),
        };
        NewRun {
            id,
            workflow: Workflow::Provision,
            org_id: &request.org_id,
            team_node_id: &request.team_node_id,
            request: input.request_json(),
            request_hash: request.hash(),
            desired: Some(spec),
            idempotency_key: request.idempotency_key.as_deref(),
            actor_subject,
            actor_email: None,
            deadline_seconds,
            steps: workflow::plan(&input, None),
            team_status: TeamStatus::Provisioning,
            audit_action: "provision.requested",
            audit_detail: Value::Object(Default::default()),
        }
    }
}

/// Inserts the run with all its steps, records it as the team's latest run (creating the team's
/// record; what is asked of the team changes only when a run of it succeeds) and writes the audit
/// row of the request: one statement. Returns the run as stored; `None` when a run with the same
/// idempotency key already exists (a concurrent twin won), and then nothing is written.
pub async fn insert_run(
    conn: &mut PgConnection,
    new: NewRun<'_>,
) -> Result<Option<(RunRow, Vec<StepRow>)>, sqlx::Error> {
    let positions: Vec<i16> = (0..new.steps.len() as i16).collect();
    let names: Vec<Step> = new.steps.iter().map(|(step, _)| *step).collect();
    let statuses: Vec<StepStatus> = new.steps.iter().map(|(_, status)| *status).collect();
    let inserted = sqlx::query!(
        r#"WITH run AS (
             INSERT INTO orchestrator_provisioning_runs
                 (id, workflow, org_id, team_node_id, status, request, request_hash, desired, idempotency_key,
                  actor_subject, actor_email, deadline_at)
             VALUES ($1, $2, $3, $4, 'running', $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11))
             ON CONFLICT (org_id, team_node_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id, created_at, updated_at, deadline_at),
         steps AS (
             INSERT INTO orchestrator_provisioning_steps (run_id, position, name, status)
             SELECT run.id, s.position, s.name, s.status
             FROM run, UNNEST($12::smallint[], $13::text[], $14::text[]) AS s (position, name, status)),
         team AS (
             INSERT INTO orchestrator_teams (org_id, team_node_id, status, last_run_id)
             SELECT $3, $4, $15, run.id FROM run
             ON CONFLICT (org_id, team_node_id) DO UPDATE
             SET status = EXCLUDED.status, last_run_id = EXCLUDED.last_run_id, updated_at = now()),
         audit AS (
             INSERT INTO orchestrator_audit_events
                 (actor_subject, actor_email, action, org_id, team_node_id, provisioning_run_id, outcome, detail)
             SELECT $9, $10, $16, $3, $4, run.id, 'accepted', $17 FROM run)
         SELECT created_at AS "created_at!", updated_at AS "updated_at!", deadline_at FROM run"#,
        new.id,
        new.workflow.as_str(),
        new.org_id.as_str(),
        new.team_node_id.as_str(),
        storable_json(&new.request),
        new.request_hash,
        new.desired.map(Json) as _,
        new.idempotency_key,
        new.actor_subject,
        new.actor_email,
        new.deadline_seconds,
        &positions,
        &names as &[Step],
        &statuses as &[StepStatus],
        new.team_status.as_str(),
        new.audit_action,
        storable_json(&new.audit_detail),
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(inserted) = inserted else { return Ok(None) };

    let run = RunRow {
        id: new.id,
        workflow: new.workflow,
        org_id: new.org_id.clone(),
        team_node_id: new.team_node_id.clone(),
        status: RunStatus::Running,
        request: Some(new.request),
        desired: new.desired.cloned().map(Json),
        idempotency_key: new.idempotency_key.map(str::to_string),
        current_step: None,
        error: None,
        error_detail: None,
        steps: Value::Object(Default::default()),
        team_token_held: false,
        actor_subject: Some(new.actor_subject.to_string()),
        actor_email: new.actor_email.map(str::to_string),
        executions: 1,
        deadline_at: inserted.deadline_at,
        cancel_requested_at: None,
        cancel_undo: false,
        cancelled_by: None,
        created_at: inserted.created_at,
        updated_at: inserted.updated_at,
        finished_at: None,
    };
    let steps = new
        .steps
        .iter()
        .zip(positions)
        .map(|((name, status), position)| StepRow {
            run_id: new.id,
            position,
            name: *name,
            status: *status,
            attempts: 0,
            started_at: None,
            finished_at: None,
            duration_ms: None,
            result: None,
            error: None,
            attempt_errors: Value::Array(Vec::new()),
        })
        .collect();
    Ok(Some((run, steps)))
}

pub async fn get_run(executor: impl PgExecutor<'_>, id: Uuid) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as!(
        RunRow,
        r#"SELECT id, workflow AS "workflow: Workflow", org_id AS "org_id: OrgId",
             team_node_id AS "team_node_id: TeamNodeId", status AS "status: RunStatus", request,
             desired AS "desired: Json<TeamSpec>", idempotency_key, current_step, error, error_detail, steps,
             sealed_team_token IS NOT NULL AS "team_token_held!", actor_subject, actor_email, executions,
             deadline_at, cancel_requested_at, cancel_undo, cancelled_by, created_at, updated_at, finished_at
         FROM orchestrator_provisioning_runs WHERE id = $1"#,
        id
    )
    .fetch_optional(executor)
    .await
}

/// The run an idempotency key names for a team.
pub struct KeyedRun {
    pub id: Uuid,
    pub workflow: Workflow,
    /// `None` for a run the existing service recorded, which kept no request to compare.
    pub request_hash: Option<String>,
}

pub async fn find_by_idempotency_key(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
    key: &str,
) -> Result<Option<KeyedRun>, sqlx::Error> {
    sqlx::query_as!(
        KeyedRun,
        r#"SELECT id, workflow AS "workflow: Workflow", request_hash FROM orchestrator_provisioning_runs
         WHERE org_id = $1 AND team_node_id = $2 AND idempotency_key = $3"#,
        org,
        team,
        key
    )
    .fetch_optional(executor)
    .await
}

/// The newest run still going for a team: what a busy team's 409 points at. A run the existing
/// service left `running` (it died mid-request and never went back) is not one.
pub async fn current_run_for_team(
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
             finished_at, duration_ms, result, error, attempt_errors
         FROM orchestrator_provisioning_steps WHERE run_id = $1 ORDER BY position"#,
        run_id
    )
    .fetch_all(executor)
    .await
}

/// What the executor learns from each of its writes: whether it still owns the run, and whether
/// a cancel was asked for since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    pub cancel_requested: bool,
    pub cancel_undo: bool,
    pub cancelled_by: Option<String>,
}

/// A step that succeeded. `sealed_token` is the team token it issued, sealed (stored with it in
/// one statement).
pub struct StepSuccess {
    pub position: i16,
    pub attempts: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub result: Value,
    pub sealed_token: Option<Vec<u8>>,
}

impl StepSuccess {
    /// The step as this success leaves it, for the record kept in memory.
    pub fn apply_to(&self, step: &mut StepRow) {
        step.status = StepStatus::Succeeded;
        step.attempts = self.attempts;
        step.started_at = Some(self.started_at);
        step.finished_at = Some(Utc::now());
        step.duration_ms = Some(self.duration_ms);
        step.result = Some(self.result.clone());
        step.error = None;
    }
}

/// Records a step's success. `None` when the run is no longer this execution's.
pub async fn step_succeeded(
    conn: &mut PgConnection,
    run_id: Uuid,
    epoch: i32,
    step: &StepSuccess,
) -> Result<Option<Signals>, sqlx::Error> {
    sqlx::query_as!(
        Signals,
        r#"WITH run AS (
             UPDATE orchestrator_provisioning_runs
             SET updated_at = now(), sealed_team_token = coalesce($7, sealed_team_token)
             WHERE id = $1 AND executions = $2 AND status = 'running'
             RETURNING cancel_requested_at IS NOT NULL AS cancel_requested, cancel_undo, cancelled_by),
         step AS (
             UPDATE orchestrator_provisioning_steps
             SET status = 'succeeded', attempts = $4, started_at = $5, finished_at = now(), duration_ms = $6,
                 result = $8, error = NULL
             WHERE run_id = $1 AND position = $3 AND EXISTS (SELECT 1 FROM run)
             RETURNING 1 AS done)
         SELECT cancel_requested AS "cancel_requested!", cancel_undo AS "cancel_undo!", cancelled_by FROM run"#,
        run_id,
        epoch,
        step.position,
        step.attempts,
        step.started_at,
        step.duration_ms,
        step.sealed_token.as_deref(),
        storable_json(&step.result),
    )
    .fetch_optional(conn)
    .await
}

/// An attempt that failed: its error joins the step's history; `final_attempt` fails the step.
pub struct AttemptFailure<'a> {
    pub position: i16,
    pub attempts: i32,
    pub started_at: DateTime<Utc>,
    pub error: &'a Value,
    pub final_attempt: bool,
}

pub async fn attempt_failed(
    conn: &mut PgConnection,
    run_id: Uuid,
    epoch: i32,
    failure: AttemptFailure<'_>,
) -> Result<Option<Signals>, sqlx::Error> {
    let error = storable_json(failure.error);
    sqlx::query_as!(
        Signals,
        r#"WITH run AS (
             UPDATE orchestrator_provisioning_runs SET updated_at = now()
             WHERE id = $1 AND executions = $2 AND status = 'running'
             RETURNING cancel_requested_at IS NOT NULL AS cancel_requested, cancel_undo, cancelled_by),
         step AS (
             UPDATE orchestrator_provisioning_steps
             SET attempts = $4, error = $5, attempt_errors = attempt_errors || jsonb_build_array($5::jsonb),
                 status = CASE WHEN $6 THEN 'failed' ELSE status END,
                 started_at = coalesce(started_at, $7),
                 finished_at = CASE WHEN $6 THEN now() ELSE finished_at END,
                 duration_ms = CASE WHEN $6
                     THEN (EXTRACT(EPOCH FROM (now() - coalesce(started_at, $7))) * 1000)::bigint
                     ELSE duration_ms END
             WHERE run_id = $1 AND position = $3 AND EXISTS (SELECT 1 FROM run)
             RETURNING 1 AS done)
         SELECT cancel_requested AS "cancel_requested!", cancel_undo AS "cancel_undo!", cancelled_by FROM run"#,
        run_id,
        epoch,
        failure.position,
        failure.attempts,
        error,
        failure.final_attempt,
        failure.started_at,
    )
    .fetch_optional(conn)
    .await
}

/// Records what a step is about to do before it does it: the one step where doing it twice could
/// do harm (the team token) leaves this record, so a later attempt knows.
pub async fn record_step_intent(
    conn: &mut PgConnection,
    run_id: Uuid,
    epoch: i32,
    position: i16,
    intent: &Value,
) -> Result<Option<Signals>, sqlx::Error> {
    sqlx::query_as!(
        Signals,
        r#"WITH run AS (
             UPDATE orchestrator_provisioning_runs
             SET updated_at = now(),
                 current_step = (SELECT name FROM orchestrator_provisioning_steps WHERE run_id = $1 AND position = $3)
             WHERE id = $1 AND executions = $2 AND status = 'running'
             RETURNING cancel_requested_at IS NOT NULL AS cancel_requested, cancel_undo, cancelled_by),
         step AS (
             UPDATE orchestrator_provisioning_steps
             SET status = 'running', started_at = coalesce(started_at, now()), result = $4
             WHERE run_id = $1 AND position = $3 AND EXISTS (SELECT 1 FROM run)
             RETURNING 1 AS done)
         SELECT cancel_requested AS "cancel_requested!", cancel_undo AS "cancel_undo!", cancelled_by FROM run"#,
        run_id,
        epoch,
        position,
        intent
    )
    .fetch_optional(conn)
    .await
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

/// Erases every team token still held for a team's callers: its tokens were revoked.
pub async fn erase_team_tokens_of_team(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_provisioning_runs SET sealed_team_token = NULL
         WHERE org_id = $1 AND team_node_id = $2 AND sealed_team_token IS NOT NULL",
        org,
        team
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// How a run ended: its status, the error (one line and as an object), the step summary and the
/// step it stopped at.
pub struct RunEnd<'a> {
    pub status: RunStatus,
    pub error: Option<&'a str>,
    pub error_detail: Option<&'a Value>,
    pub steps: &'a Value,
    pub current_step: Option<Step>,
}

/// What ending a run wrote that the executor did not choose.
pub struct Ended {
    pub current_step: Option<String>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The end of a run as one statement: its last step's success (if the run ended on one), the
/// run's end, the team's record (if this is still its latest run), the audit row, and the
/// release of the team's lock. The audit row is written here rather than by `audit::record` so
/// that all of it is one round trip; the lock is released by the same statement, before the
/// commit, which is why whoever takes the lock next locks the run's row before trusting it.
pub struct RunEnding<'a> {
    pub end: RunEnd<'a>,
    pub last_step: Option<&'a StepSuccess>,
    pub team: crate::provisioning::store::TeamRunEnd,
    pub actor_subject: &'a str,
    pub actor_email: Option<&'a str>,
    pub action: &'a str,
    pub audit_detail: &'a Value,
    pub lock_key: i64,
}

/// Ends the run if it is still this execution's; `None` if it is not (nothing written, and the
/// lock still held).
pub async fn end_run(
    conn: &mut PgConnection,
    run_id: Uuid,
    epoch: i32,
    ending: RunEnding<'_>,
) -> Result<Option<Ended>, sqlx::Error> {
    let RunEnding {
        end, last_step, team, ..
    } = &ending;
    sqlx::query_as!(
        Ended,
        r#"WITH run AS (
             UPDATE orchestrator_provisioning_runs
             SET status = $3, error = $4, error_detail = $5, steps = $6,
                 current_step = CASE WHEN $3 = 'succeeded' THEN NULL ELSE coalesce($7, current_step) END,
                 sealed_team_token = coalesce($13, sealed_team_token), updated_at = now(), finished_at = now()
             WHERE id = $1 AND executions = $2 AND status = 'running'
             RETURNING org_id, team_node_id, desired, current_step, updated_at, finished_at),
         last_step AS (
             UPDATE orchestrator_provisioning_steps
             SET status = 'succeeded', attempts = $9, started_at = $10, finished_at = now(), duration_ms = $11,
                 result = $12, error = NULL
             WHERE run_id = $1 AND position = $8 AND EXISTS (SELECT 1 FROM run)
             RETURNING 1 AS done),
         team AS (
             UPDATE orchestrator_teams t
             SET status = $14, updated_at = now(),
                 desired = CASE WHEN $14 = 'active' THEN coalesce(run.desired, t.desired) ELSE t.desired END,
                 bootstrapped_at = CASE WHEN $14 = 'deprovisioned' THEN NULL
                                        WHEN $15 THEN coalesce(t.bootstrapped_at, now())
                                        ELSE t.bootstrapped_at END,
                 deprovisioned_at = CASE WHEN $14 = 'deprovisioned' THEN now() ELSE NULL END
             FROM run
             WHERE t.org_id = run.org_id AND t.team_node_id = run.team_node_id AND t.last_run_id = $1
             RETURNING 1 AS done),
         audit AS (
             INSERT INTO orchestrator_audit_events
                 (actor_subject, actor_email, action, org_id, team_node_id, provisioning_run_id, outcome, detail)
             SELECT $16, $17, $18, run.org_id, run.team_node_id, $1, $3, $19 FROM run
             RETURNING 1 AS done),
         -- The team's ingestion schedule as the run left it: what its CronJob step applied (else
         -- what the row says), gone when the schedule was turned off; every schedule gone with
         -- a deprovisioned team.
         schedule_kept AS (
             INSERT INTO orchestrator_pipeline_schedules AS s
                 (org_id, team_node_id, schedule_type, cron_expression, k8s_cronjob_name, enabled)
             SELECT run.org_id, run.team_node_id, 'ingestion',
                    coalesce($6::jsonb -> 'pipeline_cronjob' -> 'result' ->> 'schedule', run.desired ->> 'pipeline_schedule', '0 2 * * *'),
                    $6::jsonb -> 'pipeline_cronjob' -> 'result' ->> 'name',
                    NOT coalesce((run.desired ->> 'pipeline_schedule_suspended')::boolean, FALSE)
             FROM run
             WHERE $14 = 'active' AND coalesce((run.desired ->> 'pipeline_schedule_enabled')::boolean, FALSE)
             ON CONFLICT (org_id, team_node_id, schedule_type) DO UPDATE
             SET cron_expression = CASE WHEN $6::jsonb -> 'pipeline_cronjob' -> 'result' ->> 'schedule' IS NULL
                                        THEN s.cron_expression ELSE EXCLUDED.cron_expression END,
                 k8s_cronjob_name = coalesce(EXCLUDED.k8s_cronjob_name, s.k8s_cronjob_name),
                 enabled = EXCLUDED.enabled, updated_at = now()
             RETURNING 1 AS done),
         schedule_gone AS (
             DELETE FROM orchestrator_pipeline_schedules s USING run
             WHERE s.org_id = run.org_id AND s.team_node_id = run.team_node_id
               AND ($14 = 'deprovisioned'
                    OR ($14 = 'active' AND s.schedule_type = 'ingestion' AND run.desired IS NOT NULL
                        AND NOT coalesce((run.desired ->> 'pipeline_schedule_enabled')::boolean, FALSE)))
             RETURNING 1 AS done),
         -- Data-modifying CTEs nobody reads run after the main query: reading them (to the end)
         -- here is what makes the release come after the team's row is written and locked.
         written AS (
             SELECT (SELECT count(*) FROM last_step) + (SELECT count(*) FROM team) + (SELECT count(*) FROM audit)
                  + (SELECT count(*) FROM schedule_kept) + (SELECT count(*) FROM schedule_gone) AS rows),
         unlocked AS (SELECT pg_advisory_unlock($20) AS released FROM run, written)
         SELECT current_step, updated_at, finished_at FROM run, unlocked"#,
        run_id,
        epoch,
        end.status.as_str(),
        end.error.map(storable_text),
        end.error_detail.map(storable_json),
        storable_json(end.steps),
        end.current_step.map(Step::as_str),
        last_step.map(|s| s.position),
        last_step.map(|s| s.attempts),
        last_step.map(|s| s.started_at),
        last_step.map(|s| s.duration_ms),
        last_step.map(|s| storable_json(&s.result)),
        last_step.and_then(|s| s.sealed_token.as_deref()),
        team.status.as_str(),
        team.bootstrapped,
        ending.actor_subject,
        ending.actor_email,
        ending.action,
        storable_json(ending.audit_detail),
        ending.lock_key,
    )
    .fetch_optional(conn)
    .await
}

/// The step summary the existing service kept (and its clients read): each step that ran, keyed
/// by name, with `ok` and the step's output; a failed step with its error. `slack_channels` adds
/// the existing service's derived `slack_channel_map` entry after a successful config patch.
pub fn step_summary(steps: &[StepRow], slack_channels: usize) -> Value {
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
            summary.insert(
                "slack_channel_map".into(),
                serde_json::json!({"ok": true, "count": slack_channels, "source": "config_service"}),
            );
        }
    }
    Value::Object(summary)
}

/// Records that a step was undone, if the run is still this execution's.
pub async fn mark_step_rolled_back(
    conn: &mut PgConnection,
    run_id: Uuid,
    epoch: i32,
    position: i16,
    note: &Value,
) -> Result<Option<Signals>, sqlx::Error> {
    sqlx::query_as!(
        Signals,
        r#"WITH run AS (
             UPDATE orchestrator_provisioning_runs SET updated_at = now()
             WHERE id = $1 AND executions = $2 AND status = 'running'
             RETURNING cancel_requested_at IS NOT NULL AS cancel_requested, cancel_undo, cancelled_by),
         step AS (
             UPDATE orchestrator_provisioning_steps
             SET status = 'rolled_back',
                 result = coalesce(result, '{}'::jsonb) || jsonb_build_object('rollback', $4::jsonb)
             WHERE run_id = $1 AND position = $3 AND EXISTS (SELECT 1 FROM run)
             RETURNING 1 AS done)
         SELECT cancel_requested AS "cancel_requested!", cancel_undo AS "cancel_undo!", cancelled_by FROM run"#,
        run_id,
        epoch,
        position,
        note
    )
    .fetch_optional(conn)
    .await
}

/// Checks that the run is still this execution's (before an action that must not be taken by an
/// owner presumed dead), and refreshes its heartbeat.
pub async fn touch_run(conn: &mut PgConnection, run_id: Uuid, epoch: i32) -> Result<Option<Signals>, sqlx::Error> {
    sqlx::query_as!(
        Signals,
        r#"UPDATE orchestrator_provisioning_runs SET updated_at = now()
         WHERE id = $1 AND executions = $2 AND status = 'running'
         RETURNING cancel_requested_at IS NOT NULL AS "cancel_requested!", cancel_undo, cancelled_by"#,
        run_id,
        epoch
    )
    .fetch_optional(conn)
    .await
}

/// Puts a failed or timed-out run back to running from the step it stopped at, with a new
/// deadline, as a new execution. `false` if it was not retryable (or is the existing service's,
/// which cannot be resumed).
pub async fn reopen_for_retry(
    conn: &mut PgConnection,
    run_id: Uuid,
    deadline_seconds: f64,
) -> Result<bool, sqlx::Error> {
    let reopened = sqlx::query!(
        "UPDATE orchestrator_provisioning_runs
         SET status = 'running', error = NULL, error_detail = NULL, finished_at = NULL,
             executions = executions + 1, updated_at = now(), deadline_at = now() + make_interval(secs => $2),
             cancel_requested_at = NULL, cancel_undo = FALSE, cancelled_by = NULL
         WHERE id = $1 AND status IN ('failed', 'timed_out') AND request IS NOT NULL",
        run_id,
        deadline_seconds
    )
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if reopened {
        // A rolled-back step was undone: a retry must do it again, not skip it.
        sqlx::query!(
            "UPDATE orchestrator_provisioning_steps SET status = 'pending', error = NULL
             WHERE run_id = $1 AND status IN ('failed', 'rolled_back', 'running')",
            run_id
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(reopened)
}

/// Takes over a run whose owner died, as a new execution: the old owner's writes are fenced off
/// from here on. `false` if it is no longer running.
pub async fn take_over(executor: impl PgExecutor<'_>, run_id: Uuid) -> Result<bool, sqlx::Error> {
    let taken = sqlx::query!(
        "UPDATE orchestrator_provisioning_runs SET executions = executions + 1, updated_at = now()
         WHERE id = $1 AND status = 'running' AND request IS NOT NULL",
        run_id
    )
    .execute(executor)
    .await?;
    Ok(taken.rows_affected() == 1)
}

/// Asks a running run to stop at its next step boundary. `false` if it is not running.
pub async fn request_cancel(
    executor: impl PgExecutor<'_>,
    run_id: Uuid,
    undo: bool,
    actor: &str,
) -> Result<bool, sqlx::Error> {
    let requested = sqlx::query!(
        "UPDATE orchestrator_provisioning_runs
         SET cancel_requested_at = coalesce(cancel_requested_at, now()), cancel_undo = cancel_undo OR $2,
             cancelled_by = coalesce(cancelled_by, $3)
         WHERE id = $1 AND status = 'running' AND request IS NOT NULL",
        run_id,
        undo,
        actor
    )
    .execute(executor)
    .await?;
    Ok(requested.rows_affected() == 1)
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

#[derive(Default)]
pub struct RunFilter {
    pub org_id: Option<String>,
    pub team_node_id: Option<TeamNodeId>,
    pub status: Option<RunStatus>,
    pub workflow: Option<Workflow>,
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// Runs, newest first. Built at run time: five optional filters would be 32 static queries.
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
    if let Some(workflow) = filter.workflow {
        sql.push(" AND workflow = ").push_bind(workflow);
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
