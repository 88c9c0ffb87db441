//! The webhook front door: verified ingress, a durable inbox, and dispatch to agent runs.

pub mod admin;
pub mod destinations;
pub mod dispatch;
pub mod ingress;
pub mod internal;
pub mod signature;
pub mod sources;
pub mod store;
pub mod writer;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::app::AppState;
use crate::config::WebhookConfig;

/// Ingress routes, each with its source's body limit (checked before anything else).
pub fn ingress_router(config: &WebhookConfig) -> Router<AppState> {
    let limit = |bytes: usize| DefaultBodyLimit::max(bytes);
    Router::new()
        .route(
            "/webhooks/slack/events",
            post(ingress::slack_events).layer(limit(config.slack.body_limit_bytes)),
        )
        .route(
            "/webhooks/slack/interactions",
            post(ingress::slack_interactions).layer(limit(config.slack.body_limit_bytes)),
        )
        .route(
            "/webhooks/github",
            post(ingress::github).layer(limit(config.github.body_limit_bytes)),
        )
        .route(
            "/webhooks/pagerduty",
            post(ingress::pagerduty).layer(limit(config.pagerduty.body_limit_bytes)),
        )
        .route(
            "/webhooks/incidentio",
            post(ingress::incidentio).layer(limit(config.incidentio.body_limit_bytes)),
        )
        // One limit shared by every source: excess deliveries wait (their bodies unread) instead
        // of all being buffered at once.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(config.max_in_flight))
}

pub fn admin_router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/webhooks/events", get(admin::list_events))
        .route("/api/v1/admin/webhooks/events/{id}", get(admin::get_event))
        .route("/api/v1/admin/webhooks/events/{id}/replay", post(admin::replay_event))
        .route("/api/v1/admin/webhooks/replay", post(admin::replay_matching))
        .route("/api/v1/internal/slack/trigger", post(internal::slack_trigger))
}
