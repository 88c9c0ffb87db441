//! `POST /api/v1/admin/provision/team` and the runs API: read, list, retry, cancel.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Connection;
use uuid::Uuid;

use super::engine::{self, RunSlot};
use super::lock::TeamLock;
use super::request::ProvisionRequest;
use super::start::{self, RunRequest};
use super::store::{self, RunRow, StepRow};
use super::view::{self, RunPage, RunView};
use super::workflow;
use crate::audit::{self, AuditEntry};
use crate::auth::{Admin, Capability};
use crate::domain::{RunStatus, Workflow};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, ErrorBody};
use crate::pagination;
use crate::state::AppState;

pub const RUN_ID_HEADER: &str = "x-incidentfox-provisioning-run-id";

/// The body of `POST /api/v1/admin/provision/team` (documentation only; parsed by hand).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ProvisionTeamBody {
    org_id: String,
    /// 1 to 128 of letters, digits, '-', '_', '.'.
    team_node_id: String,
    slack_channel_ids: Option<Vec<String>>,
    /// Routing lists by key: slack_channel_ids, github_repos, pagerduty_service_ids, ...
    #[schema(value_type = Option<Object>)]
    routing: Option<Value>,
    idempotency_key: Option<String>,
    /// A 5-field cron expression.
    pipeline_schedule: Option<String>,
    create_pipeline_schedule: Option<bool>,
    /// shared (default) or dedicated.
    deployment_mode: Option<String>,
    rollback_on_failure: Option<bool>,
}

/// How long to wait for the run before answering 202: `Prefer: respond-async` means not at all,
/// `Prefer: wait=N` caps it (RFC 7240), else the configured wait.
pub(crate) fn wait_budget(headers: &HeaderMap, state: &AppState) -> Duration {
    let configured = state.config.provisioning.wait;
    let prefer = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    if prefer.iter().any(|p| p == "respond-async") {
        return Duration::ZERO;
    }
    prefer
        .iter()
        .find_map(|p| p.strip_prefix("wait=").and_then(|n| n.trim().parse::<u64>().ok()))
        .map_or(configured, |secs| Duration::from_secs(secs).min(configured))
}

pub(crate) fn run_header(run_id: Uuid) -> HeaderValue {
    HeaderValue::from_str(&run_id.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Provision a team, or change one: config and routing, team token, pipeline bootstrap, CronJob,
/// dedicated agent. A field left out keeps what the team was asked before.
#[utoipa::path(post, path = "/api/v1/admin/provision/team", tag = "provisioning",
    request_body = ProvisionTeamBody, security(("admin_token" = [])),
    params(("Prefer" = Option<String>, Header, description = "respond-async to answer 202 at once; wait=N to wait at most N seconds")),
    responses(
        (status = 200, description = "the run succeeded", body = RunView),
        (status = 202, description = "the run is still going; poll Location", body = RunView),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "another run holds the team, or the run was cancelled", body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 500, description = "the run failed inside the orchestrator", body = RunView),
        (status = 502, description = "a neighbour failed the run", body = RunView),
        (status = 503, body = ErrorBody),
        (status = 504, description = "the run passed its deadline", body = RunView)))]
pub async fn provision_team(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    let request = ProvisionRequest::parse(&body)?;
    admin.authorize(&state.config.auth, Capability::Provision, &request.org_id)?;
    let wait = wait_budget(&headers, &state);
    let asked = RunRequest {
        org_id: &request.org_id,
        team_node_id: &request.team_node_id,
        idempotency_key: request.idempotency_key.as_deref(),
        request_hash: request.hash(),
        request: serde_json::to_value(&request).map_err(ApiError::internal)?,
        workflow: Workflow::Provision,
        detail: start::provision_detail(&request),
    };
    let (run_id, slot) = start::start(&state.provisioning, &admin, asked).await??.into_parts();
    let (status, view) = wait_and_view(&state, &admin, run_id, slot, wait).await?;
    Ok(run_response(status, run_id, view))
}

/// The run once it finished within `wait`, else as it is (202).
pub(crate) async fn wait_and_view(
    state: &AppState,
    admin: &Admin,
    run_id: Uuid,
    slot: Option<Arc<RunSlot>>,
    wait: Duration,
) -> ApiResult<(StatusCode, RunView)> {
    let deadline = tokio::time::Instant::now() + wait;
    let run = engine::wait_for_final(&state.provisioning, run_id, slot, deadline)
        .await?
        .ok_or_else(|| ApiError::not_found("run_not_found", "no such provisioning run"))?;
    let status = view::answer_status(&run.run);
    let view = view::view(&state.provisioning, &state.config.auth, admin, run).await?;
    Ok((status, view))
}

/// A run's answer: its status, its id in a header, and while it runs a `Location` to poll.
pub(crate) fn run_response<T: serde::Serialize>(status: StatusCode, run_id: Uuid, body: T) -> Response {
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(RUN_ID_HEADER, run_header(run_id));
    if status == StatusCode::ACCEPTED {
        if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/admin/provision/runs/{run_id}")) {
            headers.insert(header::LOCATION, location);
        }
    }
    response
}

/// Loads a run the admin may see; another org's run is 404, as if it did not exist.
async fn visible_run(state: &AppState, admin: &Admin, run_id: Uuid) -> ApiResult<RunRow> {
    let run = store::get_run(&state.db, run_id).await?;
    match run {
        Some(run) if admin.require_org(&run.org_id).is_ok() => Ok(run),
        _ => Err(ApiError::not_found("run_not_found", "no such provisioning run")),
    }
}

/// A run the admin may retry or cancel: one it may see, of a workflow it may start.
async fn changeable_run(state: &AppState, admin: &Admin, run_id: Uuid) -> ApiResult<RunRow> {
    let run = visible_run(state, admin, run_id).await?;
    let capability = match run.workflow {
        Workflow::Provision => Capability::Provision,
        Workflow::Deprovision => Capability::Deprovision,
    };
    admin.require(&state.config.auth, capability)?;
    Ok(run)
}

/// One run with its steps in order (and the one-time team token, if still held).
#[utoipa::path(get, path = "/api/v1/admin/provision/runs/{id}", tag = "provisioning", security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "provisioning run id")),
    responses((status = 200, body = RunView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_run(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(run_id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    admin.require(&state.config.auth, Capability::ProvisionRead)?;
    let run = visible_run(&state, &admin, run_id).await?;
    let view = view::view(&state.provisioning, &state.config.auth, &admin, run.into()).await?;
    Ok(run_response(StatusCode::OK, run_id, view))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct RunQuery {
    org_id: Option<String>,
    team_node_id: Option<String>,
    /// running, succeeded, failed, rolled_back, cancelled or timed_out.
    status: Option<String>,
    /// provision or deprovision.
    workflow: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Runs, newest first, paginated; an org admin sees its own org only.
#[utoipa::path(get, path = "/api/v1/admin/provision/runs", tag = "provisioning", security(("admin_token" = [])), params(RunQuery),
    responses((status = 200, body = RunPage), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list_runs(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(query): ApiQuery<RunQuery>,
) -> ApiResult<Json<RunPage>> {
    admin.require(&state.config.auth, Capability::ProvisionRead)?;
    let requested_org = pagination::org_filter(query.org_id.as_deref())?;
    let org_id = admin.scope_filter(requested_org)?;
    let status = pagination::enum_filter::<RunStatus>(query.status.as_deref(), "status")?;
    let workflow = pagination::enum_filter::<Workflow>(query.workflow.as_deref(), "workflow")?;
    let team_node_id = pagination::team_filter(query.team_node_id.as_deref())?;
    let limit = pagination::limit(query.limit)?;
    let before = pagination::decode_uuid(query.cursor.as_deref())?;
    let filter = store::RunFilter {
        org_id,
        team_node_id,
        status,
        workflow,
        before,
        limit: limit + 1,
    };
    let (runs, next_cursor) = pagination::split(store::list_runs(&state.db, &filter).await?, limit, |r| {
        (r.created_at, r.id)
    });
    let items = runs.into_iter().map(Into::into).collect();
    Ok(Json(RunPage { items, next_cursor }))
}

/// Resumes a failed or timed-out run from the step it stopped at, with the caller's authority.
#[utoipa::path(post, path = "/api/v1/admin/provision/runs/{id}/retry", tag = "provisioning", security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "provisioning run id")),
    responses((status = 200, body = RunView), (status = 202, body = RunView), (status = 404, body = ErrorBody),
        (status = 409, description = "the run is not failed or timed out, a newer run changed the team since, or the team is busy", body = ErrorBody)))]
pub async fn retry_run(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiPath(run_id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    let run = changeable_run(&state, &admin, run_id).await?;
    if run.request.is_none() {
        return Err(ApiError::conflict(
            "legacy_run",
            "this run was recorded by the service this one replaced and cannot be resumed; provision the team again",
        ));
    }
    if !run.status.is_retryable() {
        return Err(not_retryable(&run));
    }
    let wait = wait_budget(&headers, &state);
    let engine = &state.provisioning;
    let (org, team) = (run.org_id.as_str(), run.team_node_id.as_str());
    let Some(mut lock) = TeamLock::acquire_within(&engine.lock_db, org, team, engine.settings.lock_timeout).await?
    else {
        let running = store::current_run_for_team(&state.db, org, team).await?;
        return Err(start::NotStarted::Busy(running).into());
    };
    let reopened = reopen(&state, &admin, &run, &mut lock).await;
    let (run, steps) = match reopened {
        Ok(Ok(reopened)) => reopened,
        Ok(Err(refusal)) => {
            lock.release().await;
            return Err(refusal);
        }
        Err(e) => {
            lock.release().await;
            return Err(e.into());
        }
    };
    let slot = start::execute(engine, &admin, run, steps, lock);
    let (status, view) = wait_and_view(&state, &admin, run_id, Some(slot), wait).await?;
    Ok(run_response(status, run_id, view))
}

fn not_retryable(run: &RunRow) -> ApiError {
    ApiError::conflict(
        "run_not_failed",
        format!(
            "only a failed or timed-out run can be retried; this one is {}",
            run.status
        ),
    )
    .with("status", run.status.as_str())
}

/// Under the team's lock: puts the run back to running as a new execution, if it is still
/// retryable and still the team's latest run.
async fn reopen(
    state: &AppState,
    admin: &Admin,
    run: &RunRow,
    lock: &mut TeamLock,
) -> Result<Result<(RunRow, Vec<StepRow>), ApiError>, sqlx::Error> {
    let (org, team) = (run.org_id.as_str(), run.team_node_id.as_str());
    let deadline = state.provisioning.settings.run_deadline.as_secs_f64();
    let conn = lock.connection().ok_or(sqlx::Error::PoolClosed)?;
    let mut tx = conn.begin().await?;
    let latest = store::get_team(&mut *tx, org, team)
        .await?
        .and_then(|t| t.last_run_id)
        .is_none_or(|last| last == run.id);
    if !latest {
        return Ok(Err(ApiError::conflict(
            "run_superseded",
            "a newer run changed this team since; provision the team again instead",
        )));
    }
    if !store::reopen_for_retry(&mut tx, run.id, deadline).await? {
        let status = store::get_run(&mut *tx, run.id).await?.map_or(run.status, |r| r.status);
        return Ok(Err(not_retryable(&RunRow { status, ..run.clone() })));
    }
    store::team_run_started(&mut tx, org, team, workflow::team_status_while(run.workflow), run.id).await?;
    audit::record(
        &mut *tx,
        AuditEntry {
            actor_subject: admin.subject(),
            actor_email: admin.email(),
            action: engine::action(run.workflow, "retried"),
            org_id: Some(org),
            team_node_id: Some(team),
            provisioning_run_id: Some(run.id),
            webhook_event_id: None,
            outcome: "accepted",
            detail: json!({"stopped_at": run.current_step, "status": run.status}),
        },
    )
    .await?;
    let reopened = store::get_run(&mut *tx, run.id).await?;
    let steps = store::steps(&mut *tx, run.id).await?;
    tx.commit().await?;
    Ok(reopened
        .map(|r| (r, steps))
        .ok_or_else(|| ApiError::not_found("run_not_found", "no such provisioning run")))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct CancelQuery {
    /// Also undo what the run did (its completed steps, in reverse). Default false.
    undo: Option<bool>,
}

/// Stops a running run at its next step boundary (and undoes what it did, with `undo=true`),
/// wherever it executes. Answers once it stopped, within the wait budget.
#[utoipa::path(post, path = "/api/v1/admin/provision/runs/{id}/cancel", tag = "provisioning", security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "provisioning run id"), CancelQuery,
        ("Prefer" = Option<String>, Header, description = "respond-async to answer 202 at once; wait=N to wait at most N seconds")),
    responses((status = 200, description = "the run stopped", body = RunView),
        (status = 202, description = "the cancel is recorded; the run stops at its next step boundary", body = RunView),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the run has finished (its status is in the answer)", body = ErrorBody)))]
pub async fn cancel_run(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiPath(run_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<CancelQuery>,
) -> ApiResult<Response> {
    let run = changeable_run(&state, &admin, run_id).await?;
    let finished = |run: &RunRow| {
        ApiError::conflict("run_finished", format!("the run has finished: it is {}", run.status))
            .with("status", run.status.as_str())
    };
    if run.is_final() || run.request.is_none() {
        return Err(finished(&run));
    }
    let undo = query.undo.unwrap_or(false);
    let mut tx = state.db.begin().await?;
    if !store::request_cancel(&mut *tx, run_id, undo, admin.subject()).await? {
        tx.rollback().await?;
        let run = visible_run(&state, &admin, run_id).await?;
        return Err(finished(&run));
    }
    audit::record(
        &mut *tx,
        AuditEntry {
            actor_subject: admin.subject(),
            actor_email: admin.email(),
            action: engine::action(run.workflow, "cancel_requested"),
            org_id: Some(&run.org_id),
            team_node_id: Some(&run.team_node_id),
            provisioning_run_id: Some(run_id),
            webhook_event_id: None,
            outcome: "accepted",
            detail: json!({ "undo": undo }),
        },
    )
    .await?;
    tx.commit().await?;
    let engine = &state.provisioning;
    engine.signal_cancel(run_id, undo);
    // Nobody holds the team's lock: nobody executes the run (its owner died and it waits for the
    // resumer). Take it over here, so it stops now.
    let mut slot = None;
    if let Some(mut lock) = TeamLock::try_acquire(&engine.lock_db, &run.org_id, &run.team_node_id).await? {
        let conn = lock.connection().ok_or(sqlx::Error::PoolClosed)?;
        if store::take_over(&mut *conn, run_id).await? {
            let run = store::get_run(&mut *conn, run_id).await?;
            let steps = store::steps(&mut *conn, run_id).await?;
            if let Some(run) = run {
                slot = Some(start::execute(engine, &admin, run, steps, lock));
            }
        } else {
            lock.release().await;
        }
    }
    let wait = wait_budget(&headers, &state);
    let (_, view) = wait_and_view(&state, &admin, run_id, slot, wait).await?;
    let status = if view.run.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(run_response(status, run_id, view))
}
