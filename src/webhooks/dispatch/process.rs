//! One claimed event, from plan to outcome: what it carries, who owns it, the team's agent run,
//! and what is written back.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use serde_json::{json, Value};

use super::decision::{self, AfterFailure, DispatchError};
use super::Dispatcher;
use crate::agent_call::{self, TeamAgent};
use crate::audit::{self, AuditEntry};
use crate::clients::agent::AgentRequest;
use crate::config::Secret;
use crate::domain::EventStatus;
use crate::webhooks::destinations;
use crate::webhooks::signature::Source;
use crate::webhooks::sources::{self, Plan, RunPlan};
use crate::webhooks::store::{self, ClaimedEvent, OutcomeRow};

/// The result of dispatching one event, before it is written.
enum Dispatched {
    Delivered { org: String, team: String, result: Value },
    Skipped(String),
    Unrouted(String),
}

/// Why an attempt failed, with the team it was routed to if routing got that far (so the team's
/// org admins can see and replay it).
struct Failure {
    error: DispatchError,
    team: Option<(String, String)>,
}

impl From<DispatchError> for Failure {
    fn from(error: DispatchError) -> Self {
        Self { error, team: None }
    }
}

/// Dispatches one event. Its outcome is written after the worker has moved on (under its lease,
/// renewed until then): a worker does not wait for a commit, so outcome batches grow with the load
/// instead of the dispatch rate being bounded by workers ÷ commit time (measured with
/// `scripts/bench pipeline`: 2,556 events a second against 3,968 accepted while each worker
/// waited for its outcome's flushed commit).
pub(super) async fn process(dispatcher: &Arc<Dispatcher>, event: ClaimedEvent) {
    let owner = event.lease;
    let Some(source) = Source::parse(&event.source) else {
        tracing::error!(event_id = %event.id, source = %event.source, "event of an unknown source");
        return;
    };
    let started = Instant::now();
    // The lease is renewed with every other one this replica holds ([`super::keep_leases`]); if
    // it is lost, stop: another worker may take the event, and this one must not go on running
    // the agent for it. Held until the outcome is written.
    let Some(held) = dispatcher.leases.hold(event.id) else {
        tracing::warn!(event_id = %event.id, "the lease of an event was lost before a worker started it");
        return;
    };
    let result = tokio::select! {
        result = dispatch(dispatcher, source, &event) => result,
        () = held.lost.notified() => Err(DispatchError::LeaseLost.into()),
    };
    let label = source.as_str();
    let finished = |status: &str| {
        dispatcher
            .metrics
            .webhook_dispatch_attempts_total
            .with_label_values(&[label, status])
            .inc();
        observe_latency(dispatcher, label, &event);
    };
    let outcome = match result {
        Ok(Dispatched::Delivered { org, team, result }) => {
            finished("delivered");
            OutcomeRow {
                org_id: Some(org),
                team_node_id: Some(team),
                correlation_id: Some(event.id.to_string()),
                agent_result: Some(result),
                ..OutcomeRow::new(event.id, owner, EventStatus::Delivered)
            }
        }
        Ok(Dispatched::Skipped(reason)) => {
            finished("skipped");
            OutcomeRow {
                skip_reason: Some(reason),
                ..OutcomeRow::new(event.id, owner, EventStatus::Skipped)
            }
        }
        Ok(Dispatched::Unrouted(reason)) => {
            finished("unrouted");
            OutcomeRow {
                last_error: Some(reason),
                ..OutcomeRow::new(event.id, owner, EventStatus::Unrouted)
            }
        }
        Err(failure) => failed(dispatcher, source, &event, failure),
    };
    // At most so many outcomes wait to be written: past it, workers wait too.
    let Ok(writing) = dispatcher.outcome_writes.clone().acquire_owned().await else {
        return;
    };
    let dispatcher = dispatcher.clone();
    tokio::spawn(async move {
        write_outcome(&dispatcher, source, &event, outcome).await;
        tracing::debug!(event_id = %event.id, source = source.as_str(), elapsed_ms = started.elapsed().as_millis() as u64, "dispatched");
        drop(held);
        drop(writing);
    });
}

async fn write_outcome(dispatcher: &Dispatcher, source: Source, event: &ClaimedEvent, outcome: OutcomeRow) {
    let retry_at = outcome
        .next_attempt_at
        .filter(|_| outcome.status == EventStatus::Pending);
    let write = if outcome.status == EventStatus::DeadLetter {
        record_dead_letter(dispatcher, source, event, outcome).await
    } else {
        dispatcher.outcomes.submit(outcome).await.map_err(|e| e.to_string())
    };
    match write {
        // Written: the claim loop may wake for the retry (it is claimable from now on).
        Ok(true) => {
            if event.ordering_key.is_some() {
                dispatcher.conversation_moved_on();
            }
            if let Some(at) = retry_at {
                dispatcher.retry_scheduled((at - Utc::now()).to_std().unwrap_or_default());
            }
        }
        Ok(false) => tracing::warn!(event_id = %event.id, "the event's lease moved on before its outcome was written"),
        Err(error) => {
            tracing::error!(event_id = %event.id, %error, "writing a dispatch outcome failed; the lease will expire and it is retried")
        }
    }
}

fn observe_latency(dispatcher: &Dispatcher, source: &str, event: &ClaimedEvent) {
    let age = (Utc::now() - event.received_at).num_milliseconds().max(0) as f64 / 1000.0;
    dispatcher
        .metrics
        .webhook_dispatch_latency_seconds
        .with_label_values(&[source])
        .observe(age);
}

/// Another attempt after a backoff, or a dead letter.
fn failed(dispatcher: &Dispatcher, source: Source, event: &ClaimedEvent, failure: Failure) -> OutcomeRow {
    let Failure { error, team } = failure;
    let (org_id, team_node_id) = team.unzip();
    let attempts = event.attempts.max(1) as u32;
    let age = (Utc::now() - event.received_at).to_std().unwrap_or_default();
    let label = source.as_str();
    let count = |outcome: &str| {
        dispatcher
            .metrics
            .webhook_dispatch_attempts_total
            .with_label_values(&[label, outcome])
            .inc();
    };
    match decision::after_failure(&dispatcher.settings.retry, attempts, age, &error) {
        AfterFailure::Retry(delay) => {
            count("retry");
            tracing::info!(event_id = %event.id, source = label, attempts, delay_ms = delay.as_millis() as u64, %error, "dispatch failed; will retry");
            OutcomeRow {
                next_attempt_at: Some(Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or_default()),
                last_error: Some(error.to_string()),
                org_id,
                team_node_id,
                ..OutcomeRow::new(event.id, event.lease, EventStatus::Pending)
            }
        }
        AfterFailure::DeadLetter => {
            count("dead_letter");
            observe_latency(dispatcher, label, event);
            tracing::error!(event_id = %event.id, source = label, attempts, %error, "dispatch gave up; event dead-lettered");
            OutcomeRow {
                last_error: Some(error.to_string()),
                org_id,
                team_node_id,
                ..OutcomeRow::new(event.id, event.lease, EventStatus::DeadLetter)
            }
        }
    }
}

/// A dead letter and its audit row commit together (rare: not group-committed); the outcome's
/// statement makes the commit wait for the flush.
async fn record_dead_letter(
    dispatcher: &Dispatcher,
    source: Source,
    event: &ClaimedEvent,
    outcome: OutcomeRow,
) -> Result<bool, String> {
    let write = async {
        let mut tx = dispatcher.queue_db.begin().await?;
        let written = store::record_outcomes(&mut *tx, std::slice::from_ref(&outcome)).await?[0];
        if written {
            let mut entry = AuditEntry::new("orchestrator", "webhook.dead_lettered", "dead_letter");
            entry.webhook_event_id = Some(event.id);
            entry.detail = json!({"source": source.as_str(), "kind": event.kind, "attempts": event.attempts,
                "error": outcome.last_error});
            audit::record(&mut *tx, entry).await?;
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(written)
    };
    write.await.map_err(|e| e.to_string())
}

async fn dispatch(dispatcher: &Dispatcher, source: Source, event: &ClaimedEvent) -> Result<Dispatched, Failure> {
    let Some(body) = &event.body else {
        return Ok(Dispatched::Skipped("the body was purged".into()));
    };
    let run = match sources::plan(source, &event.kind, body) {
        Plan::Skip(reason) => return Ok(Dispatched::Skipped(reason)),
        Plan::Feedback(feedback) => {
            dispatcher
                .config_service
                .feedback(&feedback)
                .await
                .map_err(DispatchError::Feedback)?;
            return Ok(Dispatched::Delivered {
                org: String::new(),
                team: String::new(),
                result: json!({"feedback": feedback["feedback"]}),
            });
        }
        Plan::Run(run) => run,
    };
    let Some((org, team)) = route(dispatcher, &run).await? else {
        return Ok(Dispatched::Unrouted(format!(
            "no team owns {}={}",
            run.routing_key, run.routing_value
        )));
    };
    match run_agent(dispatcher, source, event, &run, &org, &team).await {
        Ok(result) => Ok(Dispatched::Delivered { org, team, result }),
        Err(error) => Err(Failure {
            error,
            team: Some((org, team)),
        }),
    }
}

async fn route(dispatcher: &Dispatcher, run: &RunPlan) -> Result<Option<(String, String)>, DispatchError> {
    let key = (run.routing_key.to_string(), run.routing_value.clone());
    let found = match dispatcher.caches.routing.get(&key) {
        Some(found) => found,
        None => {
            let mut identifiers = serde_json::Map::new();
            identifiers.insert(run.routing_key.into(), Value::String(run.routing_value.clone()));
            let found = dispatcher
                .config_service
                .routing_lookup(&identifiers)
                .await
                .map_err(DispatchError::Routing)?;
            dispatcher.caches.routing.insert(key, found.clone());
            found
        }
    };
    Ok(match (found.found, found.org_id, found.team_node_id) {
        (true, Some(org), Some(team)) => Some((org, team)),
        _ => None,
    })
}

/// The team's credential and config, minted with the orchestrator's own admin token and cached.
async fn team_agent(dispatcher: &Dispatcher, org: &str, team: &str) -> Result<TeamAgent, DispatchError> {
    let admin = dispatcher
        .settings
        .internal_admin_token
        .as_ref()
        .ok_or(DispatchError::NoCredential)?;
    let key = (org.to_string(), team.to_string());
    let mint = TeamAgent::mint(
        &dispatcher.config_service,
        admin,
        org,
        team,
        &dispatcher.settings.namespace,
    );
    Ok(dispatcher.caches.teams.get_or_mint(&key, mint).await?)
}

async fn run_agent(
    dispatcher: &Dispatcher,
    source: Source,
    event: &ClaimedEvent,
    run: &RunPlan,
    org: &str,
    team: &str,
) -> Result<Value, DispatchError> {
    let team_agent = team_agent(dispatcher, org, team).await?;
    let agent_name = team_agent.entrance_agent();
    let limits = dispatcher.settings.limits(source);
    let correlation = event.id.to_string();
    let session_id = run.session_id.clone().unwrap_or_else(|| correlation.clone());
    let context = run.context(source, &session_id);
    let destinations = destinations::resolve(
        source,
        &run.reply_to,
        &team_agent.config,
        run.destinations.as_deref(),
        dispatcher.settings.slack_bot_token.as_ref().map(Secret::expose),
    );
    let request = AgentRequest {
        agent_name: &agent_name,
        message: &run.message,
        context: &context,
        timeout: limits.timeout,
        max_turns: limits.max_turns,
        correlation_id: &correlation,
        session_id: &session_id,
        output_destinations: Some(&destinations),
        trigger_source: source.as_str(),
        org_id: org,
        team_id: team,
        team_token: &team_agent.token,
        base_url: team_agent.dedicated.as_ref(),
    };
    match agent_call::run(&dispatcher.agent, &dispatcher.metrics, source.as_str(), &request).await {
        Ok(answer) => Ok(json!({
            "success": answer.success,
            "agent_name": agent_name,
            "output": bounded(answer.output),
        })),
        Err(e) => {
            dispatcher
                .caches
                .teams
                .forget_if_refused(&(org.to_string(), team.to_string()), &e);
            Err(DispatchError::Agent(e))
        }
    }
}

fn bounded(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(crate::clients::truncate(&s, 4000)),
        other if other.to_string().len() > 8000 => json!({"truncated": true}),
        other => other,
    }
}
