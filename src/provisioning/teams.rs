//! Which teams exist, and are they as asked? `GET /api/v1/admin/teams` and one team with its
//! recent runs and the live state of what it owns; the existing service's `/deployment` and
//! `/pipeline` views of one team.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::request::TeamSpec;
use super::steps::{self, TeamScope};
use super::store::{self, RunFilter, ScheduleRow, TeamFilter, TeamRow};
use super::view::RunSummary;
use crate::auth::{Admin, Capability};
use crate::domain::{DeploymentMode, DriftPolicy, OrgId, Step, TeamNodeId, TeamStatus};
use crate::error::{ApiError, ApiPath, ApiQuery, ApiResult, ErrorBody};
use crate::pagination;
use crate::state::AppState;

/// How many of a team's runs its view lists.
const RECENT_RUNS: i64 = 5;

#[derive(Serialize, utoipa::ToSchema)]
pub struct TeamSummary {
    #[schema(value_type = String)]
    pub org_id: OrgId,
    #[schema(value_type = String)]
    pub team_node_id: TeamNodeId,
    pub status: TeamStatus,
    /// What was asked of the team; null for a team the existing service provisioned and this one
    /// has not changed yet.
    pub desired: Option<TeamSpec>,
    /// The run that last changed the team.
    pub last_run_id: Option<Uuid>,
    pub bootstrapped_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deprovisioned_at: Option<DateTime<Utc>>,
    /// What the reconciler does with drift (null: the service's default).
    pub drift_policy: Option<DriftPolicy>,
    /// The last drift the reconciler found in the team's objects, and what it did.
    #[schema(value_type = Option<Object>)]
    pub last_drift: Option<Value>,
    pub last_drift_at: Option<DateTime<Utc>>,
}

impl From<TeamRow> for TeamSummary {
    fn from(t: TeamRow) -> Self {
        Self {
            org_id: t.org_id,
            team_node_id: t.team_node_id,
            status: t.status,
            desired: t.desired.map(|d| d.0),
            last_run_id: t.last_run_id,
            bootstrapped_at: t.bootstrapped_at,
            created_at: t.created_at,
            updated_at: t.updated_at,
            deprovisioned_at: t.deprovisioned_at,
            drift_policy: t.drift_policy,
            last_drift: t.last_drift.map(|d| d.0),
            last_drift_at: t.last_drift_at,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TeamPage {
    pub items: Vec<TeamSummary>,
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct TeamQuery {
    org_id: Option<String>,
    /// provisioning, active, failed, deprovisioning or deprovisioned.
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Teams in (org, team) order, paginated; an org admin sees its own org only.
#[utoipa::path(get, path = "/api/v1/admin/teams", tag = "teams", security(("admin_token" = [])), params(TeamQuery),
    responses((status = 200, body = TeamPage), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list_teams(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(query): ApiQuery<TeamQuery>,
) -> ApiResult<Json<TeamPage>> {
    admin.require(&state.config.auth, Capability::ProvisionRead)?;
    let org_id = admin.scope_filter(pagination::org_filter(query.org_id.as_deref())?)?;
    let status = pagination::enum_filter::<TeamStatus>(query.status.as_deref(), "status")?;
    let limit = pagination::limit(query.limit)?;
    let after = pagination::decode_team(query.cursor.as_deref())?;
    let filter = TeamFilter {
        org_id,
        status,
        after,
        limit: limit + 1,
    };
    let (teams, next_cursor) = pagination::split_by(store::list_teams(&state.db, &filter).await?, limit, |t| {
        pagination::encode_team(&t.org_id, &t.team_node_id)
    });
    Ok(Json(TeamPage {
        items: teams.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// What the team owns, as Kubernetes and the config service have it now.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LiveState {
    /// The AI pipeline's CronJob: name, namespace, schedule, suspended, last_schedule_time,
    /// active_jobs; null if there is none.
    #[schema(value_type = Option<Object>)]
    pub pipeline_cronjob: Value,
    #[schema(value_type = Option<Object>)]
    pub dependency_discovery_cronjob: Value,
    /// The dedicated agent's Deployment: replicas, ready and available replicas, conditions,
    /// service_url; null if there is none.
    #[schema(value_type = Option<Object>)]
    pub dedicated_agent: Value,
    /// The team has an active team token; null if it could not be read.
    pub token_active: Option<bool>,
    /// What could not be read, one line each.
    pub errors: Vec<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TeamView {
    #[serde(flatten)]
    pub team: TeamSummary,
    /// The team's latest runs, newest first.
    pub recent_runs: Vec<RunSummary>,
    /// Its schedules (`GET .../schedules`).
    pub schedules: Vec<ScheduleRow>,
    pub live: LiveState,
}

/// The team named by the path, if the admin may read its org; 404 if there is none.
pub(crate) async fn visible_team(
    state: &AppState,
    admin: &Admin,
    capability: Capability,
    org: &OrgId,
    team: &TeamNodeId,
) -> ApiResult<TeamRow> {
    admin.authorize(&state.config.auth, capability, org)?;
    store::get_team(&state.db, org, team)
        .await?
        .ok_or_else(|| ApiError::not_found("team_not_found", "no such team"))
}

/// One team: what was asked, where it stands, its latest runs, and the live state of its
/// CronJobs, dedicated agent and token.
#[utoipa::path(get, path = "/api/v1/admin/teams/{org_id}/{team_node_id}", tag = "teams", security(("admin_token" = [])),
    params(("org_id" = String, Path, description = "the team's org"), ("team_node_id" = String, Path, description = "the team")),
    responses((status = 200, body = TeamView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_team(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((org, team)): ApiPath<(OrgId, TeamNodeId)>,
) -> ApiResult<Json<TeamView>> {
    let row = visible_team(&state, &admin, Capability::ProvisionRead, &org, &team).await?;
    let filter = RunFilter {
        org_id: Some(org.to_string()),
        team_node_id: Some(team.clone()),
        limit: RECENT_RUNS,
        ..RunFilter::default()
    };
    let recent_runs = store::list_runs(&state.db, &filter).await?;
    let scope = TeamScope {
        engine: &state.provisioning,
        org: &org,
        team: &team,
        credential: &admin.token,
    };
    let mut errors = Vec::new();
    let mut read = |what: &str, observed: Result<Value, steps::StepError>| match observed {
        Ok(value) => value,
        Err(e) => {
            errors.push(format!("{what}: {}", e.message));
            Value::Null
        }
    };
    let cronjobs = read("cronjobs", steps::observe_cronjobs(&scope).await);
    let dedicated_agent = read("dedicated_agent", Step::DedicatedDeployment.observe(&scope).await);
    let tokens = read("team_tokens", Step::TeamToken.observe(&scope).await);
    let live = LiveState {
        pipeline_cronjob: cronjobs.get("pipeline_cronjob").cloned().unwrap_or(Value::Null),
        dependency_discovery_cronjob: cronjobs
            .get("dependency_discovery_cronjob")
            .cloned()
            .unwrap_or(Value::Null),
        dedicated_agent,
        token_active: tokens.get("token_active").and_then(Value::as_bool),
        errors,
    };
    let schedules = store::team_schedules(&state.db, &org, &team).await?;
    Ok(Json(TeamView {
        team: row.into(),
        schedules,
        recent_runs: recent_runs.into_iter().map(Into::into).collect(),
        live,
    }))
}

/// The existing service's view of a team's agent.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeploymentStatus {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// shared or dedicated.
    pub mode: DeploymentMode,
    pub replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub available_replicas: Option<i32>,
    pub service_url: Option<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub conditions: Option<Value>,
    /// Why the live state could not be read (`mode` is then what was asked).
    pub error: Option<String>,
}

/// The team's agent: dedicated (its Deployment's state) or shared.
#[utoipa::path(get, path = "/api/v1/admin/teams/{org_id}/{team_node_id}/deployment", tag = "teams", security(("admin_token" = [])),
    params(("org_id" = String, Path, description = "the team's org"), ("team_node_id" = String, Path, description = "the team")),
    responses((status = 200, body = DeploymentStatus), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_deployment(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((org, team)): ApiPath<(OrgId, TeamNodeId)>,
) -> ApiResult<Json<DeploymentStatus>> {
    let row = visible_team(&state, &admin, Capability::DeploymentRead, &org, &team).await?;
    let scope = TeamScope {
        engine: &state.provisioning,
        org: &org,
        team: &team,
        credential: &admin.token,
    };
    let shared = |error: Option<String>| DeploymentStatus {
        name: None,
        namespace: None,
        mode: row
            .desired
            .as_ref()
            .map_or(DeploymentMode::Shared, |d| d.0.deployment_mode),
        replicas: None,
        ready_replicas: None,
        available_replicas: None,
        service_url: None,
        conditions: None,
        error,
    };
    Ok(Json(match Step::DedicatedDeployment.observe(&scope).await {
        Ok(Value::Null) => DeploymentStatus {
            mode: DeploymentMode::Shared,
            ..shared(None)
        },
        Ok(live) => {
            let int = |key: &str| live.get(key).and_then(Value::as_i64).map(|n| n as i32);
            let text = |key: &str| live.get(key).and_then(Value::as_str).map(str::to_string);
            DeploymentStatus {
                name: text("name"),
                namespace: text("namespace"),
                mode: DeploymentMode::Dedicated,
                replicas: int("replicas"),
                ready_replicas: int("ready_replicas"),
                available_replicas: int("available_replicas"),
                service_url: text("service_url"),
                conditions: live.get("conditions").cloned(),
                error: None,
            }
        }
        Err(e) => shared(Some(format!("{}: {}", e.code, e.message))),
    }))
}

/// The existing service's view of a team's pipeline CronJob.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PipelineStatus {
    /// The team has a pipeline CronJob.
    pub configured: bool,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub schedule: Option<String>,
    pub suspended: Option<bool>,
    pub last_schedule_time: Option<String>,
    pub active_jobs: Option<u64>,
    /// Why the live state could not be read.
    pub error: Option<String>,
}

/// The team's AI pipeline CronJob, as Kubernetes has it.
#[utoipa::path(get, path = "/api/v1/admin/teams/{org_id}/{team_node_id}/pipeline", tag = "teams", security(("admin_token" = [])),
    params(("org_id" = String, Path, description = "the team's org"), ("team_node_id" = String, Path, description = "the team")),
    responses((status = 200, body = PipelineStatus), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_pipeline(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((org, team)): ApiPath<(OrgId, TeamNodeId)>,
) -> ApiResult<Json<PipelineStatus>> {
    visible_team(&state, &admin, Capability::PipelineRead, &org, &team).await?;
    let scope = TeamScope {
        engine: &state.provisioning,
        org: &org,
        team: &team,
        credential: &admin.token,
    };
    let none = |error: Option<String>| PipelineStatus {
        configured: false,
        name: None,
        namespace: None,
        schedule: None,
        suspended: None,
        last_schedule_time: None,
        active_jobs: None,
        error,
    };
    Ok(Json(match Step::PipelineCronjob.observe(&scope).await {
        Ok(Value::Null) => none(None),
        Ok(live) => {
            let text = |key: &str| live.get(key).and_then(Value::as_str).map(str::to_string);
            PipelineStatus {
                configured: true,
                name: text("name"),
                namespace: text("namespace"),
                schedule: text("schedule"),
                suspended: live.get("suspended").and_then(Value::as_bool),
                last_schedule_time: text("last_schedule_time"),
                active_jobs: live.get("active_jobs").and_then(Value::as_u64),
                error: None,
            }
        }
        Err(e) => none(Some(format!("{}: {}", e.code, e.message))),
    }))
}
