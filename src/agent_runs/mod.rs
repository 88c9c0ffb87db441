//! Admin-triggered agent runs: the proxy that keeps team credentials out of browsers.

mod api;
mod run;
mod store;
mod stream;
pub mod sweep;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use sqlx::PgPool;
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::agent_call::TeamAgents;
use crate::auth::TokenKey;
use crate::clients::agent::AgentClient;
use crate::clients::config_service::ConfigServiceClient;
use crate::config::{AgentRunConfig, Secret};
use crate::db::HeldConnections;
use crate::metrics::Metrics;
use crate::state::AppState;

/// Admin runs are measured under this source label.
const METRIC_SOURCE: &str = "admin";

/// Exactly what the proxy and its sweeper use.
#[derive(Clone)]
pub struct AgentProxy(Arc<ProxyParts>);

pub struct ProxyParts {
    pub db: PgPool,
    /// A few of `db`'s connections for the run's two statements, which are on every run's path.
    pub held: HeldConnections,
    pub config_service: ConfigServiceClient,
    pub agent: AgentClient,
    pub metrics: Arc<Metrics>,
    /// What the platform audit is written with.
    pub internal_admin_token: Option<Secret>,
    /// Where dedicated agents live (their URLs are trusted only in this namespace).
    pub namespace: String,
    pub limits: AgentRunConfig,
    /// Team credentials minted for an admin, by (SHA-256 of the admin's token, org, team).
    pub credentials: TeamAgents<(TokenKey, String, String)>,
}

impl AgentProxy {
    pub fn new(parts: ProxyParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AgentProxy {
    type Target = ProxyParts;
    fn deref(&self) -> &ProxyParts {
        &self.0
    }
}

/// Agent runs take minutes: their route has its own timeout, above the longest run allowed.
pub fn routes(limits: &AgentRunConfig) -> OpenApiRouter<AppState> {
    let timeout = limits.max_timeout + Duration::from_secs(30);
    OpenApiRouter::new()
        .routes(routes!(api::run_agent).layer(TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, timeout)))
}
