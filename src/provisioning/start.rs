//! Starting a run: in one transaction on the connection that takes the team's lock, the lock, the
//! idempotency check, the busy check, the plan, the run and its steps, the team's record and the
//! audit row. Then the executor takes over the lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection;
use uuid::Uuid;

use super::engine::{self, Engine, Execution, RunSlot};
use super::lock::{self, TeamLock};
use super::request::TeamSpec;
use super::store::{self, NewRun, RunRow, StepRow};
use super::workflow::{self, RunInput};
use crate::auth::Admin;
use crate::domain::{OrgId, TeamNodeId, Workflow};
use crate::error::ApiError;

/// A run asked for.
pub struct RunRequest<'a> {
    pub org_id: &'a OrgId,
    pub team_node_id: &'a TeamNodeId,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: String,
    pub request: Value,
    pub workflow: Workflow,
    /// Audit detail of the request.
    pub detail: Value,
}

/// What asking for a run came to.
pub enum Started {
    /// A new run, executing in this process (its slot hands its end over).
    New(Uuid, Arc<RunSlot>),
    /// The idempotency key names this run already.
    Replay(Uuid),
}

impl Started {
    /// The run, and its slot when it executes in this process.
    pub fn into_parts(self) -> (Uuid, Option<Arc<RunSlot>>) {
        match self {
            Started::New(run_id, slot) => (run_id, Some(slot)),
            Started::Replay(run_id) => (run_id, None),
        }
    }
}

/// Why a run was not started.
pub enum NotStarted {
    /// Another run holds the team (the run, if it is known).
    Busy(Option<Uuid>),
    /// The idempotency key names a run of another request.
    KeyReused(Uuid),
    /// Deprovisioning a team this service does not know.
    UnknownTeam,
}

impl From<NotStarted> for ApiError {
    fn from(not: NotStarted) -> Self {
        match not {
            NotStarted::Busy(run) => {
                let mut error = ApiError::conflict(
                    "team_busy",
                    "another run holds this team; retry later or follow the run in progress",
                );
                if let Some(run_id) = run {
                    error = error.with("provisioning_run_id", run_id.to_string()).with_header(
                        axum::http::HeaderName::from_static(super::api::RUN_ID_HEADER),
                        super::api::run_header(run_id),
                    );
                }
                error
            }
            NotStarted::KeyReused(run_id) => ApiError::unprocessable(
                "idempotency_key_reused",
                "this idempotency key was used for a different request for this team",
            )
            .with("provisioning_run_id", run_id.to_string()),
            NotStarted::UnknownTeam => ApiError::not_found("team_not_found", "no such team"),
        }
    }
}

/// Starts the run, or finds the one its idempotency key names, waiting for the team's lock at
/// most the configured time (5 ms to 100 ms between tries).
pub async fn start(
    engine: &Engine,
    admin: &Admin,
    asked: RunRequest<'_>,
) -> Result<Result<Started, NotStarted>, ApiError> {
    let deadline = Instant::now() + engine.settings.lock_timeout;
    let mut pause = Duration::from_millis(5);
    let waited = Instant::now();
    loop {
        match try_start(engine, admin, &asked).await? {
            Attempt::Locked(outcome) => {
                engine
                    .metrics
                    .provisioning_lock_wait_seconds
                    .observe(waited.elapsed().as_secs_f64());
                return Ok(outcome);
            }
            Attempt::Replay(run_id) => return Ok(Ok(Started::Replay(run_id))),
            Attempt::KeyReused(run_id) => return Ok(Err(NotStarted::KeyReused(run_id))),
            Attempt::Busy => {
                let now = Instant::now();
                if now >= deadline {
                    let running = store::current_run_for_team(&engine.db, asked.org_id, asked.team_node_id).await?;
                    return Ok(Err(NotStarted::Busy(running)));
                }
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

enum Attempt {
    /// The lock was taken: the run started, or why not.
    Locked(Result<Started, NotStarted>),
    Replay(Uuid),
    KeyReused(Uuid),
    Busy,
}

async fn try_start(engine: &Engine, admin: &Admin, asked: &RunRequest<'_>) -> Result<Attempt, ApiError> {
    let (org, team) = (asked.org_id.as_str(), asked.team_node_id.as_str());
    let mut guard = TeamLock::connect(&engine.lock_db, org, team).await?;
    let key = guard.key();
    let conn = guard.connection().ok_or(sqlx::Error::PoolClosed)?;
    let mut tx = conn.begin().await?;
    let locked = lock::try_lock(&mut tx, key).await?;
    // A replay is answered whether or not the team is busy (its run may be the one holding it).
    if let Some(idempotency_key) = asked.idempotency_key {
        if let Some(existing) = store::find_by_idempotency_key(&mut *tx, org, team, idempotency_key).await? {
            if locked {
                lock::unlock(&mut tx, key).await?;
            }
            tx.commit().await?;
            guard.release_unlocked();
            // A run the existing service recorded has no request to compare: its key answers
            // with it, as the existing service did.
            let same = existing.workflow == asked.workflow
                && existing
                    .request_hash
                    .as_deref()
                    .is_none_or(|hash| hash == asked.request_hash);
            return Ok(if same {
                Attempt::Replay(existing.id)
            } else {
                Attempt::KeyReused(existing.id)
            });
        }
    }
    if !locked {
        tx.commit().await?;
        guard.release_unlocked();
        return Ok(Attempt::Busy);
    }
    // Holding the lock, a run the team's record says is still going lost its owner: it must be
    // resumed (by the resumer, within seconds) before a newer run, or it would later overwrite it.
    let existing_team = store::get_team_for_update(&mut tx, org, team).await?;
    if let Some(running) = existing_team.as_ref().and_then(|t| t.running_run()) {
        lock::unlock(&mut tx, key).await?;
        tx.commit().await?;
        guard.release_unlocked();
        return Ok(Attempt::Locked(Err(NotStarted::Busy(Some(running)))));
    }
    let input = match asked.workflow {
        Workflow::Provision => {
            let request = serde_json::from_value(asked.request.clone()).map_err(|e| {
                ApiError::internal(anyhow::anyhow!(
                    "a validated provisioning request did not read back: {e}"
                ))
            })?;
            let spec = TeamSpec::resolve(existing_team.as_ref().and_then(|t| t.standing_spec()), &request);
            RunInput::Provision { request, spec }
        }
        Workflow::Deprovision => {
            if existing_team.is_none() {
                lock::unlock(&mut tx, key).await?;
                tx.commit().await?;
                guard.release_unlocked();
                return Ok(Attempt::Locked(Err(NotStarted::UnknownTeam)));
            }
            RunInput::Deprovision(serde_json::from_value(asked.request.clone()).map_err(|e| {
                ApiError::internal(anyhow::anyhow!(
                    "a validated deprovisioning request did not read back: {e}"
                ))
            })?)
        }
    };
    let spec = match &input {
        RunInput::Provision { spec, .. } => Some(spec),
        RunInput::Deprovision(_) => None,
    };
    let run_id = Uuid::now_v7();
    let inserted = store::insert_run(
        &mut tx,
        NewRun {
            id: run_id,
            workflow: asked.workflow,
            org_id: asked.org_id,
            team_node_id: asked.team_node_id,
            request: asked.request.clone(),
            request_hash: asked.request_hash.clone(),
            desired: spec,
            idempotency_key: asked.idempotency_key,
            actor_subject: admin.subject(),
            actor_email: admin.email(),
            deadline_seconds: engine.settings.run_deadline.as_secs_f64(),
            steps: workflow::plan(&input, existing_team.as_ref()),
            team_status: workflow::team_status_while(asked.workflow),
            audit_action: engine::action(asked.workflow, "requested"),
            audit_detail: asked.detail.clone(),
        },
    )
    .await?;
    let Some((run, steps)) = inserted else {
        // Unreachable while the key is checked under the lock; answered as a replay if it is not.
        tx.rollback().await?;
        drop(guard);
        return Ok(Attempt::Busy);
    };
    tx.commit().await?;
    let slot = execute(engine, admin, run, steps, guard);
    Ok(Attempt::Locked(Ok(Started::New(run_id, slot))))
}

/// Hands a run and its team's lock to the executor, acting with the caller's authority.
pub fn execute(engine: &Engine, admin: &Admin, run: RunRow, steps: Vec<StepRow>, lock: TeamLock) -> Arc<RunSlot> {
    engine::spawn(
        engine,
        Execution {
            run,
            steps,
            lock,
            credential: admin.token.clone(),
            actor_subject: admin.subject().to_string(),
        },
    )
}

/// The audit detail of a provisioning request.
pub fn provision_detail(request: &super::request::ProvisionRequest) -> Value {
    json!({
        "deployment_mode": request.deployment_mode,
        "pipeline_schedule": request.pipeline_schedule,
        "create_pipeline_schedule": request.create_pipeline_schedule,
        "routing_keys": request.routing.keys().collect::<Vec<_>>(),
        "rollback_on_failure": request.rollback_on_failure,
        "idempotency_key": request.idempotency_key,
    })
}
