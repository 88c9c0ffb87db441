//! Dispatch workers: claim inbox events, find the owning team, run its agent, record the outcome.
//! Every replica runs one dispatcher; Postgres arbitrates (SKIP LOCKED claims with a lease).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ingress::source_config;
use super::signature::Source;
use super::sources::{self, Plan, RunPlan};
use super::store::{self, ClaimedEvent, OutcomeRow};
use super::writer::OutcomeWriter;
use crate::app::AppState;
use crate::audit::{self, AuditEntry};
use crate::clients::agent::{AgentError, AgentRequest};
use crate::clients::config_service::RoutingMatch;
use crate::config::Secret;
use crate::retry::RetryPolicy;

const ROUTING_TTL: Duration = Duration::from_secs(30);
const TEAM_CONFIG_TTL: Duration = Duration::from_secs(60);
/// An impersonation token is renewed this long before it expires.
const TOKEN_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
const DEFAULT_AGENT: &str = "planner";
/// How long a dispatcher with some workers still busy waits for more to free up before claiming.
const CLAIM_GATHER: Duration = Duration::from_millis(5);

/// Short-lived caches in front of the config service.
#[derive(Clone, Default)]
pub struct DispatchCaches {
    routing: Arc<Mutex<HashMap<TeamKey, (RoutingMatch, Instant)>>>,
    teams: Arc<Mutex<HashMap<TeamKey, TeamAccess>>>,
}

/// A pair of strings: (routing key, value) or (org, team).
type TeamKey = (String, String);

#[derive(Clone)]
struct TeamAccess {
    token: Secret,
    token_expires: chrono::DateTime<Utc>,
    config: Value,
    config_fetched: Instant,
}

impl DispatchCaches {
    fn routing(&self, key: &(String, String)) -> Option<RoutingMatch> {
        let cache = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < ROUTING_TTL)
            .map(|(m, _)| m.clone())
    }
    fn remember_routing(&self, key: (String, String), found: RoutingMatch) {
        let mut cache = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.retain(|_, (_, at)| at.elapsed() < ROUTING_TTL);
        }
        cache.insert(key, (found, Instant::now()));
    }
    fn team(&self, key: &(String, String)) -> Option<TeamAccess> {
        let cache = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|t| t.token_expires - TOKEN_MARGIN > Utc::now() && t.config_fetched.elapsed() < TEAM_CONFIG_TTL)
            .cloned()
    }
    fn remember_team(&self, key: (String, String), access: TeamAccess) {
        let mut cache = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, access);
    }
    fn forget_team(&self, key: &(String, String)) {
        self.teams.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// This replica's dispatch workers and what wakes its claim loop.
pub struct Dispatcher {
    workers: Arc<Semaphore>,
    total: usize,
    /// Events may be due: stored here, or announced by another replica.
    pub queued: Arc<Notify>,
    /// A worker is free again.
    freed: Notify,
    /// Outcomes of concurrent dispatches share a commit, as deliveries do at ingress.
    outcomes: OutcomeWriter,
    /// Claims, outcomes and lease renewals run here, with their plans pinned ([`crate::db::queue_pool`]).
    pub queue_db: PgPool,
}

impl Dispatcher {
    pub fn new(queue_db: PgPool, workers: usize) -> Self {
        Self {
            workers: Arc::new(Semaphore::new(workers)),
            total: workers,
            queued: Arc::new(Notify::new()),
            freed: Notify::new(),
            outcomes: OutcomeWriter::outcomes(queue_db.clone()),
            queue_db,
        }
    }
}

/// Runs [`run`] on threads of its own whose CPU priority is `ORCHESTRATOR_DISPATCH_NICE` below
/// request handling. Acknowledging a delivery is the time-critical path (Slack retries after 3 s,
/// GitHub after 10, and a source that keeps timing out disables the hook); dispatch works from a
/// durable inbox and can lag. When both want the CPU, the kernel gives it to acknowledgements, and
/// dispatch takes the rest. Measured with `scripts/bench ingest` on 2 cores, where a dispatch at
/// full speed halved the rate at which deliveries were accepted.
///
/// Everything dispatch starts lives on these threads and ends with this future: on shutdown, and
/// when the service's own runtime is dropped (a crash in tests), so a dead service never dispatches.
pub async fn run_at_lower_priority(state: AppState, stop: CancellationToken) {
    let nice = state.config.webhooks.dispatch_nice as i32;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("dispatch")
        .on_thread_start(move || lower_this_thread(nice))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the dispatch threads; dispatching on the request threads");
            return run(state, stop).await;
        }
    };
    let handle = runtime.spawn(run(state, stop));
    let _stops_with_this_future = DispatchRuntime(Some(runtime));
    if let Err(e) = handle.await {
        tracing::error!(error = %e, "the dispatch loop failed");
    }
}

/// Stops the dispatch threads when dropped, without waiting for them (allowed in async code).
struct DispatchRuntime(Option<tokio::runtime::Runtime>);

impl Drop for DispatchRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Linux gives every thread its own nice value: this lowers only the calling thread's priority.
fn lower_this_thread(nice: i32) {
    if nice == 0 {
        return;
    }
    if let Err(e) = rustix::process::nice(nice) {
        tracing::warn!(error = %e, "cannot lower the priority of a dispatch thread");
    }
}

/// The claim loop of this replica: claims as many due events as it has free workers, whenever
/// events may be due (stored here, announced by another replica, or the poll interval passed) and
/// a worker is free. A worker that finishes leads to a claim only if the last claim suggested more
/// were waiting: an empty claim costs a plan, a commit and a round trip.
pub async fn run(state: AppState, stop: CancellationToken) {
    let config = &state.config.webhooks;
    let dispatcher = &state.dispatcher;
    let total = dispatcher.total;
    let workers = &dispatcher.workers;
    let claim_batch = (total / 4).max(1);
    tokio::spawn(listen(state.clone(), dispatcher.queued.clone(), stop.clone()));
    let lease_secs = config.dispatch_lease.as_secs_f64();
    // At start-up, events left by a previous process may be due.
    let mut maybe_due = true;

    loop {
        if stop.is_cancelled() {
            break;
        }
        let mut free = workers.available_permits();
        if maybe_due && free > 0 && free < claim_batch && free < total {
            // Others are still running: let a few more finish so one claim serves several. Each
            // claim costs a plan, a commit and a round trip; this costs at most CLAIM_GATHER.
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(CLAIM_GATHER) => {}
            }
            free = workers.available_permits();
        }
        let mut claimed_all = false;
        if maybe_due && free > 0 {
            match store::claim(&dispatcher.queue_db, free as i64, lease_secs).await {
                Ok(events) => {
                    // Fewer than asked for: nothing else is due right now.
                    claimed_all = events.len() == free;
                    maybe_due = claimed_all;
                    for event in events {
                        let Ok(permit) = workers.clone().acquire_owned().await else {
                            break;
                        };
                        let state = state.clone();
                        tokio::spawn(async move {
                            process(&state, event).await;
                            drop(permit);
                            state.dispatcher.freed.notify_one();
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming webhook events failed"),
            }
        }
        if claimed_all {
            // There may be more due right now.
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = dispatcher.queued.notified() => maybe_due = true,
            // Only worth a claim if events are waiting for a worker.
            () = dispatcher.freed.notified() => {}
            () = tokio::time::sleep(config.dispatch_poll_interval) => maybe_due = true,
        }
    }
    // Let running dispatches finish within the lease; what does not is taken over after it.
    let _ = tokio::time::timeout(Duration::from_secs(10), workers.acquire_many(total as u32)).await;
}

/// LISTEN for new events; reconnects with a pause when the connection drops.
async fn listen(state: AppState, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&state.db).await?;
            listener.listen(store::NOTIFY_CHANNEL).await?;
            loop {
                listener.recv().await?;
                wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = listener => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "webhook LISTEN connection lost; polling until it is back");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// The result of dispatching one event, before it is written.
enum Dispatched {
    Delivered {
        org: String,
        team: String,
        result: Value,
    },
    Skipped(String),
    Unrouted(String),
    /// Why it failed, and the team it was routed to if routing got that far.
    Failed(String, Option<(String, String)>),
}

async fn process(state: &AppState, event: ClaimedEvent) {
    let owner = event.lease;
    let Some(source) = Source::parse(&event.source) else {
        tracing::error!(event_id = %event.id, source = %event.source, "event of an unknown source");
        return;
    };
    let started = Instant::now();
    let lease = state.config.webhooks.dispatch_lease;
    // Renew the lease while the agent runs, so no other worker takes the event meanwhile.
    // If renewals keep failing until the lease is gone, stop: another worker may take the event,
    // and this one must not go on running the agent for it.
    let heartbeat = async {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(lease / 3).await;
            match store::renew_lease(&state.dispatcher.queue_db, event.id, owner, lease.as_secs_f64()).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    tracing::warn!(event_id = %event.id, "lost the lease of an event being dispatched");
                    return;
                }
                Err(e) if renewed.elapsed() + lease / 3 >= lease => {
                    tracing::warn!(event_id = %event.id, error = %e, "cannot renew the lease before it expires; abandoning");
                    return;
                }
                Err(e) => tracing::warn!(event_id = %event.id, error = %e, "renewing a lease failed"),
            }
        }
    };
    let result = tokio::select! {
        result = dispatch(state, source, &event) => result,
        () = heartbeat => Dispatched::Failed("lost the lease while dispatching".into(), None),
    };
    let label = source.as_str();
    let correlation = event.id.to_string();
    let finished = |status: &str| {
        state
            .metrics
            .webhook_dispatch_attempts_total
            .with_label_values(&[label, status])
            .inc();
        observe_latency(state, label, &event);
    };
    let outcome = match result {
        Dispatched::Delivered { org, team, result } => {
            finished("delivered");
            OutcomeRow {
                org_id: Some(org),
                team_node_id: Some(team),
                correlation_id: Some(correlation),
                agent_result: Some(result),
                ..OutcomeRow::new(event.id, owner, "delivered")
            }
        }
        Dispatched::Skipped(reason) => {
            finished("skipped");
            OutcomeRow {
                skip_reason: Some(reason),
                ..OutcomeRow::new(event.id, owner, "skipped")
            }
        }
        Dispatched::Unrouted(reason) => {
            finished("unrouted");
            OutcomeRow {
                last_error: Some(reason),
                ..OutcomeRow::new(event.id, owner, "unrouted")
            }
        }
        Dispatched::Failed(error, team) => failure(state, owner, source, &event, error, team),
    };
    let write = if outcome.status == "dead_letter" {
        record_dead_letter(state, source, &event, outcome).await
    } else {
        state
            .dispatcher
            .outcomes
            .submit(outcome)
            .await
            .map_err(|e| e.to_string())
    };
    match write {
        Ok(true) => {}
        Ok(false) => tracing::warn!(event_id = %event.id, "the event's lease moved on before its outcome was written"),
        Err(error) => {
            tracing::error!(event_id = %event.id, %error, "writing a dispatch outcome failed; the lease will expire and it is retried")
        }
    }
    tracing::debug!(event_id = %event.id, source = label, elapsed_ms = started.elapsed().as_millis() as u64, "dispatched");
}

fn observe_latency(state: &AppState, source: &str, event: &ClaimedEvent) {
    let age = (Utc::now() - event.received_at).num_milliseconds().max(0) as f64 / 1000.0;
    state
        .metrics
        .webhook_dispatch_latency_seconds
        .with_label_values(&[source])
        .observe(age);
}

fn dispatch_policy(state: &AppState) -> RetryPolicy {
    let c = &state.config.webhooks;
    RetryPolicy {
        initial: c.retry_initial,
        multiplier: 2.0,
        max_delay: c.retry_max,
        max_attempts: c.dispatch_max_attempts,
        max_elapsed: c.dispatch_max_age,
    }
}

/// What a failed attempt leads to: another attempt after a backoff, or a dead letter.
fn failure(
    state: &AppState,
    owner: Uuid,
    source: Source,
    event: &ClaimedEvent,
    error: String,
    team: Option<(String, String)>,
) -> OutcomeRow {
    // Keep the routed team on failed events so its org admins can see and replay them.
    let (org_id, team_node_id) = team.unzip();
    let policy = dispatch_policy(state);
    let attempts = event.attempts.max(1) as u32;
    let delay = policy.delay(attempts, None);
    let age = (Utc::now() - event.received_at).to_std().unwrap_or_default();
    let label = source.as_str();
    if policy.allows_another(attempts, age, delay) {
        state
            .metrics
            .webhook_dispatch_attempts_total
            .with_label_values(&[label, "retry"])
            .inc();
        tracing::info!(event_id = %event.id, source = label, attempts, delay_ms = delay.as_millis() as u64, %error, "dispatch failed; will retry");
        return OutcomeRow {
            next_attempt_at: Some(Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or_default()),
            last_error: Some(error),
            org_id,
            team_node_id,
            ..OutcomeRow::new(event.id, owner, "pending")
        };
    }
    state
        .metrics
        .webhook_dispatch_attempts_total
        .with_label_values(&[label, "dead_letter"])
        .inc();
    observe_latency(state, label, event);
    tracing::error!(event_id = %event.id, source = label, attempts, %error, "dispatch gave up; event dead-lettered");
    OutcomeRow {
        last_error: Some(error),
        org_id,
        team_node_id,
        ..OutcomeRow::new(event.id, owner, "dead_letter")
    }
}

/// A dead letter and its audit row commit together (rare: not group-committed).
async fn record_dead_letter(
    state: &AppState,
    source: Source,
    event: &ClaimedEvent,
    outcome: OutcomeRow,
) -> Result<bool, String> {
    let write = async {
        let mut tx = state.dispatcher.queue_db.begin().await?;
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

async fn dispatch(state: &AppState, source: Source, event: &ClaimedEvent) -> Dispatched {
    let Some(body) = &event.body else {
        return Dispatched::Skipped("the body was purged".into());
    };
    let run = match sources::plan(source, &event.kind, body) {
        Plan::Skip(reason) => return Dispatched::Skipped(reason),
        Plan::Feedback(feedback) => {
            return match state.config_service.feedback(&feedback).await {
                Ok(()) => Dispatched::Delivered {
                    org: String::new(),
                    team: String::new(),
                    result: json!({"feedback": feedback["feedback"]}),
                },
                Err(e) => Dispatched::Failed(format!("forwarding feedback failed: {e}"), None),
            };
        }
        Plan::Run(run) => run,
    };
    let owner = match route(state, &run).await {
        Ok(Some(owner)) => owner,
        Ok(None) => return Dispatched::Unrouted(format!("no team owns {}={}", run.routing_key, run.routing_value)),
        Err(e) => return Dispatched::Failed(e, None),
    };
    let (org, team) = owner;
    match run_agent(state, source, event, &run, &org, &team).await {
        Ok(result) => Dispatched::Delivered { org, team, result },
        Err(e) => Dispatched::Failed(e, Some((org, team))),
    }
}

async fn route(state: &AppState, run: &RunPlan) -> Result<Option<(String, String)>, String> {
    let key = (run.routing_key.to_string(), run.routing_value.clone());
    let found = match state.dispatch_caches.routing(&key) {
        Some(found) => found,
        None => {
            let mut identifiers = serde_json::Map::new();
            identifiers.insert(run.routing_key.into(), Value::String(run.routing_value.clone()));
            let found = state
                .config_service
                .routing_lookup(&identifiers)
                .await
                .map_err(|e| format!("routing lookup failed: {e}"))?;
            state.dispatch_caches.remember_routing(key, found.clone());
            found
        }
    };
    Ok(match (found.found, found.org_id, found.team_node_id) {
        (true, Some(org), Some(team)) => Some((org, team)),
        _ => None,
    })
}

async fn team_access(state: &AppState, org: &str, team: &str) -> Result<TeamAccess, String> {
    let key = (org.to_string(), team.to_string());
    if let Some(access) = state.dispatch_caches.team(&key) {
        return Ok(access);
    }
    let admin = state
        .config
        .internal_admin_token
        .as_ref()
        .ok_or("ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set: cannot act for a team")?;
    let minted = state
        .config_service
        .impersonation_token(admin, org, team)
        .await
        .map_err(|e| format!("impersonation token: {e}"))?;
    let config = state
        .config_service
        .config_me(&minted.token)
        .await
        .map_err(|e| format!("team config: {e}"))?;
    let access = TeamAccess {
        token: minted.token,
        token_expires: minted
            .expires_at
            .unwrap_or_else(|| Utc::now() + chrono::TimeDelta::minutes(5)),
        config,
        config_fetched: Instant::now(),
    };
    state.dispatch_caches.remember_team(key, access.clone());
    Ok(access)
}

async fn run_agent(
    state: &AppState,
    source: Source,
    event: &ClaimedEvent,
    run: &RunPlan,
    org: &str,
    team: &str,
) -> Result<Value, String> {
    let access = team_access(state, org, team).await?;
    let agent_name = match access.config.get("entrance_agent").and_then(Value::as_str) {
        Some(name) if crate::clients::agent::is_agent_name(name) => name.to_string(),
        Some(_) => {
            tracing::warn!(
                org,
                team,
                "the team's entrance_agent is not a valid agent name; using the default"
            );
            DEFAULT_AGENT.to_string()
        }
        None => DEFAULT_AGENT.to_string(),
    };
    let dedicated = crate::provisioning::objects::trusted_dedicated_url(
        access
            .config
            .pointer("/agent/dedicated_service_url")
            .and_then(Value::as_str),
        org,
        team,
        &state.config.kubernetes.namespace,
    );
    let source_config = source_config(&state.config.webhooks, source);
    let correlation = event.id.to_string();
    let session_id = run.session_id.clone().unwrap_or_else(|| correlation.clone());
    let context = run.context(source, &session_id);
    let destinations = super::destinations::resolve(
        source,
        &run.reply_to,
        &access.config,
        run.destinations.as_deref(),
        state.config.slack_bot_token.as_ref().map(Secret::expose),
    );
    let request = AgentRequest {
        agent_name: &agent_name,
        message: &run.message,
        context: &context,
        timeout: source_config.agent_timeout,
        max_turns: source_config.agent_max_turns,
        correlation_id: &correlation,
        session_id: &session_id,
        output_destinations: Some(&destinations),
        trigger_source: source.as_str(),
        org_id: org,
        team_id: team,
        team_token: &access.token,
        base_url: dedicated.as_ref(),
    };
    let started = Instant::now();
    let result = state.agent.run(&request).await;
    state
        .metrics
        .agent_run_duration_seconds
        .with_label_values(&[source.as_str()])
        .observe(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok(_) => "ok",
        Err(AgentError::Timeout(_)) => "timeout",
        Err(AgentError::Failed(_)) => "failed",
        Err(AgentError::Upstream(_)) => "upstream_error",
    };
    state
        .metrics
        .agent_runs_total
        .with_label_values(&[source.as_str(), outcome])
        .inc();
    match result {
        Ok(answer) => Ok(json!({
            "success": answer.success,
            "agent_name": agent_name,
            "output": bounded(answer.output),
        })),
        Err(e) => {
            if matches!(&e, AgentError::Upstream(n) if n.status() == Some(401) || n.status() == Some(403)) {
                // The impersonation token may have been revoked: mint a new one next time.
                state.dispatch_caches.forget_team(&(org.to_string(), team.to_string()));
            }
            Err(format!("agent run failed: {e}"))
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

/// Samples the inbox depth for the gauge and applies retention, on every replica (cheap, and
/// idempotent). The open statuses are counted every tick from their partial indexes; every status,
/// which reads the whole retained history, once an hour with retention.
pub async fn housekeeping(state: AppState, stop: CancellationToken) {
    let mut ticks: u64 = 0;
    loop {
        let hourly = ticks % 240 == 0;
        let (counts, statuses): (_, &[&str]) = if hourly {
            (store::counts_by_status(&state.db).await, &store::STATUSES)
        } else {
            (store::open_counts(&state.db).await, &store::OPEN_STATUSES)
        };
        match counts {
            Ok(counts) => {
                for status in statuses {
                    let n = counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
                    state.metrics.webhook_inbox_events.with_label_values(&[status]).set(n);
                }
            }
            Err(e) => tracing::debug!(error = %e, "sampling the inbox failed"),
        }
        if hourly {
            let c = &state.config.webhooks;
            // Batches of at most PURGE_BATCH rows keep each statement short; loop until one is short.
            loop {
                match store::purge(&state.db, c.retention_days, c.dedupe_days.max(7)).await {
                    Ok((events, deliveries)) => {
                        if events + deliveries > 0 {
                            tracing::info!(events, deliveries, "webhook retention purged old rows");
                        }
                        if (events < store::PURGE_BATCH && deliveries < store::PURGE_BATCH) || stop.is_cancelled() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook retention failed");
                        break;
                    }
                }
            }
            state.webhook_rate_limits.shrink();
        }
        ticks += 1;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
    }
}
