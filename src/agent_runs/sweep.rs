//! Closes runs a crash left open (their closing never landed): every replica, every minute.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::run::{close_in_platform_audit, Closing};
use super::{store, AgentProxy};

pub async fn run(proxy: AgentProxy, stop: CancellationToken) {
    let grace = proxy.limits.max_timeout + Duration::from_secs(120);
    loop {
        match store::close_stale(&proxy.db, grace).await {
            Ok(orphans) => {
                let closing = Closing::failed("orphaned", "the process running it stopped before the run was closed");
                for (run_id, org) in orphans {
                    tracing::warn!(%run_id, "closed an agent run left open by a stopped process");
                    close_in_platform_audit(&proxy, run_id, &org, &closing).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "sweeping open agent runs failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}
