//! Inbox depth for the gauge, retention, and the rate limiters' key space: cheap, idempotent, on
//! every replica.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::webhooks::ingress::RateLimits;
use crate::webhooks::store;

/// Exactly what housekeeping uses.
#[derive(Clone)]
pub struct Housekeeping {
    pub db: PgPool,
    pub metrics: Arc<Metrics>,
    pub rate_limits: RateLimits,
    pub retention_days: u32,
    pub dedupe_days: u32,
}

/// Ticks of 15 s in an hour.
const TICKS_PER_HOUR: u64 = 240;

/// The open statuses are counted every tick from their partial indexes; every status, which reads
/// the whole retained history, once an hour with retention.
pub async fn run(work: Housekeeping, stop: CancellationToken) {
    let mut ticks: u64 = 0;
    loop {
        let hourly = ticks % TICKS_PER_HOUR == 0;
        let counts = if hourly {
            store::counts_by_status(&work.db).await
        } else {
            store::open_counts(&work.db).await
        };
        match counts {
            Ok(counts) => {
                let shown = store::shown_statuses();
                // The open ones come first; the others are counted only hourly.
                let sampled = if hourly { &shown[..] } else { &shown[..2] };
                for status in sampled {
                    let n = counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
                    work.metrics.webhook_inbox_events.with_label_values(&[status]).set(n);
                }
            }
            Err(e) => tracing::debug!(error = %e, "sampling the inbox failed"),
        }
        if hourly {
            // Batches of at most PURGE_BATCH rows keep each statement short; loop until one is short.
            loop {
                match store::purge(&work.db, work.retention_days, work.dedupe_days.max(7)).await {
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
            work.rate_limits.shrink();
        }
        ticks += 1;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
    }
}
