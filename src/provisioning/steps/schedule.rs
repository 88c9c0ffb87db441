//! The team's CronJobs: the AI pipeline's scheduled ingestion (created, updated or removed to match
//! what was asked) and, when deprovisioning, dependency discovery too.

use k8s_openapi::api::batch::v1::CronJob;
use serde_json::{json, Value};

use super::{apply_owned, config, delete_owned, owned, recorded_str, StepContext, StepDone, StepError, TeamScope};
use crate::provisioning::cron;
use crate::provisioning::objects::CronJobKind;
use crate::provisioning::request::TeamSpec;

/// Applies the pipeline's CronJob when the schedule is on; removes it when it is off.
pub(super) async fn converge(cx: &StepContext<'_>, spec: &TeamSpec) -> Result<StepDone, StepError> {
    let scope = &cx.scope;
    let (org, team) = (scope.org.as_str(), scope.team.as_str());
    if !spec.pipeline_schedule_enabled {
        let removed = remove(scope, CronJobKind::Pipeline).await?;
        return Ok(json!({"removed": removed}).into());
    }
    let schedule = match &spec.pipeline_schedule {
        Some(schedule) => schedule.clone(),
        None => configured_schedule(scope).await?,
    };
    let cronjob = scope
        .objects()
        .cronjob(CronJobKind::Pipeline, &schedule, spec.pipeline_schedule_suspended);
    let (applied, created) = apply_owned(&scope.engine.kube, &cronjob).await?;
    Ok(json!({"result": {
        "name": applied.name, "namespace": applied.namespace, "schedule": schedule,
        "org_id": org, "team_node_id": team, "created": created,
        "uid": applied.uid, "resource_version": applied.resource_version,
    }})
    .into())
}

/// The team config's `ai_pipeline.schedule`, else the default; validated like a requested one.
async fn configured_schedule(scope: &TeamScope<'_>) -> Result<String, StepError> {
    let config = config::effective(scope).await?.unwrap_or(Value::Null);
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

/// The expected object of a kind, for its name and ownership (the schedule does not matter).
fn expected(scope: &TeamScope<'_>, kind: CronJobKind) -> CronJob {
    scope.objects().cronjob(kind, kind.default_schedule(), false)
}

/// Deletes the team's CronJob of that kind: `{name, namespace, deleted: true}`, or "not_found".
async fn remove(scope: &TeamScope<'_>, kind: CronJobKind) -> Result<Value, StepError> {
    let namespace = &scope.engine.kubernetes.namespace;
    Ok(match delete_owned(&scope.engine.kube, &expected(scope, kind)).await? {
        Some((name, uid)) => json!({"name": name, "namespace": namespace, "deleted": true, "uid": uid}),
        None => json!("not_found"),
    })
}

/// Deletes the CronJob this run created (by the uid it recorded: never one created since, nor
/// one the team had before, which the run only updated).
pub(super) async fn undo(cx: &StepContext<'_>) -> Result<Value, StepError> {
    let created = cx.recorded.and_then(|r| r.pointer("/result/created")) == Some(&json!(true));
    let Some(name) = recorded_str(cx.recorded, "/result/name").filter(|_| created) else {
        return Ok(json!({"note": "no CronJob was created by this run"}));
    };
    cx.scope
        .engine
        .kube
        .delete::<CronJob>(name, recorded_str(cx.recorded, "/result/uid"))
        .await?;
    Ok(json!({"deleted": [format!("CronJob/{name}")]}))
}

/// A CronJob as the existing service's `/pipeline` endpoint described it.
fn cronjob_status(cronjob: &CronJob) -> Value {
    let spec = cronjob.spec.as_ref();
    let status = cronjob.status.as_ref();
    json!({
        "name": cronjob.metadata.name,
        "namespace": cronjob.metadata.namespace,
        "schedule": spec.map(|s| s.schedule.clone()),
        "suspended": spec.and_then(|s| s.suspend).unwrap_or(false),
        "last_schedule_time": status.and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0.to_string()),
        "active_jobs": status.and_then(|s| s.active.as_ref()).map_or(0, Vec::len),
    })
}

async fn observe(scope: &TeamScope<'_>, kind: CronJobKind) -> Result<Value, StepError> {
    Ok(owned(&scope.engine.kube, &expected(scope, kind))
        .await?
        .map_or(Value::Null, |cronjob| cronjob_status(&cronjob)))
}

pub(super) async fn observe_pipeline(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    observe(scope, CronJobKind::Pipeline).await
}

/// The live state of both of the team's CronJobs.
pub(crate) async fn observe_all(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    Ok(json!({
        "pipeline_cronjob": observe(scope, CronJobKind::Pipeline).await?,
        "dependency_discovery_cronjob": observe(scope, CronJobKind::Discovery).await?,
    }))
}

/// Deletes both of the team's CronJobs (the existing service's keys for each).
pub(super) async fn delete_all(scope: &TeamScope<'_>) -> Result<StepDone, StepError> {
    Ok(json!({"deleted": {
        "pipeline_cronjob": remove(scope, CronJobKind::Pipeline).await?,
        "dependency_discovery_cronjob": remove(scope, CronJobKind::Discovery).await?,
    }})
    .into())
}

pub(super) async fn plan_delete_all(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    let namespace = &scope.engine.kubernetes.namespace;
    let mut plan = serde_json::Map::new();
    for (key, kind) in [
        ("pipeline_cronjob", CronJobKind::Pipeline),
        ("dependency_discovery_cronjob", CronJobKind::Discovery),
    ] {
        let entry = match owned(&scope.engine.kube, &expected(scope, kind)).await? {
            Some(cronjob) => json!({"name": cronjob.metadata.name, "namespace": namespace, "would_delete": true}),
            None => json!("not_found"),
        };
        plan.insert(key.into(), entry);
    }
    Ok(json!({ "deleted": plan }))
}
