//! The provision request: parsed by hand from JSON so that every problem is a 422 naming its
//! field, and normalised so the same request always hashes the same (idempotency).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::cron;
use crate::domain::{DeploymentMode, OrgId, ScheduleType, TeamNodeId};
use crate::error::{ApiError, OrInvalidField};

/// Routing keys the config service understands, as the plural list names a team's config uses.
pub const ROUTING_KEYS: &[&str] = &[
    "slack_channel_ids",
    "slack_workspace_ids",
    "github_repos",
    "pagerduty_service_ids",
    "incidentio_team_ids",
    "incidentio_alert_source_ids",
    "teams_channel_ids",
    "google_chat_space_ids",
    "coralogix_team_names",
    "services",
];

const MAX_KEY_LEN: usize = 128;
const MAX_ROUTING_VALUES: usize = 200;
const MAX_ROUTING_VALUE_LEN: usize = 256;

/// A provisioning request as asked. A field left out keeps what the team was asked before (a new
/// team: the default); see [`TeamSpec::resolve`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionRequest {
    pub org_id: OrgId,
    pub team_node_id: TeamNodeId,
    /// The routing lists to set; each replaces the team's list of that key.
    pub routing: BTreeMap<String, Vec<String>>,
    pub idempotency_key: Option<String>,
    pub pipeline_schedule: Option<String>,
    #[serde(default)]
    pub create_pipeline_schedule: Option<bool>,
    #[serde(default)]
    pub deployment_mode: Option<DeploymentMode>,
    pub rollback_on_failure: bool,
}

impl ProvisionRequest {
    /// The hash that tells a replay (same key, same request) from key reuse.
    pub fn hash(&self) -> String {
        let mut normalised = self.clone();
        normalised.idempotency_key = None;
        let bytes = serde_json::to_vec(&normalised).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }

    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let object = body
            .as_object()
            .ok_or_else(|| ApiError::unprocessable("invalid_body", "the request body must be a JSON object"))?;
        let org_id = OrgId::parse(required_string(object, "org_id")?).or_invalid("org_id")?;
        let team_node_id = TeamNodeId::parse(required_string(object, "team_node_id")?).or_invalid("team_node_id")?;

        let mut routing: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some(ids) = object.get("slack_channel_ids").filter(|v| !v.is_null()) {
            merge_values(
                &mut routing,
                "slack_channel_ids",
                string_list(ids, "slack_channel_ids")?,
            );
        }
        match object.get("routing") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (key, value) in map {
                    let field = format!("routing.{key}");
                    if !ROUTING_KEYS.contains(&key.as_str()) {
                        return Err(ApiError::invalid_field(
                            &field,
                            format!("unknown routing key; expected one of {}", ROUTING_KEYS.join(", ")),
                        ));
                    }
                    if !value.is_null() {
                        merge_values(&mut routing, key, string_list(value, &field)?);
                    }
                }
            }
            Some(_) => return Err(ApiError::invalid_field("routing", "must be an object of routing lists")),
        }

        let idempotency_key = idempotency_key(object)?;
        let pipeline_schedule = optional_string(object, "pipeline_schedule")?.map(|s| s.trim().to_string());
        if let Some(schedule) = &pipeline_schedule {
            cron::validate(schedule).map_err(|e| ApiError::invalid_field("pipeline_schedule", e))?;
        }
        let deployment_mode = optional_string(object, "deployment_mode")?
            .map(|mode| mode.parse::<DeploymentMode>())
            .transpose()
            .map_err(|_| ApiError::invalid_field("deployment_mode", "must be \"shared\" or \"dedicated\""))?;
        Ok(Self {
            org_id,
            team_node_id,
            routing,
            idempotency_key,
            pipeline_schedule,
            create_pipeline_schedule: optional_bool(object, "create_pipeline_schedule")?,
            deployment_mode,
            rollback_on_failure: optional_bool(object, "rollback_on_failure")?.unwrap_or(false),
        })
    }
}

/// What was asked of a team: the desired state a provisioning run converges it to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct TeamSpec {
    /// The routing lists this service set, by key (a key never set is the config service's alone).
    pub routing: BTreeMap<String, Vec<String>>,
    /// The AI pipeline's CronJob exists.
    pub pipeline_schedule_enabled: bool,
    /// Its cron expression; `None`: the team config's `ai_pipeline.schedule`, else the default.
    pub pipeline_schedule: Option<String>,
    /// Paused by an operator (`PUT .../schedules`): the CronJob stays, suspended. Provisioning
    /// leaves it as it is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pipeline_schedule_suspended: bool,
    pub deployment_mode: DeploymentMode,
    /// Inferred from the existing service's runs, not asked of this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inferred: bool,
}

impl TeamSpec {
    /// The request over what was asked before: a routing list given replaces that list, a
    /// schedule given (or `create_pipeline_schedule`) turns it on, `create_pipeline_schedule:
    /// false` alone turns it off, and anything left out stays as it was.
    pub fn resolve(previous: Option<&TeamSpec>, request: &ProvisionRequest) -> TeamSpec {
        let mut spec = previous.cloned().unwrap_or_default();
        spec.inferred = false;
        for (key, values) in &request.routing {
            spec.routing.insert(key.clone(), values.clone());
        }
        match (&request.pipeline_schedule, request.create_pipeline_schedule) {
            (Some(schedule), _) => {
                spec.pipeline_schedule_enabled = true;
                spec.pipeline_schedule = Some(schedule.clone());
            }
            (None, Some(create)) => spec.pipeline_schedule_enabled = create,
            (None, None) => {}
        }
        if let Some(mode) = request.deployment_mode {
            spec.deployment_mode = mode;
        }
        spec
    }
}

/// A deprovisioning request, the existing service's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeprovisionRequest {
    pub org_id: OrgId,
    pub team_node_id: TeamNodeId,
    /// `false` keeps the team's Kubernetes objects (tokens are revoked and routing cleared still).
    pub delete_k8s_resources: bool,
    /// Answer the plan from live state and change nothing.
    pub dry_run: bool,
    pub idempotency_key: Option<String>,
}

impl DeprovisionRequest {
    pub fn hash(&self) -> String {
        let normalised = json!({"delete_k8s_resources": self.delete_k8s_resources});
        hex::encode(Sha256::digest(normalised.to_string().as_bytes()))
    }

    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let object = body
            .as_object()
            .ok_or_else(|| ApiError::unprocessable("invalid_body", "the request body must be a JSON object"))?;
        let TeamRef { org_id, team_node_id } = TeamRef::parse(body)?;
        Ok(Self {
            org_id,
            team_node_id,
            delete_k8s_resources: optional_bool(object, "delete_k8s_resources")?.unwrap_or(true),
            dry_run: optional_bool(object, "dry_run")?.unwrap_or(false),
            idempotency_key: idempotency_key(object)?,
        })
    }
}

/// A body that names one team, `{org_id, team_node_id}` (`sync-cronjobs`, `pipeline/trigger`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamRef {
    pub org_id: OrgId,
    pub team_node_id: TeamNodeId,
}

impl TeamRef {
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let object = body
            .as_object()
            .ok_or_else(|| ApiError::unprocessable("invalid_body", "the request body must be a JSON object"))?;
        Ok(Self {
            org_id: OrgId::parse(required_string(object, "org_id")?).or_invalid("org_id")?,
            team_node_id: TeamNodeId::parse(required_string(object, "team_node_id")?).or_invalid("team_node_id")?,
        })
    }
}

/// One schedule of `PUT .../schedules`; what is left out keeps its current value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleChange {
    pub schedule_type: ScheduleType,
    pub cron_expression: Option<String>,
    pub enabled: Option<bool>,
}

/// At most one entry per schedule type, so a handful at most.
const MAX_SCHEDULES: usize = 8;

impl ScheduleChange {
    /// `{"schedules": [{"schedule_type", "cron_expression", "enabled"}]}`. `ai_pipeline` is
    /// accepted for `ingestion` (the team config's name for it).
    pub fn parse_all(body: &Value) -> Result<Vec<Self>, ApiError> {
        let object = body
            .as_object()
            .ok_or_else(|| ApiError::unprocessable("invalid_body", "the request body must be a JSON object"))?;
        let items = match object.get("schedules") {
            Some(Value::Array(items)) => items,
            None | Some(Value::Null) => return Err(ApiError::invalid_field("schedules", "is required")),
            Some(_) => return Err(ApiError::invalid_field("schedules", "must be a list")),
        };
        if items.len() > MAX_SCHEDULES {
            return Err(ApiError::invalid_field(
                "schedules",
                format!("at most {MAX_SCHEDULES} entries"),
            ));
        }
        let mut changes: Vec<ScheduleChange> = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let field = |name: &str| format!("schedules[{index}].{name}");
            let entry = item
                .as_object()
                .ok_or_else(|| ApiError::invalid_field(&format!("schedules[{index}]"), "must be an object"))?;
            let kind = match entry.get("schedule_type") {
                Some(Value::String(kind)) => kind.as_str(),
                None | Some(Value::Null) => {
                    return Err(ApiError::invalid_field(&field("schedule_type"), "is required"))
                }
                Some(_) => return Err(ApiError::invalid_field(&field("schedule_type"), "must be a string")),
            };
            let schedule_type = match kind {
                "ai_pipeline" => ScheduleType::Ingestion,
                other => other.parse::<ScheduleType>().map_err(|_| {
                    ApiError::invalid_field(
                        &field("schedule_type"),
                        format!("must be one of {}", ScheduleType::names()),
                    )
                })?,
            };
            if changes.iter().any(|c| c.schedule_type == schedule_type) {
                return Err(ApiError::invalid_field(&field("schedule_type"), "is listed twice"));
            }
            let cron_expression = match entry.get("cron_expression") {
                None | Some(Value::Null) => None,
                Some(Value::String(cron)) => {
                    super::cron::validate(cron)
                        .map_err(|why| ApiError::invalid_field(&field("cron_expression"), why))?;
                    Some(cron.trim().to_string())
                }
                Some(_) => return Err(ApiError::invalid_field(&field("cron_expression"), "must be a string")),
            };
            let enabled = match entry.get("enabled") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(enabled)) => Some(*enabled),
                Some(_) => return Err(ApiError::invalid_field(&field("enabled"), "must be true or false")),
            };
            changes.push(ScheduleChange {
                schedule_type,
                cron_expression,
                enabled,
            });
        }
        Ok(changes)
    }
}

fn idempotency_key(object: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let key = optional_string(object, "idempotency_key")?;
    if let Some(key) = &key {
        if key.is_empty() || key.chars().count() > MAX_KEY_LEN || key.chars().any(char::is_control) {
            return Err(ApiError::invalid_field(
                "idempotency_key",
                "must be 1 to 128 printable characters",
            ));
        }
    }
    Ok(key)
}

fn required_string(object: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    optional_string(object, field)?.ok_or_else(|| ApiError::invalid_field(field, "is required"))
}

fn optional_string(object: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid_field(field, "must be a string")),
    }
}

fn optional_bool(object: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid_field(field, "must be true or false")),
    }
}

/// A list of strings, or a single string.
fn string_list(value: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    let items: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        Value::String(_) => vec![value],
        _ => return Err(ApiError::invalid_field(field, "must be a list of strings")),
    };
    if items.len() > MAX_ROUTING_VALUES {
        return Err(ApiError::invalid_field(
            field,
            format!("at most {MAX_ROUTING_VALUES} values"),
        ));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::String(s)
                if !s.trim().is_empty() && s.len() <= MAX_ROUTING_VALUE_LEN && !s.chars().any(char::is_control) =>
            {
                Ok(s.trim().to_string())
            }
            _ => Err(ApiError::invalid_field(
                field,
                "each value must be a non-empty string of at most 256 characters",
            )),
        })
        .collect()
}

fn merge_values(routing: &mut BTreeMap<String, Vec<String>>, key: &str, values: Vec<String>) {
    let list = routing.entry(key.to_string()).or_default();
    for value in values {
        if !list.contains(&value) {
            list.push(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(err: ApiError) -> String {
        err.extra
            .get("field")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn parses_and_normalises() {
        let request = ProvisionRequest::parse(&json!({
            "org_id": "acme", "team_node_id": "sre", "slack_channel_ids": ["C1"],
            "routing": {"slack_channel_ids": ["C1", "C2"], "github_repos": "acme/api"},
            "pipeline_schedule": "0 3 * * *", "deployment_mode": "dedicated", "extra": 1
        }))
        .unwrap();
        assert_eq!(request.routing["slack_channel_ids"], vec!["C1", "C2"]);
        assert_eq!(request.routing["github_repos"], vec!["acme/api"]);
        assert_eq!(request.deployment_mode, Some(DeploymentMode::Dedicated));
        assert_eq!(request.pipeline_schedule.as_deref(), Some("0 3 * * *"));
    }

    #[test]
    fn a_request_changes_what_it_names_and_keeps_the_rest() {
        let parse = |body: Value| ProvisionRequest::parse(&body).unwrap();
        let first = TeamSpec::resolve(
            None,
            &parse(
                json!({"org_id": "acme", "team_node_id": "sre", "slack_channel_ids": ["C1"],
                "routing": {"github_repos": ["acme/api"]}, "pipeline_schedule": "0 3 * * *", "deployment_mode": "dedicated"}),
            ),
        );
        assert!(first.pipeline_schedule_enabled);
        assert_eq!(first.deployment_mode, DeploymentMode::Dedicated);
        // Only the Slack list: it replaces that list, and everything else stays.
        let second = TeamSpec::resolve(
            Some(&first),
            &parse(json!({"org_id": "acme", "team_node_id": "sre", "slack_channel_ids": ["C2"]})),
        );
        assert_eq!(second.routing["slack_channel_ids"], vec!["C2"]);
        assert_eq!(second.routing["github_repos"], vec!["acme/api"]);
        assert!(second.pipeline_schedule_enabled);
        assert_eq!(second.pipeline_schedule.as_deref(), Some("0 3 * * *"));
        assert_eq!(second.deployment_mode, DeploymentMode::Dedicated);
        // Turned off explicitly; and back to shared.
        let third = TeamSpec::resolve(
            Some(&second),
            &parse(
                json!({"org_id": "acme", "team_node_id": "sre", "create_pipeline_schedule": false,
                "deployment_mode": "shared"}),
            ),
        );
        assert!(!third.pipeline_schedule_enabled);
        assert_eq!(third.deployment_mode, DeploymentMode::Shared);
        // On again keeps the cron expression it had.
        let fourth = TeamSpec::resolve(
            Some(&third),
            &parse(json!({"org_id": "acme", "team_node_id": "sre", "create_pipeline_schedule": true})),
        );
        assert!(fourth.pipeline_schedule_enabled);
        assert_eq!(fourth.pipeline_schedule.as_deref(), Some("0 3 * * *"));
        // A new team gets the defaults.
        let fresh = TeamSpec::resolve(None, &parse(json!({"org_id": "acme", "team_node_id": "new"})));
        assert_eq!(fresh, TeamSpec::default());
    }

    #[test]
    fn a_deprovision_request_defaults_to_deleting_everything() {
        let request = DeprovisionRequest::parse(&json!({"org_id": "acme", "team_node_id": "sre"})).unwrap();
        assert!(request.delete_k8s_resources && !request.dry_run);
        let err =
            DeprovisionRequest::parse(&json!({"org_id": "acme", "team_node_id": "sre", "dry_run": "yes"})).unwrap_err();
        assert_eq!(field_of(err), "dry_run");
    }

    #[test]
    fn the_key_does_not_change_the_hash_but_the_request_does() {
        let a = ProvisionRequest::parse(&json!({"org_id": "acme", "team_node_id": "sre", "idempotency_key": "k1"}))
            .unwrap();
        let b = ProvisionRequest::parse(&json!({"org_id": "acme", "team_node_id": "sre", "idempotency_key": "k2"}))
            .unwrap();
        let c = ProvisionRequest::parse(
            &json!({"org_id": "acme", "team_node_id": "sre", "create_pipeline_schedule": true}),
        )
        .unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (json!({"team_node_id": "sre"}), "org_id"),
            (json!({"org_id": "acme", "team_node_id": ""}), "team_node_id"),
            (
                json!({"org_id": "acme", "team_node_id": "x".repeat(129)}),
                "team_node_id",
            ),
            (json!({"org_id": "acme", "team_node_id": "a/b"}), "team_node_id"),
            (
                json!({"org_id": "acme", "team_node_id": "sre", "pipeline_schedule": "61 * * * *"}),
                "pipeline_schedule",
            ),
            (
                json!({"org_id": "acme", "team_node_id": "sre", "deployment_mode": "solo"}),
                "deployment_mode",
            ),
            (
                json!({"org_id": "acme", "team_node_id": "sre", "idempotency_key": "k".repeat(129)}),
                "idempotency_key",
            ),
            (
                json!({"org_id": "acme", "team_node_id": "sre", "routing": {"fax_numbers": ["1"]}}),
                "routing.fax_numbers",
            ),
            (
                json!({"org_id": "acme", "team_node_id": "sre", "slack_channel_ids": [1]}),
                "slack_channel_ids",
            ),
            (
                json!({"org_id": "acme", "team_node_id": "sre", "rollback_on_failure": "yes"}),
                "rollback_on_failure",
            ),
        ];
        for (body, field) in cases {
            let err = ProvisionRequest::parse(&body).unwrap_err();
            assert_eq!(err.status, 422, "{body}");
            assert_eq!(field_of(err), field, "{body}");
        }
    }
}
