//! Group commit for the inbox: concurrent deliveries are stored together, one statement and one
//! commit per batch, and each request is answered only once its own row is committed. Under load
//! this turns thousands of single-row commits into a few hundred batches; idle, a batch is one
//! row and adds no delay (nothing waits for a timer).

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use super::store::{self, Inserted, NewEvent};
use crate::error::is_database_unavailable;

/// Rows in one statement at most.
const MAX_BATCH: usize = 256;
/// Batches being written at once: overlap one batch's commit with the next one's insert.
const IN_FLIGHT: usize = 4;
const QUEUE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
#[error("the inbox could not store the event: {0}")]
pub struct WriteError(String);

struct Pending {
    event: NewEvent,
    reply: oneshot::Sender<Result<Inserted, WriteError>>,
}

/// A cheap handle; the writer task lives as long as any handle does.
#[derive(Clone)]
pub struct InboxWriter {
    queue: mpsc::Sender<Pending>,
}

impl InboxWriter {
    /// `stored` is woken after every committed batch, so this replica's dispatcher starts at once.
    pub fn spawn(pool: PgPool, stored: Arc<Notify>) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(collect(pool, receiver, stored));
        Self { queue }
    }

    /// Stores one event; returns when it is committed (or known to be a duplicate).
    pub async fn insert(&self, event: NewEvent) -> Result<Inserted, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { event, reply })
            .await
            .map_err(|_| WriteError("the inbox writer stopped".into()))?;
        answer
            .await
            .map_err(|_| WriteError("the inbox writer dropped the event".into()))?
    }
}

async fn collect(pool: PgPool, mut receiver: mpsc::Receiver<Pending>, stored: Arc<Notify>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Wait for the first row, then take whatever else is already queued: no timer, so an
        // idle service writes a single delivery at once.
        let Some(first) = receiver.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        let stored = stored.clone();
        tokio::spawn(async move {
            write(&pool, batch).await;
            stored.notify_one();
            drop(slot);
        });
    }
}

async fn write(pool: &PgPool, batch: Vec<Pending>) {
    let (events, replies): (Vec<NewEvent>, Vec<_>) = batch.into_iter().map(|p| (p.event, p.reply)).unzip();
    match store::insert_events(pool, &events).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) if is_database_unavailable(&e) || events.len() == 1 => {
            tracing::warn!(error = %e, rows = events.len(), "storing webhook events failed");
            for reply in replies {
                let _ = reply.send(Err(WriteError(e.to_string())));
            }
        }
        Err(e) => {
            // One row the database refuses must not fail its neighbours: store them one by one.
            tracing::warn!(error = %e, rows = events.len(), "a webhook batch failed; storing its rows one by one");
            for (event, reply) in events.iter().zip(replies) {
                let result = store::insert_events(pool, std::slice::from_ref(event))
                    .await
                    .map(|mut r| r.remove(0))
                    .map_err(|e| WriteError(e.to_string()));
                let _ = reply.send(result);
            }
        }
    }
}
