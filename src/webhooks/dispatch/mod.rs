//! Dispatch workers: claim inbox events, find the owning team, run its agent, record the outcome.
//! Every replica runs one dispatcher; Postgres arbitrates (SKIP LOCKED claims with a lease).

mod caches;
mod decision;
mod housekeeping;
mod priority;
mod process;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

pub use caches::DispatchCaches;

pub use housekeeping::{run as housekeeping, Housekeeping};

use super::fairness::FairShares;
use super::signature::Source;
use super::store::{self, ClaimedEvent};
use super::writer::OutcomeWriter;
use crate::clients::agent::AgentClient;
use crate::clients::config_service::ConfigServiceClient;
use crate::config::{Secret, WebhookConfig};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;

/// How long a dispatcher with some workers still busy waits for more to free up before claiming.
/// Each claim costs a plan, a commit and a round trip; with events claimed ahead
/// ([`PREFETCH_HORIZON`]) workers do not wait for it.
const CLAIM_GATHER: Duration = Duration::from_millis(2);

/// Events are claimed ahead of free workers for about this long of dispatch at the recent rate,
/// so that a worker that finishes takes its next event at once instead of waiting for the claim
/// loop's round trip. With an instant agent, `scripts/bench pipeline` measured the wait for the
/// claim loop at about 10 ms of each 14 ms dispatch, and the whole path at 0.22 to 0.28 of the
/// pgbench ceiling. With agent runs of seconds the rate is low and nothing is claimed ahead: an
/// event waiting here would be waiting for a worker while another replica has one free.
const PREFETCH_HORIZON: Duration = Duration::from_millis(10);

/// How far behind the claim loop's floor lags where this replica's dispatch has reached
/// ([`ClaimScan`]): an event is tagged no lower than dispatch had reached when it arrived, and is
/// stored within milliseconds of it (ack p99 17 ms at 3,300 deliveries a second).
const FLOOR_LAG: Duration = Duration::from_millis(100);

/// While claiming, one claim at least this often walks the fair index from its start
/// ([`ClaimScan`]): how long an event below the floor waits for a claim that can see it.
const FULL_SCAN_EVERY: Duration = Duration::from_millis(200);

/// A full scan is followed by floored claims for at least this many times as long as it took, so
/// that full scans take at most about 5% of the claim loop's time however slow they become. Each
/// full scan walks every entry a vacuum has not removed yet, and an entry is skipped cheaply only
/// once no snapshot can see its row: while a long statement holds the oldest snapshot back, each
/// one means a visit to the table. Measured under `scripts/bench pipeline` with a full scan every
/// 200 ms whatever it cost: claims of 456 ms each (reading the table from disk), every one of them
/// a full scan since the last was more than 200 ms before, and dispatch fell to 984 a second
/// against 4,141 deliveries accepted.
const FULL_SCAN_SPACING: u32 = 20;

/// Workers beyond `ORCHESTRATOR_DISPATCH_WORKERS`, as a share of them, for events of senders within
/// their fair share while every worker is busy (a flood): such an event starts at once instead of
/// waiting for a worker to finish. Measured with `scripts/bench fairness`: without them, the quiet
/// teams' p95 wait went from 1.65 ms alone to 108 ms beside a flood (fair claiming, on a saturated
/// machine), because an event that claims first still waits for the next worker to finish.
const EXPRESS_SHARE: usize = 4;

/// How many express workers a replica with `workers` workers has.
fn express_workers(workers: usize) -> usize {
    (workers / EXPRESS_SHARE).max(1)
}

/// Outcomes a replica may have waiting to be written, per worker: a worker moves on once its
/// agent has answered, and waits only when the database falls this far behind.
const OUTCOMES_WAITING_PER_WORKER: usize = 4;

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
    leases: LeaseKeeper,
    /// The earliest retry this replica scheduled since its claim loop last looked: the loop
    /// wakes for it without asking the database.
    next_retry: Mutex<Option<tokio::time::Instant>>,
    /// Claimed events no worker has started yet, lowest fair-share tag first (their leases are
    /// renewed like the others). A quiet sender's event claimed after a flood's goes first.
    ready: Mutex<BinaryHeap<Reverse<Waiting>>>,
    /// Dispatches finished, for the rate that sizes how far ahead to claim.
    finished: AtomicU64,
    /// Outcomes waiting to be written, at most [`OUTCOMES_WAITING_PER_WORKER`] per worker.
    outcome_writes: Arc<Semaphore>,
    /// Extra workers for senders within their share while all workers are busy ([`EXPRESS_SHARE`]).
    express: Arc<Semaphore>,
    /// Learns from each claim how far dispatch has got.
    fair_shares: Arc<FairShares>,
    /// Events stored leased for this replica ([`HandOff`]) that the claim loop has not taken yet.
    handed: Mutex<Vec<ClaimedEvent>>,
    /// Wakes the claim loop for them.
    handed_in: Notify,
    /// Room promised to the inbox writer and not given back or taken by the claim loop yet.
    reserved: AtomicUsize,
    /// How many events the claim loop last meant to keep claimed ahead ([`ClaimAhead`]).
    ahead_target: AtomicUsize,
    /// Off once the claim loop stops: nothing more is handed to it.
    taking_hand_offs: AtomicBool,
    /// The claim loop's last look found nothing else due, and nothing was stored unleased since:
    /// only then are new events handed over, so that they never overtake a backlog in fair order.
    nothing_due: AtomicBool,
    /// The claim loop's last look found events due that the claim just before it did not get:
    /// they wait behind an earlier event of their conversation (or were stored since, which wakes
    /// the loop anyway). An outcome of an event with a conversation then wakes it (`unblocked`)
    /// to claim again: not a claim and a look per millisecond while a thread's first event runs.
    waiting_behind: AtomicBool,
    unblocked: Notify,
}

/// A claimed event waiting for a worker, ordered by its fair-share tag, then by arrival.
struct Waiting(ClaimedEvent);

impl Waiting {
    fn order(&self) -> (i64, chrono::DateTime<chrono::Utc>, uuid::Uuid) {
        (self.0.fair_tag, self.0.received_at, self.0.id)
    }
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Waiting {}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

/// Gives events the inbox writer has just stored straight to this replica's dispatch while it has
/// room for them: stored with a lease, as if claimed in the same statement, they cost no claim (a
/// plan, a walk of the fair index, an update and a commit per batch: about a third of Postgres'
/// time per event in `scripts/bench pipeline`). Only while nothing else is due: with a backlog
/// (or without room: every worker busy and enough claimed ahead) events are stored unleased and
/// claimed in fair-share order, so a flood still waits for itself (`scripts/bench fairness`
/// measured a quiet team's p95 at 983 ms beside a flood when a freed worker went to whichever
/// delivery arrived next). A replica that dies holding them leaves leases that expire.
#[derive(Clone)]
pub struct HandOff {
    dispatcher: Arc<Dispatcher>,
}

impl HandOff {
    /// Promises room for up to `wanted` events; every promise is settled with [`Self::deliver`].
    pub fn reserve(&self, wanted: usize) -> usize {
        let dispatcher = &self.dispatcher;
        if !dispatcher.taking_hand_offs.load(Ordering::Relaxed) || !dispatcher.nothing_due.load(Ordering::Relaxed) {
            return 0;
        }
        let granted = dispatcher.room().min(wanted);
        if granted > 0 {
            dispatcher.reserved.fetch_add(granted, Ordering::Relaxed);
        }
        granted
    }

    /// The events stored leased out of `reserved` promised: the rest of the room is given back.
    pub fn deliver(&self, reserved: usize, events: Vec<ClaimedEvent>) {
        let dispatcher = &self.dispatcher;
        dispatcher
            .reserved
            .fetch_sub(reserved.saturating_sub(events.len()), Ordering::Relaxed);
        if events.is_empty() {
            return;
        }
        dispatcher
            .handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(events);
        dispatcher.handed_in.notify_one();
    }

    /// Events were stored that dispatch has to claim: this replica's claim loop starts at once.
    pub fn stored_unclaimed(&self) {
        self.dispatcher.nothing_due.store(false, Ordering::Relaxed);
        self.dispatcher.queued.notify_one();
    }

    pub fn lease_seconds(&self) -> f64 {
        self.dispatcher.settings.lease.as_secs_f64()
    }
}

/// The leases this replica holds, renewed together: one statement every third of a lease,
/// however many events are being dispatched. A lease that could not be renewed is signalled to
/// its dispatch, which stops (another replica may have taken the event over).
/// Each held lease's event id, its lease token and what tells its dispatch the lease was lost.
type HeldLeases = Arc<Mutex<HashMap<uuid::Uuid, (uuid::Uuid, Arc<Notify>)>>>;

#[derive(Default)]
struct LeaseKeeper {
    held: HeldLeases,
}

/// A lease held while its event is dispatched and its outcome written; dropping it stops its
/// renewal.
struct HeldLease {
    held: HeldLeases,
    id: uuid::Uuid,
    /// Notified when the lease is lost.
    lost: Arc<Notify>,
}

impl LeaseKeeper {
    /// Renews a claimed event's lease from now on.
    fn register(&self, id: uuid::Uuid, owner: uuid::Uuid) {
        self.lock().insert(id, (owner, Arc::new(Notify::new())));
    }

    /// The lease of a registered event, for its dispatch; `None` if it was lost while the event
    /// waited for a worker.
    fn hold(&self, id: uuid::Uuid) -> Option<HeldLease> {
        let lost = self.lock().get(&id)?.1.clone();
        Some(HeldLease {
            held: self.held.clone(),
            id,
            lost,
        })
    }

    fn forget(&self, id: uuid::Uuid) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, (uuid::Uuid, Arc<Notify>)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> Vec<(uuid::Uuid, uuid::Uuid)> {
        self.lock().iter().map(|(id, (owner, _))| (*id, *owner)).collect()
    }

    /// Signals the dispatches of these leases that they are lost.
    fn lose(&self, ids: impl IntoIterator<Item = uuid::Uuid>) {
        let mut held = self.lock();
        for id in ids {
            if let Some((_, lost)) = held.remove(&id) {
                lost.notify_one();
            }
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// Renews every held lease each third of a lease until `stop`. When renewals keep failing until
/// a lease would be gone, its dispatch is told to stop: another replica may take the event.
async fn keep_leases(dispatcher: Arc<Dispatcher>, stop: CancellationToken) {
    let lease = dispatcher.settings.lease;
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(lease / 3) => {}
        }
        let held = dispatcher.leases.snapshot();
        if held.is_empty() {
            renewed = Instant::now();
            continue;
        }
        match store::renew_leases(&dispatcher.queue_db, &held, lease.as_secs_f64()).await {
            Ok(lost) => {
                renewed = Instant::now();
                if !lost.is_empty() {
                    tracing::warn!(events = lost.len(), "lost the lease of events being dispatched");
                    dispatcher.leases.lose(lost);
                }
            }
            Err(e) if renewed.elapsed() + lease / 3 >= lease => {
                tracing::warn!(error = %e, "cannot renew the leases before they expire; abandoning those dispatches");
                dispatcher.leases.lose(held.into_iter().map(|l| l.0));
            }
            Err(e) => tracing::warn!(error = %e, "renewing leases failed"),
        }
    }
}

impl Dispatcher {
    pub fn new(
        queue_db: PgPool,
        listen_db: PgPool,
        settings: DispatchSettings,
        config_service: ConfigServiceClient,
        agent: AgentClient,
        metrics: Arc<Metrics>,
        fair_shares: Arc<FairShares>,
    ) -> Self {
        let outcome_writes = settings.workers * OUTCOMES_WAITING_PER_WORKER;
        let express = express_workers(settings.workers);
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
            leases: LeaseKeeper::default(),
            next_retry: Mutex::new(None),
            ready: Mutex::new(BinaryHeap::new()),
            finished: AtomicU64::new(0),
            outcome_writes: Arc::new(Semaphore::new(outcome_writes)),
            express: Arc::new(Semaphore::new(express)),
            fair_shares,
            handed: Mutex::new(Vec::new()),
            handed_in: Notify::new(),
            reserved: AtomicUsize::new(0),
            ahead_target: AtomicUsize::new(0),
            taking_hand_offs: AtomicBool::new(true),
            nothing_due: AtomicBool::new(false),
            waiting_behind: AtomicBool::new(false),
            unblocked: Notify::new(),
        }
    }

    /// Room for more events: free workers and what is claimed ahead for them, less the events
    /// waiting and those promised to the inbox writer.
    fn room(&self) -> usize {
        (self.workers.available_permits() + self.ahead_target.load(Ordering::Relaxed))
            .saturating_sub(self.ready().len() + self.reserved.load(Ordering::Relaxed))
    }

    /// Takes the events handed over since the last look: from now on they are this replica's
    /// claimed events like any other.
    fn take_handed(self: &Arc<Self>) {
        let handed = std::mem::take(&mut *self.handed.lock().unwrap_or_else(|p| p.into_inner()));
        if handed.is_empty() {
            return;
        }
        self.reserved.fetch_sub(handed.len(), Ordering::Relaxed);
        self.claimed(handed);
    }

    /// What the inbox writer hands new events over with.
    pub fn hand_off(self: &Arc<Self>) -> HandOff {
        HandOff {
            dispatcher: self.clone(),
        }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Reverse<Waiting>>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes claimed events: their leases are renewed from now on. While every worker is busy, an
    /// event of a sender within its share starts at once on an express worker; the others wait.
    fn claimed(self: &Arc<Self>, events: Vec<ClaimedEvent>) {
        let reached = self.fair_shares.reached();
        for event in events {
            self.leases.register(event.id, event.lease);
            if event.fair_tag <= reached && self.workers.available_permits() == 0 {
                if let Ok(permit) = self.express.clone().try_acquire_owned() {
                    self.start_express(event, permit);
                    continue;
                }
            }
            self.ready().push(Reverse(Waiting(event)));
        }
    }

    fn start_express(self: &Arc<Self>, event: ClaimedEvent, permit: tokio::sync::OwnedSemaphorePermit) {
        let dispatcher = self.clone();
        tokio::spawn(async move {
            process::process(&dispatcher, event).await;
            dispatcher.finished.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }

    /// The next event for a worker; fair shares learn how far dispatch has got.
    fn next_ready(&self) -> Option<ClaimedEvent> {
        let Reverse(Waiting(event)) = self.ready().pop()?;
        self.fair_shares.dispatched(event.fair_tag);
        Some(event)
    }

    /// Starts a worker for each waiting event while workers are free. A worker goes on with the
    /// next waiting event when it finishes, and so never waits for the claim loop.
    fn start_ready(self: &Arc<Self>) {
        loop {
            let Ok(permit) = self.workers.clone().try_acquire_owned() else {
                return;
            };
            let Some(first) = self.next_ready() else {
                return;
            };
            let dispatcher = self.clone();
            tokio::spawn(async move {
                let mut event = first;
                loop {
                    process::process(&dispatcher, event).await;
                    dispatcher.finished.fetch_add(1, Ordering::Relaxed);
                    let Some(next) = dispatcher.next_ready() else {
                        break;
                    };
                    // There is room to claim ahead again.
                    dispatcher.freed.notify_one();
                    event = next;
                }
                drop(permit);
                dispatcher.freed.notify_one();
            });
        }
    }

    /// While every worker is busy, starts events of senders within their fair share on the express
    /// workers: those tagged no further than dispatch has got.
    async fn claim_express(self: &Arc<Self>, lease_secs: f64, floor: i64) {
        let free = self.express.available_permits();
        if free == 0 {
            return;
        }
        let reached = self.fair_shares.reached();
        let events = match store::claim(&self.queue_db, free as i64, lease_secs, floor..=reached).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "claiming webhook events for the express workers failed");
                return;
            }
        };
        self.claimed(events);
    }

    /// Gives back the leases of events no worker started (at shutdown): another replica may take
    /// them at once instead of after their lease.
    async fn release_waiting(&self) {
        self.taking_hand_offs.store(false, Ordering::Relaxed);
        let mut waiting: Vec<ClaimedEvent> = self.ready().drain().map(|Reverse(Waiting(e))| e).collect();
        waiting.append(&mut self.handed.lock().unwrap_or_else(|p| p.into_inner()));
        if waiting.is_empty() {
            return;
        }
        let leases: Vec<(uuid::Uuid, uuid::Uuid)> = waiting.iter().map(|e| (e.id, e.lease)).collect();
        for (id, _) in &leases {
            self.leases.forget(*id);
        }
        if let Err(e) = store::release_leases(&self.queue_db, &leases).await {
            tracing::warn!(error = %e, events = leases.len(), "giving back unstarted events failed; they are taken over after their lease");
        }
    }

    /// A retry was scheduled `after` from now.
    fn retry_scheduled(&self, after: Duration) {
        let at = tokio::time::Instant::now() + after;
        let mut next = self.next_retry.lock().unwrap_or_else(|p| p.into_inner());
        *next = Some(next.map_or(at, |current| current.min(at)));
    }

    /// An event of a conversation was finished (or scheduled for a retry): the next event of its
    /// conversation may be claimable now.
    fn conversation_moved_on(&self) {
        if self.waiting_behind.swap(false, Ordering::Relaxed) {
            self.unblocked.notify_one();
        }
    }

    fn take_next_retry(&self) -> Option<tokio::time::Instant> {
        self.next_retry.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Closes the queue pool once the dispatcher has stopped (and the inbox writer, which
    /// writes there too, has given its connections back).
    pub async fn close(&self) {
        self.outcomes.release_connections();
        self.queue_db.close().await;
    }
}

/// Runs the claim loop on threads of their own, `ORCHESTRATOR_DISPATCH_NICE` below request
/// handling ([`priority::run_at_lower_priority`]).
pub async fn run_at_lower_priority(dispatcher: Arc<Dispatcher>, stop: CancellationToken) {
    let nice = dispatcher.settings.nice;
    priority::run_at_lower_priority(nice, move |stop| run(dispatcher, stop), stop).await;
}

/// The claim loop of this replica: claims due events for its free workers and a few ahead
/// ([`PREFETCH_HORIZON`]), whenever events may be due (stored here, announced by another replica,
/// or the poll interval passed) and there is room. A worker that finishes leads to a claim only if
/// the last claim suggested more were waiting: an empty claim costs a plan, a commit and a round
/// trip.
pub async fn run(dispatcher: Arc<Dispatcher>, stop: CancellationToken) {
    let total = dispatcher.settings.workers;
    let claim_batch = (total / 4).max(1);
    tokio::spawn(listen(
        dispatcher.listen_db.clone(),
        dispatcher.queued.clone(),
        stop.clone(),
    ));
    tokio::spawn(keep_leases(dispatcher.clone(), stop.clone()));
    if let Err(e) = dispatcher.fair_shares.catch_up(&dispatcher.queue_db).await {
        tracing::warn!(error = %e, "reading where dispatch is failed; fair shares learn it from the first claim");
    }
    let lease_secs = dispatcher.settings.lease.as_secs_f64();
    let mut ahead = ClaimAhead::new(total);
    let mut scan = ClaimScan::new();
    // At start-up, events left by a previous process may be due.
    let mut maybe_due = true;
    // With nothing due, when to look again (`next_claimable`), and whether that look is only a
    // check (one cheap read) or a claim.
    let mut recheck_at = tokio::time::Instant::now();
    let mut recheck = false;
    // The next look follows a claim that got fewer than it asked for: anything it finds due now
    // is waiting behind an earlier event of its conversation (or was stored since).
    let mut look_follows_claim = false;
    // Events were just stored: claim without gathering, so that a quiet sender's event goes out
    // with the next worker to finish even while a flood keeps every worker busy.
    let mut arrived = false;
    // A floored claim got less than it asked for: when to claim from the index's start, for
    // what may be claimable below the floor.
    let mut claim_whole_at: Option<tokio::time::Instant> = None;

    loop {
        if stop.is_cancelled() {
            break;
        }
        dispatcher.take_handed();
        dispatcher.start_ready();
        if arrived && maybe_due && dispatcher.workers.available_permits() == 0 {
            // New events while every worker is busy: those of senders within their share go at once.
            let from = scan.floored(dispatcher.fair_shares.reached());
            dispatcher.claim_express(lease_secs, from).await;
            arrived = false;
        }
        let room = |dispatcher: &Dispatcher, ahead: &mut ClaimAhead| {
            let target = ahead.target(dispatcher.finished.load(Ordering::Relaxed));
            dispatcher.ahead_target.store(target, Ordering::Relaxed);
            dispatcher.room()
        };
        let mut wanted = room(&dispatcher, &mut ahead);
        if maybe_due && !arrived && wanted > 0 && wanted < claim_batch && dispatcher.workers.available_permits() < total
        {
            // Others are still running: let a few more finish so one claim serves several. New
            // events end the wait: one from a sender within its share must not wait for it.
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(CLAIM_GATHER) => {}
                () = dispatcher.queued.notified() => {}
            }
            dispatcher.start_ready();
            wanted = room(&dispatcher, &mut ahead);
        }
        // This look found events due now: if the claim after it gets fewer than it asks for, the
        // rest wait behind their conversations, and looking again would only say so again.
        let mut looked_due_now = false;
        if recheck {
            recheck = false;
            // A look finds retries falling due and leases expiring: events below the floor.
            scan.scan_whole_next();
            let follows_claim = std::mem::take(&mut look_follows_claim);
            match store::next_claimable(&dispatcher.queue_db).await {
                Ok(next) => {
                    let (due_now, wait) = next_wait(next, chrono::Utc::now(), &dispatcher.settings);
                    recheck_at = tokio::time::Instant::now() + wait;
                    if due_now && follows_claim {
                        // Not claimable after all: claim again when a conversation moves on
                        // here, new events come, or after the poll interval.
                        maybe_due = false;
                        dispatcher.waiting_behind.store(true, Ordering::Relaxed);
                    } else {
                        maybe_due = due_now;
                        looked_due_now = due_now;
                        dispatcher.nothing_due.store(!due_now, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading when webhook events are due failed");
                    maybe_due = true;
                }
            }
        }
        let mut claimed_all = false;
        if maybe_due && wanted > 0 {
            arrived = false;
            let from = scan.next_from(dispatcher.fair_shares.reached());
            let started = Instant::now();
            let claim = store::claim(&dispatcher.queue_db, wanted as i64, lease_secs, from..=i64::MAX).await;
            if let Ok(events) = &claim {
                scan.claimed(from, started.elapsed(), events, wanted);
            }
            match claim {
                Ok(events) => {
                    // Fewer than asked for: nothing else is due right now; look again when
                    // something may be (a retry's time, a lease's expiry), at the latest after a
                    // lease (a replica that claims after this look leases for that long).
                    claimed_all = events.len() == wanted;
                    maybe_due = claimed_all;
                    dispatcher.nothing_due.store(!claimed_all, Ordering::Relaxed);
                    if !claimed_all {
                        if from > i64::MIN {
                            // Nothing more above the floor. What may be claimable below it waits
                            // for the next full scan (a look follows only if that one is short).
                            claim_whole_at = Some(scan.next_full_at());
                        } else if looked_due_now {
                            dispatcher.waiting_behind.store(true, Ordering::Relaxed);
                        } else {
                            recheck = true;
                            look_follows_claim = true;
                        }
                    }
                    dispatcher.claimed(events);
                    dispatcher.start_ready();
                }
                Err(e) => tracing::warn!(error = %e, "claiming webhook events failed"),
            }
        }
        if claimed_all {
            // There may be more due right now.
            tokio::task::yield_now().await;
            continue;
        }
        if recheck {
            // The look at when events are due comes first.
            continue;
        }
        if let Some(retry_at) = dispatcher.take_next_retry() {
            recheck_at = recheck_at.min(retry_at);
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = dispatcher.queued.notified() => {
                maybe_due = true;
                arrived = true;
                dispatcher.nothing_due.store(false, Ordering::Relaxed);
            }
            // Stored leased for this replica: started above, no claim needed.
            () = dispatcher.handed_in.notified() => {}
            // The conversation's next event is tagged where dispatch was when it arrived,
            // maybe below the floor.
            () = dispatcher.unblocked.notified() => {
                maybe_due = true;
                scan.scan_whole_next();
            }
            // Only worth a claim if events are waiting for a worker; a retry it scheduled
            // brings the next look forward.
            () = dispatcher.freed.notified() => {
                if let Some(retry_at) = dispatcher.take_next_retry() {
                    recheck_at = recheck_at.min(retry_at);
                }
            }
            () = tokio::time::sleep_until(recheck_at) => recheck = true,
            // The next claim walks the whole index: its time has come.
            () = sleep_until_some(claim_whole_at) => {
                claim_whole_at = None;
                maybe_due = true;
            }
        }
    }
    dispatcher.release_waiting().await;
    // Let running dispatches finish and their outcomes be written within the lease; what does not
    // is taken over after it.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _workers = dispatcher.workers.acquire_many(total as u32).await;
        let _express = dispatcher.express.acquire_many(express_workers(total) as u32).await;
        let _writes = dispatcher
            .outcome_writes
            .acquire_many((total * OUTCOMES_WAITING_PER_WORKER) as u32)
            .await;
    })
    .await;
}

/// Sleeps until `at`, or forever without it.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where a claim starts walking the fair index. Its start holds the entries of finished events
/// until a vacuum removes them (an outcome changes `status`, the partial index's condition, so the
/// row's old version leaves its entry behind), and autovacuum comes at most once a minute
/// (`autovacuum_naptime`), later the larger the table. Measured under `scripts/bench pipeline`:
/// after 110,000 to 136,000 events at 3,400 a second, a claim that found nothing read 357 to 495
/// index pages (1.0 to 1.9 ms); on a table of 200,000 events claims took 4.5 ms each, and a backlog
/// that formed at 3,300 a second could not drain once every event had to be claimed.
///
/// So a claim starts at a floor: where this replica's dispatch had reached [`FLOOR_LAG`] to twice
/// that ago. Every event this replica stored since is tagged above it (`fairness`). Below it, an
/// event may become claimable later: a retry falling due, a lease expiring or given back, the next
/// event of a conversation, another replica's event tagged behind this one's reach. A claim that
/// starts at the index's start finds those: the claim after each look at when events are due,
/// after a conversation moved on here, and every [`FULL_SCAN_EVERY`] while claiming (or
/// [`FULL_SCAN_SPACING`] times as long as the last one took, if longer). Where a claim got all it
/// asked for, the next one goes on from its highest tag if that is lower than the floor: a backlog
/// found below the floor (dispatch on this replica went past it with events handed over, or a full
/// scan found it) drains in cheap steps, not one full scan at a time.
struct ClaimScan {
    floor: i64,
    /// The highest tag of the last claim if it got all it asked for (`i64::MAX`: it did not).
    resume_at: i64,
    /// Where dispatch had reached at `sampled_at`: the next floor.
    candidate: i64,
    sampled_at: Instant,
    /// When the next claim walks the whole index (the claim loop's clock, which it sleeps on);
    /// `None`: the next one does.
    next_full: Option<tokio::time::Instant>,
}

impl ClaimScan {
    fn new() -> Self {
        Self {
            floor: i64::MIN,
            resume_at: i64::MAX,
            candidate: i64::MIN,
            sampled_at: Instant::now(),
            next_full: None,
        }
    }

    /// The floor, given where dispatch has reached now.
    fn floor(&mut self, reached: i64) -> i64 {
        if self.sampled_at.elapsed() >= FLOOR_LAG {
            self.floor = self.candidate;
            self.candidate = reached;
            self.sampled_at = Instant::now();
        }
        self.floor
    }

    /// Where a claim that does not walk the whole index starts.
    fn floored(&mut self, reached: i64) -> i64 {
        self.floor(reached).min(self.resume_at)
    }

    /// The lowest tag the next claim looks at: `i64::MIN` when a full scan is due.
    fn next_from(&mut self, reached: i64) -> i64 {
        let floored = self.floored(reached);
        let full_due = self.next_full.is_none_or(|at| tokio::time::Instant::now() >= at);
        if full_due {
            i64::MIN
        } else {
            floored
        }
    }

    /// A claim from `from`, which took `took`, got `events` of the `wanted`.
    fn claimed(&mut self, from: i64, took: Duration, events: &[ClaimedEvent], wanted: usize) {
        if from == i64::MIN {
            self.next_full = Some(tokio::time::Instant::now() + FULL_SCAN_EVERY.max(took * FULL_SCAN_SPACING));
        }
        self.resume_at = match events.iter().map(|e| e.fair_tag).max() {
            // Tags are per sender: another event may share the highest one, hence inclusive.
            Some(highest) if events.len() >= wanted => highest,
            _ => i64::MAX,
        };
    }

    fn scan_whole_next(&mut self) {
        self.next_full = None;
    }

    /// When the next full scan is due.
    fn next_full_at(&self) -> tokio::time::Instant {
        self.next_full.unwrap_or_else(tokio::time::Instant::now)
    }
}

/// How many events to claim ahead of free workers: about [`PREFETCH_HORIZON`] of dispatch at the
/// rate measured over the last few tens of milliseconds, at most as many as the workers. Once a
/// backlog forms every event goes through a claim, and a claim takes at most the free workers and
/// this many: capped at half the workers (16 of 32), claims averaged 17 to 20 events and the claim
/// loop barely kept up at 4,800 deliveries a second (`scripts/bench pipeline --rate 4800
/// --senders 64`: queued → dispatched p99 1.25 s and 0.50 s, one of two runs not bounded); at all
/// of them, 0.16 s and 0.09 s, both bounded, with 30% fewer claims.
struct ClaimAhead {
    most: usize,
    since: Instant,
    finished: u64,
    rate: f64,
}

impl ClaimAhead {
    /// The rate is measured over windows of at least this long.
    const WINDOW: Duration = Duration::from_millis(50);

    fn new(workers: usize) -> Self {
        Self {
            most: workers,
            since: Instant::now(),
            finished: 0,
            rate: 0.0,
        }
    }

    /// The events to keep claimed ahead, given how many dispatches have finished so far.
    fn target(&mut self, finished: u64) -> usize {
        let elapsed = self.since.elapsed();
        if elapsed >= Self::WINDOW {
            let latest = finished.saturating_sub(self.finished) as f64 / elapsed.as_secs_f64();
            // Half the weight to the latest window: a burst is followed within a few windows,
            // and so is its end.
            self.rate = (self.rate + latest) / 2.0;
            self.since = Instant::now();
            self.finished = finished;
        }
        ((self.rate * PREFETCH_HORIZON.as_secs_f64()).round() as usize).min(self.most)
    }
}

/// Whether to claim at once, and how long until the next look, given when an event may next be
/// claimed. Something claimable now that the last claim did not get is waiting behind an earlier
/// event of its conversation: look again after the poll interval, not in a loop. Nothing pending:
/// after a lease at most, which bounds the take-over of a lease claimed by a replica that died
/// since this look (the NOTIFY of new events wakes the loop sooner).
fn next_wait(
    next: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
    settings: &DispatchSettings,
) -> (bool, Duration) {
    let ceiling = settings.lease;
    match next {
        None => (false, ceiling),
        Some(at) if at <= now => (true, settings.poll_interval.min(ceiling)),
        Some(at) => (false, (at - now).to_std().unwrap_or_default().min(ceiling)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed_with_tags(tags: &[i64]) -> Vec<ClaimedEvent> {
        tags.iter()
            .map(|&fair_tag| ClaimedEvent {
                id: uuid::Uuid::new_v4(),
                lease: uuid::Uuid::new_v4(),
                source: "github".into(),
                kind: "pull_request".into(),
                delivery_id: fair_tag.to_string(),
                headers: serde_json::Value::Null,
                body: None,
                received_at: chrono::Utc::now(),
                attempts: 1,
                ordering_key: None,
                fair_tag,
            })
            .collect()
    }

    #[test]
    fn claims_start_where_dispatch_was_and_walk_the_whole_index_when_asked_or_after_a_while() {
        let mut scan = ClaimScan::new();
        // Nothing known yet: the first claim walks the whole index.
        assert_eq!(scan.next_from(10), i64::MIN);
        // A slow full scan (50 ms) that found nothing is followed by floored claims for a second.
        scan.claimed(i64::MIN, Duration::from_millis(50), &[], 4);
        std::thread::sleep(FLOOR_LAG);
        scan.next_from(20);
        std::thread::sleep(FLOOR_LAG);
        // The floor is where dispatch had reached one to two lags ago.
        assert_eq!(scan.next_from(30), 20);
        scan.claimed(20, Duration::from_millis(1), &claimed_with_tags(&[25]), 4);
        assert_eq!(scan.next_from(40), 20);
        // After a look at when events are due (a retry, an expired lease below the floor).
        scan.scan_whole_next();
        assert_eq!(scan.next_from(40), i64::MIN);
        // It found a backlog below the floor: the next claims go on from where it stopped.
        scan.claimed(i64::MIN, Duration::from_millis(1), &claimed_with_tags(&[3, 5, 4, 5]), 4);
        assert!(scan.next_full_at() > tokio::time::Instant::now() + FULL_SCAN_EVERY / 2);
        assert_eq!(scan.next_from(40), 5);
        scan.claimed(5, Duration::from_millis(1), &claimed_with_tags(&[5, 6, 8, 9]), 4);
        assert_eq!(scan.next_from(40), 9);
        assert_eq!(scan.floored(40), 9);
        // The backlog is drained: back to the floor.
        scan.claimed(9, Duration::from_millis(1), &claimed_with_tags(&[11]), 4);
        assert_eq!(scan.next_from(40), 20);
    }
}
