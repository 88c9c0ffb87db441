//! The step engine: executes a run of any workflow, one step after another, on the connection
//! that holds the team's lock. A step's end is recorded as it happens (its start only where doing
//! it twice could do harm: the team token); transient failures are retried within the step; a
//! cancel or the deadline stops the run at a step boundary; the last step's end, the run's end,
//! the team's record, the audit row and the lock's release are one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::lock::TeamLock;
use super::sealing::Sealer;
use super::steps::{self, IntentJournal, StepContext, StepError, TeamScope};
use super::store::{self, RunRow, Signals, StepRow};
use super::workflow::{self, RunInput};
use crate::clients::ai_pipeline::AiPipelineClient;
use crate::clients::config_service::ConfigServiceClient;
use crate::clients::kubernetes::KubeClient;
use crate::config::{KubernetesConfig, ProvisioningConfig, Secret};
use crate::domain::{RunStatus, Step, StepStatus, Workflow};
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

    /// Tells the run's executor, if it is in this process, that a cancel was recorded; an executor
    /// elsewhere learns it from its next write.
    pub fn signal_cancel(&self, run_id: Uuid, undo: bool) {
        if let Some(slot) = self.0.registry.slot(run_id) {
            let mut cancel = lock_unpoisoned(&slot.cancel);
            *cancel = Some(undo || cancel.unwrap_or(false));
            drop(cancel);
            slot.wake.notify_waiters();
        }
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

fn lock_unpoisoned<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A run as its executor left it, handed to whoever waits for it in this process so that the
/// answer needs no read.
pub struct FinishedRun {
    pub run: RunRow,
    pub steps: Vec<StepRow>,
    /// The team token this execution issued, sealed: the waiter can open it without a read.
    pub sealed_token: Option<Vec<u8>>,
}

/// A run executing in this process: how to wait for it, and how to tell it to stop.
#[derive(Default)]
pub struct RunSlot {
    done: Notify,
    finished: Mutex<Option<Arc<FinishedRun>>>,
    /// A cancel recorded for it (`Some(undo)`).
    cancel: Mutex<Option<bool>>,
    wake: Notify,
}

impl RunSlot {
    fn finished(&self) -> Option<Arc<FinishedRun>> {
        lock_unpoisoned(&self.finished).clone()
    }
}

/// Runs executing in this process.
#[derive(Clone, Default)]
struct RunRegistry {
    slots: Arc<Mutex<HashMap<Uuid, Arc<RunSlot>>>>,
}

impl RunRegistry {
    fn started(&self, run_id: Uuid) -> Arc<RunSlot> {
        lock_unpoisoned(&self.slots).entry(run_id).or_default().clone()
    }

    /// `None` if it runs elsewhere (or is done), so waiting never leaves entries behind.
    fn slot(&self, run_id: Uuid) -> Option<Arc<RunSlot>> {
        lock_unpoisoned(&self.slots).get(&run_id).cloned()
    }

    fn finished(&self, run_id: Uuid, finished: Option<FinishedRun>) {
        let slot = lock_unpoisoned(&self.slots).remove(&run_id);
        if let Some(slot) = slot {
            *lock_unpoisoned(&slot.finished) = finished.map(Arc::new);
            slot.done.notify_waiters();
        }
    }
}

/// A run to execute, with its team's lock.
pub struct Execution {
    pub run: RunRow,
    pub steps: Vec<StepRow>,
    pub lock: TeamLock,
    /// The credential the steps act with: the caller's admin token, or the internal admin token
    /// when a replica resumes a run nobody is waiting for.
    pub credential: Secret,
    pub actor_subject: String,
}

/// Starts executing a run in the background; it keeps going if the client goes away. The slot
/// hands its end to a waiter in this process.
pub fn spawn(engine: &Engine, execution: Execution) -> Arc<RunSlot> {
    let run_id = execution.run.id;
    let slot = engine.0.registry.started(run_id);
    let engine = engine.clone();
    let task_slot = slot.clone();
    engine.0.tracker.clone().spawn(async move {
        engine.metrics.provisioning_runs_in_progress.inc();
        // A panic in a step must not leave the slot and the gauge behind; the run stays
        // `running`, its lock dies with its connection, and the resumer picks it up again.
        let executed = std::panic::AssertUnwindSafe(execute(&engine, execution, &task_slot)).catch_unwind();
        let finished = match executed.await {
            Ok(Ok(finished)) => finished,
            Ok(Err(e)) => {
                tracing::error!(%run_id, error = %e, "run interrupted by a database error; it will be resumed");
                None
            }
            Err(_) => {
                tracing::error!(%run_id, "run interrupted by a panic; it will be resumed");
                None
            }
        };
        engine.metrics.provisioning_runs_in_progress.dec();
        engine.0.registry.finished(run_id, finished);
    });
    slot
}

/// Where the executor's loop ended.
enum Outcome {
    Succeeded,
    Failed {
        index: usize,
        error: StepError,
    },
    Cancelled {
        undo: bool,
    },
    TimedOut {
        index: usize,
    },
    /// A previous execution had started undoing the run (a rollback, or a cancel with undo):
    /// finish undoing it, never go forward.
    Undoing,
    /// Shutting down, or the run was taken over: leave it to be resumed.
    Interrupted,
}

/// What one step's attempts came to.
enum Attempted {
    Done(Box<store::StepSuccess>),
    Failed(StepError),
    Stopped(Outcome),
}

/// The executor's writes: fenced by the execution count, on the lock's connection. Each tells
/// whether a cancel was recorded since.
struct Journal {
    lock: tokio::sync::Mutex<TeamLock>,
    run_id: Uuid,
    epoch: i32,
    signals: Mutex<Signals>,
    /// A write found the run taken over by another execution.
    lost: std::sync::atomic::AtomicBool,
    /// What steps recorded before acting, by position (the token step's intent).
    intents: Mutex<HashMap<i16, Value>>,
    /// The team token a step of this execution issued, sealed.
    sealed: Mutex<Option<Vec<u8>>>,
}

impl Journal {
    fn note(&self, signals: Option<Signals>) -> bool {
        match signals {
            Some(signals) => {
                *lock_unpoisoned(&self.signals) = signals;
                true
            }
            None => {
                self.lost.store(true, std::sync::atomic::Ordering::SeqCst);
                false
            }
        }
    }

    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn connection<T>(
        &self,
        write: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut lock = self.lock.lock().await;
        let conn = lock.connection().ok_or(sqlx::Error::PoolClosed)?;
        write(conn).await
    }
}

impl IntentJournal for Journal {
    fn record_intent<'a>(
        &'a self,
        position: i16,
        intent: &'a Value,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StepError>> + Send + 'a>> {
        Box::pin(async move {
            let (run_id, epoch) = (self.run_id, self.epoch);
            let signals = self
                .connection(async |conn| store::record_step_intent(conn, run_id, epoch, position, intent).await)
                .await
                .map_err(|e| StepError::database(&e))?;
            if !self.note(signals) {
                return Err(StepError::run_lost());
            }
            lock_unpoisoned(&self.intents).insert(position, intent.clone());
            Ok(())
        })
    }
}

struct Executor<'a> {
    engine: &'a Engine,
    run: &'a RunRow,
    input: &'a RunInput,
    credential: &'a Secret,
    actor: &'a str,
    journal: Journal,
    slot: &'a RunSlot,
}

async fn execute(engine: &Engine, execution: Execution, slot: &RunSlot) -> Result<Option<FinishedRun>, sqlx::Error> {
    let Execution {
        run,
        mut steps,
        lock,
        credential,
        actor_subject,
    } = execution;
    // A run the existing service recorded has no request to execute; it is never resumed.
    let input = match RunInput::of(&run) {
        Some(Ok(input)) => input,
        Some(Err(e)) => {
            tracing::error!(run_id = %run.id, error = %e, "the run's recorded request cannot be read; it cannot be executed");
            let message = format!("the run's recorded request cannot be read ({e}); provision the team again");
            end_without_executing(engine, &run, lock, &actor_subject, "unreadable_request", &message).await?;
            return Ok(None);
        }
        None => {
            lock.release().await;
            return Ok(None);
        }
    };
    let executor = Executor {
        engine,
        run: &run,
        input: &input,
        credential: &credential,
        actor: &actor_subject,
        journal: Journal {
            lock: tokio::sync::Mutex::new(lock),
            run_id: run.id,
            epoch: run.executions,
            signals: Mutex::new(Signals {
                cancel_requested: run.cancel_requested_at.is_some(),
                cancel_undo: run.cancel_undo,
                cancelled_by: run.cancelled_by.clone(),
            }),
            lost: Default::default(),
            intents: Mutex::new(HashMap::new()),
            sealed: Mutex::new(None),
        },
        slot,
    };
    let (outcome, last) = executor.run_steps(&mut steps).await?;
    executor.conclude(outcome, last, steps).await
}

impl Executor<'_> {
    fn scope(&self) -> TeamScope<'_> {
        TeamScope {
            engine: self.engine,
            org: &self.run.org_id,
            team: &self.run.team_node_id,
            credential: self.credential,
        }
    }

    /// The cancel recorded for the run, here or on any replica: `Some(undo)`.
    fn cancel(&self) -> Option<bool> {
        let local = *lock_unpoisoned(&self.slot.cancel);
        let signals = lock_unpoisoned(&self.journal.signals).clone();
        match (local, signals.cancel_requested) {
            (Some(undo), _) => Some(undo || signals.cancel_undo),
            (None, true) => Some(signals.cancel_undo),
            (None, false) => None,
        }
    }

    /// How long until the run's deadline; zero once past it.
    fn time_left(&self) -> Option<Duration> {
        self.run
            .deadline_at
            .map(|deadline| (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO))
    }

    /// Why the run must stop before the step at `index`, if it must.
    fn stop_before(&self, index: usize) -> Option<Outcome> {
        if self.engine.stopping() || self.journal.lost() {
            return Some(Outcome::Interrupted);
        }
        if let Some(undo) = self.cancel() {
            return Some(Outcome::Cancelled { undo });
        }
        if self.time_left() == Some(Duration::ZERO) {
            return Some(Outcome::TimedOut { index });
        }
        None
    }

    /// Runs every step not done yet. The last step's success is returned unwritten: it is
    /// recorded with the run's end.
    async fn run_steps(&self, steps: &mut [StepRow]) -> Result<(Outcome, Option<store::StepSuccess>), sqlx::Error> {
        if steps.iter().any(|s| s.status == StepStatus::RolledBack) {
            return Ok((Outcome::Undoing, None));
        }
        let remaining: Vec<usize> = (0..steps.len()).filter(|&i| !steps[i].status.is_done()).collect();
        for (k, &index) in remaining.iter().enumerate() {
            if let Some(stop) = self.stop_before(index) {
                return Ok((stop, None));
            }
            match self.run_step(&mut steps[index]).await? {
                Attempted::Done(success) => {
                    success.apply_to(&mut steps[index]);
                    if success.sealed_token.is_some() {
                        *lock_unpoisoned(&self.journal.sealed) = success.sealed_token.clone();
                    }
                    if k + 1 == remaining.len() {
                        return Ok((Outcome::Succeeded, Some(*success)));
                    }
                    let (run_id, epoch) = (self.run.id, self.journal.epoch);
                    let signals = self
                        .journal
                        .connection(async |conn| store::step_succeeded(conn, run_id, epoch, &success).await)
                        .await?;
                    if !self.journal.note(signals) {
                        return Ok((Outcome::Interrupted, None));
                    }
                }
                Attempted::Failed(error) => return Ok((Outcome::Failed { index, error }, None)),
                Attempted::Stopped(outcome) => return Ok((outcome, None)),
            }
        }
        Ok((Outcome::Succeeded, None))
    }

    /// One step with its retries. Every failed attempt's error is recorded (and kept in `step`).
    async fn run_step(&self, step: &mut StepRow) -> Result<Attempted, sqlx::Error> {
        let policy = self.engine.step_policy();
        let started_at = Utc::now();
        let started = Instant::now();
        let mut attempts = step.attempts;
        let mut tries = 0u32;
        let label = step.name.as_str();
        loop {
            attempts += 1;
            tries += 1;
            let recorded = lock_unpoisoned(&self.journal.intents)
                .get(&step.position)
                .cloned()
                .or_else(|| step.result.clone());
            let cx = StepContext {
                scope: self.scope(),
                run_id: self.run.id,
                position: step.position,
                input: self.input,
                recorded: recorded.as_ref(),
                journal: &self.journal,
            };
            let attempt_started = Instant::now();
            let outcome = step.name.apply(&cx).await;
            let observe = |outcome: &str| {
                self.engine
                    .metrics
                    .provisioning_step_duration_seconds
                    .with_label_values(&[label, outcome])
                    .observe(attempt_started.elapsed().as_secs_f64());
            };
            if self.journal.lost() {
                return Ok(Attempted::Stopped(Outcome::Interrupted));
            }
            let error = match outcome {
                Ok(done) => {
                    observe("succeeded");
                    let sealed_token = done
                        .issued_token
                        .as_ref()
                        .map(|token| self.engine.sealer.seal(token, self.run.id.as_bytes()));
                    return Ok(Attempted::Done(Box::new(store::StepSuccess {
                        position: step.position,
                        attempts,
                        started_at,
                        duration_ms: started.elapsed().as_millis() as i64,
                        result: done.result,
                        sealed_token,
                    })));
                }
                Err(error) => error,
            };
            if self.engine.stopping() {
                observe("interrupted");
                return Ok(Attempted::Stopped(Outcome::Interrupted));
            }
            let decision = after_failure(&policy, tries, started.elapsed(), &error, self.time_left());
            let final_attempt = decision == AfterFailure::Fail;
            let error_json = error.to_json(step.name);
            let (run_id, epoch, position) = (self.run.id, self.journal.epoch, step.position);
            let failure = store::AttemptFailure {
                position,
                attempts,
                started_at,
                error: &error_json,
                final_attempt,
            };
            let signals = self
                .journal
                .connection(async |conn| store::attempt_failed(conn, run_id, epoch, failure).await)
                .await?;
            if !self.journal.note(signals) {
                return Ok(Attempted::Stopped(Outcome::Interrupted));
            }
            if let Value::Array(errors) = &mut step.attempt_errors {
                errors.push(error_json);
            }
            match decision {
                AfterFailure::Fail => {
                    observe("failed");
                    return Ok(Attempted::Failed(error));
                }
                AfterFailure::OutOfTime => {
                    observe("timed_out");
                    return Ok(Attempted::Stopped(Outcome::TimedOut {
                        index: position as usize,
                    }));
                }
                AfterFailure::Retry(delay) => {
                    observe("retried");
                    // Listening before looking: a cancel signalled in between still wakes us.
                    let woken = self.slot.wake.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    if let Some(undo) = self.cancel() {
                        return Ok(Attempted::Stopped(Outcome::Cancelled { undo }));
                    }
                    tracing::info!(%run_id, step = label, attempt = attempts, code = error.code, delay_ms = delay.as_millis() as u64, "step failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = woken => {}
                        () = self.engine.0.stop.cancelled() => {}
                    }
                    if let Some(stop) = self.stop_before(position as usize) {
                        return Ok(Attempted::Stopped(stop));
                    }
                }
            }
        }
    }

    /// Undoes the completed steps in reverse. Returns what could not be undone. Each undo is
    /// preceded by a fenced check and recorded by a fenced write: an owner presumed dead stops
    /// undoing as soon as the run is another's, and a resumed execution finishes the undo
    /// (`Outcome::Undoing`) rather than go forward.
    async fn undo(&self, completed: &[StepRow]) -> Result<Vec<Value>, sqlx::Error> {
        let (run_id, epoch) = (self.run.id, self.journal.epoch);
        let mut problems = Vec::new();
        for step in completed.iter().rev() {
            let owned = self
                .journal
                .connection(async |conn| store::touch_run(conn, run_id, epoch).await)
                .await?;
            if !self.journal.note(owned) {
                break;
            }
            let cx = StepContext {
                scope: self.scope(),
                run_id,
                position: step.position,
                input: self.input,
                recorded: step.result.as_ref(),
                journal: &self.journal,
            };
            match step.name.undo(&cx).await {
                Ok(note) => {
                    let position = step.position;
                    let marked = self
                        .journal
                        .connection(async |conn| {
                            store::mark_step_rolled_back(conn, run_id, epoch, position, &note).await
                        })
                        .await?;
                    if !self.journal.note(marked) {
                        break;
                    }
                }
                Err(e) => problems.push(e.to_json(step.name)),
            }
        }
        Ok(problems)
    }

    /// Revokes a team token the token step may have issued without finishing (the run ends
    /// without it): otherwise the team keeps a token nobody holds and is never issued another.
    async fn revoke_unfinished_token(&self, steps: &[StepRow]) -> Option<Value> {
        let step = steps.iter().find(|s| {
            s.name == Step::TeamToken
                && matches!(s.status, StepStatus::Pending | StepStatus::Running | StepStatus::Failed)
        })?;
        let recorded = lock_unpoisoned(&self.journal.intents)
            .get(&step.position)
            .cloned()
            .or_else(|| step.result.clone());
        match steps::revoke_unfinished_token(&self.scope(), self.run.id, recorded.as_ref()).await {
            Ok(revoked) if revoked.is_empty() => None,
            Ok(revoked) => Some(json!({ "revoked_token_ids": revoked })),
            Err(e) => Some(json!({ "error": e.to_json(step.name) })),
        }
    }

    /// Records how the run ended, with its audit row and the team's record, and releases the lock,
    /// in one transaction.
    async fn conclude(
        self,
        outcome: Outcome,
        last: Option<store::StepSuccess>,
        steps: Vec<StepRow>,
    ) -> Result<Option<FinishedRun>, sqlx::Error> {
        let succeeded = |s: &&StepRow| s.status == StepStatus::Succeeded;
        let cancelled = |undone: bool| {
            let by = lock_unpoisoned(&self.journal.signals)
                .cancelled_by
                .clone()
                .or_else(|| self.run.cancelled_by.clone())
                .unwrap_or_else(|| "an operator".into());
            let message = format!("cancelled by {by}");
            let detail = json!({"code": "cancelled", "message": message, "undone": undone});
            (message, detail)
        };
        let (status, error, current_step) = match outcome {
            Outcome::Interrupted => {
                self.journal.lock.into_inner().release().await;
                return Ok(None);
            }
            Outcome::Succeeded => (RunStatus::Succeeded, None, None),
            Outcome::Failed { index, error } => {
                let step = steps[index].name;
                let mut detail = error.to_json(step);
                let mut status = RunStatus::Failed;
                if self.input.rolls_back_on_failure() {
                    let completed: Vec<StepRow> = steps[..index].iter().filter(succeeded).cloned().collect();
                    let problems = self.undo(&completed).await?;
                    if problems.is_empty() {
                        status = RunStatus::RolledBack;
                    } else {
                        detail["rollback_errors"] = json!(problems);
                    }
                }
                (status, Some((format!("{step}: {}", error.message), detail)), Some(step))
            }
            Outcome::Cancelled { undo } => {
                let (message, mut detail) = cancelled(undo);
                if undo {
                    let completed: Vec<StepRow> = steps.iter().filter(succeeded).cloned().collect();
                    let problems = self.undo(&completed).await?;
                    if !problems.is_empty() {
                        detail["rollback_errors"] = json!(problems);
                    }
                }
                (RunStatus::Cancelled, Some((message, detail)), None)
            }
            Outcome::Undoing => {
                let completed: Vec<StepRow> = steps.iter().filter(succeeded).cloned().collect();
                let problems = self.undo(&completed).await?;
                // A failed step is what the undo was for (a rollback); without one, a cancel.
                let (status, message, mut detail, step) = match steps.iter().find(|s| s.status == StepStatus::Failed) {
                    Some(failed) => {
                        let detail = failed.error.clone().unwrap_or_else(|| json!({"step": failed.name}));
                        let message = detail.get("message").and_then(Value::as_str).unwrap_or("failed");
                        let line = format!("{}: {message}", failed.name);
                        (RunStatus::RolledBack, line, detail, Some(failed.name))
                    }
                    None => {
                        let (message, detail) = cancelled(true);
                        (RunStatus::Cancelled, message, detail, None)
                    }
                };
                let status = if problems.is_empty() {
                    status
                } else {
                    detail["rollback_errors"] = json!(problems);
                    match status {
                        RunStatus::RolledBack => RunStatus::Failed,
                        other => other,
                    }
                };
                (status, Some((message, detail)), step)
            }
            Outcome::TimedOut { index } => {
                let step = steps[index].name;
                let message = format!(
                    "the run passed its deadline before {step} finished (ORCHESTRATOR_RUN_DEADLINE_SECONDS); retry it"
                );
                let detail = json!({"step": step, "code": "deadline_exceeded", "message": message});
                (
                    RunStatus::TimedOut,
                    Some((format!("{step}: {message}"), detail)),
                    Some(step),
                )
            }
        };
        if self.journal.lost() {
            // Taken over while undoing: the new owner finishes it.
            self.journal.lock.into_inner().release().await;
            return Ok(None);
        }
        let mut error = error;
        if status != RunStatus::Succeeded {
            if let (Some(cleanup), Some((_, detail))) = (self.revoke_unfinished_token(&steps).await, error.as_mut()) {
                detail["token_cleanup"] = cleanup;
            }
        }
        // A run that did not succeed is summarised from its record (the failed attempts, an
        // undo); a successful one from the steps as executed, which are the record.
        let undone = matches!(status, RunStatus::RolledBack | RunStatus::Cancelled)
            || error.as_ref().is_some_and(|(_, d)| d.get("rollback_errors").is_some());
        let steps = if status == RunStatus::Succeeded {
            steps
        } else {
            store::steps(&self.engine.db, self.run.id).await?
        };
        let summary = store::step_summary(&steps, self.input.slack_channels());
        // A rolled-back bootstrap was left in place: the first ingestion ran all the same.
        let bootstrapped = steps
            .iter()
            .any(|s| s.name == Step::Bootstrap && matches!(s.status, StepStatus::Succeeded | StepStatus::RolledBack));
        let workflow = self.input.workflow();
        let mut audit_detail = match &error {
            Some((_, detail)) => json!({ "error": detail }),
            None => json!({}),
        };
        if workflow == Workflow::Deprovision {
            audit_detail["deleted"] = deleted_of(&steps);
        }

        let mut lock = self.journal.lock.into_inner();
        let key = lock.key();
        let Some(conn) = lock.connection() else {
            return Ok(None);
        };
        let ending = store::RunEnding {
            end: store::RunEnd {
                status,
                error: error.as_ref().map(|(line, _)| line.as_str()),
                error_detail: error.as_ref().map(|(_, detail)| detail),
                steps: &summary,
                current_step,
            },
            last_step: last.as_ref(),
            team: store::TeamRunEnd {
                status: workflow::team_status_after(workflow, status),
                bootstrapped,
            },
            actor_subject: self.actor,
            actor_email: self
                .run
                .actor_email
                .as_deref()
                .filter(|_| self.run.actor_subject.as_deref() == Some(self.actor)),
            action: action(workflow, "completed"),
            audit_detail: &audit_detail,
            lock_key: key,
        };
        let Some(ended) = store::end_run(conn, self.run.id, self.journal.epoch, ending).await? else {
            // Taken over since: the new owner records the end.
            lock.release().await;
            return Ok(None);
        };
        lock.release_unlocked();

        self.engine
            .metrics
            .provisioning_runs_total
            .with_label_values(&[workflow.as_str(), status.as_str()])
            .inc();
        let (run_id, org, team) = (self.run.id, &self.run.org_id, &self.run.team_node_id);
        match &error {
            None => tracing::info!(%run_id, %org, %team, %workflow, "run succeeded"),
            Some((line, _)) => {
                tracing::warn!(%run_id, %org, %team, %workflow, %status, error = %line, "run did not succeed")
            }
        }

        if undone {
            // The undo changed what is held; the waiter reads the run back.
            return Ok(None);
        }
        let sealed_token = last
            .as_ref()
            .and_then(|l| l.sealed_token.clone())
            .or_else(|| lock_unpoisoned(&self.journal.sealed).clone());
        let run = RunRow {
            status,
            error: error.as_ref().map(|(line, _)| line.clone()),
            error_detail: error.map(|(_, detail)| detail),
            steps: summary,
            current_step: ended.current_step,
            team_token_held: self.run.team_token_held || sealed_token.is_some(),
            updated_at: ended.updated_at,
            finished_at: ended.finished_at,
            ..self.run.clone()
        };
        Ok(Some(FinishedRun {
            run,
            steps,
            sealed_token,
        }))
    }
}

/// Ends a run that cannot be executed (its request cannot be read, or nobody can act for it) as
/// failed, with the team's record and the audit row, and releases its lock.
pub(crate) async fn end_without_executing(
    engine: &Engine,
    run: &RunRow,
    mut lock: TeamLock,
    actor: &str,
    code: &str,
    message: &str,
) -> Result<(), sqlx::Error> {
    let error = json!({"code": code, "message": message});
    let key = lock.key();
    let Some(conn) = lock.connection() else {
        return Ok(());
    };
    let ending = store::RunEnding {
        end: store::RunEnd {
            status: RunStatus::Failed,
            error: Some(message),
            error_detail: Some(&error),
            steps: &run.steps,
            current_step: None,
        },
        last_step: None,
        team: store::TeamRunEnd {
            status: workflow::team_status_after(run.workflow, RunStatus::Failed),
            bootstrapped: false,
        },
        actor_subject: actor,
        actor_email: None,
        action: action(run.workflow, "completed"),
        audit_detail: &json!({ "error": error }),
        lock_key: key,
    };
    if store::end_run(conn, run.id, run.executions, ending).await?.is_some() {
        lock.release_unlocked();
        engine
            .metrics
            .provisioning_runs_total
            .with_label_values(&[run.workflow.as_str(), RunStatus::Failed.as_str()])
            .inc();
    } else {
        lock.release().await;
    }
    Ok(())
}

/// The audit action of a workflow's event: `provision.completed`, `deprovision.requested`, ...
pub fn action(workflow: Workflow, what: &str) -> &'static str {
    match (workflow, what) {
        (Workflow::Provision, "requested") => "provision.requested",
        (Workflow::Provision, "retried") => "provision.retried",
        (Workflow::Provision, "cancel_requested") => "provision.cancel_requested",
        (Workflow::Provision, _) => "provision.completed",
        (Workflow::Deprovision, "requested") => "deprovision.requested",
        (Workflow::Deprovision, "retried") => "deprovision.retried",
        (Workflow::Deprovision, "cancel_requested") => "deprovision.cancel_requested",
        (Workflow::Deprovision, _) => "deprovision.completed",
    }
}

/// What a deprovisioning run removed: its steps' `deleted` entries in one object (the existing
/// service's answer).
pub fn deleted_of(steps: &[StepRow]) -> Value {
    let mut deleted = serde_json::Map::new();
    for step in steps {
        if let Some(Value::Object(entries)) = step.result.as_ref().and_then(|r| r.get("deleted")) {
            deleted.extend(entries.clone());
        }
    }
    Value::Object(deleted)
}

/// What to do after a step's attempt failed.
#[derive(Debug, PartialEq)]
pub(crate) enum AfterFailure {
    /// Try again after this pause.
    Retry(Duration),
    /// The step fails, and with it the run.
    Fail,
    /// Another attempt would start past the run's deadline: the run stops as timed out, and a
    /// retry resumes it at this step.
    OutOfTime,
}

/// A transient error is retried while the policy allows another attempt (attempts and total time,
/// the pause included) and the run's deadline is not reached by then; anything else fails the
/// step.
pub(crate) fn after_failure(
    policy: &RetryPolicy,
    tries: u32,
    elapsed: Duration,
    error: &StepError,
    time_left: Option<Duration>,
) -> AfterFailure {
    let delay = policy.delay(tries, error.retry_after);
    if !error.transient || !policy.allows_another(tries, elapsed, delay) {
        AfterFailure::Fail
    } else if time_left.is_some_and(|left| delay >= left) {
        AfterFailure::OutOfTime
    } else {
        AfterFailure::Retry(delay)
    }
}

/// What a run looks like to someone waiting for it.
pub struct RunState {
    pub run: RunRow,
    /// Its steps, when the executor handed them over (else the view reads them).
    pub steps: Option<Vec<StepRow>>,
    pub sealed_token: Option<Vec<u8>>,
}

impl From<RunRow> for RunState {
    fn from(run: RunRow) -> Self {
        Self {
            run,
            steps: None,
            sealed_token: None,
        }
    }
}

/// Waits until the run is final or `deadline` passes. A run executing in this process hands its
/// end over (no read); one executing elsewhere is polled.
pub async fn wait_for_final(
    engine: &Engine,
    run_id: Uuid,
    slot: Option<Arc<RunSlot>>,
    deadline: tokio::time::Instant,
) -> Result<Option<RunState>, sqlx::Error> {
    let mut slot = slot;
    loop {
        if let Some(slot) = slot.take().or_else(|| engine.0.registry.slot(run_id)) {
            let done = slot.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if lock_unpoisoned(&slot.finished).is_none() && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    () = done => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            if let Some(finished) = slot.finished() {
                return Ok(Some(RunState {
                    run: finished.run.clone(),
                    steps: Some(finished.steps.clone()),
                    sealed_token: finished.sealed_token.clone(),
                }));
            }
        }
        let run = store::get_run(&engine.db, run_id).await?;
        match run {
            None => return Ok(None),
            Some(run) if run.is_final() || tokio::time::Instant::now() >= deadline => return Ok(Some(run.into())),
            Some(_) => {}
        }
        let poll = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
        tokio::time::sleep_until(poll).await;
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
            after_failure(&p, 1, Duration::ZERO, &error(true), None),
            AfterFailure::Retry(d) if d <= Duration::from_millis(100)
        ));
        assert_eq!(
            after_failure(&p, 3, Duration::ZERO, &error(true), None),
            AfterFailure::Fail
        );
        assert_eq!(
            after_failure(&p, 1, Duration::from_secs(10), &error(true), None),
            AfterFailure::Fail,
            "out of time"
        );
    }

    #[test]
    fn a_permanent_failure_fails_at_once() {
        assert_eq!(
            after_failure(&policy(), 1, Duration::ZERO, &error(false), None),
            AfterFailure::Fail
        );
    }

    #[test]
    fn a_retry_that_would_start_past_the_deadline_times_the_run_out() {
        let p = policy();
        // No time left: out of time whatever the jittered delay (full jitter can be ~0 ms, so a
        // few milliseconds left would make this test flaky).
        assert_eq!(
            after_failure(&p, 1, Duration::ZERO, &error(true), Some(Duration::ZERO)),
            AfterFailure::OutOfTime
        );
        assert!(matches!(
            after_failure(&p, 1, Duration::ZERO, &error(true), Some(Duration::from_secs(60))),
            AfterFailure::Retry(_)
        ));
        // A permanent failure is a failure, deadline or not.
        assert_eq!(
            after_failure(&p, 1, Duration::ZERO, &error(false), Some(Duration::ZERO)),
            AfterFailure::Fail
        );
    }

    #[test]
    fn a_neighbours_retry_after_is_honoured() {
        let mut slow = error(true);
        slow.retry_after = Some(Duration::from_millis(700));
        assert!(matches!(
            after_failure(&policy(), 1, Duration::ZERO, &slow, None),
            AfterFailure::Retry(d) if d >= Duration::from_millis(700)
        ));
    }
}
