//! Dispatch workers: claim inbox events, find the owning team, run its agent, record the outcome.
//! Every replica runs one dispatcher; Postgres arbitrates (SKIP LOCKED claims with a lease).

mod caches;
mod decision;
mod housekeeping;
mod priority;
mod process;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

pub use caches::DispatchCaches;

pub use housekeeping::{run as housekeeping, Housekeeping};

use super::signature::Source;
use super::store;
use super::writer::OutcomeWriter;
use crate::clients::agent::AgentClient;
use crate::clients::config_service::ConfigServiceClient;
use crate::config::{Secret, WebhookConfig};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;

/// How long a dispatcher with some workers still busy waits for more to free up before claiming.
const CLAIM_GATHER: Duration = Duration::from_millis(5);

/// What dispatch is configured with.
pub struct DispatchSettings {
    pub workers: usize,
    pub nice: u32,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    /// The agent's timeout and turn limit per source.
    sources: [(Source, AgentLimits); 4],
    /// Where dedicated agents live (their URLs are trusted only in this namespace).
    pub namespace: String,
    /// What dispatch acts for teams with; without it no event can reach an agent.
    pub internal_admin_token: Option<Secret>,
    /// For the Slack destinations of teams whose config names no bot token.
    pub slack_bot_token: Option<Secret>,
}

#[derive(Clone, Copy)]
pub struct AgentLimits {
    pub timeout: Duration,
    pub max_turns: u32,
}

impl DispatchSettings {
    pub fn new(
        webhooks: &WebhookConfig,
        namespace: &str,
        internal_admin_token: Option<Secret>,
        slack_bot_token: Option<Secret>,
    ) -> Self {
        let limits = |source: Source| {
            let config = super::ingress::source_config(webhooks, source);
            (
                source,
                AgentLimits {
                    timeout: config.agent_timeout,
                    max_turns: config.agent_max_turns,
                },
            )
        };
        Self {
            workers: webhooks.dispatch_workers,
            nice: webhooks.dispatch_nice,
            lease: webhooks.dispatch_lease,
            poll_interval: webhooks.dispatch_poll_interval,
            retry: RetryPolicy {
                initial: webhooks.retry_initial,
                multiplier: 2.0,
                max_delay: webhooks.retry_max,
                max_attempts: webhooks.dispatch_max_attempts,
                max_elapsed: webhooks.dispatch_max_age,
            },
            sources: Source::ALL.map(limits),
            namespace: namespace.to_string(),
            internal_admin_token,
            slack_bot_token,
        }
    }

    pub fn limits(&self, source: Source) -> AgentLimits {
        self.sources
            .iter()
            .find(|(s, _)| *s == source)
            .map(|(_, limits)| *limits)
            .unwrap_or(AgentLimits {
                timeout: Duration::from_secs(300),
                max_turns: 50,
            })
    }
}

/// Exactly what dispatch uses: its pools, its neighbours, its caches, its workers and what wakes
/// its claim loop.
pub struct Dispatcher {
    workers: Arc<Semaphore>,
    /// Events may be due: stored here, or announced by another replica.
    queued: Arc<Notify>,
    /// A worker is free again.
    freed: Notify,
    /// Outcomes of concurrent dispatches share a commit, as deliveries do at ingress.
    outcomes: OutcomeWriter,
    /// Claims, outcomes and lease renewals run here, with their plans pinned ([`crate::db::queue_pool`]).
    queue_db: PgPool,
    /// Where the LISTEN connection comes from.
    listen_db: PgPool,
    settings: DispatchSettings,
    config_service: ConfigServiceClient,
    agent: AgentClient,
    caches: DispatchCaches,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    pub fn new(
        queue_db: PgPool,
        listen_db: PgPool,
        settings: DispatchSettings,
        config_service: ConfigServiceClient,
        agent: AgentClient,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            workers: Arc::new(Semaphore::new(settings.workers)),
            queued: Arc::new(Notify::new()),
            freed: Notify::new(),
            outcomes: OutcomeWriter::outcomes(queue_db.clone()),
            queue_db,
            listen_db,
            settings,
            config_service,
            agent,
            caches: DispatchCaches::default(),
            metrics,
        }
    }

    /// What wakes the claim loop when this replica stores events.
    pub fn wake_on_store(&self) -> Arc<Notify> {
        self.queued.clone()
    }

    /// Closes the queue pool once the dispatcher has stopped.
    pub async fn close(&self) {
        self.queue_db.close().await;
    }
}

/// Runs the claim loop on threads of their own, `ORCHESTRATOR_DISPATCH_NICE` below request
/// handling ([`priority::run_at_lower_priority`]).
pub async fn run_at_lower_priority(dispatcher: Arc<Dispatcher>, stop: CancellationToken) {
    let nice = dispatcher.settings.nice;
    priority::run_at_lower_priority(nice, move |stop| run(dispatcher, stop), stop).await;
}

/// The claim loop of this replica: claims as many due events as it has free workers, whenever
/// events may be due (stored here, announced by another replica, or the poll interval passed) and
/// a worker is free. A worker that finishes leads to a claim only if the last claim suggested more
/// were waiting: an empty claim costs a plan, a commit and a round trip.
pub async fn run(dispatcher: Arc<Dispatcher>, stop: CancellationToken) {
    let total = dispatcher.settings.workers;
    let claim_batch = (total / 4).max(1);
    tokio::spawn(listen(
        dispatcher.listen_db.clone(),
        dispatcher.queued.clone(),
        stop.clone(),
    ));
    let lease_secs = dispatcher.settings.lease.as_secs_f64();
    // At start-up, events left by a previous process may be due.
    let mut maybe_due = true;

    loop {
        if stop.is_cancelled() {
            break;
        }
        let workers = &dispatcher.workers;
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
                        let dispatcher = dispatcher.clone();
                        tokio::spawn(async move {
                            process::process(&dispatcher, event).await;
                            drop(permit);
                            dispatcher.freed.notify_one();
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
            () = tokio::time::sleep(dispatcher.settings.poll_interval) => maybe_due = true,
        }
    }
    // Let running dispatches finish within the lease; what does not is taken over after it.
    let _ = tokio::time::timeout(Duration::from_secs(10), dispatcher.workers.acquire_many(total as u32)).await;
}

/// LISTEN for new events; reconnects with a pause when the connection drops.
async fn listen(db: PgPool, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&db).await?;
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
