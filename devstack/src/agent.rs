//! Agent service stand-in: the JSON `run` dialect and the server-sent-events `investigate` dialect.
//! Both echo the prompt after a configurable delay, and count runs so that tests can observe
//! cancellation (a client that hangs up mid-run).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::json::parse_body;

const TEAM_TOKEN_HEADER: &str = "x-incidentfox-team-token";

/// State of the agent stand-in. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

#[derive(Default)]
struct AgentInner {
    settings: Mutex<Settings>,
    started: AtomicUsize,
    completed: AtomicUsize,
    cancelled: AtomicUsize,
    in_flight: AtomicUsize,
}

#[derive(Clone, Default)]
struct Settings {
    delay: Duration,
    investigate_token: Option<String>,
    error_mode: Option<String>,
}

impl Agent {
    /// How long a run takes before answering (independent of the generic fault latency).
    pub fn set_delay(&self, delay: Duration) {
        self.inner.settings.lock().unwrap().delay = delay;
    }

    /// When set, `/investigate` requires `Authorization: Bearer <token>`.
    pub fn set_investigate_token(&self, token: Option<String>) {
        self.inner.settings.lock().unwrap().investigate_token = token;
    }

    /// When set, runs fail with this message (an `error` event, or `success: false`).
    pub fn set_error_mode(&self, message: Option<String>) {
        self.inner.settings.lock().unwrap().error_mode = message;
    }

    /// Runs accepted (authenticated and well-formed), both dialects.
    pub fn runs_started(&self) -> usize {
        self.inner.started.load(Ordering::SeqCst)
    }

    /// Runs that produced their final answer (result or error).
    pub fn runs_completed(&self) -> usize {
        self.inner.completed.load(Ordering::SeqCst)
    }

    /// Runs abandoned because the client disconnected before the end (an investigate stream
    /// dropped early, or a `run` request whose connection closed while it was waiting).
    pub fn runs_cancelled(&self) -> usize {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    fn settings(&self) -> Settings {
        self.inner.settings.lock().unwrap().clone()
    }
}

/// Counts one run; if dropped before [`RunGuard::finish`], the run counts as cancelled. Dropping is
/// how hyper tells us the client went away: it drops the handler future or the response body.
struct RunGuard {
    agent: Agent,
    finished: bool,
}

impl RunGuard {
    fn start(agent: &Agent) -> RunGuard {
        agent.inner.started.fetch_add(1, Ordering::SeqCst);
        agent.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        RunGuard {
            agent: agent.clone(),
            finished: false,
        }
    }

    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.agent.inner.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.agent.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.agent.inner.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

pub(crate) fn router(agent: Agent) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/agents/{agent_name}/run", post(run))
        .route("/investigate", post(investigate))
        .route("/__devstack/agent", get(state_dump).post(configure))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
        .with_state(agent)
}

fn detail(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "detail": message }))).into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn json_object(body: &Bytes) -> Option<Map<String, Value>> {
    match parse_body(body) {
        Ok(Some(Value::Object(map))) => Some(map),
        _ => None,
    }
}

async fn run(State(agent): State<Agent>, Path(agent_name): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if header_str(&headers, TEAM_TOKEN_HEADER).is_none() {
        return detail(StatusCode::UNAUTHORIZED, "missing X-IncidentFox-Team-Token");
    }
    let Some(body) = json_object(&body) else {
        return detail(StatusCode::UNPROCESSABLE_ENTITY, "body must be a JSON object");
    };
    let Some(message) = body.get("message").and_then(Value::as_str) else {
        return detail(StatusCode::UNPROCESSABLE_ENTITY, "field required: message");
    };
    let correlation_id = header_str(&headers, "x-correlation-id");

    let mut guard = RunGuard::start(&agent);
    let settings = agent.settings();
    // tokio rounds any sleep up to the next millisecond: skip it when there is no delay.
    if !settings.delay.is_zero() {
        tokio::time::sleep(settings.delay).await;
    }
    guard.finish();

    let answer = match settings.error_mode {
        Some(error) => json!({
            "success": false,
            "error": error,
            "agent_name": agent_name,
            "correlation_id": correlation_id,
        }),
        None => json!({
            "success": true,
            "output": format!("echo: {message}"),
            "agent_name": agent_name,
            "correlation_id": correlation_id,
        }),
    };
    Json(answer).into_response()
}

async fn investigate(State(agent): State<Agent>, headers: HeaderMap, body: Bytes) -> Response {
    let settings = agent.settings();
    if let Some(expected) = &settings.investigate_token {
        let presented = header_str(&headers, "authorization")
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if presented != Some(expected.as_str()) {
            return detail(StatusCode::UNAUTHORIZED, "invalid investigate token");
        }
    }
    let Some(body) = json_object(&body) else {
        return detail(StatusCode::UNPROCESSABLE_ENTITY, "body must be a JSON object");
    };
    let Some(prompt) = body.get("prompt").and_then(Value::as_str) else {
        return detail(StatusCode::UNPROCESSABLE_ENTITY, "field required: prompt");
    };

    let last = match &settings.error_mode {
        Some(message) => json!({ "type": "error", "data": { "message": message } }),
        None => {
            json!({ "type": "result", "data": { "text": format!("echo: {prompt}"), "success": true } })
        }
    };
    let events = vec![
        json!({ "type": "thought", "data": { "text": "thinking" } }),
        json!({ "type": "tool_start", "data": { "name": "echo", "input": { "prompt": prompt } } }),
        json!({ "type": "tool_end", "data": { "name": "echo", "output": prompt } }),
        last,
    ];
    // The first event goes out at once; the delay is split across the gaps between events, so a
    // client sees progress long before the result.
    let gaps = u32::try_from(events.len() - 1).unwrap_or(1).max(1);
    let step = settings.delay / gaps;
    let guard = RunGuard::start(&agent);
    let stream = futures::stream::unfold(
        (guard, events.into_iter(), true),
        move |(mut guard, mut events, first)| async move {
            let event = events.next()?;
            if !first && !step.is_zero() {
                tokio::time::sleep(step).await;
            }
            if events.len() == 0 {
                guard.finish();
            }
            let frame = Bytes::from(format!("data: {event}\n\n"));
            Some((Ok::<_, Infallible>(frame), (guard, events, false)))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `POST /__devstack/agent` `{"delay_ms": n, "error": "msg"|null, "investigate_token": "t"|null}`:
/// the setters above, for the dev script. Absent fields are left alone; `null` clears.
async fn configure(State(agent): State<Agent>, body: Bytes) -> Response {
    let Some(body) = json_object(&body) else {
        return detail(StatusCode::UNPROCESSABLE_ENTITY, "body must be a JSON object");
    };
    if let Some(ms) = body.get("delay_ms").and_then(Value::as_u64) {
        agent.set_delay(Duration::from_millis(ms));
    }
    if let Some(error) = body.get("error") {
        agent.set_error_mode(error.as_str().map(str::to_owned));
    }
    if let Some(token) = body.get("investigate_token") {
        agent.set_investigate_token(token.as_str().map(str::to_owned));
    }
    state_dump(State(agent)).await.into_response()
}

async fn state_dump(State(agent): State<Agent>) -> Json<Value> {
    let settings = agent.settings();
    Json(json!({
        "delay_ms": u64::try_from(settings.delay.as_millis()).unwrap_or(u64::MAX),
        "error": settings.error_mode,
        "investigate_token_set": settings.investigate_token.is_some(),
        "runs_started": agent.runs_started(),
        "runs_completed": agent.runs_completed(),
        "runs_cancelled": agent.runs_cancelled(),
        "in_flight": agent.in_flight(),
    }))
}
