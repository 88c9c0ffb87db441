//! Admin-triggered agent runs: the proxy that keeps team credentials out of browsers.

pub mod api;
pub mod store;

use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use tower_http::timeout::TimeoutLayer;

use crate::app::AppState;
use crate::config::Config;

/// Agent runs take minutes: their route has its own timeout, above the longest run allowed.
pub fn router(config: &Config) -> Router<AppState> {
    let timeout = config.agent_runs.max_timeout + Duration::from_secs(30);
    Router::new()
        .route("/api/v1/admin/agents/run", post(api::run_agent))
        .layer(TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, timeout))
}
