//! The OpenAPI 3 document, served at `/openapi.json`. Paths come from the routes themselves
//! ([`super::routes`]); what the shared middleware answers (a missing token, a body too large, a
//! timeout, ...) is added here to every operation it applies to, so the document lists every status
//! the service really sends.

use axum::extract::State;
use axum::Json;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ErrorBody;
use crate::state::AppState;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "orchestrator", description = "Control plane of a multi-tenant AI SRE platform."),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "operations", description = "Health, readiness, metrics and this document."),
        (name = "provisioning", description = "Durable runs that provision, change and deprovision teams."),
        (name = "teams", description = "Every team: what was asked of it, where it stands, and what it owns now."),
        (name = "audit", description = "The audit trail."),
        (name = "agents", description = "Admin-triggered agent runs through the proxy."),
        (name = "webhooks", description = "Verified webhook ingress and the operator view of the inbox."),
    )
)]
struct ApiDoc;

/// The document's frame: info, tags, security schemes; the routes add their paths.
pub fn base() -> OpenApi {
    ApiDoc::openapi()
}

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApi) {
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

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3 document")))]
pub async fn openapi_json(State(state): State<AppState>) -> Json<OpenApi> {
    Json(state.openapi.as_ref().clone())
}

/// Documents 408 on every operation of `router`: the routes a request timeout is layered on.
pub fn document_timeout(router: &mut OpenApiRouter<AppState>) {
    for_each_operation(router.get_openapi_mut(), |_, operation| {
        add(
            operation,
            408,
            "request_timeout: the request took too long and was cancelled",
        );
    });
}

/// Adds to every operation the statuses the shared middleware and extractors answer wherever they
/// apply: authentication, bodies, path and query parameters, the database.
pub fn document_shared_responses(openapi: &mut OpenApi) {
    for_each_operation(openapi, |path, operation| {
        let admin = operation
            .security
            .as_ref()
            .is_some_and(|requirements| !requirements.is_empty());
        if admin {
            add(
                operation,
                401,
                "missing_token or invalid_token: no admin token, or one the config service refuses",
            );
            add(
                operation,
                403,
                "missing_permission or org_forbidden: the token may not do this, or not for this org",
            );
        }
        if let Some(body) = &operation.request_body {
            let json = body.content.contains_key("application/json");
            add(operation, 413, "payload_too_large: the body is larger than the limit");
            if json {
                add(operation, 400, "malformed_json: the body is not JSON");
                add(
                    operation,
                    415,
                    "unsupported_media_type: the body is not application/json",
                );
                add(
                    operation,
                    422,
                    "invalid_body or invalid_field: the body is not what this operation takes",
                );
            }
        }
        let parameters = operation.parameters.as_deref().unwrap_or_default();
        let has_path = parameters.iter().any(|p| p.parameter_in == ParameterIn::Path);
        let has_query = parameters.iter().any(|p| p.parameter_in == ParameterIn::Query);
        if has_path {
            add(operation, 400, "invalid_path_parameter: a path parameter is malformed");
            add(operation, 404, "not_found: no such resource");
        }
        if has_query {
            add(operation, 400, "invalid_query: the query string is malformed");
            add(
                operation,
                422,
                "invalid_query or invalid_field: a query parameter is invalid",
            );
        }
        if path != "/openapi.json" && path != "/metrics" {
            add(
                operation,
                503,
                "unavailable: the database or a neighbour needed to answer is unavailable; retry",
            );
        }
    });
}

fn for_each_operation(openapi: &mut OpenApi, mut each: impl FnMut(&str, &mut Operation)) {
    for (path, item) in openapi.paths.paths.iter_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            each(path, operation);
        }
    }
}

/// Adds an error response (the envelope) unless the operation documents that status already.
fn add(operation: &mut Operation, status: u16, description: &str) {
    let status = status.to_string();
    if operation.responses.responses.contains_key(&status) {
        return;
    }
    let response = ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    operation.responses.responses.insert(status, response.into());
}
