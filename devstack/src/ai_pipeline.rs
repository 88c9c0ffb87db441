//! AI pipeline stand-in: team bootstrap (idempotent by `Idempotency-Key`) and on-demand runs.
//! A Python service too: naive timestamps, `{"detail": ...}` errors.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};

use crate::json::{now_naive, parse_body, random_hex};

/// One distinct bootstrap (replays of an `Idempotency-Key` are not listed again).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Bootstrap {
    pub team: String,
    pub idempotency_key: Option<String>,
    pub run_id: String,
    /// Naive UTC, as answered.
    pub created_at: String,
}

/// One on-demand pipeline run.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PipelineRun {
    pub team: String,
    pub org_id: Option<String>,
    pub job_name: String,
    pub run_id: String,
}

/// State of the AI pipeline stand-in. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct AiPipeline {
    inner: Arc<Mutex<PipelineState>>,
}

#[derive(Default)]
struct PipelineState {
    bootstraps: Vec<Bootstrap>,
    runs: Vec<PipelineRun>,
}

impl AiPipeline {
    /// Distinct bootstraps, in order.
    pub fn bootstraps(&self) -> Vec<Bootstrap> {
        self.inner.lock().unwrap().bootstraps.clone()
    }

    /// On-demand runs, in order.
    pub fn runs(&self) -> Vec<PipelineRun> {
        self.inner.lock().unwrap().runs.clone()
    }
}

pub(crate) fn router(pipeline: AiPipeline) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/api/v1/teams/{team}/bootstrap", post(bootstrap))
        .route("/api/v1/teams/{team}/run", post(run))
        .route("/__devstack/state", get(state_dump))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
        .with_state(pipeline)
}

fn detail(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "detail": message }))).into_response()
}

/// The pipeline trusts the platform's admin tokens without checking them, but it does insist on one.
fn has_bearer(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
}

async fn bootstrap(State(pipeline): State<AiPipeline>, Path(team): Path<String>, headers: HeaderMap) -> Response {
    if !has_bearer(&headers) {
        return detail(StatusCode::UNAUTHORIZED, "missing bearer token");
    }
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned);

    let mut state = pipeline.inner.lock().unwrap();
    if let Some(key) = &idempotency_key {
        if let Some(previous) = state
            .bootstraps
            .iter()
            .find(|b| b.idempotency_key.as_ref() == Some(key))
        {
            if previous.team != team {
                return detail(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Idempotency-Key was already used for another team",
                );
            }
            // A replay: same answer, nothing new started.
            return Json(bootstrap_answer(previous)).into_response();
        }
    }
    let bootstrap = Bootstrap {
        team,
        idempotency_key,
        run_id: format!("bootstrap-{}", random_hex(12)),
        created_at: now_naive(),
    };
    let answer = bootstrap_answer(&bootstrap);
    state.bootstraps.push(bootstrap);
    Json(answer).into_response()
}

fn bootstrap_answer(bootstrap: &Bootstrap) -> Value {
    json!({
        "run_id": bootstrap.run_id,
        "status": "queued",
        "team_id": bootstrap.team,
        "kind": "bootstrap",
        "created_at": bootstrap.created_at,
    })
}

async fn run(
    State(pipeline): State<AiPipeline>,
    Path(team): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !has_bearer(&headers) {
        return detail(StatusCode::UNAUTHORIZED, "missing bearer token");
    }
    let body = match parse_body(&body) {
        Ok(body) => body.unwrap_or(Value::Null),
        Err(_) => return detail(StatusCode::UNPROCESSABLE_ENTITY, "invalid JSON body"),
    };
    let run_id = format!("run-{}", random_hex(12));
    let job_name = format!("ai-pipeline-manual-{}", random_hex(8));
    pipeline.inner.lock().unwrap().runs.push(PipelineRun {
        team: team.clone(),
        org_id: body["org_id"].as_str().map(str::to_owned),
        job_name: job_name.clone(),
        run_id: run_id.clone(),
    });
    Json(json!({
        "job_name": job_name,
        "run_id": run_id,
        "team_id": team,
        "status": "queued",
        "kind": "manual",
        "created_at": now_naive(),
    }))
    .into_response()
}

async fn state_dump(State(pipeline): State<AiPipeline>) -> Json<Value> {
    let state = pipeline.inner.lock().unwrap();
    Json(json!({ "bootstraps": state.bootstraps, "runs": state.runs }))
}
