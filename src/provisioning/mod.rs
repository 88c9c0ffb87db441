//! The team lifecycle as durable workflows on one step engine: provisioning (create or change a
//! team), deprovisioning, cancel and retry, and the teams view.

pub(crate) mod api;
pub(crate) mod cron;
pub(crate) mod deprovision;
pub(crate) mod engine;
pub(crate) mod lock;
pub(crate) mod objects;
pub(crate) mod reconcile;
pub mod request;
pub(crate) mod resume;
pub(crate) mod schedules;
pub(crate) mod sealing;
pub(crate) mod start;
pub(crate) mod steps;
pub mod store;
pub(crate) mod teams;
pub(crate) mod view;
pub(crate) mod workflow;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(api::provision_team))
        .routes(routes!(api::list_runs))
        .routes(routes!(api::get_run))
        .routes(routes!(api::retry_run))
        .routes(routes!(api::cancel_run))
        .routes(routes!(deprovision::deprovision_team))
        .routes(routes!(teams::list_teams))
        .routes(routes!(teams::get_team))
        .routes(routes!(teams::get_deployment))
        .routes(routes!(teams::get_pipeline))
        .routes(routes!(schedules::get_schedules, schedules::put_schedules))
        .routes(routes!(schedules::get_drift))
        .routes(routes!(schedules::put_drift_policy))
        .routes(routes!(schedules::sync_cronjobs))
        .routes(routes!(schedules::sync_my_cronjobs))
        .routes(routes!(schedules::trigger_pipeline))
}
