//! Executes a provisioning run: each step recorded as it starts and ends, transient failures
//! retried within the step, permanent ones failing the run, optional rollback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::lock::TeamLock;
use super::request::ProvisionRequest;
use super::sealing::Sealer;
use super::steps::{self, StepError};
use super::store;
use crate::audit::{self, AuditEntry};
use crate::clients::ai_pipeline::AiPipelineClient;
use crate::clients::config_service::ConfigServiceClient;
use crate::clients::kubernetes::KubeClient;
use crate::config::{KubernetesConfig, ProvisioningConfig, Secret};
use crate::domain::{RunStatus, Step, StepStatus};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;

/// Everything a run's execution uses, and nothing else: the handlers that start runs and the
/// resumer hold this, not the whole application state. Derefs to its handles.
#[derive(Clone)]
pub struct Engine(Arc<EngineParts>);

struct EngineParts {
    handles: EngineHandles,
    registry: RunRegistry,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl std::ops::Deref for Engine {
    type Target = EngineHandles;
    fn deref(&self) -> &EngineHandles {
        &self.0.handles
    }
}

/// The handles an [`Engine`] is built from and its steps use.
pub struct EngineHandles {
    pub db: PgPool,
    /// Connections that hold team locks for the length of a run ([`crate::db::lock_pool`]).
    pub lock_db: PgPool,
    pub kube: KubeClient,
    pub config_service: ConfigServiceClient,
    pub ai_pipeline: AiPipelineClient,
    pub metrics: Arc<Metrics>,
    pub sealer: Sealer,
    pub kubernetes: KubernetesConfig,
    /// What the team's objects are told to read their config from.
    pub config_service_url: String,
    pub settings: ProvisioningConfig,
    /// What resumed runs act with: nobody is waiting for them.
    pub internal_admin_token: Option<Secret>,
}

impl Engine {
    pub fn new(handles: EngineHandles) -> Self {
        Self(Arc::new(EngineParts {
            handles,
            registry: RunRegistry::default(),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        }))
    }

    /// Stops runs at their next step boundary and waits for them, at most `grace`; whatever is
    /// left is resumed by another replica (or this one on restart).
    pub async fn stop(&self, grace: Duration) -> bool {
        self.0.stop.cancel();
        self.0.tracker.close();
        tokio::time::timeout(grace, self.0.tracker.wait()).await.is_ok()
    }

    pub(crate) fn stopping(&self) -> bool {
        self.0.stop.is_cancelled()
    }

    fn step_policy(&self) -> RetryPolicy {
        let p = &self.settings;
        RetryPolicy {
            initial: p.retry_initial,
            multiplier: 2.0,
            max_delay: p.retry_max,
            max_attempts: p.step_max_attempts,
            max_elapsed: p.step_max_elapsed,
        }
    }
}

/// Runs executing in this process, and a way to wake whoever waits for one to finish.
#[derive(Clone, Default)]
struct RunRegistry {
    waiters: Arc<Mutex<HashMap<Uuid, Arc<Notify>>>>,
}

impl RunRegistry {
    /// Registers a run this process is about to execute.
    fn started(&self, run_id: Uuid) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.entry(run_id).or_default();
    }

    /// The notifier of a run executing in this process; `None` if it runs elsewhere (or is done),
    /// so waiting never leaves entries behind.
    fn notifier(&self, run_id: Uuid) -> Option<Arc<Notify>> {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.get(&run_id).cloned()
    }

    fn finished(&self, run_id: Uuid) {
        let notify = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&run_id);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}

/// Everything the executor needs beyond the engine.
pub struct Execution {
    pub run_id: Uuid,
    pub lock: TeamLock,
    /// The credential the steps act with: the caller's admin token, or the internal admin token
    /// when a replica resumes a run nobody is waiting for.
    pub credential: Secret,
    pub actor_subject: String,
}

/// Starts executing a run in the background; it keeps going if the client goes away.
pub fn spawn(engine: &Engine, execution: Execution) {
    engine.0.registry.started(execution.run_id);
    let engine = engine.clone();
    let tracker = engine.0.tracker.clone();
    tracker.spawn(async move {
        let run_id = execution.run_id;
        engine.metrics.provisioning_runs_in_progress.inc();
        if let Err(e) = execute(&engine, execution).await {
            // The run stays `running` with its lock released: the resumer picks it up again.
            tracing::error!(%run_id, error = %e, "provisioning run interrupted by a database error; it will be resumed");
        }
        engine.metrics.provisioning_runs_in_progress.dec();
        engine.0.registry.finished(run_id);
    });
}

enum Outcome {
    Succeeded,
    Failed {
        position: i16,
        step: Step,
        error: StepError,
    },
    /// Shutting down between steps: leave the run to be resumed.
    Interrupted,
}

async fn execute(engine: &Engine, execution: Execution) -> Result<(), sqlx::Error> {
    let Execution {
        run_id,
        mut lock,
        credential,
        actor_subject,
    } = execution;
    let result = execute_locked(engine, run_id, &mut lock, &credential, &actor_subject).await;
    lock.release().await;
    result
}

async fn execute_locked(
    engine: &Engine,
    run_id: Uuid,
    lock: &mut TeamLock,
    credential: &Secret,
    actor: &str,
) -> Result<(), sqlx::Error> {
    let Some(run) = store::get_run(&engine.db, run_id).await? else {
        return Ok(());
    };
    if run.is_final() {
        return Ok(());
    }
    // A run the existing service recorded has no request to execute; it is never resumed.
    let Some(request) = run.request.as_ref().map(|r| r.0.clone()) else {
        return Ok(());
    };
    let mut steps = store::steps(&engine.db, run_id).await?;
    let mut outcome = Outcome::Succeeded;

    for step in steps.iter_mut() {
        if step.status.is_done() {
            continue;
        }
        if engine.stopping() {
            outcome = Outcome::Interrupted;
            break;
        }
        // The lock dies with its session (a failover, an idle session killed); then another
        // replica may already be resuming this run, and this executor must stop.
        if !lock.is_held().await {
            tracing::warn!(%run_id, "lost the team's provisioning lock; leaving the run to be resumed");
            outcome = Outcome::Interrupted;
            break;
        }
        match run_step(engine, run_id, step, &request, credential).await? {
            Ok(result) => {
                step.result = Some(result);
                step.status = StepStatus::Succeeded;
            }
            Err(error) => {
                outcome = Outcome::Failed {
                    position: step.position,
                    step: step.name,
                    error,
                };
                break;
            }
        }
    }

    match outcome {
        Outcome::Interrupted => Ok(()),
        Outcome::Succeeded => {
            let summary = store::step_summary(&steps, &request);
            let end = store::RunEnd {
                status: RunStatus::Succeeded,
                error: None,
                error_detail: None,
                steps: &summary,
            };
            record_end(engine, &run, actor, end).await?;
            tracing::info!(%run_id, org = %run.org_id, team = %run.team_node_id, "provisioning run succeeded");
            Ok(())
        }
        Outcome::Failed { position, step, error } => {
            let mut error_json = error.to_json(step);
            let mut status = RunStatus::Failed;
            if request.rollback_on_failure {
                let completed: Vec<_> = steps
                    .iter()
                    .filter(|s| s.position < position && s.status != StepStatus::Skipped)
                    .cloned()
                    .collect();
                let problems = steps::undo(engine, run_id, &request, credential, &completed).await?;
                if problems.is_empty() {
                    status = RunStatus::RolledBack;
                } else {
                    error_json["rollback_errors"] = json!(problems);
                }
            }
            // Re-read: the failed step and any rollback are recorded there.
            let steps = store::steps(&engine.db, run_id).await?;
            let summary = store::step_summary(&steps, &request);
            let one_line = format!("{step}: {}", error.message);
            let end = store::RunEnd {
                status,
                error: Some(&one_line),
                error_detail: Some(&error_json),
                steps: &summary,
            };
            record_end(engine, &run, actor, end).await?;
            tracing::warn!(%run_id, org = %run.org_id, team = %run.team_node_id, %step, code = error.code, %status, "provisioning run failed");
            Ok(())
        }
    }
}

/// Records the run's end and its audit row in one transaction, then counts it.
async fn record_end(
    engine: &Engine,
    run: &store::RunRow,
    actor: &str,
    end: store::RunEnd<'_>,
) -> Result<(), sqlx::Error> {
    let status = end.status;
    let detail = match end.error_detail {
        Some(error) => json!({ "error": error }),
        None => json!({}),
    };
    let mut tx = engine.db.begin().await?;
    store::finish_run(&mut *tx, run.id, end).await?;
    audit::record(
        &mut *tx,
        run_audit(run, actor, "provision.completed", status.as_str(), detail),
    )
    .await?;
    tx.commit().await?;
    engine
        .metrics
        .provisioning_runs_total
        .with_label_values(&[status.as_str()])
        .inc();
    Ok(())
}

fn run_audit<'a>(
    run: &'a store::RunRow,
    actor: &'a str,
    action: &'a str,
    outcome: &'a str,
    detail: Value,
) -> AuditEntry<'a> {
    AuditEntry {
        actor_subject: actor,
        actor_email: run
            .actor_email
            .as_deref()
            .filter(|_| run.actor_subject.as_deref() == Some(actor)),
        action,
        org_id: Some(&run.org_id),
        team_node_id: Some(&run.team_node_id),
        provisioning_run_id: Some(run.id),
        webhook_event_id: None,
        outcome,
        detail,
    }
}

/// What to do after a step's attempt failed.
#[derive(Debug, PartialEq)]
pub(crate) enum AfterFailure {
    /// Try again after this pause.
    Retry(Duration),
    /// The step fails, and with it the run.
    Fail,
}

/// A transient error is retried while the policy allows another attempt (attempts and total time,
/// the pause included) and the service is not shutting down; anything else fails the step.
pub(crate) fn after_failure(
    policy: &RetryPolicy,
    tries: u32,
    elapsed: Duration,
    error: &StepError,
    stopping: bool,
) -> AfterFailure {
    let delay = policy.delay(tries, error.retry_after);
    if error.transient && !stopping && policy.allows_another(tries, elapsed, delay) {
        AfterFailure::Retry(delay)
    } else {
        AfterFailure::Fail
    }
}

/// One step with its retries. The outer `Result` is the database; the inner is the step.
async fn run_step(
    engine: &Engine,
    run_id: Uuid,
    step: &store::StepRow,
    request: &ProvisionRequest,
    credential: &Secret,
) -> Result<Result<Value, StepError>, sqlx::Error> {
    let policy = engine.step_policy();
    store::step_started(&engine.db, run_id, step.position).await?;
    let started = Instant::now();
    let mut attempts = step.attempts;
    let mut tries = 0u32;
    let label = step.name.as_str();
    loop {
        attempts += 1;
        tries += 1;
        if tries > 1 {
            store::step_attempt(&engine.db, run_id, step.position, attempts).await?;
        }
        let attempt_started = Instant::now();
        let outcome = steps::perform(engine, run_id, step.name, step.position, request, credential).await;
        let elapsed = attempt_started.elapsed().as_secs_f64();
        let observe = |outcome: &str| {
            engine
                .metrics
                .provisioning_step_duration_seconds
                .with_label_values(&[label, outcome])
                .observe(elapsed);
        };
        match outcome {
            Ok(done) => {
                observe("succeeded");
                let mut conn = engine.db.acquire().await?;
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                if let Some(token) = &done.issued_token {
                    store::seal_team_token(&mut *tx, run_id, &engine.sealer.seal(token, run_id.as_bytes())).await?;
                }
                store::step_finished(
                    &mut tx,
                    run_id,
                    step.position,
                    store::StepEnd {
                        status: StepStatus::Succeeded,
                        attempts,
                        result: Some(&done.result),
                        error: None,
                    },
                )
                .await?;
                tx.commit().await?;
                return Ok(Ok(done.result));
            }
            Err(error) => match after_failure(&policy, tries, started.elapsed(), &error, engine.stopping()) {
                AfterFailure::Retry(delay) => {
                    observe("retried");
                    tracing::info!(%run_id, step = label, attempt = attempts, code = error.code, delay_ms = delay.as_millis() as u64, "step failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                AfterFailure::Fail => {
                    observe("failed");
                    let mut conn = engine.db.acquire().await?;
                    store::step_finished(
                        &mut conn,
                        run_id,
                        step.position,
                        store::StepEnd {
                            status: StepStatus::Failed,
                            attempts,
                            result: None,
                            error: Some(&error.to_json(step.name)),
                        },
                    )
                    .await?;
                    return Ok(Err(error));
                }
            },
        }
    }
}

/// Waits until the run is final or `deadline` passes. Wakes on the local executor's notice and
/// polls as a fallback, since the executor may live on another replica.
pub async fn wait_for_final(
    engine: &Engine,
    run_id: Uuid,
    deadline: tokio::time::Instant,
) -> Result<Option<store::RunRow>, sqlx::Error> {
    loop {
        let notify = engine.0.registry.notifier(run_id);
        let notified = notify.as_ref().map(|n| n.notified());
        tokio::pin!(notified);
        if let Some(notified) = notified.as_mut().as_pin_mut() {
            notified.enable();
        }
        let run = store::get_run(&engine.db, run_id).await?;
        match run {
            Some(run) if run.is_final() => return Ok(Some(run)),
            None => return Ok(None),
            Some(run) if tokio::time::Instant::now() >= deadline => return Ok(Some(run)),
            Some(_) => {}
        }
        let poll = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
        match notified.as_mut().as_pin_mut() {
            Some(notified) => {
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(poll) => {}
                }
            }
            None => tokio::time::sleep_until(poll).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            max_attempts: 3,
            max_elapsed: Duration::from_secs(10),
        }
    }

    fn error(transient: bool) -> StepError {
        StepError {
            code: "neighbour_server_error",
            message: "config_service answered 503".into(),
            transient,
            retry_after: None,
        }
    }

    #[test]
    fn a_transient_failure_is_retried_within_the_budget() {
        let p = policy();
        assert!(matches!(
            after_failure(&p, 1, Duration::ZERO, &error(true), false),
            AfterFailure::Retry(d) if d <= Duration::from_millis(100)
        ));
        assert_eq!(
            after_failure(&p, 3, Duration::ZERO, &error(true), false),
            AfterFailure::Fail
        );
        assert_eq!(
            after_failure(&p, 1, Duration::from_secs(10), &error(true), false),
            AfterFailure::Fail,
            "out of time"
        );
    }

    #[test]
    fn a_permanent_failure_or_a_shutdown_fails_at_once() {
        let p = policy();
        assert_eq!(
            after_failure(&p, 1, Duration::ZERO, &error(false), false),
            AfterFailure::Fail
        );
        assert_eq!(
            after_failure(&p, 1, Duration::ZERO, &error(true), true),
            AfterFailure::Fail
        );
    }

    #[test]
    fn a_neighbours_retry_after_is_honoured() {
        let mut slow = error(true);
        slow.retry_after = Some(Duration::from_millis(700));
        assert!(matches!(
            after_failure(&policy(), 1, Duration::ZERO, &slow, false),
            AfterFailure::Retry(d) if d >= Duration::from_millis(700)
        ));
    }
}
