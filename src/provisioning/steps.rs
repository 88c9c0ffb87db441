//! What each provisioning step does, and how a completed one is undone: from the handles its
//! earlier execution recorded, never from recomputed state.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Service;
use serde_json::{json, Value};
use uuid::Uuid;

use super::engine::Engine;
use super::objects::{self, CronJobKind, TeamObjects};
use super::request::ProvisionRequest;
use super::{cron, store, token};
use crate::clients::kubernetes::{self as k8s, KubeClient};
use crate::clients::NeighbourError;
use crate::config::Secret;
use crate::domain::Step;

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
    pub(crate) fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            transient: false,
            retry_after: None,
        }
    }

    /// The database, reached from inside a step: worth another attempt.
    pub(crate) fn database(e: &sqlx::Error) -> Self {
        Self {
            code: "database_unavailable",
            message: e.to_string(),
            transient: true,
            retry_after: None,
        }
    }

    pub(crate) fn to_json(&self, step: Step) -> Value {
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

/// A step's recorded result, and the team token it issued (sealed in the same transaction).
pub struct StepDone {
    pub result: Value,
    pub issued_token: Option<Secret>,
}

impl From<Value> for StepDone {
    fn from(result: Value) -> Self {
        Self {
            result,
            issued_token: None,
        }
    }
}

/// One attempt of a step. Every step is idempotent: done twice, it leaves what it leaves once.
pub async fn perform(
    engine: &Engine,
    run_id: Uuid,
    step: Step,
    position: i16,
    request: &ProvisionRequest,
    credential: &Secret,
) -> Result<StepDone, StepError> {
    let org = request.org_id.as_str();
    let team = request.team_node_id.as_str();
    let objects = TeamObjects {
        kubernetes: &engine.kubernetes,
        config_service_url: &engine.config_service_url,
        org,
        team,
    };
    match step {
        Step::ConfigPatch => {
            let mut patch = json!({"ai_pipeline": {"team_id": team}});
            if !request.routing.is_empty() {
                patch["routing"] = json!(request.routing);
            }
            patch_config_creating_node(engine, credential, org, team, &patch).await?;
            Ok(json!({"patched": patch}).into())
        }
        Step::TeamToken => token::issue_once(engine, run_id, position, credential, org, team).await,
        Step::Bootstrap => {
            let key = format!("{run_id}:{step}");
            let answer = engine.ai_pipeline.bootstrap(credential, team, &key).await?;
            Ok(json!({"run": bounded(answer), "idempotency_key": key}).into())
        }
        Step::PipelineCronjob => {
            let schedule = match &request.pipeline_schedule {
                Some(schedule) => schedule.clone(),
                None => configured_schedule(engine, credential, org, team).await?,
            };
            let cronjob = objects.cronjob(CronJobKind::Pipeline, &schedule, false);
            let applied = apply_owned(&engine.kube, &cronjob).await?;
            Ok(json!({"result": {
                "name": applied.name, "namespace": applied.namespace, "schedule": schedule,
                "org_id": org, "team_node_id": team, "created": true,
                "uid": applied.uid, "resource_version": applied.resource_version,
            }})
            .into())
        }
        Step::DedicatedDeployment => {
            let deployment = apply_owned(&engine.kube, &objects.dedicated_agent_deployment()).await?;
            let service = apply_owned(&engine.kube, &objects.dedicated_agent_service()).await?;
            let url = objects::dedicated_agent_url(org, team, &engine.kubernetes.namespace);
            let patch = json!({"agent": {"dedicated_service_url": url, "deployment_mode": "dedicated"}});
            patch_config_creating_node(engine, credential, org, team, &patch).await?;
            Ok(json!({"result": {
                "name": deployment.name, "namespace": deployment.namespace, "org_id": org, "team_node_id": team,
                "replicas": 1, "service_url": url,
                "deployment_uid": deployment.uid, "service_uid": service.uid,
            }})
            .into())
        }
    }
}

/// Applies a team's object unless an object of that name belongs to someone else: another team
/// whose name sanitises alike, or something this service did not create.
async fn apply_owned<K>(kube: &KubeClient, object: &K) -> Result<k8s::AppliedObject, StepError>
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

/// Patches the team's config, creating its node first when the config service does not know it.
pub(crate) async fn patch_config_creating_node(
    engine: &Engine,
    credential: &Secret,
    org: &str,
    team: &str,
    patch: &Value,
) -> Result<(), StepError> {
    match engine
        .config_service
        .patch_node_config(credential, org, team, patch)
        .await
    {
        Ok(_) => Ok(()),
        Err(NeighbourError::Status { status: 404, .. }) => {
            engine.config_service.create_team_node(credential, org, team).await?;
            engine
                .config_service
                .patch_node_config(credential, org, team, patch)
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The team config's `ai_pipeline.schedule`, else the default; validated like a requested one.
async fn configured_schedule(engine: &Engine, credential: &Secret, org: &str, team: &str) -> Result<String, StepError> {
    let config = engine.config_service.effective_config(credential, org, team).await?;
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
pub async fn undo(
    engine: &Engine,
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
            match step.name {
                Step::DedicatedDeployment => {
                    let service = objects::dedicated_agent_service_name(org, team);
                    let deployment = objects::dedicated_agent_deployment_name(org, team);
                    engine
                        .kube
                        .delete::<Service>(&service, recorded_uid(step, "/result/service_uid"))
                        .await?;
                    engine
                        .kube
                        .delete::<Deployment>(&deployment, recorded_uid(step, "/result/deployment_uid"))
                        .await?;
                    patch_config_creating_node(
                        engine,
                        credential,
                        org,
                        team,
                        &json!({"agent": {"dedicated_service_url": null, "deployment_mode": null}}),
                    )
                    .await?;
                    Ok(json!({"deleted": [format!("Deployment/{deployment}"), format!("Service/{service}")]}))
                }
                Step::PipelineCronjob => {
                    let name = objects::pipeline_cronjob_name(org, team);
                    engine
                        .kube
                        .delete::<CronJob>(&name, recorded_uid(step, "/result/uid"))
                        .await?;
                    Ok(json!({"deleted": [format!("CronJob/{name}")]}))
                }
                Step::TeamToken => match step
                    .result
                    .as_ref()
                    .filter(|r| r.get("created") == Some(&json!(true)))
                    .and_then(|r| r.get("token_id"))
                    .and_then(Value::as_str)
                {
                    Some(token_id) => {
                        engine
                            .config_service
                            .revoke_team_token(credential, org, team, token_id)
                            .await?;
                        store::erase_team_token(&engine.db, run_id)
                            .await
                            .map_err(|e| StepError::permanent("database", e.to_string()))?;
                        Ok(json!({"revoked_token_id": token_id}))
                    }
                    None => Ok(json!({"note": "no token was issued by this run"})),
                },
                // Neither can be undone safely: the bootstrap already ran, and the config patch
                // merged into config we did not snapshot. Both are idempotent on the next run.
                Step::ConfigPatch | Step::Bootstrap => Ok(json!({"note": "left in place: not reversible"})),
            }
        }
        .await;
        match undone {
            Ok(note) => store::mark_step_rolled_back(&engine.db, run_id, step.position, &note).await?,
            Err(e) => problems.push(e.to_json(step.name)),
        }
    }
    Ok(problems)
}
