//! A provisioning run as the API shows it: the existing service's answer, enriched.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::engine::{Engine, RunState};
use super::store::{self, RunRow, StepRow};
use super::workflow::RunInput;
use crate::auth::{Admin, Capability};
use crate::config::AuthConfig;
use crate::domain::{OrgId, RunStatus, TeamNodeId, Workflow};
use crate::error::ApiResult;

/// A provisioning run as the API shows it: the existing service's answer (`steps` keyed by step
/// name, `error` one line of text), with the per-step detail (`step_details`) and the error as an
/// object (`error_detail`) added.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RunView {
    #[serde(flatten)]
    pub run: RunSummary,
    #[schema(value_type = String)]
    pub team_id: TeamNodeId,
    /// The team token issued by this run. Shown exactly once, to the first caller allowed to
    /// provision who reads the run after the token was issued.
    pub team_token: Option<String>,
    /// True while an issued token is held (sealed) for a caller that has not received it.
    pub team_token_held: bool,
    /// The AI pipeline's answer to the bootstrap.
    #[schema(value_type = Option<Object>)]
    pub pipeline_bootstrap: Option<Value>,
    /// The CronJob applied: name, namespace, schedule, org_id, team_node_id, created.
    #[schema(value_type = Option<Object>)]
    pub pipeline_cronjob: Option<Value>,
    /// The dedicated agent applied: name, namespace, org_id, team_node_id, replicas, service_url.
    #[schema(value_type = Option<Object>)]
    pub dedicated_deployment: Option<Value>,
    /// Each step that ran, keyed by name: `{"ok": bool, ...its output}` or `{"ok": false, "error"}`.
    #[schema(value_type = Object)]
    pub steps: Value,
    /// Every step in order, with status, attempts, timings, result and error.
    pub step_details: Vec<StepRow>,
}

/// A run without its steps and outputs, as lists show it. `error` is one line (`<step>:
/// <message>`); `error_detail` is `{step, code, message}` (and `rollback_errors` when an undo
/// failed).
#[derive(Serialize, utoipa::ToSchema)]
pub struct RunSummary {
    pub provisioning_run_id: Uuid,
    /// provision (create or change a team) or deprovision.
    pub workflow: Workflow,
    pub status: RunStatus,
    #[schema(value_type = String)]
    pub org_id: OrgId,
    #[schema(value_type = String)]
    pub team_node_id: TeamNodeId,
    pub current_step: Option<String>,
    pub error: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub error_detail: Option<Value>,
    pub idempotency_key: Option<String>,
    pub executions: i32,
    /// Past it, the run stops at its next step boundary as `timed_out`.
    pub deadline_at: Option<DateTime<Utc>>,
    /// A cancel was asked for (by `cancelled_by`); the run stops at its next step boundary.
    pub cancel_requested: bool,
    pub cancelled_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RunPage {
    pub items: Vec<RunSummary>,
    pub next_cursor: Option<String>,
}

impl From<RunRow> for RunSummary {
    fn from(r: RunRow) -> Self {
        Self {
            provisioning_run_id: r.id,
            workflow: r.workflow,
            status: r.status,
            org_id: r.org_id,
            team_node_id: r.team_node_id,
            current_step: r.current_step,
            error: r.error,
            error_detail: r.error_detail,
            idempotency_key: r.idempotency_key,
            executions: r.executions,
            deadline_at: r.deadline_at,
            cancel_requested: r.cancel_requested_at.is_some(),
            cancelled_by: r.cancelled_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
        }
    }
}

/// What `POST /provision/team` answers for a run: 202 while it runs, 200 once it succeeded, and
/// for a failed one what the existing service answered: 502 when a neighbour (the config service,
/// the AI pipeline, Kubernetes) failed it, 500 otherwise. A cancelled run is 409, one that timed
/// out 504.
pub fn answer_status(run: &RunRow) -> StatusCode {
    match run.status {
        RunStatus::Running => StatusCode::ACCEPTED,
        RunStatus::Succeeded => StatusCode::OK,
        RunStatus::Cancelled => StatusCode::CONFLICT,
        RunStatus::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        RunStatus::Failed | RunStatus::RolledBack => {
            let code = run
                .error_detail
                .as_ref()
                .and_then(|e| e.get("code"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let neighbour = ["neighbour_", "kubernetes_", "invalid_configured_schedule"]
                .iter()
                .any(|prefix| code.starts_with(prefix));
            if neighbour || run.request.is_none() {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

/// The run as the API shows it; the one-time team token goes to the first admin allowed to
/// provision who reads it.
pub async fn view(engine: &Engine, auth: &AuthConfig, admin: &Admin, state: RunState) -> ApiResult<RunView> {
    let RunState {
        run,
        steps,
        sealed_token,
    } = state;
    let steps = match steps {
        Some(steps) => steps,
        None => store::steps(&engine.db, run.id).await?,
    };
    let mut team_token_held = run.team_token_held;
    let mut team_token = None;
    // Only an admin allowed to provision may receive the secret.
    if team_token_held && admin.has(auth, Capability::Provision) {
        let sealed = match sealed_token {
            Some(sealed) => Some(sealed),
            None => store::sealed_team_token(&engine.db, run.id).await?,
        };
        // Open before taking: a replica that cannot open it (another key) must not destroy the
        // only copy. The take is conditional on the same bytes, so still only one caller gets it.
        if let Some(sealed) = sealed {
            match engine.sealer.open(&sealed, run.id.as_bytes()) {
                Some(token) => {
                    if store::take_team_token(&engine.db, run.id, &sealed).await? {
                        team_token_held = false;
                        team_token = Some(token.expose().to_string());
                    }
                }
                None => tracing::error!(
                    run_id = %run.id,
                    "the sealed team token cannot be opened here: ORCHESTRATOR_SECRETS_KEY differs between replicas, or changed"
                ),
            }
        }
    }
    let output_of = |name: &str, field: &str| {
        run.steps
            .get(name)
            .filter(|step| step.get("ok") == Some(&Value::Bool(true)))
            .and_then(|step| step.get(field))
            .cloned()
    };
    // A run still going (or the existing service's, which kept no step rows) is summarised from
    // what there is; a finished run of this service carries its summary already.
    let summary = match RunInput::of(&run) {
        Some(Ok(input)) if !run.is_final() && !steps.is_empty() => store::step_summary(&steps, input.slack_channels()),
        _ => run.steps.clone(),
    };
    let pipeline_bootstrap = output_of("bootstrap", "run");
    let pipeline_cronjob = output_of("pipeline_cronjob", "result");
    let dedicated_deployment = output_of("dedicated_deployment", "result");
    let mut summary_of_run = RunSummary::from(run);
    if !summary_of_run.status.is_final() {
        // Only the token step records its start: a running run is at its first step not done.
        summary_of_run.current_step = steps
            .iter()
            .find(|s| !s.status.is_done())
            .map(|s| s.name.to_string())
            .or(summary_of_run.current_step);
    }
    Ok(RunView {
        team_id: summary_of_run.team_node_id.clone(),
        pipeline_bootstrap,
        pipeline_cronjob,
        dedicated_deployment,
        team_token,
        team_token_held,
        steps: summary,
        step_details: steps,
        run: summary_of_run,
    })
}
