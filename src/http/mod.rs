//! The router: every capability's routes, each declared once with its documentation, under one
//! middleware stack.

pub mod openapi;

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;
use crate::error::{self, REQUEST_ID_HEADER};
use crate::state::AppState;
use crate::{agent_runs, audit, health, provisioning, webhooks};

/// The matched route template, carried from the routing layer out to the metrics layer.
#[derive(Clone)]
struct RouteLabel(String);

/// Label for every request that matched no route, so unknown paths add no series.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Every route and the OpenAPI document they make, from one list.
pub fn routes(config: &Config) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    // Routes answered within the general request timeout.
    let mut api = OpenApiRouter::new()
        .merge(openapi::routes())
        .merge(provisioning::routes())
        .merge(audit::routes())
        .merge(webhooks::routes(&config.webhooks))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ));
    openapi::document_timeout(&mut api);
    let (router, mut document) = OpenApiRouter::with_openapi(openapi::base())
        .merge(health::routes())
        .merge(api)
        .merge(agent_runs::routes(&config.agent_runs))
        .split_for_parts();
    openapi::document_shared_responses(&mut document);
    (router, document)
}

/// The routes under the one middleware stack, with the state they share.
pub fn with_middleware(routes: Router<AppState>, state: AppState) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    routes
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .route_layer(middleware::from_fn(record_route))
        .layer(axum::extract::DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(make_span)
                        .on_request(())
                        .on_response(on_response),
                )
                .layer(middleware::from_fn_with_state(state.clone(), track_metrics))
                .layer(middleware::from_fn(error::error_envelope))
                .layer(CatchPanicLayer::new()),
        )
        .with_state(state)
}

fn make_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        route = tracing::field::Empty,
        request_id = %request_id,
    )
}

fn on_response(response: &Response, latency: Duration, _span: &tracing::Span) {
    let status = response.status().as_u16();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if response.status().is_server_error() {
        tracing::warn!(status, latency_ms, "response");
    } else {
        tracing::debug!(status, latency_ms, "response");
    }
}

async fn record_route(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let route = matched.map(|m| m.as_str().to_string());
    if let Some(route) = &route {
        tracing::Span::current().record("route", route.as_str());
    }
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteLabel(route));
    }
    response
}

async fn track_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or(UNMATCHED_ROUTE, |r| r.0.as_str());
    let method = bounded_method(&method);
    state
        .metrics
        .http_requests_total
        .with_label_values(&[method, route, response.status().as_str()])
        .inc();
    state
        .metrics
        .http_request_duration_seconds
        .with_label_values(&[method, route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Methods are a closed set in the labels: anything exotic is `other`.
fn bounded_method(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
