//! `POST /api/v1/internal/slack/trigger`: the platform's own Slack bot hands over a message.
//! It is not run inline: it goes into the same durable inbox as a verified Slack event and is
//! dispatched the same way (routing by channel, impersonation, agent run, retries).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::sources::strip_nul;
use super::store::{self, Inserted};
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::state::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
pub struct SlackTrigger {
    channel_id: String,
    thread_ts: Option<String>,
    event_ts: String,
    user_id: String,
    text: String,
    team_id: Option<String>,
    /// Where the agent posts its answer, overriding what the team's config says (at most 20).
    #[schema(value_type = Option<Vec<Object>>)]
    output_destinations: Option<Vec<serde_json::Value>>,
}

/// More destinations than any bot would name: a bound on what is stored per trigger.
const MAX_DESTINATIONS: usize = 20;

#[derive(Serialize, utoipa::ToSchema)]
pub struct TriggerAccepted {
    event_id: Uuid,
    /// True when this channel and event_ts were already handed over; nothing new was queued.
    duplicate: bool,
}

/// `Authorization: Bearer <token>` or `X-Internal-Token`, compared in constant time. With no
/// token configured every call is refused.
fn authenticate(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(expected) = &state.config.internal_token else {
        return Err(ApiError::unauthorized(
            "internal_auth_not_configured",
            "ORCHESTRATOR_INTERNAL_TOKEN is not configured; internal calls are refused",
        ));
    };
    let presented = crate::auth::presented_token(headers, "x-internal-token")
        .ok_or_else(|| ApiError::unauthorized("missing_token", "an internal token is required"))?;
    if bool::from(presented.expose().as_bytes().ct_eq(expected.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "invalid_token",
            "the internal token is not valid",
        ))
    }
}

fn required(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.trim().is_empty() || value.len() > max || value.chars().any(char::is_control) && field != "text" {
        return Err(ApiError::invalid_field(
            field,
            format!("must be non-empty, at most {max} bytes"),
        ));
    }
    Ok(())
}

/// Queues a message from the platform's Slack bot for dispatch.
#[utoipa::path(post, path = "/api/v1/internal/slack/trigger", tag = "webhooks", request_body = SlackTrigger,
    security(("internal_token" = [])),
    responses((status = 202, body = TriggerAccepted), (status = 401, body = crate::error::ErrorBody),
        (status = 422, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn slack_trigger(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SlackTrigger>,
) -> ApiResult<Response> {
    authenticate(&state, &headers)?;
    required("channel_id", &body.channel_id, 64)?;
    required("event_ts", &body.event_ts, 64)?;
    required("user_id", &body.user_id, 64)?;
    required("text", &body.text, 40_000)?;
    if let Some(destinations) = &body.output_destinations {
        if destinations.len() > MAX_DESTINATIONS
            || !destinations
                .iter()
                .all(|d| d.get("type").is_some_and(|t| t.is_string()))
        {
            return Err(ApiError::invalid_field(
                "output_destinations",
                format!("must be at most {MAX_DESTINATIONS} objects, each with a string `type`"),
            ));
        }
    }
    let thread = body
        .thread_ts
        .clone()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| body.event_ts.clone());
    let mut stored = json!({
        "channel_id": body.channel_id, "thread_ts": thread, "event_ts": body.event_ts,
        "user_id": body.user_id, "text": body.text, "team_id": body.team_id,
    });
    if let Some(destinations) = &body.output_destinations {
        stored["output_destinations"] = json!(destinations);
    }
    let bytes = serde_json::to_vec(&stored).map_err(ApiError::internal)?;
    let delivery_id = format!("trigger:{}:{}", body.channel_id, body.event_ts);
    let ordering_key = format!("slack:{}:{thread}", body.channel_id);
    let new = store::NewEvent {
        id: Uuid::now_v7(),
        source: "slack".into(),
        kind: "internal_trigger".into(),
        delivery_id: strip_nul(&delivery_id),
        headers: json!({}),
        body: bytes,
        ordering_key: Some(strip_nul(&ordering_key)),
        // The same sender as the channel's Slack events (`sources::envelope`).
        fair_tag: state.fair_shares.tag(
            "slack",
            &format!("{}:{}", body.team_id.as_deref().unwrap_or("-"), body.channel_id),
        ),
    };
    let outcome = |o: &str| {
        state
            .metrics
            .webhook_deliveries_total
            .with_label_values(&["slack", o])
            .inc()
    };
    let (event_id, duplicate) = match state.inbox.submit(new).await {
        Ok(Inserted::New(id) | Inserted::Leased { id, .. }) => {
            outcome("accepted");
            (id, false)
        }
        Ok(Inserted::Duplicate(id)) => {
            outcome("duplicate");
            (id, true)
        }
        Err(e) => {
            outcome("storage_error");
            return Err(
                ApiError::unavailable("storage_unavailable", "the trigger could not be stored; retry later")
                    .with_source(e),
            );
        }
    };
    Ok((StatusCode::ACCEPTED, Json(TriggerAccepted { event_id, duplicate })).into_response())
}
