//! What request handlers share: handles only. Built by [`crate::startup`], cloned per request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::PgPool;

use crate::agent_runs::AgentProxy;
use crate::auth::AdminVerifier;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::provisioning::engine::Engine;
use crate::provisioning::reconcile::Reconciler;
use crate::webhooks::fairness::FairShares;
use crate::webhooks::ingress::RateLimits;
use crate::webhooks::writer::InboxWriter;

/// One reference count to clone: axum clones the state for every request.
#[derive(Clone)]
pub struct AppState(Arc<Handles>);

impl std::ops::Deref for AppState {
    type Target = Handles;
    fn deref(&self) -> &Handles {
        &self.0
    }
}

pub struct Handles {
    pub config: Arc<Config>,
    /// The request pool.
    pub db: PgPool,
    pub metrics: Arc<Metrics>,
    pub admin_verifier: AdminVerifier,
    /// Starts and reads provisioning runs.
    pub provisioning: Engine,
    /// Plans and corrections of a team's objects (the drift endpoint, schedule changes).
    pub reconciler: Reconciler,
    pub agent_proxy: AgentProxy,
    /// Stores accepted webhook deliveries with group commit.
    pub inbox: InboxWriter,
    /// Tags each accepted event with its place in the claim order.
    pub fair_shares: Arc<FairShares>,
    pub webhook_rate_limits: RateLimits,
    /// The OpenAPI document, built with the router from the same route list.
    pub openapi: Arc<utoipa::openapi::OpenApi>,
    /// Set once shutdown begins: readiness answers 503 from then on.
    pub shutting_down: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(handles: Handles) -> Self {
        Self(Arc::new(handles))
    }
}

impl Handles {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}
