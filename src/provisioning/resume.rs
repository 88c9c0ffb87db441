//! The resumer, in every replica: finds runs whose owner died (their lock is free) and resumes
//! them from the step they were in.

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::engine::{self, Engine, Execution};
use super::lock::TeamLock;
use super::store::{self, RunRow, StepRow};

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
    // Runs inside one long step look stale too (their lock decides): look at enough of them that
    // orphans are never left behind a page of healthy runs.
    let candidates = store::stale_running_runs(&engine.db, idle, 1000).await?;
    let mut resumed = 0;
    for candidate in candidates {
        let run_id = candidate.id;
        let Some(mut lock) = TeamLock::try_acquire(&engine.lock_db, &candidate.org_id, &candidate.team_node_id).await?
        else {
            continue;
        };
        // Under the lock, and counting a new execution so that the old owner's writes, should it
        // still be alive somewhere, are refused from now on.
        let taken = take_over(&mut lock, run_id).await;
        let (run, steps) = match taken {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                lock.release().await;
                continue;
            }
            Err(e) => {
                lock.release().await;
                return Err(e);
            }
        };
        let Some(credential) = engine.internal_admin_token.clone() else {
            tracing::error!(%run_id, "cannot resume an orphaned run: ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set");
            let message = "the run's owner died and ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set; retry the run";
            engine::end_without_executing(engine, &run, lock, RESUMER, "resume_credential_missing", message).await?;
            continue;
        };
        engine.metrics.provisioning_runs_resumed_total.inc();
        tracing::info!(%run_id, org = %candidate.org_id, team = %candidate.team_node_id, "resuming an orphaned run");
        engine::spawn(
            engine,
            Execution {
                run,
                steps,
                lock,
                credential,
                actor_subject: RESUMER.into(),
            },
        );
        resumed += 1;
    }
    Ok(resumed)
}

/// The run, taken over as a new execution; `None` if it is no longer running (its owner finished
/// just before dying).
async fn take_over(lock: &mut TeamLock, run_id: Uuid) -> Result<Option<(RunRow, Vec<StepRow>)>, sqlx::Error> {
    let conn = lock.connection().ok_or(sqlx::Error::PoolClosed)?;
    if !store::take_over(&mut *conn, run_id).await? {
        return Ok(None);
    }
    let Some(run) = store::get_run(&mut *conn, run_id).await? else {
        return Ok(None);
    };
    let steps = store::steps(&mut *conn, run_id).await?;
    Ok(Some((run, steps)))
}
