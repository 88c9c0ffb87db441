//! The resumer, in every replica: finds runs whose owner died (their lock is free) and resumes
//! them from the step they were in.

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::engine::{self, Engine, Execution};
use super::lock::TeamLock;
use super::store;
use crate::domain::RunStatus;

/// Subject the audit trail names for a run resumed by a replica.
const RESUMER: &str = "orchestrator-resumer";

pub async fn run(engine: Engine, stop: CancellationToken) {
    let interval = engine.settings.resume_interval;
    loop {
        if let Err(e) = resume_once(&engine).await {
            tracing::warn!(error = %e, "scanning for orphaned provisioning runs failed");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

pub async fn resume_once(engine: &Engine) -> Result<usize, sqlx::Error> {
    // A run touched within the last half interval is very likely alive; the lock decides anyway.
    let idle = engine.settings.resume_interval.as_secs_f64() / 2.0;
    let candidates = store::stale_running_runs(&engine.db, idle, 50).await?;
    let mut resumed = 0;
    for candidate in candidates {
        let run_id = candidate.id;
        let Some(lock) = TeamLock::try_acquire(&engine.lock_db, &candidate.org_id, &candidate.team_node_id).await?
        else {
            continue;
        };
        // Re-read under the lock: the owner may have finished just before dying.
        let still_running = store::get_run(&engine.db, run_id).await?.is_some_and(|r| !r.is_final());
        if !still_running {
            lock.release().await;
            continue;
        }
        let Some(credential) = engine.internal_admin_token.clone() else {
            tracing::error!(%run_id, "cannot resume an orphaned run: ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set");
            let message = "the run's owner died and ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set; retry the run";
            let error = json!({"code": "resume_credential_missing", "message": message});
            store::finish_run(
                &engine.db,
                run_id,
                store::RunEnd {
                    status: RunStatus::Failed,
                    error: Some(message),
                    error_detail: Some(&error),
                    steps: &json!({}),
                },
            )
            .await?;
            lock.release().await;
            continue;
        };
        store::count_execution(&engine.db, run_id).await?;
        engine.metrics.provisioning_runs_resumed_total.inc();
        tracing::info!(%run_id, org = %candidate.org_id, team = %candidate.team_node_id, "resuming an orphaned provisioning run");
        engine::spawn(
            engine,
            Execution {
                run_id,
                lock,
                credential,
                actor_subject: RESUMER.into(),
            },
        );
        resumed += 1;
    }
    Ok(resumed)
}
