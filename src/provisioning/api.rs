//! `POST /api/v1/admin/provision/team` and the runs API.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::engine::{self, Execution};
use super::lock::TeamLock;
use super::request::ProvisionRequest;
use super::store::{self, RunRow};
use super::view::{self, RunPage, RunView};
use crate::audit::{self, AuditEntry};
use crate::auth::{Admin, Capability};
use crate::domain::RunStatus;
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
fn wait_budget(headers: &HeaderMap, state: &AppState) -> Duration {
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

fn run_header(run_id: Uuid) -> HeaderValue {
    HeaderValue::from_str(&run_id.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Provision a team: config and routing, team token, pipeline bootstrap, CronJob, dedicated agent.
#[utoipa::path(post, path = "/api/v1/admin/provision/team", tag = "provisioning",
    request_body = ProvisionTeamBody, security(("admin_token" = [])),
    params(("Prefer" = Option<String>, Header, description = "respond-async to answer 202 at once; wait=N to wait at most N seconds")),
    responses(
        (status = 200, description = "the run finished (succeeded or failed)", body = RunView),
        (status = 202, description = "the run is still going; poll Location", body = RunView),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "another run holds the team", body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn provision_team(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    let request = ProvisionRequest::parse(&body)?;
    admin.authorize(&state.config.auth, Capability::Provision, &request.org_id)?;
    let wait = wait_budget(&headers, &state);
    let (org, team) = (request.org_id.as_str(), request.team_node_id.as_str());

    if let Some(existing) = find_replay(&state, &request).await? {
        return respond(&state, &admin, existing, wait).await;
    }

    let waited = Instant::now();
    let engine = &state.provisioning;
    let lock = TeamLock::acquire_within(&engine.lock_db, org, team, engine.settings.lock_timeout).await?;
    state
        .metrics
        .provisioning_lock_wait_seconds
        .observe(waited.elapsed().as_secs_f64());
    let Some(lock) = lock else {
        return Err(team_busy(&state, org, team).await);
    };

    // A twin request with the same key may have created the run while we waited.
    let existing = match find_replay(&state, &request).await {
        Ok(existing) => existing,
        Err(e) => {
            lock.release().await;
            return Err(e);
        }
    };
    if let Some(existing) = existing {
        lock.release().await;
        return respond(&state, &admin, existing, wait).await;
    }
    // Holding the lock, any other run still `running` for this team lost its owner: it must be
    // resumed (by the resumer, within seconds) before a newer run, or it would later overwrite it.
    match store::running_run_for_team(&state.db, org, team).await {
        Ok(None) => {}
        Ok(Some(_)) => {
            lock.release().await;
            return Err(team_busy(&state, org, team).await);
        }
        Err(e) => {
            lock.release().await;
            return Err(e.into());
        }
    }

    let run_id = Uuid::now_v7();
    let created = create_run(&state, &admin, &request, run_id).await;
    match created {
        Ok(true) => {}
        Ok(false) => {
            lock.release().await;
            return match find_replay(&state, &request).await? {
                Some(existing) => respond(&state, &admin, existing, wait).await,
                None => Err(ApiError::conflict(
                    "idempotency_conflict",
                    "a concurrent request with the same idempotency key is being created; retry",
                )),
            };
        }
        Err(e) => {
            lock.release().await;
            return Err(e.into());
        }
    }
    execute_and_respond(&state, &admin, run_id, lock, wait).await
}

/// Hands the run, with its team's lock, to the executor (acting with the caller's authority) and
/// answers as soon as it finishes or the wait budget is spent.
async fn execute_and_respond(
    state: &AppState,
    admin: &Admin,
    run_id: Uuid,
    lock: TeamLock,
    wait: Duration,
) -> ApiResult<Response> {
    engine::spawn(
        &state.provisioning,
        Execution {
            run_id,
            lock,
            credential: admin.token.clone(),
            actor_subject: admin.subject().to_string(),
        },
    );
    respond(state, admin, run_id, wait).await
}

/// The run an idempotency key already names; 422 if the key was used for another request.
async fn find_replay(state: &AppState, request: &ProvisionRequest) -> ApiResult<Option<Uuid>> {
    let Some(key) = &request.idempotency_key else {
        return Ok(None);
    };
    let Some((run_id, hash)) =
        store::find_by_idempotency_key(&state.db, &request.org_id, &request.team_node_id, key).await?
    else {
        return Ok(None);
    };
    // A run the existing service recorded has no request to compare: its key answers with it, as
    // the existing service did.
    if hash.is_some_and(|hash| hash != request.hash()) {
        return Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "this idempotency key was used for a different request for this team",
        )
        .with("provisioning_run_id", run_id.to_string()));
    }
    Ok(Some(run_id))
}

async fn create_run(
    state: &AppState,
    admin: &Admin,
    request: &ProvisionRequest,
    run_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let inserted = store::insert_run(
        &mut tx,
        store::NewRun {
            id: run_id,
            request,
            actor_subject: admin.subject(),
            actor_email: admin.email(),
        },
    )
    .await?;
    if inserted.is_none() {
        return Ok(false);
    }
    audit::record(
        &mut *tx,
        AuditEntry {
            actor_subject: admin.subject(),
            actor_email: admin.email(),
            action: "provision.requested",
            org_id: Some(&request.org_id),
            team_node_id: Some(&request.team_node_id),
            provisioning_run_id: Some(run_id),
            webhook_event_id: None,
            outcome: "accepted",
            detail: json!({
                "deployment_mode": request.deployment_mode,
                "schedule": request.wants_schedule(),
                "rollback_on_failure": request.rollback_on_failure,
                "idempotency_key": request.idempotency_key,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

async fn team_busy(state: &AppState, org: &str, team: &str) -> ApiError {
    let running = store::running_run_for_team(&state.db, org, team).await.ok().flatten();
    let mut error = ApiError::conflict(
        "team_busy",
        "another provisioning run holds this team; retry later or follow the run in progress",
    );
    if let Some(run_id) = running {
        error = error
            .with("provisioning_run_id", run_id.to_string())
            .with_header(header::HeaderName::from_static(RUN_ID_HEADER), run_header(run_id));
    }
    error
}

/// The run if it finished within `wait` (200, or the existing service's 502 when a neighbour
/// failed it), else 202 with a `Location` to poll.
async fn respond(state: &AppState, admin: &Admin, run_id: Uuid, wait: Duration) -> ApiResult<Response> {
    let deadline = tokio::time::Instant::now() + wait;
    let run = engine::wait_for_final(&state.provisioning, run_id, deadline)
        .await?
        .ok_or_else(|| ApiError::not_found("run_not_found", "no such provisioning run"))?;
    let status = view::answer_status(&run);
    let finished = run.is_final();
    let view = view::view(&state.provisioning, &state.config.auth, admin, run).await?;
    let mut response = (status, Json(view)).into_response();
    let headers = response.headers_mut();
    headers.insert(RUN_ID_HEADER, run_header(run_id));
    if !finished {
        if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/admin/provision/runs/{run_id}")) {
            headers.insert(header::LOCATION, location);
        }
    }
    Ok(response)
}

/// Loads a run the admin may see; another org's run is 404, as if it did not exist.
async fn visible_run(state: &AppState, admin: &Admin, run_id: Uuid) -> ApiResult<RunRow> {
    let run = store::get_run(&state.db, run_id).await?;
    match run {
        Some(run) if admin.require_org(&run.org_id).is_ok() => Ok(run),
        _ => Err(ApiError::not_found("run_not_found", "no such provisioning run")),
    }
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
    let view = view::view(&state.provisioning, &state.config.auth, &admin, run).await?;
    let mut response = Json(view).into_response();
    response.headers_mut().insert(RUN_ID_HEADER, run_header(run_id));
    Ok(response)
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct RunQuery {
    org_id: Option<String>,
    team_node_id: Option<String>,
    /// running, succeeded, failed or rolled_back.
    status: Option<String>,
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
    let status = query
        .status
        .as_deref()
        .map(str::parse::<RunStatus>)
        .transpose()
        .map_err(|_| ApiError::invalid_field("status", format!("must be one of {}", RunStatus::names())))?;
    let team_node_id = pagination::team_filter(query.team_node_id.as_deref())?;
    let limit = pagination::limit(query.limit)?;
    let before = pagination::decode_uuid(query.cursor.as_deref())?;
    let filter = store::RunFilter {
        org_id,
        team_node_id,
        status,
        before,
        limit: limit + 1,
    };
    let (runs, next_cursor) = pagination::split(store::list_runs(&state.db, &filter).await?, limit, |r| {
        (r.created_at, r.id)
    });
    let items = runs.into_iter().map(Into::into).collect();
    Ok(Json(RunPage { items, next_cursor }))
}

/// Resumes a failed run from its failed step, with the caller's authority.
#[utoipa::path(post, path = "/api/v1/admin/provision/runs/{id}/retry", tag = "provisioning", security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "provisioning run id")),
    responses((status = 200, body = RunView), (status = 202, body = RunView), (status = 404, body = ErrorBody),
        (status = 409, description = "the run is not failed, or the team is busy", body = ErrorBody)))]
pub async fn retry_run(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiPath(run_id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    admin.require(&state.config.auth, Capability::Provision)?;
    let run = visible_run(&state, &admin, run_id).await?;
    if run.request.is_none() {
        return Err(ApiError::conflict(
            "legacy_run",
            "this run was recorded by the service this one replaced and cannot be resumed; provision the team again",
        ));
    }
    if run.status != RunStatus::Failed {
        return Err(ApiError::conflict(
            "run_not_failed",
            format!("only a failed run can be retried; this one is {}", run.status),
        )
        .with("status", run.status.as_str()));
    }
    let wait = wait_budget(&headers, &state);
    let engine = &state.provisioning;
    let lock = TeamLock::acquire_within(
        &engine.lock_db,
        &run.org_id,
        &run.team_node_id,
        engine.settings.lock_timeout,
    )
    .await?;
    let Some(lock) = lock else {
        return Err(team_busy(&state, &run.org_id, &run.team_node_id).await);
    };
    let reopened: Result<bool, sqlx::Error> = async {
        let mut tx = state.db.begin().await?;
        if !store::reopen_failed_run(&mut tx, run_id).await? {
            return Ok(false);
        }
        audit::record(
            &mut *tx,
            AuditEntry {
                actor_subject: admin.subject(),
                actor_email: admin.email(),
                action: "provision.retried",
                org_id: Some(&run.org_id),
                team_node_id: Some(&run.team_node_id),
                provisioning_run_id: Some(run_id),
                webhook_event_id: None,
                outcome: "accepted",
                detail: json!({"failed_step": run.current_step}),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    match reopened {
        Ok(true) => {}
        Ok(false) => {
            lock.release().await;
            return Err(ApiError::conflict("run_not_failed", "the run is no longer failed"));
        }
        Err(e) => {
            lock.release().await;
            return Err(e.into());
        }
    }
    execute_and_respond(&state, &admin, run_id, lock, wait).await
}
