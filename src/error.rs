//! The one error type every handler returns, and the envelope that gives every error response,
//! including the ones axum and tower-http produce on their own, the same JSON shape:
//! `{"detail": "...", "code": "...", "request_id": "..."}`.
//!
//! A struct with constructors rather than an enum with a variant per case: the cases differ only
//! in status, code and message, and call sites read better as `ApiError::not_found(..)`.

use std::borrow::Cow;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Boxed so `Result<T, ApiError>` stays one pointer wide on the happy path.
#[derive(Debug)]
pub struct ApiError(Box<ErrorParts>);

#[derive(Debug)]
pub struct ErrorParts {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub detail: String,
    /// Extra top-level fields for the body (for example the id of a run in progress).
    pub extra: Map<String, Value>,
    pub headers: HeaderMap,
    /// The cause of a 5xx, logged with the request id and never sent to the client.
    pub source: Option<anyhow::Error>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: impl Into<Cow<'static, str>>, detail: impl Into<String>) -> Self {
        Self(Box::new(ErrorParts {
            status,
            code: code.into(),
            detail: detail.into(),
            extra: Map::new(),
            headers: HeaderMap::new(),
            source: None,
        }))
    }

    pub fn with_source(mut self, source: impl Into<anyhow::Error>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
    pub fn unauthorized(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, detail)
    }
    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, detail)
    }
    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, detail)
    }
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }
    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }
    /// A 422 for one invalid request field, naming it in `field`.
    pub fn invalid_field(field: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Self::unprocessable("invalid_field", format!("{field}: {detail}")).with("field", field)
    }
    pub fn unavailable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
    }
    pub fn bad_gateway(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, code, detail)
    }
    pub fn gateway_timeout(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, code, detail)
    }
    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal server error",
        )
        .with_source(source)
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.0.headers.insert(name, value);
        self
    }
}

/// Names the field a domain value came from when it does not parse: a 422 `invalid_field`.
pub trait OrInvalidField<T> {
    fn or_invalid(self, field: &str) -> Result<T, ApiError>;
}

impl<T> OrInvalidField<T> for Result<T, crate::domain::InvalidValue> {
    fn or_invalid(self, field: &str) -> Result<T, ApiError> {
        self.map_err(|e| ApiError::invalid_field(field, e.0))
    }
}

impl std::ops::Deref for ApiError {
    type Target = ErrorParts;
    fn deref(&self) -> &ErrorParts {
        &self.0
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if is_database_unavailable(&e) {
            ApiError::unavailable("database_unavailable", "the database is unavailable; retry later").with_source(e)
        } else {
            ApiError::internal(e)
        }
    }
}

/// Errors that mean "the database cannot be reached right now", as opposed to a bad query: the
/// connection is gone, or the server ended the session (SQLSTATE class 08, a connection
/// exception; 57P01 to 57P05: shut down, restarting, the session terminated by an operator or a
/// timeout; 53300: too many connections).
pub fn is_database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P") || code == "53300"),
        _ => false,
    }
}

/// The error already rendered by a handler; the envelope middleware adds the request id.
#[derive(Clone, Debug)]
struct RenderedError {
    code: Cow<'static, str>,
    detail: String,
    extra: Map<String, Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let parts = *self.0;
        if parts.status.is_server_error() {
            // The request id is on the request span, so this line carries it.
            match &parts.source {
                Some(source) => {
                    tracing::error!(status = %parts.status, code = %parts.code, error = ?source, "request failed")
                }
                None => {
                    tracing::warn!(status = %parts.status, code = %parts.code, detail = %parts.detail, "request failed")
                }
            }
        }
        let mut response = (parts.status, parts.headers).into_response();
        response.extensions_mut().insert(RenderedError {
            code: parts.code,
            detail: parts.detail,
            extra: parts.extra,
        });
        response
    }
}

fn default_code(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::BAD_REQUEST => ("bad_request", "the request is malformed"),
        StatusCode::UNAUTHORIZED => ("unauthorized", "authentication is required"),
        StatusCode::FORBIDDEN => ("forbidden", "not allowed"),
        StatusCode::NOT_FOUND => ("not_found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this method is not allowed on this resource"),
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long and was cancelled"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is larger than the limit"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "unsupported content type"),
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_body", "the request body is invalid"),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limited", "too many requests"),
        StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "the service is temporarily unavailable"),
        StatusCode::GATEWAY_TIMEOUT => ("upstream_timeout", "an upstream service did not answer in time"),
        s if s.is_server_error() => ("internal_error", "internal server error"),
        _ => ("error", "the request failed"),
    }
}

/// Gives every error response the JSON envelope with the request id. Runs inside the request id
/// layer, so the id is always present on the request.
pub async fn error_envelope(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let rendered = response.extensions_mut().remove::<RenderedError>();
    let (code, detail, extra) = match rendered {
        Some(r) => (r.code, r.detail, r.extra),
        None => {
            if is_json(response.headers()) {
                // A handler deliberately answered with its own JSON error body (e.g. webhook protocol).
                return response;
            }
            let (code, detail) = default_code(status);
            if status.is_server_error() {
                tracing::error!(%status, "request failed without a handled error (panic, timeout or layer)");
            }
            (Cow::Borrowed(code), detail.to_string(), Map::new())
        }
    };
    let body = ErrorBody {
        detail,
        code: code.into_owned(),
        request_id,
        extra,
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"detail":"error","code":"error"}"#.to_vec());
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The body of every error response, as the envelope writes it (and as the OpenAPI document
/// describes it: this very type).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A human-readable explanation.
    pub detail: String,
    /// A stable machine-readable code.
    pub code: String,
    /// The request id, also in the `X-Request-Id` response header.
    pub request_id: String,
    /// Fields some errors add: `field` (the invalid request field), `provisioning_run_id` (the run
    /// holding a busy team), `status` (a run's or a probe's status), `required_permission`.
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: Map<String, Value>,
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// `axum::Json` whose rejections use the service's error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::unprocessable(
            "invalid_body",
            format!("the request body is invalid: {}", e.body_text()),
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(
            "malformed_json",
            format!("the request body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(e) => {
            let status = e.status();
            let (code, detail) = default_code(status);
            ApiError::new(status, code, detail)
        }
        other => ApiError::bad_request("bad_request", other.body_text()),
    }
}

/// `axum::extract::Path` with the service's error shape.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e @ PathRejection::FailedToDeserializePathParams(_)) => {
                Err(ApiError::bad_request("invalid_path_parameter", e.body_text()))
            }
            Err(e) => Err(ApiError::bad_request("invalid_path_parameter", e.body_text())),
        }
    }
}

/// `axum::extract::Query` with the service's error shape.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::unprocessable("invalid_query", e.body_text()))
            }
            Err(e) => Err(ApiError::bad_request("invalid_query", e.body_text())),
        }
    }
}

/// Handler for routes that do not exist.
pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

/// Handler for a known route called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this method is not allowed on this route",
    )
}
