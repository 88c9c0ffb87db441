//! The Kubernetes objects the orchestrator owns, built per the contract, and the few calls it
//! makes on them: server-side apply with one field manager, get, list by label, delete.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use std::sync::Arc;
use std::time::Instant;

use crate::config::KubernetesConfig;
use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "incidentfox-orchestrator";
pub const MANAGED_BY: &str = "incidentfox-orchestrator";
pub const CRONJOB_NAME_LIMIT: usize = 52;
pub const DNS_LABEL_LIMIT: usize = 63;

/// The verbs `KubeClient` uses: `get` (is the name free, or ours?), server-side apply is `patch`,
/// rollback is `delete`. Nothing else is called, so nothing else is granted.
pub const VERBS: &[&str] = &["delete", "get", "patch"];

/// Annotations carrying the exact org and team an object belongs to. Names and labels are
/// sanitised (lossy: `acme`/`eu-sre` and `acme-eu`/`sre` share a name), so ownership is decided
/// by these.
pub const ANNOTATION_ORG: &str = "incidentfox.io/org-id";
pub const ANNOTATION_TEAM: &str = "incidentfox.io/team-node-id";

/// Every (API group, resource, verbs) the service uses. The Helm chart's Role grants exactly
/// these; a test compares the two.
pub const RBAC_RULES: &[(&str, &str, &[&str])] = &[
    ("batch", "cronjobs", VERBS),
    ("apps", "deployments", VERBS),
    ("", "services", VERBS),
];

/// Lower case, `_` and `.` (and anything else a DNS label refuses) become `-`.
pub fn sanitise(value: &str) -> String {
    let mapped: String = value
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    mapped.trim_matches('-').to_string()
}

/// `prefix-org-team`, shortened to `limit` with a stable hash suffix when longer, so distinct
/// teams never collide and the same team always gets the same name.
pub fn object_name(prefix: &str, org: &str, team: &str, limit: usize) -> String {
    let full = [prefix.to_string(), sanitise(org), sanitise(team)]
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    if full.len() <= limit {
        return full;
    }
    let digest = Sha256::digest(format!("{org}\u{0}{team}").as_bytes());
    let suffix = hex::encode(&digest[..4]);
    let keep = limit - suffix.len() - 1;
    let head = full[..keep].trim_end_matches('-');
    format!("{head}-{suffix}")
}

/// A label value: sanitised, at most 63 characters, ending alphanumeric.
pub fn label_value(value: &str) -> String {
    let clean = sanitise(value);
    if clean.len() <= DNS_LABEL_LIMIT {
        return clean;
    }
    let digest = Sha256::digest(value.as_bytes());
    let suffix = hex::encode(&digest[..4]);
    format!("{}-{suffix}", clean[..DNS_LABEL_LIMIT - 9].trim_end_matches('-'))
}

pub fn pipeline_cronjob_name(org: &str, team: &str) -> String {
    object_name("ai-pipeline", org, team, CRONJOB_NAME_LIMIT)
}

pub fn dedicated_agent_name(org: &str, team: &str) -> String {
    object_name("agent-dedicated", org, team, DNS_LABEL_LIMIT)
}

pub fn dedicated_agent_url(org: &str, team: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc.cluster.local:8000",
        dedicated_agent_name(org, team)
    )
}

/// The team's dedicated agent URL from its config, trusted only if it is exactly the one
/// provisioning writes for this team. The config is writable by org admins, and the agent call
/// carries a team credential (and, in the investigate dialect, the platform's own token), so an
/// arbitrary URL there would be a credential leak and an SSRF.
pub fn trusted_dedicated_url(configured: Option<&str>, org: &str, team: &str, namespace: &str) -> Option<url::Url> {
    let configured = configured?;
    let expected = dedicated_agent_url(org, team, namespace);
    if configured.trim_end_matches('/') == expected {
        url::Url::parse(&expected).ok()
    } else {
        tracing::warn!(
            org,
            team,
            "ignoring agent.dedicated_service_url: it is not this team's dedicated agent"
        );
        None
    }
}

fn owner_labels(org: &str, team: &str) -> serde_json::Map<String, Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels.insert("incidentfox.io/org-id".into(), label_value(org).into());
    labels.insert("incidentfox.io/team-node-id".into(), label_value(team).into());
    labels
}

fn owner_annotations(org: &str, team: &str) -> Value {
    json!({ ANNOTATION_ORG: org, ANNOTATION_TEAM: team })
}

/// The identity two teams whose sanitised names collide share; provisioning locks on it so
/// colliding teams never race past the ownership check.
pub fn name_class(org: &str, team: &str) -> String {
    object_name("", org, team, usize::MAX)
}

fn team_env(org: &str, team: &str, config_service_url: &str) -> Value {
    json!([
        {"name": "ORG_ID", "value": org},
        {"name": "TEAM_NODE_ID", "value": team},
        {"name": "CONFIG_SERVICE_URL", "value": config_service_url},
    ])
}

/// The AI pipeline's scheduled ingestion for one team.
pub fn pipeline_cronjob(
    k8s: &KubernetesConfig,
    config_service_url: &str,
    org: &str,
    team: &str,
    schedule: &str,
) -> CronJob {
    let mut labels = owner_labels(org, team);
    labels.insert("app.kubernetes.io/name".into(), "ai-pipeline".into());
    labels.insert("app.kubernetes.io/component".into(), "scheduled-ingestion".into());
    let object = json!({
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": pipeline_cronjob_name(org, team), "namespace": k8s.namespace, "labels": labels, "annotations": owner_annotations(org, team)},
        "spec": {
            "schedule": schedule,
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels},
                "spec": {
                    "backoffLimit": 2,
                    "ttlSecondsAfterFinished": 86400,
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "restartPolicy": "Never",
                            "serviceAccountName": k8s.ai_pipeline_service_account,
                            "containers": [{
                                "name": "ai-pipeline",
                                "image": k8s.ai_pipeline_image,
                                "command": ["python", "-m", "ai_learning_pipeline", "run-scheduled", "--team-id", team, "--org-id", org],
                                "env": team_env(org, team, config_service_url),
                                "resources": {
                                    "requests": {"cpu": "500m", "memory": "1Gi"},
                                    "limits": {"cpu": "2", "memory": "4Gi"}
                                }
                            }]
                        }
                    }
                }
            }
        }
    });
    from_json(object)
}

fn dedicated_labels(org: &str, team: &str) -> serde_json::Map<String, Value> {
    let mut labels = owner_labels(org, team);
    labels.insert("app.kubernetes.io/name".into(), "agent".into());
    labels.insert("incidentfox.io/deployment-mode".into(), "dedicated".into());
    labels
}

pub fn dedicated_agent_deployment(
    k8s: &KubernetesConfig,
    config_service_url: &str,
    org: &str,
    team: &str,
) -> Deployment {
    let name = dedicated_agent_name(org, team);
    let labels = dedicated_labels(org, team);
    let mut env = team_env(org, team, config_service_url);
    if let Value::Array(list) = &mut env {
        list.push(json!({"name": "DEPLOYMENT_MODE", "value": "dedicated"}));
    }
    let probe = json!({"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10});
    from_json(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": labels, "annotations": owner_annotations(org, team)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "agent", "incidentfox.io/org-id": labels["incidentfox.io/org-id"], "incidentfox.io/team-node-id": labels["incidentfox.io/team-node-id"]}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "agent",
                    "image": k8s.agent_image,
                    "ports": [{"containerPort": 8000, "name": "http"}],
                    "env": env,
                    "readinessProbe": probe,
                    "livenessProbe": probe
                }]}
            }
        }
    }))
}

pub fn dedicated_agent_service(k8s: &KubernetesConfig, org: &str, team: &str) -> Service {
    let labels = dedicated_labels(org, team);
    from_json(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": dedicated_agent_name(org, team), "namespace": k8s.namespace, "labels": labels, "annotations": owner_annotations(org, team)},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": "agent", "incidentfox.io/org-id": labels["incidentfox.io/org-id"], "incidentfox.io/team-node-id": labels["incidentfox.io/team-node-id"]},
            "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]
        }
    }))
}

/// The builders above produce valid objects by construction; a failure here is a bug in them.
fn from_json<T: DeserializeOwned>(value: Value) -> T {
    match serde_json::from_value(value) {
        Ok(object) => object,
        Err(e) => panic!("object builder produced an invalid object: {e}"),
    }
}

/// A handle to what was applied: enough to find it again and to undo it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AppliedObject {
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

#[derive(Clone)]
pub struct KubeClient {
    client: kube::Client,
    namespace: String,
    metrics: Arc<Metrics>,
}

const NEIGHBOUR: &str = "kubernetes";

/// The neighbour-metrics outcome of a Kubernetes call.
fn outcome<T>(result: &Result<T, kube::Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(kube::Error::Api(status)) if status.code >= 500 => "server_error",
        Err(kube::Error::Api(_)) => "client_error",
        Err(_) => "transport_error",
    }
}

impl KubeClient {
    pub fn new(client: kube::Client, namespace: String, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            namespace,
            metrics,
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Server-side apply: creates or updates, and is idempotent. Refuses to touch an object of the
    /// same name that belongs to another team (or to someone else altogether).
    pub async fn apply<K>(&self, object: &K) -> Result<AppliedObject, ApplyError>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let started = Instant::now();
        let existing = self.api::<K>().get_opt(&name).await;
        self.metrics
            .observe_neighbour(NEIGHBOUR, outcome(&existing), started.elapsed());
        if let Some(existing) = existing? {
            if !same_owner(existing.meta(), object.meta()) {
                return Err(ApplyError::NameTaken(format!(
                    "{} {name} already exists and belongs to another team",
                    K::kind(&Default::default())
                )));
            }
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let started = Instant::now();
        let result = self.api::<K>().patch(&name, &params, &Patch::Apply(object)).await;
        self.metrics
            .observe_neighbour(NEIGHBOUR, outcome(&result), started.elapsed());
        let applied = result?;
        Ok(AppliedObject {
            kind: K::kind(&Default::default()).to_string(),
            name,
            namespace: self.namespace.clone(),
            uid: applied.meta().uid.clone(),
            resource_version: applied.meta().resource_version.clone(),
        })
    }

    /// Deletes what this service created: by name and, when known, only if it is still the object
    /// with that uid (never a same-named object someone created since). Gone counts as deleted.
    pub async fn delete<K>(&self, name: &str, uid: Option<&str>) -> Result<(), kube::Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        let mut params = DeleteParams::background();
        if let Some(uid) = uid {
            params = params.preconditions(kube::api::Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            });
        }
        let started = Instant::now();
        let result = self.api::<K>().delete(name, &params).await;
        self.metrics
            .observe_neighbour(NEIGHBOUR, outcome(&result), started.elapsed());
        match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 && uid.is_some() => {
                tracing::warn!(%name, "not deleting: the object was replaced since this service created it");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    NameTaken(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Whether an existing object may be updated for the team `desired` is built for: its ownership
/// annotations match, or (an object from before the annotations) it carries this service's
/// labels for the same sanitised team.
fn same_owner(existing: &kube::api::ObjectMeta, desired: &kube::api::ObjectMeta) -> bool {
    let annotation =
        |meta: &kube::api::ObjectMeta, key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    match (
        annotation(existing, ANNOTATION_ORG),
        annotation(existing, ANNOTATION_TEAM),
    ) {
        (Some(org), Some(team)) => {
            Some(org) == annotation(desired, ANNOTATION_ORG) && Some(team) == annotation(desired, ANNOTATION_TEAM)
        }
        _ => {
            let label =
                |meta: &kube::api::ObjectMeta, key: &str| meta.labels.as_ref().and_then(|l| l.get(key)).cloned();
            label(existing, "app.kubernetes.io/managed-by").as_deref() == Some(MANAGED_BY)
                && label(existing, "incidentfox.io/org-id") == label(desired, "incidentfox.io/org-id")
                && label(existing, "incidentfox.io/team-node-id") == label(desired, "incidentfox.io/team-node-id")
        }
    }
}

/// Whether a Kubernetes error may go away on its own.
pub fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => {
            status.code == 408 || status.code == 409 || status.code == 429 || status.code >= 500
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_follow_the_contract_and_fit_the_limits() {
        assert_eq!(pipeline_cronjob_name("acme", "team_a.b"), "ai-pipeline-acme-team-a-b");
        let long = pipeline_cronjob_name("an-organisation-with-a-long-name", "a-team-with-an-even-longer-name");
        assert!(long.len() <= CRONJOB_NAME_LIMIT, "{long}");
        assert_eq!(
            long,
            pipeline_cronjob_name("an-organisation-with-a-long-name", "a-team-with-an-even-longer-name")
        );
        assert_ne!(
            long,
            pipeline_cronjob_name("an-organisation-with-a-long-name", "a-team-with-an-even-longer-nam3")
        );
        assert_eq!(
            dedicated_agent_url("acme", "sre", "incidentfox"),
            "http://agent-dedicated-acme-sre.incidentfox.svc.cluster.local:8000"
        );
    }

    #[test]
    fn cronjob_matches_the_contract() {
        let k8s = KubernetesConfig {
            namespace: "incidentfox".into(),
            ai_pipeline_image: "img:1".into(),
            ai_pipeline_service_account: "ai-pipeline".into(),
            dependency_service_image: "dep:1".into(),
            agent_image: "agent:1".into(),
        };
        let job = serde_json::to_value(pipeline_cronjob(&k8s, "http://config", "Acme", "SRE_1", "0 2 * * *")).unwrap();
        assert_eq!(job["metadata"]["labels"]["incidentfox.io/team-node-id"], "sre-1");
        assert_eq!(job["spec"]["concurrencyPolicy"], "Forbid");
        let pod = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(pod["containers"][0]["command"][5], "SRE_1");
        assert_eq!(pod["containers"][0]["resources"]["limits"]["memory"], "4Gi");
    }

    #[test]
    fn only_the_teams_own_dedicated_url_is_trusted() {
        let own = "http://agent-dedicated-acme-sre.incidentfox.svc.cluster.local:8000";
        assert_eq!(
            trusted_dedicated_url(Some(own), "acme", "sre", "incidentfox")
                .unwrap()
                .as_str(),
            format!("{own}/")
        );
        assert_eq!(
            trusted_dedicated_url(Some(&format!("{own}/")), "acme", "sre", "incidentfox")
                .unwrap()
                .as_str(),
            format!("{own}/")
        );
        for other in [
            "http://agent-dedicated-acme-other.incidentfox.svc.cluster.local:8000",
            "https://attacker.example",
            "http://127.0.0.1:8000",
        ] {
            assert!(
                trusted_dedicated_url(Some(other), "acme", "sre", "incidentfox").is_none(),
                "{other}"
            );
        }
        assert!(trusted_dedicated_url(None, "acme", "sre", "incidentfox").is_none());
    }

    proptest! {
        #[test]
        fn any_team_gets_a_valid_bounded_name(org in "[A-Za-z0-9][A-Za-z0-9._-]{0,127}", team in "[A-Za-z0-9][A-Za-z0-9._-]{0,127}") {
            for (name, limit) in [(pipeline_cronjob_name(&org, &team), CRONJOB_NAME_LIMIT), (dedicated_agent_name(&org, &team), DNS_LABEL_LIMIT)] {
                prop_assert!(name.len() <= limit, "{}", name);
                prop_assert!(crate::config::is_dns_label(&name), "{}", name);
            }
            let label = label_value(&team);
            prop_assert!(label.len() <= DNS_LABEL_LIMIT);
        }
    }
}
