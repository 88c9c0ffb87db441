//! `POST /api/v1/admin/deprovision/team`: the existing service's contract, run as a durable
//! workflow that removes everything the platform holds for a team (its routing and agent URL, its
//! tokens, its CronJobs, its dedicated agent), or with `dry_run` the plan of it from live state.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::api::{run_response, wait_and_view, wait_budget};
use super::engine;
use super::request::DeprovisionRequest;
use super::start::{self, RunRequest};
use super::steps::TeamScope;
use super::store;
use crate::auth::{Admin, Capability};
use crate::domain::{RunStatus, Step, StepStatus, Workflow};
use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody};
use crate::state::AppState;

/// The body of `POST /api/v1/admin/deprovision/team` (documentation only; parsed by hand).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct DeprovisionTeamBody {
    org_id: String,
    team_node_id: String,
    /// Delete the team's CronJobs and dedicated agent (default true). Tokens are revoked and
    /// routing cleared either way.
    delete_k8s_resources: Option<bool>,
    /// Answer the plan from live state and change nothing (default false).
    dry_run: Option<bool>,
    idempotency_key: Option<String>,
}

/// The existing service's answer, with the run that did it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeprovisionAnswer {
    /// Everything was removed (a dry run: the plan could be read).
    pub ok: bool,
    pub dry_run: bool,
    /// What was removed, by kind: `dedicated_deployment`, `pipeline_cronjob`,
    /// `dependency_discovery_cronjob` (each an object or "not_found"), `team_tokens`, `routing`.
    /// A dry run says what would be (`would_*`).
    #[schema(value_type = Object)]
    pub deleted: Value,
    /// What could not be removed (or read), one line each.
    pub errors: Vec<String>,
    /// The deprovisioning run (none for a dry run).
    pub provisioning_run_id: Option<Uuid>,
    pub status: Option<RunStatus>,
}

/// Deprovision a team: routing and agent URL removed from its config, every token revoked, its
/// CronJobs and dedicated agent deleted. Idempotent: a second call finds nothing left to remove.
#[utoipa::path(post, path = "/api/v1/admin/deprovision/team", tag = "provisioning",
    request_body = DeprovisionTeamBody, security(("admin_token" = [])),
    params(("Prefer" = Option<String>, Header, description = "respond-async to answer 202 at once; wait=N to wait at most N seconds")),
    responses(
        (status = 200, description = "done (`ok` says whether everything was removed), or the dry run's plan", body = DeprovisionAnswer),
        (status = 202, description = "the run is still going; poll Location", body = DeprovisionAnswer),
        (status = 404, description = "no such team", body = ErrorBody),
        (status = 409, description = "another run holds the team", body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn deprovision_team(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    let request = DeprovisionRequest::parse(&body)?;
    admin.authorize(&state.config.auth, Capability::Deprovision, &request.org_id)?;
    if request.dry_run {
        let plan = dry_run(&state, &admin, &request).await?;
        return Ok(Json(plan).into_response());
    }
    let asked = RunRequest {
        org_id: &request.org_id,
        team_node_id: &request.team_node_id,
        idempotency_key: request.idempotency_key.as_deref(),
        request_hash: request.hash(),
        request: serde_json::to_value(&request).map_err(ApiError::internal)?,
        workflow: Workflow::Deprovision,
        detail: json!({"delete_k8s_resources": request.delete_k8s_resources, "idempotency_key": request.idempotency_key}),
    };
    let (run_id, slot) = start::start(&state.provisioning, &admin, asked).await??.into_parts();
    let wait = wait_budget(&headers, &state);
    let (_, view) = wait_and_view(&state, &admin, run_id, slot, wait).await?;
    let run = &view.run;
    if run.workflow != Workflow::Deprovision {
        return Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "this idempotency key was used for a different request for this team",
        ));
    }
    let mut errors: Vec<String> = view
        .step_details
        .iter()
        .filter(|s| s.status == StepStatus::Failed)
        .filter_map(|s| {
            let message = s.error.as_ref()?.get("message")?.as_str()?;
            Some(format!("{}: {message}", s.name))
        })
        .collect();
    if errors.is_empty() && run.status.is_final() && run.status != RunStatus::Succeeded {
        errors.extend(run.error.clone());
    }
    let answer = DeprovisionAnswer {
        ok: run.status == RunStatus::Succeeded,
        dry_run: false,
        deleted: engine::deleted_of(&view.step_details),
        errors,
        provisioning_run_id: Some(run_id),
        status: Some(run.status),
    };
    let status = if run.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(run_response(status, run_id, answer))
}

/// What deprovisioning would remove, read from the config service and Kubernetes; nothing is
/// changed and no run is recorded.
async fn dry_run(state: &AppState, admin: &Admin, request: &DeprovisionRequest) -> ApiResult<DeprovisionAnswer> {
    let engine = &state.provisioning;
    if store::get_team(&state.db, &request.org_id, &request.team_node_id)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("team_not_found", "no such team"));
    }
    let scope = TeamScope {
        engine,
        org: &request.org_id,
        team: &request.team_node_id,
        credential: &admin.token,
    };
    let mut plan = serde_json::Map::new();
    let mut errors = Vec::new();
    for step in Workflow::Deprovision.steps() {
        let removes_objects = matches!(step, Step::DeleteCronjobs | Step::DeleteDedicatedAgent);
        if removes_objects && !request.delete_k8s_resources {
            continue;
        }
        match step.observe(&scope).await {
            Ok(observed) => {
                if let Some(Value::Object(entries)) = observed.get("deleted") {
                    plan.extend(entries.clone());
                }
            }
            Err(e) => errors.push(format!("{step}: {}", e.message)),
        }
    }
    Ok(DeprovisionAnswer {
        ok: errors.is_empty(),
        dry_run: true,
        deleted: Value::Object(plan),
        errors,
        provisioning_run_id: None,
        status: None,
    })
}
