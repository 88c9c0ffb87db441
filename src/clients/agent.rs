//! Client for the agent service, in either dialect: `run` (JSON) or `investigate` (server-sent
//! events). Agent runs are long, so every call takes its own timeout.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use url::Url;

use super::{endpoint, NeighbourError, Transport};
use crate::config::{AgentDialect, Secret};

const NEIGHBOUR: &str = "agent";

#[derive(Clone)]
pub struct AgentClient {
    transport: Transport,
    default_base: Url,
    dialect: AgentDialect,
    investigate_token: Option<Secret>,
}

/// One agent run as the orchestrator asks for it, whatever the dialect.
pub struct AgentRequest<'a> {
    pub agent_name: &'a str,
    pub message: &'a str,
    pub context: &'a Value,
    pub timeout: Duration,
    pub max_turns: u32,
    pub correlation_id: &'a str,
    /// Stable per thread, issue or incident, so the agent keeps one conversation.
    pub session_id: &'a str,
    /// Where the agent posts its answer; `None` leaves the field out (the caller gets the answer).
    pub output_destinations: Option<&'a [Value]>,
    pub trigger_source: &'a str,
    pub org_id: &'a str,
    pub team_id: &'a str,
    pub team_token: &'a Secret,
    /// The team's dedicated agent, when it has one.
    pub base_url: Option<&'a Url>,
}

/// A progress or final event of a run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AgentEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
}

impl AgentEvent {
    pub fn is_terminal(&self) -> bool {
        self.kind == "result" || self.kind == "error"
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentAnswer {
    pub success: bool,
    /// The agent's output (run dialect) or result text (investigate).
    pub output: Value,
    /// The whole answer as the agent sent it.
    pub raw: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent did not finish within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Upstream(NeighbourError),
    #[error("the agent reported an error: {0}")]
    Failed(String),
}

/// An upstream error text may echo the request (a validation error quoting its input), and the
/// investigate dialect sends the team token in the body: never let it travel on in an error.
fn scrubbed(error: NeighbourError, token: &Secret) -> NeighbourError {
    match error {
        NeighbourError::Status {
            neighbour,
            status,
            detail,
            retry_after,
        } => NeighbourError::Status {
            neighbour,
            status,
            detail: detail.replace(token.expose(), "[redacted]"),
            retry_after,
        },
        other => other,
    }
}

impl From<NeighbourError> for AgentError {
    fn from(e: NeighbourError) -> Self {
        match e {
            NeighbourError::Timeout { timeout, .. } => AgentError::Timeout(timeout),
            other => AgentError::Upstream(other),
        }
    }
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<AgentEvent, AgentError>> + Send>>;

impl AgentClient {
    pub fn new(
        transport: Transport,
        default_base: Url,
        dialect: AgentDialect,
        investigate_token: Option<Secret>,
    ) -> Self {
        Self {
            transport,
            default_base,
            dialect,
            investigate_token,
        }
    }

    /// Runs the agent to completion.
    pub async fn run(&self, request: &AgentRequest<'_>) -> Result<AgentAnswer, AgentError> {
        match self.dialect {
            AgentDialect::Run => self.run_json(request).await,
            AgentDialect::Investigate => {
                let deadline = Instant::now() + request.timeout;
                let mut events = self.stream(request).await?;
                loop {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(remaining, events.next()).await {
                        Err(_) => return Err(AgentError::Timeout(request.timeout)),
                        Ok(None) => return Err(AgentError::Failed("the event stream ended without a result".into())),
                        Ok(Some(Err(e))) => return Err(e),
                        Ok(Some(Ok(event))) => match event.kind.as_str() {
                            "result" => return Ok(answer_from_result(event.data)),
                            "error" => return Err(AgentError::Failed(error_message(&event.data))),
                            _ => {}
                        },
                    }
                }
            }
        }
    }

    async fn run_json(&self, request: &AgentRequest<'_>) -> Result<AgentAnswer, AgentError> {
        let base = request.base_url.unwrap_or(&self.default_base);
        let http = self
            .transport
            .http
            .post(endpoint(base, &["agents", request.agent_name, "run"]))
            .header("X-IncidentFox-Team-Token", request.team_token.expose())
            .header("X-Correlation-ID", request.correlation_id)
            .json(&{
                let mut body = json!({
                    "message": request.message,
                    "context": request.context,
                    "timeout": request.timeout.as_secs(),
                    "max_turns": request.max_turns,
                    "trigger_source": request.trigger_source,
                });
                if let Some(destinations) = request.output_destinations {
                    body["output_destinations"] = json!(destinations);
                }
                body
            });
        let response = self
            .transport
            .send_with_timeout(NEIGHBOUR, http, request.timeout)
            .await
            .map_err(|e| scrubbed(e, request.team_token))?;
        let raw: Value = super::decode(NEIGHBOUR, response).await?;
        let success = raw.get("success").and_then(Value::as_bool).unwrap_or(false);
        if !success {
            if let Some(error) = raw.get("error").filter(|e| !e.is_null()) {
                return Err(AgentError::Failed(error_message(error)));
            }
        }
        let output = ["output", "result", "text", "response"]
            .iter()
            .find_map(|k| raw.get(*k).cloned())
            .unwrap_or(Value::Null);
        Ok(AgentAnswer { success, output, raw })
    }

    /// The run's events as they arrive. In the run dialect the whole answer is one `result` event.
    pub async fn stream(&self, request: &AgentRequest<'_>) -> Result<EventStream, AgentError> {
        if self.dialect == AgentDialect::Run {
            let answer = self.run_json(request).await?;
            let event = AgentEvent {
                kind: "result".into(),
                data: json!({"text": answer.output, "success": answer.success}),
            };
            return Ok(Box::pin(futures::stream::iter([Ok(event)])));
        }
        let base = request.base_url.unwrap_or(&self.default_base);
        let mut http = self
            .transport
            .http
            .post(endpoint(base, &["investigate"]))
            .header("X-Correlation-ID", request.correlation_id)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&json!({
                "prompt": request.message,
                "team_token": request.team_token.expose(),
                "thread_id": request.session_id,
                "tenant_id": request.org_id,
                "team_id": request.team_id,
            }));
        if let Some(token) = &self.investigate_token {
            http = http.bearer_auth(token.expose());
        }
        // The timeout bounds the whole stream; the caller enforces it while reading.
        let response = self
            .transport
            .send_with_timeout(NEIGHBOUR, http, request.timeout)
            .await
            .map_err(|e| scrubbed(e, request.team_token))?;
        let bytes = response.bytes_stream();
        Ok(Box::pin(sse_events(bytes)))
    }
}

fn answer_from_result(data: Value) -> AgentAnswer {
    AgentAnswer {
        success: data.get("success").and_then(Value::as_bool).unwrap_or(true),
        output: data.get("text").cloned().unwrap_or(Value::Null),
        raw: data,
    }
}

fn error_message(data: &Value) -> String {
    let text = match data {
        Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| other.to_string()),
    };
    super::truncate(&text, 500)
}

/// Parses a server-sent event stream into events: `data:` lines, joined per event, as JSON
/// `{"type": ..., "data": ...}`. Lines that are not JSON are skipped.
fn sse_events<S, B, E>(bytes: S) -> impl Stream<Item = Result<AgentEvent, AgentError>> + Send
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]> + Send,
    E: std::fmt::Display + Send,
{
    async_stream::stream! {
        let mut buffer: Vec<u8> = Vec::new();
        let mut data = String::new();
        futures::pin_mut!(bytes);
        while let Some(chunk) = bytes.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    yield Err(AgentError::Upstream(NeighbourError::Transport { neighbour: NEIGHBOUR, message: e.to_string() }));
                    return;
                }
            };
            buffer.extend_from_slice(chunk.as_ref());
            // An event stream that never ends a line or an event must not grow without bound.
            if buffer.len() + data.len() > super::MAX_RESPONSE_BYTES {
                yield Err(AgentError::Upstream(NeighbourError::Decode {
                    neighbour: NEIGHBOUR,
                    message: "an event is larger than the limit".into(),
                }));
                return;
            }
            while let Some(newline) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=newline).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if let Some(event) = parse_event(&data) {
                        let terminal = event.is_terminal();
                        yield Ok(event);
                        if terminal {
                            return;
                        }
                    }
                    data.clear();
                } else if let Some(value) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
        }
        if let Some(event) = parse_event(&data) {
            yield Ok(event);
        }
    }
}

fn parse_event(data: &str) -> Option<AgentEvent> {
    if data.trim().is_empty() {
        return None;
    }
    let value: Value = serde_json::from_str(data).ok()?;
    let kind = value.get("type")?.as_str()?.to_string();
    Some(AgentEvent {
        kind,
        data: value.get("data").cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_events_split_across_chunks() {
        let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![
            Ok(b"data: {\"type\":\"thought\",\"da"),
            Ok(b"ta\":{\"text\":\"hm\"}}\n\n: comment\n\ndata: {\"type\":\"result\",\"data\":{\"text\":\"done\",\"success\":true}}\r\n\r\n"),
            Ok(b"data: {\"type\":\"ignored-after-result\"}\n\n"),
        ];
        let events: Vec<_> = sse_events(futures::stream::iter(chunks)).collect().await;
        let kinds: Vec<String> = events.into_iter().map(|e| e.unwrap().kind).collect();
        assert_eq!(kinds, vec!["thought", "result"]);
    }
}
