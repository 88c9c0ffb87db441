//! What a team's objects should be, and how the live ones differ: pure functions over JSON, so
//! every rule has a unit test.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde_json::{json, Value};

use crate::domain::{DeploymentMode, ScheduleType, TeamStatus};
use crate::provisioning::objects::{self, CronJobKind, TeamObjects};
use crate::provisioning::request::TeamSpec;
use crate::provisioning::store::ScheduleRow;

/// The Kubernetes resources the orchestrator owns objects of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    CronJob,
    Deployment,
    Service,
}

impl Resource {
    pub const ALL: [Resource; 3] = [Resource::CronJob, Resource::Deployment, Resource::Service];

    /// The plural the API (and the metrics) name it by.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::CronJob => "cronjobs",
            Resource::Deployment => "deployments",
            Resource::Service => "services",
        }
    }
}

/// One of a team's objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    PipelineCronjob,
    DiscoveryCronjob,
    Deployment,
    Service,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 4] = [
        ObjectKind::PipelineCronjob,
        ObjectKind::DiscoveryCronjob,
        ObjectKind::Deployment,
        ObjectKind::Service,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::PipelineCronjob => "pipeline_cronjob",
            ObjectKind::DiscoveryCronjob => "discovery_cronjob",
            ObjectKind::Deployment => "deployment",
            ObjectKind::Service => "service",
        }
    }

    pub fn resource(self) -> Resource {
        match self {
            ObjectKind::PipelineCronjob | ObjectKind::DiscoveryCronjob => Resource::CronJob,
            ObjectKind::Deployment => Resource::Deployment,
            ObjectKind::Service => Resource::Service,
        }
    }

    pub fn schedule_type(self) -> Option<ScheduleType> {
        match self {
            ObjectKind::PipelineCronjob => Some(ScheduleType::Ingestion),
            ObjectKind::DiscoveryCronjob => Some(ScheduleType::DependencyDiscovery),
            _ => None,
        }
    }

    pub fn of_schedule(schedule_type: ScheduleType) -> ObjectKind {
        match schedule_type {
            ScheduleType::Ingestion => ObjectKind::PipelineCronjob,
            ScheduleType::DependencyDiscovery => ObjectKind::DiscoveryCronjob,
        }
    }

    fn cronjob_kind(self) -> Option<CronJobKind> {
        match self {
            ObjectKind::PipelineCronjob => Some(CronJobKind::Pipeline),
            ObjectKind::DiscoveryCronjob => Some(CronJobKind::Discovery),
            _ => None,
        }
    }

    /// The team's object of this kind is named so.
    pub fn name(self, org: &str, team: &str) -> String {
        match self {
            ObjectKind::PipelineCronjob => CronJobKind::Pipeline.name(org, team),
            ObjectKind::DiscoveryCronjob => CronJobKind::Discovery.name(org, team),
            ObjectKind::Deployment => objects::dedicated_agent_deployment_name(org, team),
            ObjectKind::Service => objects::dedicated_agent_service_name(org, team),
        }
    }
}

/// A typed object to apply.
#[derive(Clone, Debug)]
pub enum Desired {
    CronJob(Box<CronJob>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
}

impl Desired {
    pub fn to_value(&self) -> Value {
        let value = match self {
            Desired::CronJob(o) => serde_json::to_value(o),
            Desired::Deployment(o) => serde_json::to_value(o),
            Desired::Service(o) => serde_json::to_value(o),
        };
        value.unwrap_or(Value::Null)
    }
}

/// What one of a team's objects should be.
#[derive(Clone, Debug)]
pub enum Expectation {
    Present(Desired),
    Absent,
    /// Nothing recorded says (a CronJob of an active team without a schedule row): one found is
    /// adopted as it is, none found is fine.
    Adopt,
}

/// A team as the reconciler sees it: what was asked of it and its schedules.
pub struct TeamState<'a> {
    pub org: &'a str,
    pub team: &'a str,
    pub status: TeamStatus,
    pub spec: Option<&'a TeamSpec>,
    pub schedules: Vec<&'a ScheduleRow>,
    /// When it was deprovisioned: what existed before, its deprovisioning chose to keep.
    pub deprovisioned_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl TeamState<'_> {
    /// Whether the reconciler judges this team's objects: an active team's are as asked, a
    /// deprovisioned team has none. Mid-run, the run owns them; after a failed run, only a retry
    /// or another provisioning knows what they should be.
    pub fn is_judged(&self) -> bool {
        matches!(self.status, TeamStatus::Active | TeamStatus::Deprovisioned)
    }

    pub fn expectation(&self, builder: &TeamObjects<'_>, kind: ObjectKind) -> Expectation {
        if self.status != TeamStatus::Active {
            return Expectation::Absent;
        }
        // What the existing service was asked is only partly known (inferred from its runs; its
        // sync-cronjobs created CronJobs without a run): what it left is adopted, never removed.
        let absent = if self.spec.is_some_and(|s| s.inferred) {
            Expectation::Adopt
        } else {
            Expectation::Absent
        };
        if let Some(cronjob_kind) = kind.cronjob_kind() {
            let schedule_type = kind.schedule_type();
            return match self.schedules.iter().find(|s| Some(s.schedule_type) == schedule_type) {
                Some(row) => Expectation::Present(Desired::CronJob(Box::new(builder.cronjob(
                    cronjob_kind,
                    &row.cron_expression,
                    !row.enabled,
                )))),
                None if kind == ObjectKind::PipelineCronjob
                    && self.spec.is_some_and(|s| !s.pipeline_schedule_enabled) =>
                {
                    absent
                }
                None => Expectation::Adopt,
            };
        }
        match self.spec.map(|s| s.deployment_mode) {
            Some(DeploymentMode::Dedicated) => Expectation::Present(match kind {
                ObjectKind::Deployment => Desired::Deployment(Box::new(builder.dedicated_agent_deployment())),
                _ => Desired::Service(Box::new(builder.dedicated_agent_service())),
            }),
            Some(DeploymentMode::Shared) => absent,
            None => Expectation::Adopt,
        }
    }
}

/// How an object differs from what it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// It should exist and does not.
    Missing,
    /// It exists, and a field the orchestrator sets has another value.
    Modified,
    /// An active team's object that should not exist (a schedule turned off, a shared team's agent).
    Unexpected,
    /// An object of a team that is deprovisioned or unknown.
    Orphan,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Modified => "modified",
            DriftKind::Unexpected => "unexpected",
            DriftKind::Orphan => "orphan",
        }
    }
}

/// One difference, with what is there and what should be.
#[derive(Clone, Debug, Serialize)]
pub struct Drift {
    pub kind: ObjectKind,
    pub name: String,
    pub drift: DriftKind,
    /// For `modified`: the fields that differ, as JSON pointers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// The differing fields as they are (`null`: the object does not exist).
    pub before: Value,
    /// The differing fields as they should be (`null`: the object should not exist).
    pub after: Value,
    /// The object's uid when it was read: a deletion is only of that object.
    #[serde(skip)]
    pub uid: Option<String>,
    #[serde(skip)]
    pub desired: Option<Desired>,
}

/// What the orchestrator sets and so compares: labels, annotations, and the spec.
const COMPARED: [&str; 3] = ["/metadata/labels", "/metadata/annotations", "/spec"];

/// How `live` differs from `expected`, field by field: every value `expected` sets must be in
/// `live` (what the API server adds, defaults and status, is not drift). An empty list or map,
/// `null` or `false` set by `expected` matches an absent field: the API server may omit them.
pub fn differences(expected: &Value, live: &Value) -> BTreeMap<String, (Value, Value)> {
    let mut found = BTreeMap::new();
    for pointer in COMPARED {
        if let Some(expected) = expected.pointer(pointer) {
            compare(pointer.to_string(), expected, live.pointer(pointer), &mut found);
        }
    }
    found
}

fn is_empty_like(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        _ => false,
    }
}

fn compare(path: String, expected: &Value, live: Option<&Value>, found: &mut BTreeMap<String, (Value, Value)>) {
    let live = live.filter(|v| !v.is_null());
    match (expected, live) {
        (expected, None) if is_empty_like(expected) => {}
        (Value::Object(expected), Some(Value::Object(live))) => {
            for (key, value) in expected {
                let escaped = key.replace('~', "~0").replace('/', "~1");
                compare(format!("{path}/{escaped}"), value, live.get(key), found);
            }
        }
        (Value::Array(expected), Some(Value::Array(live))) if expected.len() == live.len() => {
            for (index, (e, l)) in expected.iter().zip(live).enumerate() {
                compare(format!("{path}/{index}"), e, Some(l), found);
            }
        }
        (expected, Some(live)) if same_scalar(expected, live) => {}
        (expected, live) => {
            let live = live.cloned().unwrap_or(Value::Null);
            found.insert(path.clone(), (redacted(&path, live), redacted(&path, expected.clone())));
        }
    }
}

/// What a difference may show of an environment variable: its name and where it comes from,
/// never its value (someone's `kubectl edit` may have put a key there, and differences end up in
/// audit rows and API answers).
fn redacted(path: &str, value: Value) -> Value {
    fn hide(value: Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.into_iter().map(hide).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| {
                        let v = if k == "value" { json!("<redacted>") } else { hide(v) };
                        (k, v)
                    })
                    .collect(),
            ),
            other => other,
        }
    }
    if !path.contains("/env") {
        return value;
    }
    if path.ends_with("/value") && !value.is_null() {
        return json!("<redacted>");
    }
    hide(value)
}

/// Equal, or the same number written differently (`8000` and `"8000"` never are).
fn same_scalar(expected: &Value, live: &Value) -> bool {
    match (expected, live) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// Whether `live` (JSON) is the team's object that `expected` describes: the same ownership rules
/// provisioning applies before it writes.
pub fn is_teams_object(live: &Value, expected: &ObjectMeta) -> bool {
    let Ok(meta) = serde_json::from_value::<ObjectMeta>(live.get("metadata").cloned().unwrap_or(Value::Null)) else {
        return false;
    };
    objects::same_owner(&meta, expected) && objects::env_names_owner(live, expected)
}

/// The metadata every object of the team carries, for ownership checks of any kind.
pub fn owner_meta(builder: &TeamObjects<'_>) -> ObjectMeta {
    builder
        .cronjob(CronJobKind::Pipeline, CronJobKind::Pipeline.default_schedule(), false)
        .metadata
}

/// The team's drift for one kind: `live` is the team's object of that kind's name, if any.
pub fn judge(
    kind: ObjectKind,
    name: &str,
    expectation: Expectation,
    live: Option<&Value>,
    orphaned: bool,
) -> Option<Drift> {
    let uid = live
        .and_then(|l| l.pointer("/metadata/uid"))
        .and_then(Value::as_str)
        .map(str::to_string);
    match (expectation, live) {
        (Expectation::Adopt, _) | (Expectation::Absent, None) => None,
        (Expectation::Absent, Some(live)) => Some(Drift {
            kind,
            name: name.to_string(),
            drift: if orphaned {
                DriftKind::Orphan
            } else {
                DriftKind::Unexpected
            },
            fields: Vec::new(),
            before: summary(live),
            after: Value::Null,
            uid,
            desired: None,
        }),
        (Expectation::Present(desired), None) => Some(Drift {
            kind,
            name: name.to_string(),
            drift: DriftKind::Missing,
            fields: Vec::new(),
            before: Value::Null,
            after: summary(&desired.to_value()),
            uid: None,
            desired: Some(desired),
        }),
        (Expectation::Present(desired), Some(live)) => {
            let found = differences(&desired.to_value(), live);
            if found.is_empty() {
                return None;
            }
            let mut before = serde_json::Map::new();
            let mut after = serde_json::Map::new();
            for (field, (was, should)) in &found {
                before.insert(field.clone(), was.clone());
                after.insert(field.clone(), should.clone());
            }
            Some(Drift {
                kind,
                name: name.to_string(),
                drift: DriftKind::Modified,
                fields: found.into_keys().collect(),
                before: Value::Object(before),
                after: Value::Object(after),
                uid,
                desired: Some(desired),
            })
        }
    }
}

/// What an audit row keeps of a whole object: its name, schedule, suspension and images.
pub fn summary(object: &Value) -> Value {
    let containers = object
        .pointer("/spec/jobTemplate/spec/template/spec/containers")
        .or_else(|| object.pointer("/spec/template/spec/containers"))
        .and_then(Value::as_array);
    let images: Vec<&Value> = containers
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("image"))
        .collect();
    let mut summary = json!({"name": object.pointer("/metadata/name")});
    for (key, pointer) in [
        ("schedule", "/spec/schedule"),
        ("suspend", "/spec/suspend"),
        ("replicas", "/spec/replicas"),
        ("ports", "/spec/ports"),
    ] {
        if let Some(value) = object.pointer(pointer) {
            summary[key] = value.clone();
        }
    }
    if !images.is_empty() {
        summary["images"] = json!(images);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KubernetesConfig;

    fn k8s() -> KubernetesConfig {
        KubernetesConfig {
            namespace: "incidentfox".into(),
            ai_pipeline_image: "pipeline:1".into(),
            ai_pipeline_service_account: "ai-pipeline".into(),
            agent_image: "agent:1".into(),
            agent_service_account: "incidentfox-agent".into(),
            dependency_service_image: "dep:1".into(),
            dependency_service_account: "dependency-discovery".into(),
        }
    }

    fn builder(k8s: &KubernetesConfig) -> TeamObjects<'_> {
        TeamObjects {
            kubernetes: k8s,
            config_service_url: "http://config",
            org: "acme",
            team: "sre",
        }
    }

    fn row(schedule_type: ScheduleType, cron: &str, enabled: bool) -> ScheduleRow {
        ScheduleRow {
            org_id: "acme".into(),
            team_node_id: "sre".into(),
            schedule_type,
            cron_expression: cron.into(),
            enabled,
            k8s_cronjob_name: None,
            last_run_at: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    fn present(expectation: Expectation) -> Value {
        match expectation {
            Expectation::Present(desired) => desired.to_value(),
            other => panic!("expected an object, got {other:?}"),
        }
    }

    #[test]
    fn what_the_api_server_adds_is_not_drift_and_what_someone_changed_is() {
        let k8s = k8s();
        let schedules = [row(ScheduleType::Ingestion, "0 2 * * *", true)];
        let team = TeamState {
            org: "acme",
            team: "sre",
            status: TeamStatus::Active,
            spec: None,
            schedules: schedules.iter().collect(),
            deprovisioned_at: None,
        };
        let expected = present(team.expectation(&builder(&k8s), ObjectKind::PipelineCronjob));
        let mut live = expected.clone();
        live["metadata"]["uid"] = json!("u-1");
        live["metadata"]["labels"]["extra"] = json!("added by someone");
        live["spec"]["startingDeadlineSeconds"] = json!(200);
        live["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
        live["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("args");
        live["status"] = json!({"lastScheduleTime": "2026-12-06T02:00:00Z"});
        assert!(
            differences(&expected, &live).is_empty(),
            "{:?}",
            differences(&expected, &live)
        );

        live["spec"]["schedule"] = json!("*/5 * * * *");
        live["spec"]["suspend"] = json!(true);
        live["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil:2");
        let drift = judge(
            ObjectKind::PipelineCronjob,
            "n",
            team.expectation(&builder(&k8s), ObjectKind::PipelineCronjob),
            Some(&live),
            false,
        )
        .unwrap();
        assert_eq!(drift.drift, DriftKind::Modified);
        assert_eq!(
            drift.fields,
            vec![
                "/spec/jobTemplate/spec/template/spec/containers/0/image",
                "/spec/schedule",
                "/spec/suspend"
            ]
        );
        assert_eq!(drift.before["/spec/schedule"], "*/5 * * * *");
        assert_eq!(drift.after["/spec/schedule"], "0 2 * * *");
        assert_eq!(drift.uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn an_environment_variables_value_never_shows_in_a_difference() {
        let expected = json!({"spec": {"env": [{"name": "ORG_ID", "value": "acme"}]}});
        let live = json!({"spec": {"env": [{"name": "ORG_ID", "value": "acme"}, {"name": "OPENAI_API_KEY", "value": "sk-secret"}]}});
        let found = differences(&expected, &live);
        assert!(!format!("{found:?}").contains("sk-secret"), "{found:?}");
        assert_eq!(found["/spec/env"].0[1]["name"], "OPENAI_API_KEY");
        let live = json!({"spec": {"env": [{"name": "ORG_ID", "value": "sk-other"}]}});
        let found = differences(&expected, &live);
        assert_eq!(found["/spec/env/0/value"].0, "<redacted>");
    }

    #[test]
    fn each_kind_is_expected_as_the_team_was_asked() {
        let k8s = k8s();
        let b = builder(&k8s);
        let paused = [row(ScheduleType::DependencyDiscovery, "0 */2 * * *", false)];
        let dedicated = TeamSpec {
            deployment_mode: DeploymentMode::Dedicated,
            pipeline_schedule_enabled: false,
            ..TeamSpec::default()
        };
        let team = TeamState {
            org: "acme",
            team: "sre",
            status: TeamStatus::Active,
            spec: Some(&dedicated),
            schedules: paused.iter().collect(),
            deprovisioned_at: None,
        };
        assert_eq!(
            present(team.expectation(&b, ObjectKind::DiscoveryCronjob))["spec"]["suspend"],
            true
        );
        assert!(matches!(
            team.expectation(&b, ObjectKind::PipelineCronjob),
            Expectation::Absent
        ));
        assert!(matches!(
            team.expectation(&b, ObjectKind::Deployment),
            Expectation::Present(_)
        ));
        assert!(matches!(
            team.expectation(&b, ObjectKind::Service),
            Expectation::Present(_)
        ));

        // Schedule on but no row (a team from before the schedules table): found ones are adopted.
        let on = TeamSpec {
            pipeline_schedule_enabled: true,
            ..TeamSpec::default()
        };
        let adopted = TeamState {
            spec: Some(&on),
            schedules: Vec::new(),
            ..team
        };
        assert!(matches!(
            adopted.expectation(&b, ObjectKind::PipelineCronjob),
            Expectation::Adopt
        ));
        assert!(matches!(
            adopted.expectation(&b, ObjectKind::Deployment),
            Expectation::Absent
        ));

        let inferred_shared = TeamSpec {
            inferred: true,
            ..TeamSpec::default()
        };
        let inferred = TeamState {
            spec: Some(&inferred_shared),
            schedules: Vec::new(),
            ..adopted
        };
        assert!(matches!(
            inferred.expectation(&b, ObjectKind::PipelineCronjob),
            Expectation::Adopt
        ));
        assert!(matches!(
            inferred.expectation(&b, ObjectKind::Deployment),
            Expectation::Adopt
        ));

        let gone = TeamState {
            status: TeamStatus::Deprovisioned,
            ..inferred
        };
        for kind in ObjectKind::ALL {
            assert!(matches!(gone.expectation(&b, kind), Expectation::Absent));
        }
        let mid_run = TeamState {
            status: TeamStatus::Provisioning,
            ..gone
        };
        assert!(!mid_run.is_judged());
    }

    #[test]
    fn missing_unexpected_and_orphaned_objects() {
        let k8s = k8s();
        let b = builder(&k8s);
        let object = Desired::Service(Box::new(b.dedicated_agent_service()));
        let missing = judge(
            ObjectKind::Service,
            "s",
            Expectation::Present(object.clone()),
            None,
            false,
        )
        .unwrap();
        assert_eq!(missing.drift, DriftKind::Missing);
        assert!(missing.before.is_null());
        let live = object.to_value();
        let unexpected = judge(ObjectKind::Service, "s", Expectation::Absent, Some(&live), false).unwrap();
        assert_eq!(unexpected.drift, DriftKind::Unexpected);
        assert!(unexpected.after.is_null());
        let orphan = judge(ObjectKind::Service, "s", Expectation::Absent, Some(&live), true).unwrap();
        assert_eq!(orphan.drift, DriftKind::Orphan);
        assert!(judge(ObjectKind::Service, "s", Expectation::Adopt, Some(&live), false).is_none());
    }

    #[test]
    fn another_teams_object_is_not_the_teams() {
        let k8s = k8s();
        let ours = builder(&k8s);
        let theirs = TeamObjects {
            org: "acme-eu",
            ..builder(&k8s)
        };
        let live = serde_json::to_value(theirs.dedicated_agent_service()).unwrap();
        assert!(!is_teams_object(&live, &owner_meta(&ours)));
        assert!(is_teams_object(&live, &owner_meta(&theirs)));
    }
}
