//! The audit trail: one row per state change, written in the same transaction as the change.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgExecutor, Postgres, QueryBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{Admin, Capability};
use crate::error::{ApiError, ApiQuery, ApiResult};
use crate::pagination;
use crate::state::AppState;

/// One audited action. `actor_subject` names a principal, never a token.
pub struct AuditEntry<'a> {
    pub actor_subject: &'a str,
    pub actor_email: Option<&'a str>,
    pub action: &'a str,
    pub org_id: Option<&'a str>,
    pub team_node_id: Option<&'a str>,
    pub provisioning_run_id: Option<Uuid>,
    pub webhook_event_id: Option<Uuid>,
    pub outcome: &'a str,
    pub detail: Value,
}

impl<'a> AuditEntry<'a> {
    pub fn new(actor_subject: &'a str, action: &'a str, outcome: &'a str) -> Self {
        Self {
            actor_subject,
            actor_email: None,
            action,
            org_id: None,
            team_node_id: None,
            provisioning_run_id: None,
            webhook_event_id: None,
            outcome,
            detail: Value::Object(Default::default()),
        }
    }
}

pub async fn record(executor: impl PgExecutor<'_>, entry: AuditEntry<'_>) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO orchestrator_audit_events
             (actor_subject, actor_email, action, org_id, team_node_id, provisioning_run_id, webhook_event_id, outcome, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        entry.actor_subject,
        entry.actor_email,
        entry.action,
        entry.org_id,
        entry.team_node_id,
        entry.provisioning_run_id,
        entry.webhook_event_id,
        entry.outcome,
        crate::db::storable_json(&entry.detail),
    )
    .execute(executor)
    .await?;
    Ok(())
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEvent {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor_subject: String,
    pub actor_email: Option<String>,
    pub action: String,
    pub org_id: Option<String>,
    pub team_node_id: Option<String>,
    pub provisioning_run_id: Option<Uuid>,
    pub webhook_event_id: Option<Uuid>,
    pub outcome: String,
    #[schema(value_type = Object)]
    pub detail: Value,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    pub org_id: Option<String>,
    pub team_node_id: Option<String>,
    pub action: Option<String>,
    pub provisioning_run_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEvent>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit))
}

/// The audit trail, newest first; an org admin sees its own org only.
#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "audit", params(AuditQuery),
    security(("admin_token" = [])),
    responses((status = 200, body = AuditPage), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_audit(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    admin.require(&state.config.auth, Capability::AuditRead)?;
    let requested_org = pagination::org_filter(query.org_id.as_deref())?;
    pagination::team_filter(query.team_node_id.as_deref())?;
    if query
        .action
        .as_deref()
        .is_some_and(|a| a.len() > 128 || a.chars().any(char::is_control))
    {
        return Err(ApiError::invalid_field(
            "action",
            "must be at most 128 printable characters",
        ));
    }
    let org = admin.scope_filter(requested_org)?;
    let limit = pagination::limit(query.limit)?;
    let cursor = query.cursor.as_deref().map(pagination::decode).transpose()?;
    let cursor = match cursor {
        Some((at, id)) => Some((
            at,
            id.parse::<i64>()
                .map_err(|_| ApiError::invalid_field("cursor", "is not a cursor this service issued"))?,
        )),
        None => None,
    };

    let mut sql = QueryBuilder::<Postgres>::new("SELECT * FROM orchestrator_audit_events WHERE TRUE");
    if let Some(org) = &org {
        sql.push(" AND org_id = ").push_bind(org);
    }
    if let Some(team) = &query.team_node_id {
        sql.push(" AND team_node_id = ").push_bind(team);
    }
    if let Some(action) = &query.action {
        sql.push(" AND action = ").push_bind(action);
    }
    if let Some(run) = query.provisioning_run_id {
        sql.push(" AND provisioning_run_id = ").push_bind(run);
    }
    if let Some(since) = query.since {
        sql.push(" AND occurred_at >= ").push_bind(since);
    }
    if let Some((_, id)) = cursor {
        // Ids grow with time, so the id alone orders the trail.
        sql.push(" AND id < ").push_bind(id);
    }
    sql.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let rows: Vec<AuditEvent> = sql.build_query_as().fetch_all(&state.db).await?;
    let (items, next_cursor) = pagination::split(rows, limit, |e| (e.occurred_at, e.id));
    Ok(Json(AuditPage { items, next_cursor }))
}
