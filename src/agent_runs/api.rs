//! `POST /api/v1/admin/agents/run`: mint a short-lived team credential with the caller's own
//! authority, run the team's agent, and answer with its result (or stream its progress).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::store;
use crate::app::AppState;
use crate::audit::{self, AuditEntry};
use crate::auth::{Admin, Capability};
use crate::clients::agent::{AgentError, AgentEvent, AgentRequest};
use crate::clients::NeighbourError;
use crate::config::Secret;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::provisioning::request::validate_identifier;

const MAX_MESSAGE_CHARS: usize = 20_000;

/// The request body (documentation; parsed by hand so every 422 names its field).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct AgentRunBody {
    org_id: String,
    team_node_id: String,
    /// 1 to 64 of letters, digits, '-', '_', '.'.
    agent_name: String,
    /// 1 to 20000 characters.
    message: String,
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
    /// Seconds, at most ORCHESTRATOR_AGENT_RUN_MAX_TIMEOUT_SECONDS.
    timeout: Option<u64>,
    max_turns: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AgentRunResponse {
    run_id: Uuid,
    correlation_id: Uuid,
    team_node_id: String,
    agent_name: String,
    /// The agent's answer: `success` and its output or text.
    #[schema(value_type = Object)]
    agent_result: Value,
}

struct RunRequest {
    org_id: String,
    team_node_id: String,
    agent_name: String,
    message: String,
    context: Value,
    timeout: Duration,
    max_turns: u32,
}

fn parse(state: &AppState, body: &Value) -> ApiResult<RunRequest> {
    let object = body
        .as_object()
        .ok_or_else(|| ApiError::unprocessable("invalid_body", "the request body must be a JSON object"))?;
    let string = |field: &str| -> ApiResult<String> {
        match object.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) => Err(ApiError::invalid_field(field, "is required")),
            Some(_) => Err(ApiError::invalid_field(field, "must be a string")),
        }
    };
    let org_id = string("org_id")?;
    validate_identifier("org_id", &org_id)?;
    let team_node_id = string("team_node_id")?;
    validate_identifier("team_node_id", &team_node_id)?;
    let agent_name = string("agent_name")?;
    if !crate::clients::agent::is_agent_name(&agent_name) {
        return Err(ApiError::invalid_field(
            "agent_name",
            "must be 1 to 64 of letters, digits, '-', '_' or '.', starting with a letter or digit",
        ));
    }
    let message = string("message")?;
    let chars = message.chars().count();
    if chars == 0 || chars > MAX_MESSAGE_CHARS || message.trim().is_empty() {
        return Err(ApiError::invalid_field(
            "message",
            "must be 1 to 20000 characters of text",
        ));
    }
    let context = match object.get("context") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(map)) => Value::Object(map.clone()),
        Some(_) => return Err(ApiError::invalid_field("context", "must be an object")),
    };
    let limits = &state.config.agent_runs;
    let timeout = match object.get("timeout") {
        None | Some(Value::Null) => limits.default_timeout,
        Some(v) => match v.as_u64() {
            Some(secs) if secs >= 1 && secs <= limits.max_timeout.as_secs() => Duration::from_secs(secs),
            _ => {
                return Err(ApiError::invalid_field(
                    "timeout",
                    format!("must be whole seconds from 1 to {}", limits.max_timeout.as_secs()),
                ))
            }
        },
    };
    let max_turns = match object.get("max_turns") {
        None | Some(Value::Null) => limits.default_max_turns,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(limits.max_turns) => n as u32,
            _ => {
                return Err(ApiError::invalid_field(
                    "max_turns",
                    format!("must be from 1 to {}", limits.max_turns),
                ))
            }
        },
    };
    Ok(RunRequest {
        org_id,
        team_node_id,
        agent_name,
        message,
        context,
        timeout,
        max_turns,
    })
}

fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// The config service's answer to an impersonation or config request, as our error.
fn config_service_error(what: &str, e: NeighbourError) -> ApiError {
    match e.status() {
        Some(403) => ApiError::forbidden(
            "impersonation_forbidden",
            format!("the config service refused {what} for this admin"),
        ),
        Some(404) => ApiError::not_found("team_not_found", "the config service does not know this team"),
        Some(401) => ApiError::unauthorized("invalid_token", "the config service rejected the admin token"),
        _ if e.is_transient() => ApiError::unavailable(
            "config_service_unavailable",
            format!("the config service is unavailable ({what}); retry later"),
        ),
        _ => ApiError::bad_gateway(
            "config_service_error",
            format!("the config service answered unexpectedly ({what})"),
        ),
    }
}

fn agent_error(e: &AgentError) -> ApiError {
    match e {
        AgentError::Timeout(after) => ApiError::gateway_timeout(
            "agent_timeout",
            format!("the agent did not finish within {} s", after.as_secs()),
        ),
        AgentError::Upstream(inner) => {
            ApiError::bad_gateway("agent_upstream_error", format!("the agent service failed: {inner}"))
        }
        AgentError::Failed(message) => {
            ApiError::bad_gateway("agent_error", format!("the agent reported an error: {message}"))
        }
    }
}

fn outcome_label(e: &AgentError) -> &'static str {
    match e {
        AgentError::Timeout(_) => "timeout",
        AgentError::Failed(_) => "failed",
        AgentError::Upstream(_) => "upstream_error",
    }
}

/// An opened run. Closing it is mandatory: if it is dropped unclosed (the client went away,
/// the task was cancelled) it closes itself as failed in the background.
struct OpenRun {
    state: AppState,
    run_id: Uuid,
    org_id: String,
    actor: String,
    started: Instant,
    closed: bool,
}

/// How a run ended, for both audits: ours (`succeeded` or `failed`) and the platform's, whose
/// close takes only `completed`, `failed` or `timeout` (anything else is a 422).
struct Closing {
    status: &'static str,
    platform_status: &'static str,
    summary: Option<Value>,
    error: Option<Value>,
    report: PlatformReport,
}

/// What the platform audit shows of a run's end.
#[derive(Default)]
struct PlatformReport {
    tool_calls_count: i64,
    output_summary: Option<String>,
    output_json: Option<Value>,
    confidence: Option<f64>,
    error_message: Option<String>,
}

/// The platform audit shows a one-line summary: longer answers are cut here.
const OUTPUT_SUMMARY_CHARS: usize = 200;

impl Closing {
    /// The agent answered; `answer` is its whole answer and `output` the part that is its output.
    /// An answer that says `success: false` is a failed run in the platform audit.
    fn answered(answer: &Value, output: &Value) -> Self {
        let summary = json!({"success": answer.get("success"), "output_chars": output.to_string().len()});
        let succeeded = answer.get("success").and_then(Value::as_bool) != Some(false);
        let summary_text = match output {
            Value::String(text) => Some(text.clone()),
            Value::Object(fields) => ["summary", "root_cause"]
                .iter()
                .find_map(|k| fields.get(*k).and_then(Value::as_str).map(str::to_string)),
            _ => None,
        };
        Self {
            status: "succeeded",
            platform_status: if succeeded { "completed" } else { "failed" },
            summary: Some(summary),
            error: None,
            report: PlatformReport {
                tool_calls_count: answer.get("tool_calls_count").and_then(Value::as_i64).unwrap_or(0),
                output_summary: summary_text.map(|t| crate::clients::truncate(&t, OUTPUT_SUMMARY_CHARS)),
                output_json: match output {
                    Value::Object(_) => Some(output.clone()),
                    Value::String(text) => Some(json!({"text": text})),
                    _ => None,
                },
                confidence: output.get("confidence").and_then(Value::as_f64),
                error_message: None,
            },
        }
    }

    fn failed(code: &str, message: &str) -> Self {
        Self {
            status: "failed",
            platform_status: "failed",
            summary: None,
            error: Some(json!({"code": code, "message": message})),
            report: PlatformReport {
                error_message: Some(message.to_string()),
                ..PlatformReport::default()
            },
        }
    }

    fn timed_out(message: &str) -> Self {
        Self {
            platform_status: "timeout",
            ..Self::failed("timeout", message)
        }
    }

    fn from_error(e: &AgentError) -> Self {
        match e {
            AgentError::Timeout(_) => Self::timed_out(&e.to_string()),
            other => Self::failed(outcome_label(other), &other.to_string()),
        }
    }
}

impl OpenRun {
    /// Closes the run in the background: the caller's answer never waits for the bookkeeping. A
    /// crash before it lands leaves the run to `sweep_orphans`.
    fn finish(mut self, closing: Closing) {
        self.closed = true;
        self.spawn_close(closing);
    }

    fn spawn_close(&self, closing: Closing) {
        let (state, run_id, org, actor, started) = (
            self.state.clone(),
            self.run_id,
            self.org_id.clone(),
            self.actor.clone(),
            self.started,
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_run(state, run_id, org, actor, started, closing));
        }
    }
}

impl Drop for OpenRun {
    fn drop(&mut self) {
        if !self.closed {
            self.spawn_close(Closing::failed(
                "client_disconnected",
                "the client went away before the run finished; the agent call was cancelled",
            ));
        }
    }
}

async fn close_run(state: AppState, run_id: Uuid, org: String, actor: String, started: Instant, closing: Closing) {
    let duration_ms = started.elapsed().as_millis() as i64;
    let closed: Result<(), sqlx::Error> = async {
        let mut tx = state.db.begin().await?;
        let closed_now = store::close(
            &mut *tx,
            run_id,
            closing.status,
            duration_ms,
            closing.summary.as_ref(),
            closing.error.as_ref(),
        )
        .await?;
        if closed_now {
            let mut entry = AuditEntry::new(&actor, "agent_run.completed", closing.status);
            entry.org_id = Some(&org);
            entry.detail = json!({"agent_run_id": run_id, "duration_ms": duration_ms, "error": closing.error});
            audit::record(&mut *tx, entry).await?;
        }
        tx.commit().await
    }
    .await;
    if let Err(e) = closed {
        tracing::error!(%run_id, error = %e, "closing an agent run in the database failed; the sweeper will close it");
    }
    close_platform_run(&state, run_id, &org, &closing).await;
}

/// Closes the run in the platform audit, in its vocabulary (`contracts.md`).
async fn close_platform_run(state: &AppState, run_id: Uuid, org: &str, closing: &Closing) {
    let Some(admin) = &state.config.internal_admin_token else {
        return;
    };
    let report = &closing.report;
    let update = json!({
        "run_id": run_id,
        "status": closing.platform_status,
        "tool_calls_count": report.tool_calls_count,
        "output_summary": report.output_summary,
        "output_json": report.output_json,
        "error_message": report.error_message,
        "confidence": report.confidence,
    });
    if let Err(e) = state
        .config_service
        .audit_agent_run_update(admin, org, &run_id.to_string(), &update)
        .await
    {
        tracing::warn!(%run_id, error = %e, "closing the run in the platform audit failed");
    }
}

/// Closes runs a crash left open (their closing never landed): every replica, every minute.
pub async fn sweep_orphans(state: AppState, stop: tokio_util::sync::CancellationToken) {
    let grace = state.config.agent_runs.max_timeout + Duration::from_secs(120);
    loop {
        match store::close_stale(&state.db, grace).await {
            Ok(orphans) => {
                let closing = Closing::failed("orphaned", "the process running it stopped before the run was closed");
                for (run_id, org) in orphans {
                    tracing::warn!(%run_id, "closed an agent run left open by a stopped process");
                    close_platform_run(&state, run_id, &org, &closing).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "sweeping open agent runs failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Runs a team's agent without its credentials reaching the caller.
#[utoipa::path(post, path = "/api/v1/admin/agents/run", tag = "agents", request_body = AgentRunBody, security(("admin_token" = [])),
    params(("Accept" = Option<String>, Header, description = "text/event-stream to receive the agent's progress as server-sent events")),
    responses(
        (status = 200, description = "the agent's answer (JSON), or its events (text/event-stream)", body = AgentRunResponse),
        (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody),
        (status = 404, description = "team not found", body = crate::openapi::ErrorBody), (status = 422, body = crate::openapi::ErrorBody),
        (status = 502, description = "agent_upstream_error or agent_error", body = crate::openapi::ErrorBody),
        (status = 503, description = "config service unavailable", body = crate::openapi::ErrorBody),
        (status = 504, description = "agent_timeout", body = crate::openapi::ErrorBody)))]
pub async fn run_agent(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    let request = parse(&state, &body)?;
    admin.authorize(&state.config.auth, Capability::AgentRun, &request.org_id)?;
    let streaming = wants_stream(&headers);
    let run_id = Uuid::now_v7();
    let correlation_id = Uuid::new_v4();

    // The run is on record, ours and the platform's, before anything acts for the team, so every
    // failure after this point closes a recorded run. The three are independent: do them at once.
    let (opened, (), credential) = tokio::join!(
        open_run(&state, &admin, &request, run_id, correlation_id, streaming),
        platform_audit_start(&state, &admin, &request, run_id, correlation_id),
        team_credential(&state, &admin, &request.org_id, &request.team_node_id),
    );
    let open = match opened {
        Ok(open) => open,
        Err(error) => {
            close_platform_run(
                &state,
                run_id,
                &request.org_id,
                &Closing::failed("storage_unavailable", "the run could not be recorded"),
            )
            .await;
            return Err(error);
        }
    };
    let (team_token, dedicated) = match credential {
        Ok(credential) => credential,
        Err(error) => {
            open.finish(Closing::failed(&error.code, &error.detail));
            return Err(error);
        }
    };

    let correlation = correlation_id.to_string();
    let session = format!("admin:{run_id}");
    let agent_request = AgentRequest {
        agent_name: &request.agent_name,
        message: &request.message,
        context: &request.context,
        timeout: request.timeout,
        max_turns: request.max_turns,
        correlation_id: &correlation,
        session_id: &session,
        output_destinations: None,
        trigger_source: "api",
        org_id: &request.org_id,
        team_id: &request.team_node_id,
        team_token: &team_token,
        base_url: dedicated.as_ref(),
    };
    let started = Instant::now();

    if streaming {
        let events = match state.agent.stream(&agent_request).await {
            Ok(events) => events,
            Err(e) => {
                observe(&state, started, outcome_label(&e));
                open.finish(Closing::from_error(&e));
                return Err(agent_error(&e));
            }
        };
        return Ok(stream_response(state, open, events, request.timeout, started).into_response());
    }

    match state.agent.run(&agent_request).await {
        Ok(answer) => {
            observe(&state, started, "ok");
            open.finish(Closing::answered(&answer.raw, &answer.output));
            Ok(Json(AgentRunResponse {
                run_id,
                correlation_id,
                team_node_id: request.team_node_id.clone(),
                agent_name: request.agent_name.clone(),
                agent_result: answer.raw,
            })
            .into_response())
        }
        Err(e) => {
            observe(&state, started, outcome_label(&e));
            open.finish(Closing::from_error(&e));
            Err(agent_error(&e))
        }
    }
}

/// A short-lived team credential minted with the caller's own authority (so the config
/// service's scope rules apply too), and the team's dedicated agent URL if it has one. Minted
/// per request, never cached: it is the caller's authority, not ours.
async fn team_credential(
    state: &AppState,
    admin: &Admin,
    org: &str,
    team: &str,
) -> ApiResult<(Secret, Option<url::Url>)> {
    let minted = state
        .config_service
        .impersonation_token(&admin.token, org, team)
        .await
        .map_err(|e| config_service_error("an impersonation token", e))?;
    let team_config = state
        .config_service
        .config_me(&minted.token)
        .await
        .map_err(|e| config_service_error("the team's config", e))?;
    let dedicated = crate::provisioning::objects::trusted_dedicated_url(
        team_config
            .pointer("/agent/dedicated_service_url")
            .and_then(Value::as_str),
        org,
        team,
        &state.config.kubernetes.namespace,
    );
    Ok((minted.token, dedicated))
}

fn observe(state: &AppState, started: Instant, outcome: &str) {
    state
        .metrics
        .agent_run_duration_seconds
        .with_label_values(&["admin"])
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .agent_runs_total
        .with_label_values(&["admin", outcome])
        .inc();
}

async fn open_run(
    state: &AppState,
    admin: &Admin,
    request: &RunRequest,
    run_id: Uuid,
    correlation_id: Uuid,
    streaming: bool,
) -> ApiResult<OpenRun> {
    let mut tx = state.db.begin().await?;
    store::open(
        &mut *tx,
        &store::NewRun {
            id: run_id,
            correlation_id,
            org_id: &request.org_id,
            team_node_id: &request.team_node_id,
            agent_name: &request.agent_name,
            actor_subject: admin.subject(),
            actor_email: admin.email(),
            streaming,
        },
    )
    .await?;
    let mut entry = AuditEntry::new(admin.subject(), "agent_run.started", "accepted");
    entry.actor_email = admin.email();
    entry.org_id = Some(&request.org_id);
    entry.team_node_id = Some(&request.team_node_id);
    entry.detail = json!({"agent_run_id": run_id, "correlation_id": correlation_id, "agent_name": request.agent_name, "streaming": streaming});
    audit::record(&mut *tx, entry).await?;
    tx.commit().await?;

    Ok(OpenRun {
        state: state.clone(),
        run_id,
        org_id: request.org_id.clone(),
        actor: admin.subject().to_string(),
        started: Instant::now(),
        closed: false,
    })
}

/// Opens the run in the platform audit, as `contracts.md` gives the body. The platform audit is a
/// record, not a gate: a failure is logged and the run goes on.
async fn platform_audit_start(
    state: &AppState,
    admin: &Admin,
    request: &RunRequest,
    run_id: Uuid,
    correlation_id: Uuid,
) {
    let Some(internal) = &state.config.internal_admin_token else {
        return;
    };
    let body = json!({
        "run_id": run_id,
        "org_id": request.org_id,
        "team_node_id": request.team_node_id,
        "correlation_id": correlation_id,
        "trigger_source": "api",
        "trigger_actor": admin.email().unwrap_or(admin.subject()),
        "trigger_message": crate::clients::truncate(&request.message, TRIGGER_MESSAGE_CHARS),
        "trigger_channel_id": null,
        "agent_name": request.agent_name,
        "metadata": {"context": request.context},
    });
    if let Err(e) = state
        .config_service
        .audit_agent_run_start(internal, &request.org_id, &body)
        .await
    {
        tracing::warn!(%run_id, error = %e, "recording the run in the platform audit failed");
    }
}

/// The platform audit keeps the message that started a run; a long one is cut.
const TRIGGER_MESSAGE_CHARS: usize = 4000;

/// Passes the agent's events through as server-sent events, closing the run at the end. If the
/// client disconnects, the stream (and with it the upstream call) is dropped and the run closes
/// itself as failed.
fn stream_response(
    state: AppState,
    open: OpenRun,
    mut events: crate::clients::agent::EventStream,
    timeout: Duration,
    started: Instant,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = async_stream::stream! {
        let open = open;
        loop {
            let next = tokio::time::timeout_at(deadline, events.next()).await;
            let event: AgentEvent = match next {
                Err(_) => {
                    let e = AgentError::Timeout(timeout);
                    observe(&state, started, "timeout");
                    yield Ok(sse(&AgentEvent { kind: "error".into(), data: json!({"message": e.to_string(), "code": "agent_timeout"}) }));
                    open.finish(Closing::timed_out(&e.to_string()));
                    return;
                }
                Ok(None) => {
                    let message = "the agent's event stream ended without a result";
                    observe(&state, started, "failed");
                    yield Ok(sse(&AgentEvent { kind: "error".into(), data: json!({"message": message, "code": "agent_upstream_error"}) }));
                    open.finish(Closing::failed("upstream_error", message));
                    return;
                }
                Ok(Some(Err(e))) => {
                    observe(&state, started, outcome_label(&e));
                    yield Ok(sse(&AgentEvent { kind: "error".into(), data: json!({"message": e.to_string(), "code": agent_error(&e).code}) }));
                    open.finish(Closing::from_error(&e));
                    return;
                }
                Ok(Some(Ok(event))) => event,
            };
            yield Ok(sse(&event));
            match event.kind.as_str() {
                "result" => {
                    observe(&state, started, "ok");
                    let output = event.data.get("text").cloned().unwrap_or(Value::Null);
                    open.finish(Closing::answered(&event.data, &output));
                    return;
                }
                "error" => {
                    let message = event.data.get("message").and_then(Value::as_str).unwrap_or("agent error").to_string();
                    observe(&state, started, "failed");
                    open.finish(Closing::failed("failed", &message));
                    return;
                }
                _ => {}
            }
        }
    };
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn sse(event: &AgentEvent) -> Event {
    Event::default().data(serde_json::to_string(event).unwrap_or_default())
}
