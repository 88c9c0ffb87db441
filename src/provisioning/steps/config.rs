//! The team's config in the config service: routing and the pipeline's team id (provisioning),
//! and routing and agent URL removed (deprovisioning).

use serde_json::{json, Map, Value};

use super::{StepContext, StepDone, StepError, TeamScope};
use crate::clients::NeighbourError;
use crate::provisioning::request::TeamSpec;

/// Sets the team's routing lists as asked (each replaces the team's list of that key; keys never
/// asked for stay the config service's) and the pipeline's team id, creating the team's node when
/// the config service does not know it.
pub(super) async fn patch(cx: &StepContext<'_>, spec: &TeamSpec) -> Result<StepDone, StepError> {
    let scope = &cx.scope;
    let mut patch = json!({"ai_pipeline": {"team_id": scope.team.as_str()}});
    if !spec.routing.is_empty() {
        patch["routing"] = json!(spec.routing);
    }
    patch_creating_node(scope, &patch).await?;
    Ok(json!({"patched": patch}).into())
}

/// Patches the team's config, creating its node first when the config service does not know it.
pub(super) async fn patch_creating_node(scope: &TeamScope<'_>, patch: &Value) -> Result<(), StepError> {
    let config = &scope.engine.config_service;
    let (org, team, credential) = (scope.org.as_str(), scope.team.as_str(), scope.credential);
    match config.patch_node_config(credential, org, team, patch).await {
        Ok(_) => Ok(()),
        Err(NeighbourError::Status { status: 404, .. }) => {
            config.create_team_node(credential, org, team).await?;
            config.patch_node_config(credential, org, team, patch).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The team's effective config; `None` when the config service has no such team.
pub(super) async fn effective(scope: &TeamScope<'_>) -> Result<Option<Value>, StepError> {
    match scope
        .engine
        .config_service
        .effective_config(scope.credential, scope.org, scope.team)
        .await
    {
        Ok(config) => Ok(Some(config)),
        Err(NeighbourError::Status { status: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What routes webhooks to the team: its non-empty routing lists and its dedicated agent URL.
struct Routed {
    keys: Vec<String>,
    dedicated_url: bool,
}

fn routed(config: &Value) -> Routed {
    let keys = config
        .get("routing")
        .and_then(Value::as_object)
        .map(|routing| {
            routing
                .iter()
                .filter(|(_, values)| match values {
                    Value::Array(items) => !items.is_empty(),
                    Value::String(s) => !s.is_empty(),
                    _ => false,
                })
                .map(|(key, _)| key.clone())
                .collect()
        })
        .unwrap_or_default();
    let dedicated_url = config
        .pointer("/agent/dedicated_service_url")
        .is_some_and(|url| !url.is_null() && url != "");
    Routed { keys, dedicated_url }
}

/// Empties every routing list and removes the dedicated agent URL, so that webhooks for the team
/// answer `unrouted` from now on. Nothing to clear is nothing written.
pub(super) async fn clear_routing(scope: &TeamScope<'_>) -> Result<StepDone, StepError> {
    let Some(config) = effective(scope).await? else {
        return Ok(json!({"deleted": {"routing": "not_found"}}).into());
    };
    let Routed { keys, dedicated_url } = routed(&config);
    if !keys.is_empty() || dedicated_url {
        let mut patch = Map::new();
        if !keys.is_empty() {
            let emptied: Map<String, Value> = keys.iter().map(|k| (k.clone(), json!([]))).collect();
            patch.insert("routing".into(), Value::Object(emptied));
        }
        if dedicated_url {
            patch.insert("agent".into(), json!({"dedicated_service_url": null}));
        }
        scope
            .engine
            .config_service
            .patch_node_config(scope.credential, scope.org, scope.team, &Value::Object(patch))
            .await?;
    }
    Ok(json!({"deleted": {"routing": {"cleared": keys, "dedicated_service_url": dedicated_url}}}).into())
}

pub(super) async fn plan_clear_routing(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    Ok(match effective(scope).await? {
        None => json!({"deleted": {"routing": "not_found"}}),
        Some(config) => {
            let Routed { keys, dedicated_url } = routed(&config);
            json!({"deleted": {"routing": {"would_clear": keys, "dedicated_service_url": dedicated_url}}})
        }
    })
}

/// The team's routing as the config service has it.
pub(super) async fn observe_routing(scope: &TeamScope<'_>) -> Result<Value, StepError> {
    Ok(match effective(scope).await? {
        None => Value::Null,
        Some(config) => json!({"routing": config.get("routing").cloned().unwrap_or_else(|| json!({}))}),
    })
}
