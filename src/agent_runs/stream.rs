//! The agent's progress passed through as server-sent events.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::StreamExt;
use serde_json::{json, Value};

use super::api::agent_error;
use super::run::{Closing, OpenRun};
use super::AgentProxy;
use crate::agent_call;
use crate::clients::agent::{AgentError, AgentEvent, EventStream};

/// Passes the agent's events through as server-sent events, closing the run at the end. If the
/// client disconnects, the stream (and with it the upstream call) is dropped and the run closes
/// itself as failed.
pub fn respond(
    proxy: AgentProxy,
    open: OpenRun,
    mut events: EventStream,
    timeout: Duration,
    started: Instant,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let observe = move |outcome: &str| agent_call::observe(&proxy.metrics, super::METRIC_SOURCE, started, outcome);
    let stream = async_stream::stream! {
        let open = open;
        loop {
            let next = tokio::time::timeout_at(deadline, events.next()).await;
            let event: AgentEvent = match next {
                Err(_) => {
                    let e = AgentError::Timeout(timeout);
                    observe("timeout");
                    yield Ok(sse(&AgentEvent { kind: "error".into(), data: json!({"message": e.to_string(), "code": "agent_timeout"}) }));
                    open.finish(Closing::timed_out(&e.to_string()));
                    return;
                }
                Ok(None) => {
                    let message = "the agent's event stream ended without a result";
                    observe("failed");
                    yield Ok(sse(&AgentEvent { kind: "error".into(), data: json!({"message": message, "code": "agent_upstream_error"}) }));
                    open.finish(Closing::failed("upstream_error", message));
                    return;
                }
                Ok(Some(Err(e))) => {
                    observe(agent_call::error_label(&e));
                    yield Ok(sse(&AgentEvent { kind: "error".into(), data: json!({"message": e.to_string(), "code": agent_error(&e).code}) }));
                    open.finish(Closing::from_error(&e));
                    return;
                }
                Ok(Some(Ok(event))) => event,
            };
            yield Ok(sse(&event));
            match event.kind.as_str() {
                "result" => {
                    observe("ok");
                    let output = event.data.get("text").cloned().unwrap_or(Value::Null);
                    open.finish(Closing::answered(&event.data, &output));
                    return;
                }
                "error" => {
                    let message = event.data.get("message").and_then(Value::as_str).unwrap_or("agent error").to_string();
                    observe("failed");
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
