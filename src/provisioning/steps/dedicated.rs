//! An enterprise team's dedicated agent: its Deployment, its Service, and the URL in the team
//! config that sends the team's agent runs there.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use serde_json::{json, Value};

use super::{
    apply_owned, config, delete_owned, is_teams, owned, recorded_str, StepContext, StepDone, StepError, TeamObject,
    TeamScope,
};
use crate::clients::kubernetes::{AppliedObject, KubeClient};
use crate::domain::DeploymentMode;
use crate::provisioning::objects;
use crate::provisioning::request::TeamSpec;

/// Applies the dedicated agent for a dedicated team; for a shared one, removes it and the URL
/// (else its webhooks would keep going to an agent no longer wanted).
pub(super) async fn converge(cx: &StepContext<'_>, spec: &TeamSpec) -> Result<StepDone, StepError> {
    let scope = &cx.scope;
    if spec.deployment_mode == DeploymentMode::Shared {
        let removed = remove(scope).await?;
        return Ok(json!({"removed": removed}).into());
    }
    let (org, team) = (scope.org.as_str(), scope.team.as_str());
    let objects = scope.objects();
    let kube = &scope.engine.kube;
    let url = objects::dedicated_agent_url(org, team, &scope.engine.kubernetes.namespace);
    // Half done is not left behind: what an attempt created goes again if a later part of it
    // fails, so a failed step leaves the team as it found it (a retry applies it all again).
    let (deployment, deployment_created) = apply_owned(kube, &objects.dedicated_agent_deployment()).await?;
    let (service, service_created) = match apply_owned(kube, &objects.dedicated_agent_service()).await {
        Ok(applied) => applied,
        Err(e) => {
            if deployment_created {
                discard::<Deployment>(kube, &deployment).await;
            }
            return Err(e);
        }
    };
    let patch = json!({"agent": {"dedicated_service_url": url, "deployment_mode": "dedicated"}});
    if let Err(e) = config::patch_creating_node(scope, &patch).await {
        if service_created {
            discard::<Service>(kube, &service).await;
        }
        if deployment_created {
            discard::<Deployment>(kube, &deployment).await;
        }
        return Err(e);
    }
    Ok(json!({"result": {
        "name": deployment.name, "namespace": deployment.namespace, "org_id": org, "team_node_id": team,
        "replicas": 1, "service_url": url,
        "deployment_uid": deployment.uid, "service_uid": service.uid,
        "deployment_created": deployment_created, "service_created": service_created,
    }})
    .into())
}

/// Deletes an object this attempt created, as a best effort: the error that made the attempt fail
/// is the one reported.
async fn discard<K: TeamObject>(kube: &KubeClient, applied: &AppliedObject) {
    if let Err(e) = kube.delete::<K>(&applied.name, applied.uid.as_deref()).await {
        tracing::warn!(name = %applied.name, error = %e, "could not remove an object a failed step created; a retry applies it again");
    }
}

/// Deletes the team's Deployment and Service (those that are the team's) and, if the team config
/// still points at a dedicated agent, its URL. The Service carries no ids of its own: it is
/// deleted only with a Deployment that is the team's, or when there is none.
async fn remove(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    let objects = scope.objects();
    let kube = &scope.engine.kube;
    let expected = objects.dedicated_agent_deployment();
    let name = expected.metadata.name.clone().unwrap_or_default();
    let existing = kube.get::<Deployment>(&name).await?;
    let another_teams = existing.as_ref().is_some_and(|d| !is_teams(d, &expected));
    let deployment = match existing.filter(|d| is_teams(d, &expected)) {
        Some(ours) => {
            kube.delete::<Deployment>(&name, ours.metadata.uid.as_deref()).await?;
            Some(())
        }
        None => None,
    };
    let service = if another_teams {
        None
    } else {
        delete_owned(kube, &objects.dedicated_agent_service()).await?
    };
    let configured = config::effective(scope)
        .await?
        .and_then(|c| c.pointer("/agent/dedicated_service_url").cloned())
        .is_some_and(|url| !url.is_null() && url != "");
    if configured {
        let patch = json!({"agent": {"dedicated_service_url": null, "deployment_mode": "shared"}});
        config::patch_creating_node(scope, &patch).await?;
    }
    if deployment.is_none() && service.is_none() {
        return Ok(json!("not_found"));
    }
    Ok(json!({
        "name": objects::dedicated_agent_deployment_name(scope.org, scope.team),
        "namespace": scope.engine.kubernetes.namespace,
        "deployment_deleted": deployment.is_some(),
        "service_deleted": service.is_some(),
        "dedicated_service_url_cleared": configured,
    }))
}

/// Deletes what this run created (by the uids it recorded), and clears the URL it wrote if the
/// team was not dedicated before.
pub(super) async fn undo(cx: &StepContext<'_>) -> Result<Value, StepError> {
    let scope = &cx.scope;
    if recorded_str(cx.recorded, "/result/name").is_none() {
        return Ok(json!({"note": "no dedicated agent was applied by this run"}));
    }
    let created = |key: &str| cx.recorded.and_then(|r| r.pointer(key)) == Some(&json!(true));
    let service = objects::dedicated_agent_service_name(scope.org, scope.team);
    let deployment = objects::dedicated_agent_deployment_name(scope.org, scope.team);
    let kube = &scope.engine.kube;
    let mut deleted = Vec::new();
    if created("/result/service_created") {
        kube.delete::<Service>(&service, recorded_str(cx.recorded, "/result/service_uid"))
            .await?;
        deleted.push(format!("Service/{service}"));
    }
    if created("/result/deployment_created") {
        kube.delete::<Deployment>(&deployment, recorded_str(cx.recorded, "/result/deployment_uid"))
            .await?;
        deleted.push(format!("Deployment/{deployment}"));
        config::patch_creating_node(
            scope,
            &json!({"agent": {"dedicated_service_url": null, "deployment_mode": null}}),
        )
        .await?;
    }
    Ok(json!({ "deleted": deleted }))
}

/// A dedicated agent's Deployment as the existing service's `/deployment` endpoint described it.
fn deployment_status(deployment: &Deployment, service_url: &str) -> Value {
    let status = deployment.status.as_ref();
    let conditions: Vec<Value> = status
        .and_then(|s| s.conditions.as_ref())
        .map(|conditions| {
            conditions
                .iter()
                .map(|c| json!({"type": c.type_, "status": c.status, "reason": c.reason}))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "name": deployment.metadata.name,
        "namespace": deployment.metadata.namespace,
        "replicas": deployment.spec.as_ref().and_then(|s| s.replicas),
        "ready_replicas": status.and_then(|s| s.ready_replicas).unwrap_or(0),
        "available_replicas": status.and_then(|s| s.available_replicas).unwrap_or(0),
        "service_url": service_url,
        "conditions": conditions,
    })
}

pub(super) async fn observe(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    let deployment = owned(&scope.engine.kube, &scope.objects().dedicated_agent_deployment()).await?;
    let url = objects::dedicated_agent_url(scope.org, scope.team, &scope.engine.kubernetes.namespace);
    Ok(deployment.map_or(Value::Null, |d| deployment_status(&d, &url)))
}

/// Deletes the dedicated agent (the existing service's `dedicated_deployment` key).
pub(super) async fn delete(scope: &TeamScope<'_>) -> Result<StepDone, StepError> {
    Ok(json!({"deleted": {"dedicated_deployment": remove(scope).await?}}).into())
}

pub(super) async fn plan_delete(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    let objects = scope.objects();
    let kube = &scope.engine.kube;
    let deployment = owned(kube, &objects.dedicated_agent_deployment()).await?.is_some();
    let service = owned(kube, &objects.dedicated_agent_service()).await?.is_some();
    let entry = if deployment || service {
        json!({
            "name": objects::dedicated_agent_deployment_name(scope.org, scope.team),
            "namespace": scope.engine.kubernetes.namespace,
            "would_delete_deployment": deployment,
            "would_delete_service": service,
        })
    } else {
        json!("not_found")
    };
    Ok(json!({ "deleted": { "dedicated_deployment": entry } }))
}
