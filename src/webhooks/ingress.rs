//! `POST /webhooks/{source}`: verify, answer protocol messages, rate-limit, persist, acknowledge.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use super::signature::{self, Source};
use super::sources::{self, Envelope};
use super::store::{self, Inserted};
use crate::config::{SourceConfig, WebhookConfig};
use crate::error::ApiError;
use crate::state::AppState;

/// Per-source limiters keyed by sender (Slack team and channel, GitHub repository, ...).
#[derive(Clone)]
pub struct RateLimits {
    limiters: Arc<HashMap<&'static str, DefaultKeyedRateLimiter<String>>>,
}

impl RateLimits {
    pub fn new(config: &WebhookConfig) -> Self {
        let quota = |c: &SourceConfig| {
            let per_minute = NonZeroU32::new(c.rate_limit_per_minute).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(c.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
            Quota::per_minute(per_minute).allow_burst(burst)
        };
        let limiters = Source::ALL
            .iter()
            .map(|s| (s.as_str(), RateLimiter::keyed(quota(source_config(config, *s)))))
            .collect();
        Self {
            limiters: Arc::new(limiters),
        }
    }

    /// `Err(wait)` when the sender is over its quota.
    fn check(&self, source: Source, key: &str) -> Result<(), Duration> {
        let Some(limiter) = self.limiters.get(source.as_str()) else {
            return Ok(());
        };
        limiter
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets senders whose buckets are full again, so the key space cannot grow without bound.
    pub fn shrink(&self) {
        for limiter in self.limiters.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

pub fn source_config(config: &WebhookConfig, source: Source) -> &SourceConfig {
    match source {
        Source::Slack => &config.slack,
        Source::GitHub => &config.github,
        Source::PagerDuty => &config.pagerduty,
        Source::IncidentIo => &config.incidentio,
    }
}

/// A successful acknowledgement body.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Ack {
    ok: bool,
    /// Present and true when the delivery was seen before and nothing was stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

pub async fn ingest(
    state: &AppState,
    source: Source,
    slack_interactions: bool,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let metrics = &state.metrics;
    let outcome = |o: &str| {
        metrics
            .webhook_deliveries_total
            .with_label_values(&[source.as_str(), o])
            .inc()
    };
    let webhooks = &state.config.webhooks;
    let source_config = source_config(webhooks, source);

    if let Err(rejection) = signature::verify(
        source,
        headers,
        body,
        &source_config.secrets,
        now_unix(),
        webhooks.replay_window,
    ) {
        outcome("rejected");
        metrics
            .webhook_rejections_total
            .with_label_values(&[source.as_str(), rejection.code()])
            .inc();
        tracing::warn!(
            source = source.as_str(),
            reason = rejection.code(),
            bytes = body.len(),
            "webhook rejected"
        );
        return ApiError::unauthorized(rejection.code(), rejection.message()).into_response();
    }

    let meta = match sources::envelope(source, slack_interactions, headers, body) {
        Ok(Envelope::Protocol(answer)) => {
            outcome("protocol");
            return Json(answer).into_response();
        }
        Ok(Envelope::Event(meta)) => meta,
        Err(sources::MalformedDelivery(reason)) => {
            outcome("rejected");
            metrics
                .webhook_rejections_total
                .with_label_values(&[source.as_str(), "malformed_body"])
                .inc();
            return ApiError::bad_request(
                "malformed_body",
                format!("the delivery is signed but unreadable: {reason}"),
            )
            .into_response();
        }
    };

    if let Err(wait) = state.webhook_rate_limits.check(source, &meta.sender_key) {
        outcome("rate_limited");
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many deliveries from this sender; retry later",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)))
        .into_response();
    }

    let new = store::NewEvent {
        id: Uuid::now_v7(),
        source: source.as_str().to_string(),
        kind: meta.kind,
        delivery_id: meta.delivery_id,
        headers: meta.headers,
        body: body.to_vec(),
        ordering_key: meta.ordering_key,
        fair_tag: state.fair_shares.tag(source.as_str(), &meta.sender_key),
    };
    let stored = match tokio::time::timeout(state.config.webhooks.store_timeout, state.inbox.submit(new)).await {
        Ok(stored) => stored,
        Err(_) => {
            // Not acknowledged: if the row is committed after all, the sender's retry is a duplicate.
            outcome("storage_error");
            return ApiError::unavailable(
                "storage_unavailable",
                "the event could not be stored in time; retry later",
            )
            .with_header(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            )
            .into_response();
        }
    };
    match stored {
        Ok(Inserted::New(_) | Inserted::Leased { .. }) => {
            outcome("accepted");
            Json(Ack {
                ok: true,
                duplicate: None,
            })
            .into_response()
        }
        Ok(Inserted::Duplicate(_)) => {
            outcome("duplicate");
            Json(Ack {
                ok: true,
                duplicate: Some(true),
            })
            .into_response()
        }
        Err(e) => {
            // Never acknowledge what was not stored: the source retries on 5xx.
            outcome("storage_error");
            ApiError::unavailable("storage_unavailable", "the event could not be stored; retry later")
                .with_source(e)
                .into_response()
        }
    }
}

macro_rules! webhook_route {
    ($name:ident, $path:literal, $source:expr, $interactions:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "webhooks",
            request_body(content = String, description = "the provider's raw payload, signed"),
            responses(
                (status = 200, description = "stored (or a duplicate, or a protocol message answered)", body = Ack),
                (status = 400, description = "signed but unreadable", body = crate::error::ErrorBody),
                (status = 401, description = "signature missing, malformed, stale or wrong; or the source is not configured", body = crate::error::ErrorBody),
                (status = 413, body = crate::error::ErrorBody),
                (status = 429, description = "rate limited; see Retry-After", body = crate::error::ErrorBody),
                (status = 503, description = "could not store; retry", body = crate::error::ErrorBody)))]
        pub async fn $name(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
            ingest(&state, $source, $interactions, &headers, &body).await
        }
    };
}

webhook_route!(
    slack_events,
    "/webhooks/slack/events",
    Source::Slack,
    false,
    "Slack Events API deliveries."
);
webhook_route!(
    slack_interactions,
    "/webhooks/slack/interactions",
    Source::Slack,
    true,
    "Slack interactivity payloads (form-encoded)."
);
webhook_route!(
    github,
    "/webhooks/github",
    Source::GitHub,
    false,
    "GitHub webhook deliveries."
);
webhook_route!(
    pagerduty,
    "/webhooks/pagerduty",
    Source::PagerDuty,
    false,
    "PagerDuty v3 webhooks (and the legacy messages[] shape)."
);
webhook_route!(
    incidentio,
    "/webhooks/incidentio",
    Source::IncidentIo,
    false,
    "Incident.io (Standard Webhooks) deliveries."
);
