//! Executes a provisioning run: each step recorded as it starts and ends, transient failures
//! retried within the step, permanent ones failing the run, optional rollback, and resumption of
//! runs whose owner died.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Service;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::lock::TeamLock;
use super::objects::{self, CronJobKind, TeamObjects};
use super::request::{DeploymentMode, ProvisionRequest};
use super::sealing::Sealer;
use super::{cron, store};
use crate::app::AppState;
use crate::audit::{self, AuditEntry};
use crate::clients::{kubernetes as k8s, NeighbourError};
use crate::config::Secret;
use crate::retry::RetryPolicy;

/// How long a neighbour's answer we keep in a step result.
const RESULT_LIMIT: usize = 4096;

/// Why a step failed: a stable code, a message for people, and whether retrying may help.
#[derive(Debug)]
pub struct StepError {
    pub code: &'static str,
    pub message: String,
    pub transient: bool,
    pub retry_after: Option<Duration>,
}

impl StepError {
    fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            transient: false,
            retry_after: None,
        }
    }

    fn to_json(&self, step: &str) -> Value {
        json!({"step": step, "code": self.code, "message": self.message})
    }
}

impl From<NeighbourError> for StepError {
    fn from(e: NeighbourError) -> Self {
        Self {
            code: e.code(),
            transient: e.is_transient(),
            retry_after: e.retry_after(),
            message: e.to_string(),
        }
    }
}

impl From<kube::Error> for StepError {
    fn from(e: kube::Error) -> Self {
        let transient = k8s::is_transient(&e);
        let message = match &e {
            kube::Error::Api(status) => format!("kubernetes answered {}: {}", status.code, status.message),
            other => format!("kubernetes is unreachable: {other}"),
        };
        Self {
            code: if transient {
                "kubernetes_unavailable"
            } else {
                "kubernetes_rejected"
            },
            message: crate::clients::truncate(&message, 300),
            transient,
            retry_after: None,
        }
    }
}

/// Runs executing in this process, and a way to wake whoever waits for one to finish.
#[derive(Clone, Default)]
pub struct RunRegistry {
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
    pub fn notifier(&self, run_id: Uuid) -> Option<Arc<Notify>> {
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

/// Everything the executor needs beyond the app state.
pub struct Execution {
    pub run_id: Uuid,
    pub lock: TeamLock,
    /// The credential the steps act with: the caller's admin token, or the internal admin token
    /// when a replica resumes a run nobody is waiting for.
    pub credential: Secret,
    pub actor_subject: String,
}

/// Starts executing a run in the background; it keeps going if the client goes away.
pub fn spawn(state: &AppState, execution: Execution) {
    let tracker = state.provisioning.tracker.clone();
    state.provisioning.registry.started(execution.run_id);
    let state = state.clone();
    tracker.spawn(async move {
        let run_id = execution.run_id;
        state.metrics.provisioning_runs_in_progress.inc();
        if let Err(e) = execute(&state, execution).await {
            // The run stays `running` with its lock released: the resumer picks it up again.
            tracing::error!(%run_id, error = %e, "provisioning run interrupted by a database error; it will be resumed");
        }
        state.metrics.provisioning_runs_in_progress.dec();
        state.provisioning.registry.finished(run_id);
    });
}

enum Outcome {
    Succeeded,
    Failed {
        position: i16,
        step: String,
        error: StepError,
    },
    /// Shutting down between steps: leave the run to be resumed.
    Interrupted,
}

async fn execute(state: &AppState, execution: Execution) -> Result<(), sqlx::Error> {
    let Execution {
        run_id,
        mut lock,
        credential,
        actor_subject,
    } = execution;
    let result = execute_locked(state, run_id, &mut lock, &credential, &actor_subject).await;
    lock.release().await;
    result
}

async fn execute_locked(
    state: &AppState,
    run_id: Uuid,
    lock: &mut TeamLock,
    credential: &Secret,
    actor: &str,
) -> Result<(), sqlx::Error> {
    let Some(run) = store::get_run(&state.db, run_id).await? else {
        return Ok(());
    };
    if run.is_final() {
        return Ok(());
    }
    // A run the existing service recorded has no request to execute; it is never resumed.
    let Some(request) = run.request.as_ref().map(|r| r.0.clone()) else {
        return Ok(());
    };
    let mut steps = store::steps(&state.db, run_id).await?;
    let mut outcome = Outcome::Succeeded;

    for step in steps.iter_mut() {
        if matches!(step.status.as_str(), "succeeded" | "skipped" | "rolled_back") {
            continue;
        }
        if state.provisioning.stop.is_cancelled() {
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
        match run_step(state, run_id, step, &request, credential).await? {
            Ok(result) => {
                step.result = Some(result);
                step.status = "succeeded".into();
            }
            Err(error) => {
                outcome = Outcome::Failed {
                    position: step.position,
                    step: step.name.clone(),
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
            let mut tx = state.db.begin().await?;
            store::finish_run(
                &mut *tx,
                run_id,
                store::RunEnd {
                    status: "succeeded",
                    error: None,
                    error_detail: None,
                    steps: &summary,
                },
            )
            .await?;
            audit::record(
                &mut *tx,
                run_audit(&run, actor, "provision.completed", "succeeded", json!({})),
            )
            .await?;
            tx.commit().await?;
            state
                .metrics
                .provisioning_runs_total
                .with_label_values(&["succeeded"])
                .inc();
            tracing::info!(%run_id, org = %run.org_id, team = %run.team_node_id, "provisioning run succeeded");
            Ok(())
        }
        Outcome::Failed { position, step, error } => {
            let mut error_json = error.to_json(&step);
            let mut status = "failed";
            if request.rollback_on_failure {
                let completed: Vec<_> = steps
                    .iter()
                    .filter(|s| s.position < position && s.status != "skipped")
                    .cloned()
                    .collect();
                let problems = rollback(state, run_id, &request, credential, &completed).await?;
                if problems.is_empty() {
                    status = "rolled_back";
                } else {
                    error_json["rollback_errors"] = json!(problems);
                }
            }
            // Re-read: the failed step and any rollback are recorded there.
            let steps = store::steps(&state.db, run_id).await?;
            let summary = store::step_summary(&steps, &request);
            let one_line = format!("{step}: {}", error.message);
            let mut tx = state.db.begin().await?;
            store::finish_run(
                &mut *tx,
                run_id,
                store::RunEnd {
                    status,
                    error: Some(&one_line),
                    error_detail: Some(&error_json),
                    steps: &summary,
                },
            )
            .await?;
            audit::record(
                &mut *tx,
                run_audit(&run, actor, "provision.completed", status, json!({"error": error_json})),
            )
            .await?;
            tx.commit().await?;
            state.metrics.provisioning_runs_total.with_label_values(&[status]).inc();
            tracing::warn!(%run_id, org = %run.org_id, team = %run.team_node_id, %step, code = error.code, %status, "provisioning run failed");
            Ok(())
        }
    }
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

fn step_policy(state: &AppState) -> RetryPolicy {
    let p = &state.config.provisioning;
    RetryPolicy {
        initial: p.retry_initial,
        multiplier: 2.0,
        max_delay: p.retry_max,
        max_attempts: p.step_max_attempts,
        max_elapsed: p.step_max_elapsed,
    }
}

/// One step with its retries. The outer `Result` is the database; the inner is the step.
async fn run_step(
    state: &AppState,
    run_id: Uuid,
    step: &store::StepRow,
    request: &ProvisionRequest,
    credential: &Secret,
) -> Result<Result<Value, StepError>, sqlx::Error> {
    let policy = step_policy(state);
    store::step_started(&state.db, run_id, step.position).await?;
    let started = Instant::now();
    let mut attempts = step.attempts;
    let mut tries = 0u32;
    loop {
        attempts += 1;
        tries += 1;
        if tries > 1 {
            store::step_attempt(&state.db, run_id, step.position, attempts).await?;
        }
        let attempt_started = Instant::now();
        let outcome = perform(state, run_id, &step.name, step.position, request, credential).await;
        let elapsed = attempt_started.elapsed().as_secs_f64();
        match outcome {
            Ok(done) => {
                state
                    .metrics
                    .provisioning_step_duration_seconds
                    .with_label_values(&[step.name.as_str(), "succeeded"])
                    .observe(elapsed);
                let mut conn = state.db.acquire().await?;
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                if let Some(token) = &done.issued_token {
                    store::seal_team_token(
                        &mut *tx,
                        run_id,
                        &state.provisioning.sealer.seal(token, run_id.as_bytes()),
                    )
                    .await?;
                }
                store::step_finished(
                    &mut tx,
                    run_id,
                    step.position,
                    "succeeded",
                    attempts,
                    Some(&done.result),
                    None,
                )
                .await?;
                tx.commit().await?;
                return Ok(Ok(done.result));
            }
            Err(error) => {
                let delay = policy.delay(tries, error.retry_after);
                let retry = error.transient
                    && policy.allows_another(tries, started.elapsed(), delay)
                    && !state.provisioning.stop.is_cancelled();
                state
                    .metrics
                    .provisioning_step_duration_seconds
                    .with_label_values(&[step.name.as_str(), if retry { "retried" } else { "failed" }])
                    .observe(elapsed);
                if retry {
                    tracing::info!(%run_id, step = %step.name, attempt = attempts, code = error.code, delay_ms = delay.as_millis() as u64, "step failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
                let mut conn = state.db.acquire().await?;
                store::step_finished(
                    &mut conn,
                    run_id,
                    step.position,
                    "failed",
                    attempts,
                    None,
                    Some(&error.to_json(&step.name)),
                )
                .await?;
                return Ok(Err(error));
            }
        }
    }
}

struct StepDone {
    result: Value,
    issued_token: Option<Secret>,
}

impl From<Value> for StepDone {
    fn from(result: Value) -> Self {
        Self {
            result,
            issued_token: None,
        }
    }
}

async fn perform(
    state: &AppState,
    run_id: Uuid,
    step: &str,
    position: i16,
    request: &ProvisionRequest,
    credential: &Secret,
) -> Result<StepDone, StepError> {
    let org = request.org_id.as_str();
    let team = request.team_node_id.as_str();
    let objects = TeamObjects {
        kubernetes: &state.config.kubernetes,
        config_service_url: state.config.neighbours.config_service_url.as_str(),
        org,
        team,
    };
    match step {
        "config_patch" => {
            let mut patch = json!({"ai_pipeline": {"team_id": team}});
            if !request.routing.is_empty() {
                patch["routing"] = json!(request.routing);
            }
            patch_config_creating_node(state, credential, org, team, &patch).await?;
            Ok(json!({"patched": patch}).into())
        }
        "team_token" => issue_team_token_once(state, run_id, position, credential, org, team).await,
        "bootstrap" => {
            let key = format!("{run_id}:bootstrap");
            let answer = state.ai_pipeline.bootstrap(credential, team, &key).await?;
            Ok(json!({"run": bounded(answer), "idempotency_key": key}).into())
        }
        "pipeline_cronjob" => {
            let schedule = match &request.pipeline_schedule {
                Some(schedule) => schedule.clone(),
                None => configured_schedule(state, credential, org, team).await?,
            };
            let cronjob = objects.cronjob(CronJobKind::Pipeline, &schedule, false);
            let applied = apply_owned(&state.kube, &cronjob).await?;
            Ok(json!({"result": {
                "name": applied.name, "namespace": applied.namespace, "schedule": schedule,
                "org_id": org, "team_node_id": team, "created": true,
                "uid": applied.uid, "resource_version": applied.resource_version,
            }})
            .into())
        }
        "dedicated_deployment" => {
            let deployment = apply_owned(&state.kube, &objects.dedicated_agent_deployment()).await?;
            let service = apply_owned(&state.kube, &objects.dedicated_agent_service()).await?;
            let url = objects::dedicated_agent_url(org, team, &state.config.kubernetes.namespace);
            let patch = json!({"agent": {"dedicated_service_url": url, "deployment_mode": "dedicated"}});
            patch_config_creating_node(state, credential, org, team, &patch).await?;
            Ok(json!({"result": {
                "name": deployment.name, "namespace": deployment.namespace, "org_id": org, "team_node_id": team,
                "replicas": 1, "service_url": url,
                "deployment_uid": deployment.uid, "service_uid": service.uid,
            }})
            .into())
        }
        other => Err(StepError::permanent("unknown_step", format!("unknown step {other}"))),
    }
}

/// Applies a team's object unless an object of that name belongs to someone else: another team
/// whose name sanitises alike, or something this service did not create.
async fn apply_owned<K>(
    kube: &crate::clients::kubernetes::KubeClient,
    object: &K,
) -> Result<k8s::AppliedObject, StepError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let name = object.meta().name.clone().unwrap_or_default();
    if let Some(existing) = kube.get::<K>(&name).await? {
        if !objects::same_owner(existing.meta(), object.meta()) {
            return Err(StepError::permanent(
                "kubernetes_name_taken",
                format!(
                    "{} {name} already exists and belongs to another team",
                    K::kind(&Default::default())
                ),
            ));
        }
    }
    Ok(kube.apply(object).await?)
}

/// Issues a team token unless the team has an active one, without ever leaving an issued token
/// whose secret nobody holds. Before issuing, the step records which token ids already exist; if
/// an attempt died between the config service issuing and us sealing the secret (a crash, or a
/// timeout after the token was created), the next attempt finds an active token not in that list,
/// revokes it, and issues a fresh one it can hand out.
async fn issue_team_token_once(
    state: &AppState,
    run_id: Uuid,
    position: i16,
    credential: &Secret,
    org: &str,
    team: &str,
) -> Result<StepDone, StepError> {
    let database = |e: sqlx::Error| StepError {
        code: "database_unavailable",
        message: e.to_string(),
        transient: true,
        retry_after: None,
    };
    let intent = store::step_result(&state.db, run_id, position)
        .await
        .map_err(database)?;
    let known_before: Option<Vec<String>> = intent
        .as_ref()
        .filter(|r| r.get("issuing") == Some(&Value::Bool(true)))
        .and_then(|r| serde_json::from_value(r.get("known_token_ids").cloned().unwrap_or_default()).ok());

    let tokens = state.config_service.list_team_tokens(credential, org, team).await?;
    let mut active: Vec<&str> = tokens
        .iter()
        .filter(|t| !t.revoked)
        .map(|t| t.token_id.as_str())
        .collect();
    let mut revoked_orphans = Vec::new();
    if let Some(known) = &known_before {
        for orphan in active.iter().filter(|id| !known.iter().any(|k| k == *id)) {
            state
                .config_service
                .revoke_team_token(credential, org, team, orphan)
                .await?;
            tracing::warn!(%run_id, token_id = %orphan, "revoked a team token an interrupted attempt issued without handing it out");
            revoked_orphans.push(orphan.to_string());
        }
        active.retain(|id| known.iter().any(|k| k == id));
    }
    if !active.is_empty() {
        return Ok(json!({"created": false, "existing_tokens": tokens.len(), "active_token_ids": active}).into());
    }
    let all_ids: Vec<&str> = tokens.iter().map(|t| t.token_id.as_str()).collect();
    store::record_step_intent(
        &state.db,
        run_id,
        position,
        &json!({"issuing": true, "known_token_ids": all_ids}),
    )
    .await
    .map_err(database)?;
    let issued = state.config_service.issue_team_token(credential, org, team).await?;
    Ok(StepDone {
        result: json!({"created": true, "token_id": issued.token_id, "issued_at": issued.issued_at, "revoked_orphans": revoked_orphans}),
        issued_token: Some(issued.token),
    })
}

async fn patch_config_creating_node(
    state: &AppState,
    credential: &Secret,
    org: &str,
    team: &str,
    patch: &Value,
) -> Result<(), StepError> {
    match state
        .config_service
        .patch_node_config(credential, org, team, patch)
        .await
    {
        Ok(_) => Ok(()),
        Err(NeighbourError::Status { status: 404, .. }) => {
            state.config_service.create_team_node(credential, org, team).await?;
            state
                .config_service
                .patch_node_config(credential, org, team, patch)
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The team config's `ai_pipeline.schedule`, else the default; validated like a requested one.
async fn configured_schedule(
    state: &AppState,
    credential: &Secret,
    org: &str,
    team: &str,
) -> Result<String, StepError> {
    let config = state.config_service.effective_config(credential, org, team).await?;
    match config.pointer("/ai_pipeline/schedule").and_then(Value::as_str) {
        None => Ok(CronJobKind::Pipeline.default_schedule().to_string()),
        Some(schedule) => {
            cron::validate(schedule).map_err(|e| {
                StepError::permanent(
                    "invalid_configured_schedule",
                    format!("the team config's ai_pipeline.schedule {e}"),
                )
            })?;
            Ok(schedule.to_string())
        }
    }
}

fn bounded(value: Value) -> Value {
    if value.to_string().len() <= RESULT_LIMIT {
        value
    } else {
        json!({"truncated": true})
    }
}

/// The uid of an object a step created, as its result recorded it.
fn recorded_uid<'a>(step: &'a store::StepRow, pointer: &str) -> Option<&'a str> {
    step.result
        .as_ref()
        .and_then(|r| r.pointer(pointer))
        .and_then(Value::as_str)
}

/// Undoes completed steps in reverse. Returns what could not be undone.
async fn rollback(
    state: &AppState,
    run_id: Uuid,
    request: &ProvisionRequest,
    credential: &Secret,
    completed: &[store::StepRow],
) -> Result<Vec<Value>, sqlx::Error> {
    let org = request.org_id.as_str();
    let team = request.team_node_id.as_str();
    let mut problems = Vec::new();
    for step in completed.iter().rev() {
        let undone: Result<Value, StepError> = async {
            match step.name.as_str() {
                "dedicated_deployment" => {
                    let service = objects::dedicated_agent_service_name(org, team);
                    let deployment = objects::dedicated_agent_deployment_name(org, team);
                    state
                        .kube
                        .delete::<Service>(&service, recorded_uid(step, "/result/service_uid"))
                        .await?;
                    state
                        .kube
                        .delete::<Deployment>(&deployment, recorded_uid(step, "/result/deployment_uid"))
                        .await?;
                    patch_config_creating_node(
                        state,
                        credential,
                        org,
                        team,
                        &json!({"agent": {"dedicated_service_url": null, "deployment_mode": null}}),
                    )
                    .await?;
                    Ok(json!({"deleted": [format!("Deployment/{deployment}"), format!("Service/{service}")]}))
                }
                "pipeline_cronjob" => {
                    let name = objects::pipeline_cronjob_name(org, team);
                    state
                        .kube
                        .delete::<CronJob>(&name, recorded_uid(step, "/result/uid"))
                        .await?;
                    Ok(json!({"deleted": [format!("CronJob/{name}")]}))
                }
                "team_token" => match step
                    .result
                    .as_ref()
                    .and_then(|r| r.get("token_id"))
                    .and_then(Value::as_str)
                {
                    Some(token_id) if step.result.as_ref().and_then(|r| r.get("created")) == Some(&json!(true)) => {
                        state
                            .config_service
                            .revoke_team_token(credential, org, team, token_id)
                            .await?;
                        store::erase_team_token(&state.db, run_id)
                            .await
                            .map_err(|e| StepError::permanent("database", e.to_string()))?;
                        Ok(json!({"revoked_token_id": token_id}))
                    }
                    _ => Ok(json!({"note": "no token was issued by this run"})),
                },
                // Neither can be undone safely: the bootstrap already ran, and the config patch
                // merged into config we did not snapshot. Both are idempotent on the next run.
                _ => Ok(json!({"note": "left in place: not reversible"})),
            }
        }
        .await;
        match undone {
            Ok(note) => store::mark_step_rolled_back(&state.db, run_id, step.position, &note).await?,
            Err(e) => problems.push(e.to_json(&step.name)),
        }
    }
    Ok(problems)
}

/// Finds runs whose owner died (their lock is free) and resumes them. Runs on every replica.
pub async fn resume_orphans(state: AppState, stop: CancellationToken) {
    let interval = state.config.provisioning.resume_interval;
    loop {
        if let Err(e) = resume_once(&state).await {
            tracing::warn!(error = %e, "scanning for orphaned provisioning runs failed");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

pub async fn resume_once(state: &AppState) -> Result<usize, sqlx::Error> {
    // A run touched within the last half interval is very likely alive; the lock decides anyway.
    let idle = state.config.provisioning.resume_interval.as_secs_f64() / 2.0;
    let candidates = store::stale_running_runs(&state.db, idle, 50).await?;
    let mut resumed = 0;
    for (run_id, org, team) in candidates {
        let Some(lock) = TeamLock::try_acquire(&state.lock_db, &org, &team).await? else {
            continue;
        };
        // Re-read under the lock: the owner may have finished just before dying.
        let still_running = store::get_run(&state.db, run_id).await?.is_some_and(|r| !r.is_final());
        if !still_running {
            lock.release().await;
            continue;
        }
        let Some(credential) = state.config.internal_admin_token.clone() else {
            tracing::error!(%run_id, "cannot resume an orphaned run: ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set");
            let message = "the run's owner died and ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set; retry the run";
            let error = json!({"code": "resume_credential_missing", "message": message});
            store::finish_run(
                &state.db,
                run_id,
                store::RunEnd {
                    status: "failed",
                    error: Some(message),
                    error_detail: Some(&error),
                    steps: &json!({}),
                },
            )
            .await?;
            lock.release().await;
            continue;
        };
        store::count_execution(&state.db, run_id).await?;
        state.metrics.provisioning_runs_resumed_total.inc();
        tracing::info!(%run_id, %org, %team, "resuming an orphaned provisioning run");
        spawn(
            state,
            Execution {
                run_id,
                lock,
                credential,
                actor_subject: "orchestrator-resumer".into(),
            },
        );
        resumed += 1;
    }
    Ok(resumed)
}

/// Waits until the run is final or `deadline` passes. Wakes on the local executor's notice and
/// polls as a fallback, since the executor may live on another replica.
pub async fn wait_for_final(
    state: &AppState,
    run_id: Uuid,
    deadline: tokio::time::Instant,
) -> Result<Option<store::RunRow>, sqlx::Error> {
    loop {
        let notify = state.provisioning.registry.notifier(run_id);
        let notified = notify.as_ref().map(|n| n.notified());
        tokio::pin!(notified);
        if let Some(notified) = notified.as_mut().as_pin_mut() {
            notified.enable();
        }
        let run = store::get_run(&state.db, run_id).await?;
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

/// Shared handles of the provisioning capability.
#[derive(Clone)]
pub struct Provisioning {
    pub registry: RunRegistry,
    pub sealer: Sealer,
    pub tracker: tokio_util::task::TaskTracker,
    pub stop: CancellationToken,
}

pub fn deployment_mode_label(mode: DeploymentMode) -> &'static str {
    match mode {
        DeploymentMode::Shared => "shared",
        DeploymentMode::Dedicated => "dedicated",
    }
}
