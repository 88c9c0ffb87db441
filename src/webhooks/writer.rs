//! Group commit: concurrent writes of one kind are stored together, one statement and one commit
//! per batch, and each caller is answered only once its own row is committed. Under load this
//! turns thousands of single-row commits into a few hundred batches; idle, a batch is one row and
//! adds no delay (nothing waits for a timer).
//!
//! Two writers use it: the inbox (every accepted delivery) and the dispatch outcomes (every
//! finished attempt).

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot, Semaphore};

use uuid::Uuid;

use super::dispatch::HandOff;
use super::store::{self, ClaimedEvent, Inserted, NewEvent, OutcomeRow};
use crate::db::HeldConnections;
use crate::error::is_database_unavailable;

/// Rows in one statement at most.
const MAX_BATCH: usize = 256;
/// Inbox batches being written at once. One: while a batch commits, the next one gathers every
/// delivery that arrives meanwhile, so under load each commit carries as many as it can (measured
/// with `scripts/bench ingest`: 0.2 to 0.3 Postgres transactions per delivery and 60 to 64% of the
/// pgbench ceiling, against 0.4 to 0.5 and 44 to 54% with two or four in flight). The price: a
/// slow batch (a refused row makes its batch retry row by row) holds up the ones behind it.
const INBOX_IN_FLIGHT: usize = 1;
/// Outcome batches being written at once. One, as for the inbox: no worker waits for its
/// outcome's commit (it moves on under its lease), so one batch gathering while the other
/// commits only halves the batches and doubles their flushed commits.
const OUTCOMES_IN_FLIGHT: usize = 1;
const QUEUE: usize = 10_000;

/// How one kind of row is written: a batch in one statement, results in the order of the items.
pub trait Batch<T, R>: Send + Sync + 'static {
    fn write<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        items: &'a [T],
    ) -> BoxFuture<'a, Result<Vec<R>, sqlx::Error>>;
}

#[derive(Debug, thiserror::Error)]
#[error("the write could not be committed: {0}")]
pub struct WriteError(String);

struct Pending<T, R> {
    item: T,
    reply: oneshot::Sender<Result<R, WriteError>>,
}

/// A cheap handle; the writer task lives as long as any handle does.
pub struct GroupCommit<T, R> {
    queue: mpsc::Sender<Pending<T, R>>,
    connections: Arc<HeldConnections>,
}

impl<T, R> Clone for GroupCommit<T, R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            connections: self.connections.clone(),
        }
    }
}

/// Stores accepted deliveries; `Ok` means committed (or known to be a duplicate).
pub type InboxWriter = GroupCommit<NewEvent, Inserted>;
/// Records dispatch outcomes; `Ok(false)` means the lease had moved on and nothing was written.
pub type OutcomeWriter = GroupCommit<OutcomeRow, bool>;

impl InboxWriter {
    /// Events this replica's dispatch has room for are stored leased and handed to it
    /// ([`HandOff`]): they cost no claim. After a batch that stored others, this replica's claim
    /// loop is woken, and the dispatchers of other replicas are told with a NOTIFY of their own.
    pub fn inbox(pool: PgPool, hand_off: HandOff) -> Self {
        let announce = announcer(pool.clone());
        Self::spawn(pool, Arc::new(Inbox { hand_off, announce }), INBOX_IN_FLIGHT)
    }
}

struct Inbox {
    hand_off: HandOff,
    announce: mpsc::Sender<()>,
}

impl Batch<NewEvent, Inserted> for Inbox {
    fn write<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        events: &'a [NewEvent],
    ) -> BoxFuture<'a, Result<Vec<Inserted>, sqlx::Error>> {
        Box::pin(async move {
            let offered = self.hand_off.reserve(events.len());
            let leases: Vec<Option<Uuid>> = (0..events.len()).map(|i| (i < offered).then(Uuid::new_v4)).collect();
            let results = store::insert_events(connection, events, &leases, self.hand_off.lease_seconds()).await;
            let Ok(inserted) = &results else {
                // Committed after all (the answer was lost)? Its leases expire and a claim takes it.
                self.hand_off.deliver(offered, Vec::new());
                return results;
            };
            let mut handed = Vec::new();
            let mut unclaimed = false;
            for (event, result) in events.iter().zip(inserted) {
                match *result {
                    Inserted::Leased { id, lease, received_at } => handed.push(ClaimedEvent {
                        id,
                        lease,
                        source: event.source.clone(),
                        kind: event.kind.clone(),
                        delivery_id: event.delivery_id.clone(),
                        headers: event.headers.clone(),
                        body: Some(event.body.clone()),
                        received_at,
                        attempts: 1,
                        ordering_key: event.ordering_key.clone(),
                        fair_tag: event.fair_tag,
                    }),
                    Inserted::New(_) => unclaimed = true,
                    Inserted::Duplicate(_) => {}
                }
            }
            self.hand_off.deliver(offered, handed);
            if unclaimed {
                self.hand_off.stored_unclaimed();
                // Full means a NOTIFY is already due, which covers this batch too.
                let _ = self.announce.try_send(());
            }
            results
        })
    }
}

/// Tells every replica's dispatcher that events were stored: one NOTIFY transaction at a time and
/// at most one per ANNOUNCE_SPACING, however many batches commit meanwhile. Not in the batch's own
/// transaction: a NOTIFY makes its transaction commit under a database-wide lock held until the
/// commit is flushed, so batches carrying one would commit one at a time. A NOTIFY lost to a crash
/// only delays other replicas until their next poll.
fn announcer(pool: PgPool) -> mpsc::Sender<()> {
    let (announce, mut requests) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        while requests.recv().await.is_some() {
            if let Err(e) = store::notify(&pool).await {
                tracing::debug!(error = %e, "notifying other replicas of new webhook events failed; they poll");
            }
            // Each NOTIFY is a commit of its own; under load one per batch would double the commits.
            tokio::time::sleep(ANNOUNCE_SPACING).await;
        }
    });
    announce
}

/// Other replicas hear of new events at most this much later than this replica's own dispatcher.
const ANNOUNCE_SPACING: std::time::Duration = std::time::Duration::from_millis(10);

impl OutcomeWriter {
    pub fn outcomes(pool: PgPool) -> Self {
        Self::spawn(pool, Arc::new(Outcomes), OUTCOMES_IN_FLIGHT)
    }
}

struct Outcomes;

impl Batch<OutcomeRow, bool> for Outcomes {
    fn write<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        rows: &'a [OutcomeRow],
    ) -> BoxFuture<'a, Result<Vec<bool>, sqlx::Error>> {
        // One statement, committed on its own: BEGIN, SET LOCAL and COMMIT around it were three
        // more round trips per batch.
        Box::pin(store::record_outcomes(connection, rows))
    }
}

impl<T: Send + Sync + 'static, R: Send + 'static> GroupCommit<T, R> {
    pub fn spawn(pool: PgPool, batch: Arc<dyn Batch<T, R>>, in_flight: usize) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        // A connection the pool takes back is pinged there: a round trip per batch, as many as
        // the batches themselves. Each batch in flight keeps its connection instead.
        let connections = Arc::new(HeldConnections::new(pool, in_flight));
        tokio::spawn(collect(connections.clone(), batch, receiver, in_flight));
        Self { queue, connections }
    }

    /// Gives the writer's connections back to its pool before the pool closes (see
    /// [`HeldConnections::release`]); a batch written after it returns its connection at once.
    pub fn release_connections(&self) {
        self.connections.release();
    }

    /// Returns when the item's batch is committed.
    pub async fn submit(&self, item: T) -> Result<R, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { item, reply })
            .await
            .map_err(|_| WriteError("the writer stopped".into()))?;
        answer
            .await
            .map_err(|_| WriteError("the writer dropped the write".into()))?
    }
}

async fn collect<T: Send + Sync + 'static, R: Send + 'static>(
    connections: Arc<HeldConnections>,
    batch_writer: Arc<dyn Batch<T, R>>,
    mut receiver: mpsc::Receiver<Pending<T, R>>,
    in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Wait for the first row, then take whatever else is already queued: no timer, so an
        // idle service writes a single row at once.
        let Some(first) = receiver.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let connections = connections.clone();
        let batch_writer = batch_writer.clone();
        tokio::spawn(async move {
            write_batch(&connections, &*batch_writer, batch).await;
            drop(slot);
        });
    }
}

/// Writes `items` on a held connection, kept for the next batch only if the write succeeded (a
/// failed one goes back to the pool, which checks it).
async fn write_on_held<T: Send + Sync + 'static, R: Send + 'static>(
    connections: &HeldConnections,
    writer: &dyn Batch<T, R>,
    items: &[T],
) -> Result<Vec<R>, sqlx::Error> {
    let mut connection = connections.take().await?;
    let written = writer.write(&mut connection, items).await;
    if written.is_ok() {
        connection.keep();
    }
    written
}

async fn write_batch<T: Send + Sync + 'static, R: Send + 'static>(
    connections: &HeldConnections,
    writer: &dyn Batch<T, R>,
    batch: Vec<Pending<T, R>>,
) {
    let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().map(|p| (p.item, p.reply)).unzip();
    match write_on_held(connections, writer, &items).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) if is_database_unavailable(&e) || items.len() == 1 => {
            tracing::warn!(error = %e, rows = items.len(), "a group-committed write failed");
            for reply in replies {
                let _ = reply.send(Err(WriteError(e.to_string())));
            }
        }
        Err(e) => {
            // One row the database refuses must not fail its neighbours: write them one by one.
            tracing::warn!(error = %e, rows = items.len(), "a batch failed; writing its rows one by one");
            for (item, reply) in items.iter().zip(replies) {
                let result = write_on_held(connections, writer, std::slice::from_ref(item))
                    .await
                    .map_err(|e| WriteError(e.to_string()))
                    .and_then(|mut r| r.pop().ok_or_else(|| WriteError("no result for the row".into())));
                let _ = reply.send(result);
            }
        }
    }
}
