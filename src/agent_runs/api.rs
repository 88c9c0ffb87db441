//! `POST /api/v1/admin/agents/run`: mint a short-lived team credential with the caller's own
//! authority, run the team's agent, and answer with its result (or stream its progress).

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::run::{self, Closing, RunRecord};
use super::{stream, METRIC_SOURCE};
use crate::agent_call::{self, TeamAgent, TeamAgentError};
use crate::auth::{Admin, Capability};
use crate::clients::agent::{AgentAnswer, AgentError, AgentRequest, EventStream};
use crate::config::AgentRunConfig;
use crate::domain::{AgentName, OrgId, TeamNodeId};
use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody, OrInvalidField};
use crate::state::AppState;

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
    org_id: OrgId,
    team_node_id: TeamNodeId,
    agent_name: AgentName,
    message: String,
    context: Value,
    timeout: Duration,
    max_turns: u32,
}

fn parse(limits: &AgentRunConfig, body: &Value) -> ApiResult<RunRequest> {
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
    let org_id = OrgId::parse(string("org_id")?).or_invalid("org_id")?;
    let team_node_id = TeamNodeId::parse(string("team_node_id")?).or_invalid("team_node_id")?;
    let agent_name = AgentName::parse(string("agent_name")?).or_invalid("agent_name")?;
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
fn config_service_error(e: &TeamAgentError) -> ApiError {
    let what = match e {
        TeamAgentError::Impersonation(_) => "an impersonation token",
        TeamAgentError::Config(_) => "the team's config",
    };
    let e = e.neighbour();
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

pub(super) fn agent_error(e: &AgentError) -> ApiError {
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

/// Runs a team's agent without its credentials reaching the caller.
#[utoipa::path(post, path = "/api/v1/admin/agents/run", tag = "agents", request_body = AgentRunBody, security(("admin_token" = [])),
    params(("Accept" = Option<String>, Header, description = "text/event-stream to receive the agent's progress as server-sent events")),
    responses(
        (status = 200, description = "the agent's answer (JSON), or its events (text/event-stream)", body = AgentRunResponse),
        (status = 404, description = "team_not_found: the config service does not know the team", body = ErrorBody),
        (status = 502, description = "agent_upstream_error or agent_error", body = ErrorBody),
        (status = 504, description = "agent_timeout", body = ErrorBody)))]
pub async fn run_agent(
    State(state): State<AppState>,
    admin: Admin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    let proxy = &state.agent_proxy;
    let request = parse(&proxy.limits, &body)?;
    admin.authorize(&state.config.auth, Capability::AgentRun, &request.org_id)?;
    let record = RunRecord {
        run_id: Uuid::now_v7(),
        correlation_id: Uuid::new_v4(),
        org_id: &request.org_id,
        team_node_id: &request.team_node_id,
        agent_name: &request.agent_name,
        message: &request.message,
        context: &request.context,
        streaming: wants_stream(&headers),
    };

    // The team credential is minted with the caller's own authority (so the config service's scope
    // rules apply too) and kept only for that caller, for as long as its verified principal is
    // (ORCHESTRATOR_ADMIN_AUTH_CACHE_TTL_SECONDS): a revoked admin loses it when it loses the rest.
    let credential_key = (
        admin.token_key,
        request.org_id.to_string(),
        request.team_node_id.to_string(),
    );
    let correlation = record.correlation_id.to_string();
    let session = format!("admin:{}", record.run_id);
    let call = async {
        let mint = TeamAgent::mint(
            &proxy.config_service,
            &admin.token,
            &request.org_id,
            &request.team_node_id,
            &proxy.namespace,
        );
        let team = proxy
            .credentials
            .get_or_mint(&credential_key, mint)
            .await
            .map_err(CallFailure::Credential)?;
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
            team_token: &team.token,
            base_url: team.dedicated.as_ref(),
        };
        if !record.streaming {
            return agent_call::run(&proxy.agent, &proxy.metrics, METRIC_SOURCE, &agent_request)
                .await
                .map(Called::Answer)
                .map_err(CallFailure::Agent);
        }
        let started = Instant::now();
        match proxy.agent.stream(&agent_request).await {
            Ok(events) => Ok(Called::Stream(events, started)),
            Err(e) => {
                agent_call::observe(&proxy.metrics, METRIC_SOURCE, started, agent_call::error_label(&e));
                Err(CallFailure::Agent(e))
            }
        }
    };

    // The run's record is written to Postgres before the agent hears of the run (the statement
    // is sent on the first poll, and `biased` polls it first) and has committed before anything
    // is answered; the two overlap instead of adding a round trip to Postgres to every run (about
    // 0.2 ms, most of what `scripts/bench proxy` measured the proxy to add). A record that fails
    // drops the call, which cancels it. Every failure after it closes a recorded run.
    let opening = run::begin(proxy, &admin, &record).await?;
    let recording = opening.record();
    tokio::pin!(recording, call);
    let mut called = None;
    let opened = loop {
        tokio::select! {
            biased;
            opened = &mut recording => break opened,
            result = &mut call, if called.is_none() => called = Some(result),
        }
    };
    let open = opened?;
    let called = match called {
        Some(called) => called,
        None => call.await,
    };

    match called {
        Ok(Called::Answer(answer)) => {
            open.finish(Closing::answered(&answer.raw, &answer.output));
            Ok(Json(AgentRunResponse {
                run_id: record.run_id,
                correlation_id: record.correlation_id,
                team_node_id: request.team_node_id.to_string(),
                agent_name: request.agent_name.to_string(),
                agent_result: answer.raw,
            })
            .into_response())
        }
        Ok(Called::Stream(events, started)) => {
            Ok(stream::respond(proxy.clone(), open, events, request.timeout, started).into_response())
        }
        Err(CallFailure::Credential(e)) => {
            let error = config_service_error(&e);
            open.finish(Closing::failed(&error.code, &error.detail));
            Err(error)
        }
        Err(CallFailure::Agent(e)) => {
            proxy.credentials.forget_if_refused(&credential_key, &e);
            open.finish(Closing::from_error(&e));
            Err(agent_error(&e))
        }
    }
}

/// What the agent call gave: its answer, or its events as they come.
enum Called {
    Answer(AgentAnswer),
    Stream(EventStream, Instant),
}

/// Where the call failed: minting the team's credential, or the agent.
enum CallFailure {
    Credential(TeamAgentError),
    Agent(AgentError),
}
