//! Team provisioning as a durable workflow.

pub(crate) mod api;
pub(crate) mod cron;
pub(crate) mod engine;
pub(crate) mod lock;
pub(crate) mod objects;
pub mod request;
pub(crate) mod resume;
pub(crate) mod sealing;
pub(crate) mod steps;
pub mod store;
pub(crate) mod token;
pub(crate) mod view;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(api::provision_team))
        .routes(routes!(api::list_runs))
        .routes(routes!(api::get_run))
        .routes(routes!(api::retry_run))
}
