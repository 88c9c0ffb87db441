//! Team provisioning as a durable workflow.

pub mod api;
pub mod cron;
pub mod lock;
pub mod objects;
pub mod request;
pub mod sealing;
pub mod store;
pub mod workflow;

use axum::routing::{get, post};
use axum::Router;

use crate::app::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/provision/team", post(api::provision_team))
        .route("/api/v1/admin/provision/runs", get(api::list_runs))
        .route("/api/v1/admin/provision/runs/{id}", get(api::get_run))
        .route("/api/v1/admin/provision/runs/{id}/retry", post(api::retry_run))
}
