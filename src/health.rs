//! Liveness, readiness and metrics endpoints, outside the traced API group.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use sqlx::{ConnectOptions, Connection};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::db;
use crate::error::ApiError;
use crate::state::AppState;

/// A health probe must answer quickly even when the database hangs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct HealthStatus {
    /// `ok` or `unavailable`.
    status: &'static str,
}

/// A 503 in the service's error shape (with the request id), plus `status` for probes.
fn unavailable(code: &'static str, detail: &str) -> Response {
    ApiError::unavailable(code, detail)
        .with("status", "unavailable")
        .into_response()
}

async fn database_answers(state: &AppState) -> bool {
    let ping = async {
        if sqlx::query_scalar!("SELECT 1 AS alive")
            .fetch_one(&state.db)
            .await
            .is_ok()
        {
            return true;
        }
        // The pool's idle connections may all be ones the database closed (a restart): each fails
        // once and is discarded. A connection of its own answers for the database itself.
        let Ok(mut fresh) = state.db.connect_options().connect().await else {
            return false;
        };
        let answered = sqlx::query_scalar!("SELECT 1 AS alive")
            .fetch_one(&mut fresh)
            .await
            .is_ok();
        let _ = fresh.close().await;
        answered
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, ping).await, Ok(true))
}

/// Liveness: the process serves and its database answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = HealthStatus), (status = 503, description = "database unreachable")))]
pub async fn health(State(state): State<AppState>) -> Response {
    if database_answers(&state).await {
        Json(HealthStatus { status: "ok" }).into_response()
    } else {
        unavailable("database_unavailable", "the database does not answer")
    }
}

/// Readiness: the database answers and every migration this binary embeds is applied.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = HealthStatus), (status = 503, description = "not ready")))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        return unavailable("shutting_down", "the service is shutting down");
    }
    match tokio::time::timeout(PROBE_TIMEOUT, db::migrations_applied(&state.db)).await {
        Ok(Ok(true)) => Json(HealthStatus { status: "ok" }).into_response(),
        Ok(Ok(false)) => unavailable(
            "migrations_pending",
            "database migrations are not applied; run `orchestrator migrate`",
        ),
        _ => unavailable("database_unavailable", "the database does not answer"),
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
