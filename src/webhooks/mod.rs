//! The webhook front door: verified ingress, a durable inbox, and dispatch to agent runs.

pub(crate) mod admin;
pub(crate) mod destinations;
pub(crate) mod dispatch;
pub mod fairness;
pub(crate) mod ingress;
pub(crate) mod internal;
pub mod signature;
pub(crate) mod sources;
pub mod store;
pub(crate) mod writer;

use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::config::WebhookConfig;
use crate::state::AppState;

/// Ingress routes, each with its source's body limit (checked before anything else), and the
/// operator and internal routes.
pub fn routes(config: &WebhookConfig) -> OpenApiRouter<AppState> {
    let limit = |bytes: usize| DefaultBodyLimit::max(bytes);
    let ingress = OpenApiRouter::new()
        .routes(routes!(ingress::slack_events).layer(limit(config.slack.body_limit_bytes)))
        .routes(routes!(ingress::slack_interactions).layer(limit(config.slack.body_limit_bytes)))
        .routes(routes!(ingress::github).layer(limit(config.github.body_limit_bytes)))
        .routes(routes!(ingress::pagerduty).layer(limit(config.pagerduty.body_limit_bytes)))
        .routes(routes!(ingress::incidentio).layer(limit(config.incidentio.body_limit_bytes)))
        // One limit shared by every source: excess deliveries wait (their bodies unread) instead
        // of all being buffered at once.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(config.max_in_flight));
    OpenApiRouter::new()
        .merge(ingress)
        .routes(routes!(admin::list_events))
        .routes(routes!(admin::get_event))
        .routes(routes!(admin::replay_event))
        .routes(routes!(admin::replay_matching))
        .routes(routes!(internal::slack_trigger))
}
