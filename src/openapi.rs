//! The OpenAPI 3 document of every endpoint, served at `/openapi.json`.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::app::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "orchestrator", description = "Control plane of a multi-tenant AI SRE platform."),
    paths(
        crate::health::health, crate::health::ready, crate::health::metrics, openapi_json,
        crate::provisioning::api::provision_team, crate::provisioning::api::get_run,
        crate::provisioning::api::list_runs, crate::provisioning::api::retry_run,
        crate::audit::list_audit,
        crate::webhooks::ingress::slack_events, crate::webhooks::ingress::slack_interactions,
        crate::webhooks::ingress::github, crate::webhooks::ingress::pagerduty, crate::webhooks::ingress::incidentio,
        crate::webhooks::admin::list_events, crate::webhooks::admin::get_event,
        crate::webhooks::admin::replay_event, crate::webhooks::admin::replay_matching,
        crate::webhooks::internal::slack_trigger,
        crate::agent_runs::api::run_agent,
    ),
    components(schemas(crate::health::HealthStatus, ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "operations", description = "Health, readiness, metrics and this document."),
        (name = "provisioning", description = "Durable team provisioning runs."),
        (name = "audit", description = "The audit trail."),
        (name = "agents", description = "Admin-triggered agent runs through the proxy."),
        (name = "webhooks", description = "Verified webhook ingress and the operator view of the inbox."),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An admin token verified by the config service; X-Admin-Token is accepted too.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "internal_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("Authorization"))),
        );
    }
}

/// The shape of every error response.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A human-readable explanation.
    pub detail: String,
    /// A stable machine-readable code.
    pub code: String,
    /// The request id, also in the `X-Request-Id` response header.
    pub request_id: String,
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3 document")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
