//! The operator surface: list and inspect inbox events, replay one or a filtered batch.

use axum::extract::State;
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::signature::Source;
use super::store::{self, EventFilter, EventRow};
use crate::audit::{self, AuditEntry};
use crate::auth::{Admin, Capability};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::pagination;
use crate::state::AppState;

const REPLAY_MAX: i64 = 1000;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct EventQuery {
    source: Option<String>,
    status: Option<String>,
    since: Option<DateTime<Utc>>,
    org_id: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventPage {
    items: Vec<EventRow>,
    next_cursor: Option<String>,
}

fn valid_source(source: Option<String>) -> ApiResult<Option<String>> {
    match source {
        None => Ok(None),
        Some(s) => Source::parse(&s)
            .map(|s| Some(s.as_str().to_string()))
            .ok_or_else(|| ApiError::invalid_field("source", "must be slack, github, pagerduty or incidentio")),
    }
}

fn valid_status(status: Option<String>) -> ApiResult<Option<String>> {
    match status {
        Some(s) if !store::shown_statuses().contains(&s.as_str()) => Err(ApiError::invalid_field(
            "status",
            format!("must be one of {}", store::shown_statuses().join(", ")),
        )),
        other => Ok(other),
    }
}

/// Inbox events, newest first; an org admin sees events routed to its org only.
#[utoipa::path(get, path = "/api/v1/admin/webhooks/events", tag = "webhooks", security(("admin_token" = [])), params(EventQuery),
    responses((status = 200, body = EventPage), (status = 403, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
pub async fn list_events(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> ApiResult<Json<EventPage>> {
    admin.require(&state.config.auth, Capability::WebhooksRead)?;
    let requested_org = pagination::org_filter(query.org_id.as_deref())?;
    let limit = pagination::limit(query.limit)?;
    let before = pagination::decode_uuid(query.cursor.as_deref())?;
    let filter = EventFilter {
        org_id: admin.scope_filter(requested_org)?,
        source: valid_source(query.source)?,
        status: valid_status(query.status)?,
        since: query.since,
        until: None,
        before,
        limit: limit + 1,
    };
    let (items, next_cursor) = pagination::split(store::list_events(&state.db, &filter).await?, limit, |e| {
        (e.received_at, e.id)
    });
    Ok(Json(EventPage { items, next_cursor }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct EventDetailQuery {
    /// Include the raw body (base64, and as text when it is UTF-8).
    include_body: Option<bool>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventDetail {
    #[serde(flatten)]
    event: EventRow,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_text: Option<String>,
}

async fn visible_event(state: &AppState, admin: &Admin, id: Uuid) -> ApiResult<EventRow> {
    let event = store::get_event(&state.db, id).await?;
    match (event, admin.org_scope()) {
        (Some(event), None) => Ok(event),
        (Some(event), Some(org)) if event.org_id.as_deref() == Some(org) => Ok(event),
        _ => Err(ApiError::not_found("event_not_found", "no such webhook event")),
    }
}

/// One event: status, attempts, last error, routed team, agent correlation id (and the body on request).
#[utoipa::path(get, path = "/api/v1/admin/webhooks/events/{id}", tag = "webhooks", security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "event id"), EventDetailQuery),
    responses((status = 200, body = EventDetail), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_event(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<EventDetailQuery>,
) -> ApiResult<Json<EventDetail>> {
    admin.require(&state.config.auth, Capability::WebhooksRead)?;
    let event = visible_event(&state, &admin, id).await?;
    let (mut body_base64, mut body_text) = (None, None);
    if query.include_body == Some(true) {
        if let Some(body) = store::get_body(&state.db, id).await? {
            body_text = String::from_utf8(body.clone()).ok();
            body_base64 = Some(base64::engine::general_purpose::STANDARD.encode(body));
        }
    }
    Ok(Json(EventDetail {
        event,
        body_base64,
        body_text,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReplayReport {
    /// How many events went back to the queue.
    replayed: usize,
    ids: Vec<Uuid>,
    /// True when more events matched than `limit`.
    truncated: bool,
}

/// Replays the matching events and writes their audit rows in one transaction, so a replay
/// never happens unaudited (or is reported failed after it happened).
async fn replay_audited(
    state: &AppState,
    admin: &Admin,
    filter: &EventFilter,
    only: Option<&[Uuid]>,
    detail: Value,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let ids = store::replay(&mut *tx, filter, only).await?;
    for id in &ids {
        let mut entry = AuditEntry::new(admin.subject(), "webhook.replayed", "accepted");
        entry.actor_email = admin.email();
        entry.webhook_event_id = Some(*id);
        entry.org_id = admin.org_scope();
        entry.detail = detail.clone();
        audit::record(&mut *tx, entry).await?;
    }
    if !ids.is_empty() {
        store::notify(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// Puts one finished event (delivered, skipped, unrouted or dead-lettered) back in the queue.
#[utoipa::path(post, path = "/api/v1/admin/webhooks/events/{id}/replay", tag = "webhooks", security(("admin_token" = [])),
    params(("id" = Uuid, Path, description = "event id")),
    responses((status = 200, body = ReplayReport), (status = 404, body = crate::error::ErrorBody),
        (status = 409, description = "the event is still pending or being dispatched", body = crate::error::ErrorBody)))]
pub async fn replay_event(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<ReplayReport>> {
    admin.require(&state.config.auth, Capability::WebhooksReplay)?;
    let event = visible_event(&state, &admin, id).await?;
    let filter = EventFilter {
        limit: 1,
        ..Default::default()
    };
    let detail = json!({"source": event.source, "previous_status": event.status});
    let ids = replay_audited(&state, &admin, &filter, Some(&[id]), detail).await?;
    if ids.is_empty() {
        return Err(ApiError::conflict(
            "event_not_replayable",
            format!("the event is {}; only finished events can be replayed", event.status),
        ));
    }
    Ok(Json(ReplayReport {
        replayed: ids.len(),
        ids,
        truncated: false,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct ReplayFilter {
    source: Option<String>,
    /// Defaults to dead_letter.
    status: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    org_id: Option<String>,
    /// At most 1000 (default 100).
    limit: Option<i64>,
}

/// Replays every finished event matching a filter (for example every dead-lettered GitHub event since a time), bounded.
#[utoipa::path(post, path = "/api/v1/admin/webhooks/replay", tag = "webhooks", security(("admin_token" = [])),
    request_body = ReplayFilter,
    responses((status = 200, body = ReplayReport), (status = 403, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
pub async fn replay_matching(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(body): ApiJson<ReplayFilter>,
) -> ApiResult<Json<ReplayReport>> {
    admin.require(&state.config.auth, Capability::WebhooksReplay)?;
    let requested_org = pagination::org_filter(body.org_id.as_deref())?;
    let limit = match body.limit {
        None => 100,
        Some(n) if (1..=REPLAY_MAX).contains(&n) => n,
        Some(_) => {
            return Err(ApiError::invalid_field(
                "limit",
                format!("must be between 1 and {REPLAY_MAX}"),
            ))
        }
    };
    let status = valid_status(Some(body.status.unwrap_or_else(|| "dead_letter".into())))?;
    if matches!(status.as_deref(), Some("pending" | "processing")) {
        return Err(ApiError::invalid_field(
            "status",
            "only finished events can be replayed",
        ));
    }
    let filter = EventFilter {
        org_id: admin.scope_filter(requested_org)?,
        source: valid_source(body.source)?,
        status,
        since: body.since,
        until: body.until,
        before: None,
        limit: limit + 1,
    };
    let detail = json!({"bulk": true, "source": filter.source, "status": filter.status});
    let mut ids = replay_audited(
        &state,
        &admin,
        &EventFilter {
            limit,
            ..filter.clone()
        },
        None,
        detail,
    )
    .await?;
    // One more matching event left means the batch was cut at the limit.
    let truncated = !store::list_events(
        &state.db,
        &EventFilter {
            limit: 1,
            ..filter.clone()
        },
    )
    .await?
    .is_empty();
    ids.sort();
    Ok(Json(ReplayReport {
        replayed: ids.len(),
        ids,
        truncated,
    }))
}
