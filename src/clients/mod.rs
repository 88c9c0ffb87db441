//! One small client per neighbour, around the shared `reqwest::Client`. Clients do not retry:
//! the workflow that knows whether a call is safe to repeat decides, using `is_transient`.

pub(crate) mod agent;
pub(crate) mod ai_pipeline;
pub(crate) mod config_service;
pub mod kubernetes;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("{neighbour} is unreachable: {message}")]
    Transport { neighbour: &'static str, message: String },
    #[error("{neighbour} did not answer within {timeout:?}")]
    Timeout { neighbour: &'static str, timeout: Duration },
    #[error("{neighbour} answered {status}: {detail}")]
    Status {
        neighbour: &'static str,
        status: u16,
        /// The neighbour's own explanation, truncated; never contains our credentials.
        detail: String,
        retry_after: Option<Duration>,
    },
    #[error("{neighbour} sent an answer we cannot read: {message}")]
    Decode { neighbour: &'static str, message: String },
}

impl NeighbourError {
    /// Worth retrying: the neighbour may answer differently later.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            Self::Decode { .. } => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A stable machine code for run records and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Transport { .. } => "neighbour_unreachable",
            Self::Timeout { .. } => "neighbour_timeout",
            Self::Status { status, .. } if *status >= 500 => "neighbour_server_error",
            Self::Status { status: 429, .. } => "neighbour_rate_limited",
            Self::Status { .. } => "neighbour_rejected",
            Self::Decode { .. } => "neighbour_bad_response",
        }
    }
}

/// What every client shares: the HTTP client, the per-call timeout and the metrics.
#[derive(Clone)]
pub struct Transport {
    pub http: reqwest::Client,
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
}

const DETAIL_LIMIT: usize = 300;

impl Transport {
    /// Sends a request, records latency and outcome for `neighbour`, and turns non-2xx answers
    /// into `NeighbourError::Status`.
    pub async fn send(&self, neighbour: &'static str, request: RequestBuilder) -> Result<Response, NeighbourError> {
        self.send_with_timeout(neighbour, request, self.timeout).await
    }

    pub async fn send_with_timeout(
        &self,
        neighbour: &'static str,
        request: RequestBuilder,
        timeout: Duration,
    ) -> Result<Response, NeighbourError> {
        let started = Instant::now();
        let result = request.timeout(timeout).send().await;
        let elapsed = started.elapsed();
        match result {
            Err(e) if e.is_timeout() => {
                self.metrics.observe_neighbour(neighbour, "timeout", elapsed);
                Err(NeighbourError::Timeout { neighbour, timeout })
            }
            Err(e) => {
                self.metrics.observe_neighbour(neighbour, "transport_error", elapsed);
                Err(NeighbourError::Transport {
                    neighbour,
                    message: transport_message(&e),
                })
            }
            Ok(response) if response.status().is_success() => {
                self.metrics.observe_neighbour(neighbour, "ok", elapsed);
                Ok(response)
            }
            Ok(response) => {
                let status = response.status();
                let outcome = if status.is_server_error() {
                    "server_error"
                } else {
                    "client_error"
                };
                self.metrics.observe_neighbour(neighbour, outcome, elapsed);
                Err(status_error(neighbour, response).await)
            }
        }
    }

    /// Sends and decodes a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        neighbour: &'static str,
        request: RequestBuilder,
    ) -> Result<T, NeighbourError> {
        let response = self.send(neighbour, request).await?;
        decode(neighbour, response).await
    }
}

/// The most any neighbour's answer may hold in memory.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Reads a body, refusing one larger than `MAX_RESPONSE_BYTES`.
pub async fn read_limited(neighbour: &'static str, mut response: Response) -> Result<Vec<u8>, NeighbourError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| NeighbourError::Transport {
        neighbour,
        message: transport_message(&e),
    })? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(NeighbourError::Decode {
                neighbour,
                message: format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub async fn decode<T: DeserializeOwned>(neighbour: &'static str, response: Response) -> Result<T, NeighbourError> {
    let bytes = read_limited(neighbour, response).await?;
    serde_json::from_slice(&bytes).map_err(|e| NeighbourError::Decode {
        neighbour,
        message: e.to_string(),
    })
}

async fn status_error(neighbour: &'static str, response: Response) -> NeighbourError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.text().await.unwrap_or_default();
    NeighbourError::Status {
        neighbour,
        status: status.as_u16(),
        detail: error_detail(status, &body),
        retry_after,
    }
}

/// The neighbour's `detail`/`message`/`error` field if it sent JSON, else a truncated body.
fn error_detail(status: StatusCode, body: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| {
        ["detail", "message", "error"]
            .iter()
            .find_map(|k| v.get(k).and_then(|d| d.as_str()).map(str::to_string))
    });
    let text = from_json.unwrap_or_else(|| body.trim().to_string());
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    truncate(&text, DETAIL_LIMIT)
}

pub fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// reqwest's error with its causes; URLs here never carry credentials.
fn transport_message(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        message = format!("{message}: {inner}");
        source = inner.source();
    }
    truncate(&message, DETAIL_LIMIT)
}

/// Appends path segments to a base URL. Each element is one segment, percent-encoded, so an id
/// can never change the shape of the path.
pub fn endpoint(base: &url::Url, segments: &[&str]) -> url::Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty();
        path.extend(segments);
    }
    url
}
