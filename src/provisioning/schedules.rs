//! Schedules the operator controls (`GET`/`PUT .../schedules`), the existing service's
//! `sync-cronjobs` (admin and team token) and on-demand pipeline trigger, and the reconciler's
//! view of one team (`GET .../drift`, `PUT .../drift-policy`).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::CronJob;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::lock::TeamLock;
use super::objects::{CronJobKind, TeamObjects};
use super::request::{ScheduleChange, TeamRef};
use super::steps::{self, StepError};
use super::store::{self, ScheduleRow, TeamRow};
use super::teams::visible_team;
use crate::audit::{self, AuditEntry};
use crate::auth::{presented_token, Admin, Capability};
use crate::clients::NeighbourError;
use crate::config::Secret;
use crate::domain::{DriftPolicy, OrgId, ScheduleType, TeamNodeId, TeamStatus};
use crate::error::{ApiError, ApiJson, ApiPath, ApiResult, ErrorBody};
use crate::state::AppState;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Schedules {
    pub org_id: String,
    pub team_node_id: String,
    /// One per schedule type the team has; a schedule that is not listed has no CronJob.
    pub schedules: Vec<ScheduleRow>,
}

/// The body of `PUT .../schedules` (documentation only; parsed by hand for precise 422s).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SchedulesBody {
    schedules: Vec<ScheduleBody>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ScheduleBody {
    /// `ingestion` (alias `ai_pipeline`) or `dependency_discovery`.
    schedule_type: String,
    /// Five fields or a macro (`@daily`); left out: unchanged, else the type's default.
    cron_expression: Option<String>,
    /// Left out: unchanged, else true. False suspends the CronJob (it is not deleted).
    enabled: Option<bool>,
}

/// The team's schedules: cron expression, enabled, the CronJob each owns and when it last ran.
#[utoipa::path(get, path = "/api/v1/admin/teams/{org_id}/{team_node_id}/schedules", tag = "teams", security(("admin_token" = [])),
    params(("org_id" = String, Path, description = "the team's org"), ("team_node_id" = String, Path, description = "the team")),
    responses((status = 200, body = Schedules), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_schedules(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((org, team)): ApiPath<(OrgId, TeamNodeId)>,
) -> ApiResult<Json<Schedules>> {
    visible_team(&state, &admin, Capability::ProvisionRead, &org, &team).await?;
    Ok(Json(Schedules {
        schedules: store::team_schedules(&state.db, &org, &team).await?,
        org_id: org.to_string(),
        team_node_id: team.to_string(),
    }))
}

/// A team that may be changed: known, not deprovisioned, no run going; its lock held.
async fn lock_living_team(state: &AppState, org: &str, team: &str) -> ApiResult<(TeamLock, TeamRow)> {
    let check = |row: Option<TeamRow>| -> ApiResult<TeamRow> {
        let row = row
            .filter(|t| t.status != TeamStatus::Deprovisioned)
            .ok_or_else(|| ApiError::not_found("team_not_found", "no such team (or it is deprovisioned)"))?;
        if let Some(run) = row.running_run() {
            return Err(ApiError::conflict(
                "team_busy",
                "a run is changing this team; try again when it has finished",
            )
            .with("provisioning_run_id", run.to_string()));
        }
        // A retry of the failed run would put back the schedules it was asked for.
        if row.status != TeamStatus::Active {
            return Err(ApiError::conflict(
                "team_not_active",
                "the team's last run did not succeed: retry it or provision the team again first",
            )
            .with("status", row.status.as_str()));
        }
        Ok(row)
    };
    check(store::get_team(&state.db, org, team).await?)?;
    let lock = TeamLock::acquire_within(
        &state.provisioning.lock_db,
        org,
        team,
        state.config.provisioning.lock_timeout,
    )
    .await?
    .ok_or_else(|| ApiError::conflict("team_busy", "another change of this team holds it; try again"))?;
    // Read again under the lock: a run may have started or ended meanwhile.
    match store::get_team(&state.db, org, team)
        .await
        .map_err(ApiError::from)
        .and_then(check)
    {
        Ok(row) => Ok((lock, row)),
        Err(e) => {
            lock.release().await;
            Err(e)
        }
    }
}

fn kubernetes_error(e: StepError) -> ApiError {
    match e.code {
        "kubernetes_name_taken" => ApiError::conflict("kubernetes_name_taken", e.message),
        _ if e.transient => ApiError::unavailable("kubernetes_unavailable", e.message),
        _ => ApiError::bad_gateway("kubernetes_rejected", e.message),
    }
}

fn cronjob_kind(schedule_type: ScheduleType) -> CronJobKind {
    match schedule_type {
        ScheduleType::Ingestion => CronJobKind::Pipeline,
        ScheduleType::DependencyDiscovery => CronJobKind::Discovery,
    }
}

fn builder<'a>(state: &'a AppState, org: &'a str, team: &'a str) -> TeamObjects<'a> {
    TeamObjects {
        kubernetes: &state.provisioning.kubernetes,
        config_service_url: &state.provisioning.config_service_url,
        org,
        team,
    }
}

/// Applies the schedule's CronJob (suspended when disabled) and records it; the ingestion
/// schedule is the team's desired state too, so provisioning the team again keeps it.
/// Says whether the CronJob was created.
async fn put_schedule(
    state: &AppState,
    org: &str,
    team: &str,
    schedule_type: ScheduleType,
    cron: &str,
    enabled: bool,
) -> ApiResult<(CronJob, bool)> {
    let cronjob = builder(state, org, team).cronjob(cronjob_kind(schedule_type), cron, !enabled);
    let (applied, created) = steps::apply_owned(&state.provisioning.kube, &cronjob)
        .await
        .map_err(kubernetes_error)?;
    store::put_schedule(&state.db, org, team, schedule_type, cron, enabled, &applied.name, true).await?;
    if schedule_type == ScheduleType::Ingestion {
        store::set_desired_pipeline_schedule(&state.db, org, team, Some((cron, enabled))).await?;
    }
    Ok((cronjob, created))
}

/// Deletes the schedule's CronJob (if it is the team's) and its row. `None`: there was none.
async fn remove_schedule(
    state: &AppState,
    org: &str,
    team: &str,
    schedule_type: ScheduleType,
) -> ApiResult<Option<String>> {
    let expected = builder(state, org, team).cronjob(cronjob_kind(schedule_type), schedule_type.default_cron(), false);
    let deleted = steps::delete_owned(&state.provisioning.kube, &expected)
        .await
        .map_err(kubernetes_error)?;
    store::delete_schedule(&state.db, org, team, schedule_type).await?;
    if schedule_type == ScheduleType::Ingestion {
        store::set_desired_pipeline_schedule(&state.db, org, team, None).await?;
    }
    Ok(deleted.map(|(name, _)| name))
}

/// Change the team's schedules: a cron expression, enabled (the CronJob runs) or disabled (it
/// is suspended, not deleted). A schedule type the team does not have yet gets its CronJob.
#[utoipa::path(put, path = "/api/v1/admin/teams/{org_id}/{team_node_id}/schedules", tag = "teams", security(("admin_token" = [])),
    request_body = SchedulesBody,
    params(("org_id" = String, Path, description = "the team's org"), ("team_node_id" = String, Path, description = "the team")),
    responses((status = 200, body = Schedules), (status = 403, body = ErrorBody),
        (status = 404, description = "no such team, or it is deprovisioned", body = ErrorBody),
        (status = 409, description = "a run is changing the team", body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn put_schedules(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((org, team)): ApiPath<(OrgId, TeamNodeId)>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Schedules>> {
    admin.authorize(&state.config.auth, Capability::Provision, &org)?;
    let changes = ScheduleChange::parse_all(&body)?;
    let (lock, _) = lock_living_team(&state, &org, &team).await?;
    let result = async {
        let before = store::team_schedules(&state.db, &org, &team).await?;
        for change in &changes {
            let current = before.iter().find(|s| s.schedule_type == change.schedule_type);
            let cron = change
                .cron_expression
                .clone()
                .or_else(|| current.map(|c| c.cron_expression.clone()))
                .unwrap_or_else(|| change.schedule_type.default_cron().to_string());
            let enabled = change.enabled.or(current.map(|c| c.enabled)).unwrap_or(true);
            put_schedule(&state, &org, &team, change.schedule_type, &cron, enabled).await?;
        }
        Ok::<_, ApiError>(before)
    }
    .await;
    // Audited whatever happened: a change that failed half-way has applied its first part.
    let result = match result {
        Ok(before) => match store::team_schedules(&state.db, &org, &team).await {
            Ok(after) => {
                let detail = json!({"before": before, "after": after});
                audit_schedules(&state, &admin, &org, &team, "ok", detail)
                    .await
                    .map(|()| after)
            }
            Err(e) => Err(e.into()),
        },
        Err(e) => {
            let detail = json!({"error": e.detail, "asked": body});
            let _ = audit_schedules(&state, &admin, &org, &team, "failed", detail).await;
            Err(e)
        }
    };
    lock.release().await;
    Ok(Json(Schedules {
        schedules: result?,
        org_id: org.to_string(),
        team_node_id: team.to_string(),
    }))
}

async fn audit_schedules(
    state: &AppState,
    admin: &Admin,
    org: &str,
    team: &str,
    outcome: &str,
    detail: Value,
) -> ApiResult<()> {
    let mut entry = AuditEntry::new(admin.subject(), "team.schedules_changed", outcome);
    entry.actor_email = admin.email();
    entry.org_id = Some(org);
    entry.team_node_id = Some(team);
    entry.detail = detail;
    audit::record(&state.db, entry).await?;
    Ok(())
}

/// The existing service's answer to `sync-cronjobs`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SyncAnswer {
    /// Both CronJobs are as the team config says.
    pub ok: bool,
    /// `{name, namespace, schedule, org_id, team_node_id, created}` when enabled,
    /// `{name, namespace, deleted: true}` or `{skipped: true, reason: "not_found"}` when not,
    /// `{error}` when it failed.
    #[schema(value_type = Object)]
    pub ai_pipeline: Value,
    #[schema(value_type = Object)]
    pub dependency_discovery: Value,
    pub message: String,
}

/// The body of `POST /api/v1/admin/teams/sync-cronjobs` and `/admin/pipeline/trigger`.
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct TeamRefBody {
    org_id: String,
    team_node_id: String,
}

/// Makes the team's CronJobs match its effective config (`ai_pipeline` and
/// `dependency_discovery`: `enabled`, default false, and `schedule`, default per type).
async fn sync_from_config(
    state: &AppState,
    actor: (&str, Option<&str>),
    org: &str,
    team: &str,
    config: &Value,
) -> ApiResult<SyncAnswer> {
    let (lock, _) = lock_living_team(state, org, team).await?;
    let namespace = state.provisioning.kubernetes.namespace.clone();
    let mut errors = Vec::new();
    let mut answers = serde_json::Map::new();
    for schedule_type in [ScheduleType::Ingestion, ScheduleType::DependencyDiscovery] {
        let key = schedule_type.config_key();
        let section = config.get(key).cloned().unwrap_or(Value::Null);
        let enabled = section.get("enabled").and_then(Value::as_bool).unwrap_or(false);
        let cron = section
            .get("schedule")
            .and_then(Value::as_str)
            .unwrap_or(schedule_type.default_cron())
            .trim()
            .to_string();
        let answer = if !enabled {
            match remove_schedule(state, org, team, schedule_type).await {
                Ok(Some(name)) => json!({"name": name, "namespace": namespace, "deleted": true}),
                Ok(None) => json!({"skipped": true, "reason": "not_found"}),
                Err(e) => {
                    errors.push(format!("{key}: {}", e.detail));
                    json!({"error": e.detail})
                }
            }
        } else if let Err(why) = super::cron::validate(&cron) {
            let error = format!("the team config's {key}.schedule {why}");
            errors.push(format!("{key}: {error}"));
            json!({"error": error})
        } else {
            match put_schedule(state, org, team, schedule_type, &cron, true).await {
                Ok((cronjob, created)) => json!({
                    "name": cronjob.metadata.name, "namespace": namespace, "schedule": cron,
                    "org_id": org, "team_node_id": team, "created": created,
                }),
                Err(e) => {
                    errors.push(format!("{key}: {}", e.detail));
                    json!({"error": e.detail})
                }
            }
        };
        answers.insert(key.to_string(), answer);
    }
    let ok = errors.is_empty();
    let mut entry = AuditEntry::new(actor.0, "team.cronjobs_synced", if ok { "ok" } else { "failed" });
    entry.actor_email = actor.1;
    entry.org_id = Some(org);
    entry.team_node_id = Some(team);
    entry.detail = Value::Object(answers.clone());
    let recorded = audit::record(&state.db, entry).await;
    lock.release().await;
    recorded?;
    Ok(SyncAnswer {
        ok,
        ai_pipeline: answers.remove("ai_pipeline").unwrap_or(Value::Null),
        dependency_discovery: answers.remove("dependency_discovery").unwrap_or(Value::Null),
        message: if ok {
            "CronJobs synced".into()
        } else {
            format!("Errors: {}", errors.join(", "))
        },
    })
}

fn config_error(e: NeighbourError) -> ApiError {
    match e.status() {
        Some(404) => ApiError::not_found("team_not_found", "the config service does not know this team"),
        _ if e.is_transient() => ApiError::unavailable("config_service_unavailable", e.to_string()),
        _ => ApiError::bad_gateway(e.code(), e.to_string()),
    }
}

/// Make the team's CronJobs match its effective config: create or update what is enabled,
/// delete what is not.
#[utoipa::path(post, path = "/api/v1/admin/teams/sync-cronjobs", tag = "teams", security(("admin_token" = [])),
    request_body = TeamRefBody,
    responses((status = 200, description = "`ok` says whether both CronJobs are as the config says", body = SyncAnswer),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn sync_cronjobs(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<SyncAnswer>> {
    let target = TeamRef::parse(&body)?;
    admin.authorize(&state.config.auth, Capability::CronJobsSync, &target.org_id)?;
    let config = state
        .provisioning
        .config_service
        .effective_config(&admin.token, &target.org_id, &target.team_node_id)
        .await
        .map_err(config_error)?;
    let actor = (admin.subject(), admin.email());
    Ok(Json(
        sync_from_config(&state, actor, &target.org_id, &target.team_node_id, &config).await?,
    ))
}

/// The same for the team whose token is presented (team users enable and disable their own
/// scheduled features without an admin).
#[utoipa::path(post, path = "/api/v1/teams/me/sync-cronjobs", tag = "teams", security(("team_token" = [])),
    responses((status = 200, description = "`ok` says whether both CronJobs are as the config says", body = SyncAnswer),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn sync_my_cronjobs(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<SyncAnswer>> {
    let token: Secret = presented_token(&headers, "x-incidentfox-team-token").ok_or_else(|| {
        ApiError::unauthorized(
            "missing_token",
            "a team token is required (Authorization: Bearer, or X-IncidentFox-Team-Token)",
        )
    })?;
    let config_service = &state.provisioning.config_service;
    let principal = config_service.auth_me(&token).await.map_err(|e| match e.status() {
        Some(401 | 403) => ApiError::unauthorized("invalid_token", "the team token is invalid or expired"),
        _ => config_error(e),
    })?;
    let (Some(org), Some(team)) = (principal.org_id.as_deref(), principal.team_node_id.as_deref()) else {
        return Err(ApiError::forbidden(
            "not_a_team_token",
            "this token names no team: use a team token",
        ));
    };
    let org =
        OrgId::parse(org).map_err(|_| ApiError::forbidden("not_a_team_token", "the token's org id is not valid"))?;
    let team = TeamNodeId::parse(team)
        .map_err(|_| ApiError::forbidden("not_a_team_token", "the token's team id is not valid"))?;
    let config = config_service.config_me(&token).await.map_err(config_error)?;
    let actor = format!("team:{org}/{team}");
    Ok(Json(
        sync_from_config(&state, (&actor, None), &org, &team, &config).await?,
    ))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TriggerAnswer {
    pub ok: bool,
    /// The AI pipeline's job (or run) for it.
    pub job_name: Option<String>,
    pub message: String,
}

/// Start an AI pipeline run for a team now (the AI pipeline creates a one-off Job). A failure of
/// the AI pipeline answers `ok: false` with its reason, as the existing service did.
#[utoipa::path(post, path = "/api/v1/admin/pipeline/trigger", tag = "teams", security(("admin_token" = [])),
    request_body = TeamRefBody,
    responses((status = 200, body = TriggerAnswer), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn trigger_pipeline(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<TriggerAnswer>> {
    let target = TeamRef::parse(&body)?;
    admin.authorize(&state.config.auth, Capability::PipelineTrigger, &target.org_id)?;
    let (org, team) = (&target.org_id, &target.team_node_id);
    store::get_team(&state.db, org, team)
        .await?
        .filter(|t| t.status != TeamStatus::Deprovisioned)
        .ok_or_else(|| ApiError::not_found("team_not_found", "no such team (or it is deprovisioned)"))?;
    let answer = match state.provisioning.ai_pipeline.run(&admin.token, org, team).await {
        Ok(result) => TriggerAnswer {
            ok: true,
            job_name: ["job_name", "run_id"]
                .iter()
                .find_map(|k| result.get(*k).and_then(Value::as_str))
                .map(str::to_string),
            message: "Pipeline run triggered".into(),
        },
        Err(e) => {
            tracing::warn!(org_id = %org, team_node_id = %team, error = %e, "on-demand pipeline run failed");
            TriggerAnswer {
                ok: false,
                job_name: None,
                message: e.to_string(),
            }
        }
    };
    let mut entry = AuditEntry::new(
        admin.subject(),
        "pipeline.triggered",
        if answer.ok { "ok" } else { "failed" },
    );
    entry.actor_email = admin.email();
    entry.org_id = Some(org);
    entry.team_node_id = Some(team);
    entry.detail = json!({"job_name": answer.job_name, "message": answer.message});
    audit::record(&state.db, entry).await?;
    Ok(Json(answer))
}

/// What the reconciler would change for a team now.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DriftPlan {
    pub org_id: String,
    pub team_node_id: String,
    pub policy: DriftPolicy,
    /// Nothing differs.
    pub in_sync: bool,
    /// Each difference: `kind`, `name`, `drift` (missing, modified, unexpected, orphan), the
    /// `fields` that differ, `before` and `after`.
    #[schema(value_type = Vec<Object>)]
    pub drift: Value,
    /// What the reconciler last found (and whether it repaired it).
    #[schema(value_type = Option<Object>)]
    pub last_drift: Option<Value>,
    pub last_drift_at: Option<DateTime<Utc>>,
}

/// The plan: how the team's objects differ from what they should be, read live, changing
/// nothing. A team mid-run, or whose last run failed, has no plan (`in_sync`, empty).
#[utoipa::path(get, path = "/api/v1/admin/teams/{org_id}/{team_node_id}/drift", tag = "teams", security(("admin_token" = [])),
    params(("org_id" = String, Path, description = "the team's org"), ("team_node_id" = String, Path, description = "the team")),
    responses((status = 200, body = DriftPlan), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn get_drift(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((org, team)): ApiPath<(OrgId, TeamNodeId)>,
) -> ApiResult<Json<DriftPlan>> {
    let row = visible_team(&state, &admin, Capability::ProvisionRead, &org, &team).await?;
    let plan = state.reconciler.plan(&row).await.map_err(|e| match e {
        super::reconcile::ReconcileError::Kubernetes(e) => kubernetes_error(e.into()),
        super::reconcile::ReconcileError::Database(e) => e.into(),
    })?;
    Ok(Json(DriftPlan {
        org_id: org.to_string(),
        team_node_id: team.to_string(),
        policy: plan.policy,
        in_sync: plan.in_sync,
        drift: serde_json::to_value(&plan.drift).unwrap_or(Value::Null),
        last_drift: row.last_drift.map(|d| d.0),
        last_drift_at: row.last_drift_at,
    }))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct DriftPolicyBody {
    /// repair (default): put the objects back and record it; report: only record the drift.
    pub policy: DriftPolicy,
}

/// Set what the reconciler does with the team's drift.
#[utoipa::path(put, path = "/api/v1/admin/teams/{org_id}/{team_node_id}/drift-policy", tag = "teams", security(("admin_token" = [])),
    request_body = DriftPolicyBody,
    params(("org_id" = String, Path, description = "the team's org"), ("team_node_id" = String, Path, description = "the team")),
    responses((status = 200, body = DriftPolicyBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn put_drift_policy(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((org, team)): ApiPath<(OrgId, TeamNodeId)>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<DriftPolicyBody>> {
    admin.authorize(&state.config.auth, Capability::Provision, &org)?;
    let policy = body
        .get("policy")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_field("policy", "is required: repair or report"))?
        .parse::<DriftPolicy>()
        .map_err(|_| ApiError::invalid_field("policy", format!("must be one of {}", DriftPolicy::names())))?;
    visible_team(&state, &admin, Capability::Provision, &org, &team).await?;
    store::set_drift_policy(&state.db, &org, &team, policy).await?;
    let mut entry = AuditEntry::new(admin.subject(), "team.drift_policy_changed", "ok");
    entry.actor_email = admin.email();
    entry.org_id = Some(&org);
    entry.team_node_id = Some(&team);
    entry.detail = json!({"policy": policy});
    audit::record(&state.db, entry).await?;
    Ok(Json(DriftPolicyBody { policy }))
}
