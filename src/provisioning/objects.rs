//! The Kubernetes objects a team owns, exactly as `contracts.md` gives them: their names, labels,
//! selectors and specs, and who may update an object of a given name. The client only applies,
//! reads and deletes; the rules live here.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Service;
use kube::api::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::KubernetesConfig;

pub const MANAGED_BY: &str = "incidentfox-orchestrator";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_ORG: &str = "incidentfox.io/org-id";
pub const LABEL_TEAM: &str = "incidentfox.io/team-node-id";
/// Kubernetes appends 11 characters to a CronJob's name for its Jobs, so it allows 52.
pub const CRONJOB_NAME_LIMIT: usize = 52;
/// A Service's name is a DNS label.
pub const DNS_LABEL_LIMIT: usize = 63;
/// A Deployment's name is a DNS subdomain.
pub const DNS_SUBDOMAIN_LIMIT: usize = 253;

/// Annotations carrying the exact org and team an object belongs to. Names and labels are
/// sanitised and cut (lossy: `acme`/`eu-sre` and `acme-eu`/`sre` share a name), so ownership is
/// decided by these.
pub const ANNOTATION_ORG: &str = "incidentfox.io/org-id";
pub const ANNOTATION_TEAM: &str = "incidentfox.io/team-node-id";

/// How much of the sanitised org and team a name keeps: the existing service's cuts, so the
/// objects it created keep their names and are updated, not duplicated.
const ORG_PART: usize = 20;
const TEAM_PART: usize = 30;

/// Lower case; `_`, `.` (and anything else a DNS label refuses) become `-`. Nothing is trimmed:
/// the existing service did not trim, and names must stay the same.
pub fn sanitise(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect()
}

fn cut(text: &str, limit: usize) -> &str {
    // Sanitised text is ASCII, so any byte index is a character boundary.
    &text[..text.len().min(limit)]
}

/// `<org, sanitised, cut to 20>-<team, sanitised, cut to 30>`: every object name of a team ends with
/// it. Teams that share it share every name, so provisioning locks on it (they must never race
/// past the ownership check).
pub fn name_class(org: &str, team: &str) -> String {
    format!("{}-{}", cut(&sanitise(org), ORG_PART), cut(&sanitise(team), TEAM_PART))
}

/// `<prefix>-<name class>`; only a name Kubernetes would refuse (too long, or ending in `-`) is
/// shortened further, to `limit` with a stable hash of the exact org and team, so distinct teams
/// never collide and the same team always gets the same name.
pub fn object_name(prefix: &str, org: &str, team: &str, limit: usize) -> String {
    let name = format!("{prefix}-{}", name_class(org, team));
    let well_formed =
        name.starts_with(|c: char| c.is_ascii_alphanumeric()) && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() <= limit && well_formed {
        return name;
    }
    let digest = Sha256::digest(format!("{org}\u{0}{team}").as_bytes());
    let suffix = hex::encode(&digest[..4]);
    let head = cut(&name, limit - suffix.len() - 1).trim_end_matches('-');
    format!("{head}-{suffix}")
}

pub fn pipeline_cronjob_name(org: &str, team: &str) -> String {
    object_name("ai-pipeline", org, team, CRONJOB_NAME_LIMIT)
}

pub fn discovery_cronjob_name(org: &str, team: &str) -> String {
    object_name("dep-discovery", org, team, CRONJOB_NAME_LIMIT)
}

/// The dedicated agent's Deployment. Its limit is a subdomain's, so a name the existing service
/// gave a Deployment stays that Deployment's name even where its Service needs a shorter one.
pub fn dedicated_agent_deployment_name(org: &str, team: &str) -> String {
    object_name("agent-dedicated", org, team, DNS_SUBDOMAIN_LIMIT)
}

/// The dedicated agent's Service, which names its URL.
pub fn dedicated_agent_service_name(org: &str, team: &str) -> String {
    object_name("agent-dedicated", org, team, DNS_LABEL_LIMIT)
}

pub fn dedicated_agent_url(org: &str, team: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc.cluster.local:8000",
        dedicated_agent_service_name(org, team)
    )
}

/// A label value: sanitised, at most 63 characters, starting and ending alphanumeric; one that
/// is not is shortened with a stable hash.
pub fn label_value(value: &str) -> String {
    let clean = sanitise(value);
    let valid = clean.len() <= DNS_LABEL_LIMIT
        && clean.starts_with(|c: char| c.is_ascii_alphanumeric())
        && clean.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        return clean;
    }
    let digest = Sha256::digest(value.as_bytes());
    let suffix = hex::encode(&digest[..4]);
    let head = cut(clean.trim_matches('-'), DNS_LABEL_LIMIT - 9).trim_end_matches('-');
    format!("{head}-{suffix}")
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

fn owner_labels(org: &str, team: &str) -> Map<String, Value> {
    let mut labels = Map::new();
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    labels.insert(LABEL_ORG.into(), label_value(org).into());
    labels.insert(LABEL_TEAM.into(), label_value(team).into());
    labels
}

fn owner_annotations(org: &str, team: &str) -> Value {
    json!({ ANNOTATION_ORG: org, ANNOTATION_TEAM: team })
}

/// What a team's object runs with: the request's identity and the config service to read from.
pub struct TeamObjects<'a> {
    pub kubernetes: &'a KubernetesConfig,
    pub config_service_url: &'a str,
    pub org: &'a str,
    pub team: &'a str,
}

/// Which of a team's two CronJobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CronJobKind {
    /// The AI pipeline's scheduled ingestion.
    Pipeline,
    /// Dependency discovery: the team's to turn on (`PUT .../schedules`, `sync-cronjobs`).
    Discovery,
}

impl CronJobKind {
    pub fn name(self, org: &str, team: &str) -> String {
        match self {
            Self::Pipeline => pipeline_cronjob_name(org, team),
            Self::Discovery => discovery_cronjob_name(org, team),
        }
    }

    pub fn default_schedule(self) -> &'static str {
        match self {
            Self::Pipeline => "0 2 * * *",
            Self::Discovery => "0 */2 * * *",
        }
    }
}

impl TeamObjects<'_> {
    fn env(&self) -> Vec<Value> {
        vec![
            json!({"name": "ORG_ID", "value": self.org}),
            json!({"name": "TEAM_NODE_ID", "value": self.team}),
            json!({"name": "CONFIG_SERVICE_URL", "value": self.config_service_url}),
        ]
    }

    /// One of the team's CronJobs. The command is the whole invocation and `args` is applied
    /// empty on purpose: the existing service split the same invocation into `command` and
    /// `args`, and server-side apply keeps fields it does not set, so an adopted CronJob would
    /// otherwise run its arguments twice.
    pub fn cronjob(&self, kind: CronJobKind, schedule: &str, suspend: bool) -> CronJob {
        let (org, team) = (self.org, self.team);
        let mut labels = owner_labels(org, team);
        let k8s = self.kubernetes;
        let mut env = self.env();
        let (container, image, service_account, command) = match kind {
            CronJobKind::Pipeline => {
                labels.insert("app.kubernetes.io/name".into(), "ai-pipeline".into());
                labels.insert("app.kubernetes.io/component".into(), "scheduled-ingestion".into());
                let command = json!([
                    "python",
                    "-m",
                    "ai_learning_pipeline",
                    "run-scheduled",
                    "--team-id",
                    team,
                    "--org-id",
                    org
                ]);
                (
                    "ai-pipeline",
                    &k8s.ai_pipeline_image,
                    &k8s.ai_pipeline_service_account,
                    command,
                )
            }
            CronJobKind::Discovery => {
                labels.insert("app.kubernetes.io/name".into(), "dependency-discovery".into());
                labels.insert("app.kubernetes.io/component".into(), "scheduled-discovery".into());
                // The dependency service reads TEAM_ID (the existing service set only that).
                env.push(json!({"name": "TEAM_ID", "value": team}));
                let command = json!([
                    "python",
                    "-m",
                    "dependency_service.scripts.run_discovery",
                    "--team-id",
                    team
                ]);
                (
                    "dependency-discovery",
                    &k8s.dependency_service_image,
                    &k8s.dependency_service_account,
                    command,
                )
            }
        };
        from_json(json!({
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": kind.name(org, team), "namespace": k8s.namespace, "labels": labels,
                "annotations": owner_annotations(org, team)},
            "spec": {
                "schedule": schedule,
                "suspend": suspend,
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
                                "serviceAccountName": service_account,
                                "containers": [{
                                    "name": container,
                                    "image": image,
                                    "command": command,
                                    "args": [],
                                    "env": env,
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
        }))
    }

    fn dedicated_labels(&self) -> Map<String, Value> {
        let mut labels = owner_labels(self.org, self.team);
        labels.insert("app.kubernetes.io/name".into(), "incidentfox-agent".into());
        labels.insert("app.kubernetes.io/component".into(), "dedicated-agent".into());
        labels.insert("incidentfox.io/deployment-mode".into(), "dedicated".into());
        labels
    }

    /// A Deployment's selector can never change: this is the one every existing dedicated agent
    /// has.
    fn dedicated_selector(&self) -> Value {
        json!({
            "app.kubernetes.io/name": "incidentfox-agent",
            LABEL_ORG: label_value(self.org),
            LABEL_TEAM: label_value(self.team),
        })
    }

    pub fn dedicated_agent_deployment(&self) -> Deployment {
        let k8s = self.kubernetes;
        let mut env = self.env();
        env.push(json!({"name": "DEPLOYMENT_MODE", "value": "dedicated"}));
        let probe = |delay: u32, period: u32| json!({"httpGet": {"path": "/health", "port": 8000}, "initialDelaySeconds": delay, "periodSeconds": period});
        from_json(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": dedicated_agent_deployment_name(self.org, self.team), "namespace": k8s.namespace,
                "labels": self.dedicated_labels(), "annotations": owner_annotations(self.org, self.team)},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": self.dedicated_selector()},
                "template": {
                    "metadata": {"labels": self.dedicated_labels()},
                    "spec": {
                        "serviceAccountName": k8s.agent_service_account,
                        "containers": [{
                            "name": "agent",
                            "image": k8s.agent_image,
                            "ports": [{"containerPort": 8000, "name": "http"}],
                            "env": env,
                            "resources": {
                                "requests": {"cpu": "500m", "memory": "1Gi"},
                                "limits": {"cpu": "2", "memory": "4Gi"}
                            },
                            "readinessProbe": probe(10, 10),
                            "livenessProbe": probe(30, 30)
                        }]
                    }
                }
            }
        }))
    }

    pub fn dedicated_agent_service(&self) -> Service {
        from_json(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": dedicated_agent_service_name(self.org, self.team), "namespace": self.kubernetes.namespace,
                "labels": self.dedicated_labels(), "annotations": owner_annotations(self.org, self.team)},
            "spec": {
                "type": "ClusterIP",
                "selector": self.dedicated_selector(),
                "ports": [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
            }
        }))
    }
}

/// The builders above produce valid objects by construction; a failure here is a bug in them.
fn from_json<T: DeserializeOwned>(value: Value) -> T {
    match serde_json::from_value(value) {
        Ok(object) => object,
        Err(e) => panic!("object builder produced an invalid object: {e}"),
    }
}

/// Whether an existing object may be updated for the team `desired` is built for: its ownership
/// annotations match, or (an object the existing service created, without them) it carries this
/// service's managed-by label for the same sanitised team.
pub fn same_owner(existing: &ObjectMeta, desired: &ObjectMeta) -> bool {
    let annotation = |meta: &ObjectMeta, key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    match (
        annotation(existing, ANNOTATION_ORG),
        annotation(existing, ANNOTATION_TEAM),
    ) {
        (Some(org), Some(team)) => {
            Some(org) == annotation(desired, ANNOTATION_ORG) && Some(team) == annotation(desired, ANNOTATION_TEAM)
        }
        _ => {
            let label = |meta: &ObjectMeta, key: &str| meta.labels.as_ref().and_then(|l| l.get(key)).cloned();
            label(existing, LABEL_MANAGED_BY).as_deref() == Some(MANAGED_BY)
                && label(existing, LABEL_ORG) == label(desired, LABEL_ORG)
                && label(existing, LABEL_TEAM) == label(desired, LABEL_TEAM)
        }
    }
}

/// The stricter check for an object the existing service created (no ownership annotations):
/// its labels are sanitised and cut, so two teams can share them, but its pods' `ORG_ID` and
/// `TEAM_NODE_ID` hold the exact ids. Where they are set, they must be the team's. `existing` is
/// the object as JSON; an annotated object passes (its annotations decided already).
pub fn env_names_owner(existing: &Value, desired: &ObjectMeta) -> bool {
    if existing
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION_ORG))
        .is_some()
    {
        return true;
    }
    let expected = |key: &str| desired.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    let containers = existing
        .pointer("/spec/jobTemplate/spec/template/spec/containers")
        .or_else(|| existing.pointer("/spec/template/spec/containers"))
        .and_then(Value::as_array);
    let env = containers
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("env").and_then(Value::as_array))
        .flatten();
    for var in env {
        let (Some(name), Some(value)) = (
            var.get("name").and_then(Value::as_str),
            var.get("value").and_then(Value::as_str),
        ) else {
            continue;
        };
        let key = match name {
            "ORG_ID" => ANNOTATION_ORG,
            "TEAM_NODE_ID" => ANNOTATION_TEAM,
            _ => continue,
        };
        if expected(key).as_deref() != Some(value) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k8s() -> KubernetesConfig {
        KubernetesConfig {
            namespace: "incidentfox".into(),
            ai_pipeline_image: "img:1".into(),
            ai_pipeline_service_account: "ai-pipeline".into(),
            dependency_service_image: "dep:1".into(),
            dependency_service_account: "dependency-discovery".into(),
            agent_image: "agent:1".into(),
            agent_service_account: "incidentfox-agent".into(),
        }
    }

    fn team<'a>(k8s: &'a KubernetesConfig, org: &'a str, team: &'a str) -> TeamObjects<'a> {
        TeamObjects {
            kubernetes: k8s,
            config_service_url: "http://config",
            org,
            team,
        }
    }

    #[test]
    fn names_keep_the_existing_services_cuts() {
        assert_eq!(pipeline_cronjob_name("acme", "team_a.b"), "ai-pipeline-acme-team-a-b");
        // The org is cut to 20 and the team to 30 before anything else, as the existing service
        // did: its objects keep their names.
        assert_eq!(
            dedicated_agent_service_name("an-organisation-with-a-long-name", "sre"),
            "agent-dedicated-an-organisation-with-sre"
        );
        // Over a Service's 63 characters, the Deployment keeps the name the existing service
        // gave it and only the Service is shortened.
        let (org, team) = ("an-organisation-with-a-long-name", "a-team-with-an-even-longer-name");
        assert_eq!(
            dedicated_agent_deployment_name(org, team),
            "agent-dedicated-an-organisation-with-a-team-with-an-even-longer-nam"
        );
        assert!(dedicated_agent_service_name(org, team).len() <= DNS_LABEL_LIMIT);
        assert_eq!(
            discovery_cronjob_name("acme", "a-team-name-of-exactly-31-chars"),
            "dep-discovery-acme-a-team-name-of-exactly-31-char"
        );
        // Only a name still over the limit is shortened further, with a stable hash.
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
        // A cut that ends in '-' would be refused: it is shortened too.
        let dash = pipeline_cronjob_name("acme", "abcdefghijklmnopqrstuvwxyz012-x");
        assert!(crate::config::is_dns_label(&dash), "{dash}");
        assert_eq!(
            dedicated_agent_url("acme", "sre", "incidentfox"),
            "http://agent-dedicated-acme-sre.incidentfox.svc.cluster.local:8000"
        );
    }

    #[test]
    fn cronjobs_match_the_contract() {
        let k8s = k8s();
        let job = serde_json::to_value(team(&k8s, "Acme", "SRE_1").cronjob(CronJobKind::Pipeline, "0 2 * * *", false))
            .unwrap();
        assert_eq!(job["metadata"]["labels"]["incidentfox.io/team-node-id"], "sre-1");
        assert_eq!(job["spec"]["concurrencyPolicy"], "Forbid");
        let pod = &job["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["command"],
            json!([
                "python",
                "-m",
                "ai_learning_pipeline",
                "run-scheduled",
                "--team-id",
                "SRE_1",
                "--org-id",
                "Acme"
            ])
        );
        assert_eq!(pod["containers"][0]["args"], json!([]));
        assert_eq!(pod["containers"][0]["resources"]["limits"]["memory"], "4Gi");
        let discovery =
            serde_json::to_value(team(&k8s, "acme", "sre").cronjob(CronJobKind::Discovery, "0 */2 * * *", true))
                .unwrap();
        assert_eq!(discovery["metadata"]["name"], "dep-discovery-acme-sre");
        assert_eq!(discovery["spec"]["suspend"], true);
        assert_eq!(
            discovery["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"],
            "dep:1"
        );
    }

    #[test]
    fn the_dedicated_agent_matches_the_contract() {
        let k8s = k8s();
        let objects = team(&k8s, "acme", "sre");
        let deployment = serde_json::to_value(objects.dedicated_agent_deployment()).unwrap();
        assert_eq!(
            deployment["spec"]["selector"]["matchLabels"],
            json!({"app.kubernetes.io/name": "incidentfox-agent", "incidentfox.io/org-id": "acme", "incidentfox.io/team-node-id": "sre"})
        );
        let labels = &deployment["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/component"], "dedicated-agent");
        assert_eq!(labels["incidentfox.io/deployment-mode"], "dedicated");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "incidentfox-agent");
        assert_eq!(pod["containers"][0]["readinessProbe"]["initialDelaySeconds"], 10);
        assert_eq!(pod["containers"][0]["livenessProbe"]["periodSeconds"], 30);
        let service = serde_json::to_value(objects.dedicated_agent_service()).unwrap();
        assert_eq!(
            service["spec"]["selector"],
            deployment["spec"]["selector"]["matchLabels"]
        );
    }

    #[test]
    fn only_the_teams_own_dedicated_url_is_trusted() {
        let own = "http://agent-dedicated-acme-sre.incidentfox.svc.cluster.local:8000";
        for configured in [own.to_string(), format!("{own}/")] {
            assert_eq!(
                trusted_dedicated_url(Some(&configured), "acme", "sre", "incidentfox")
                    .unwrap()
                    .as_str(),
                format!("{own}/")
            );
        }
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
            for (name, limit) in [
                (pipeline_cronjob_name(&org, &team), CRONJOB_NAME_LIMIT),
                (discovery_cronjob_name(&org, &team), CRONJOB_NAME_LIMIT),
                (dedicated_agent_service_name(&org, &team), DNS_LABEL_LIMIT),
                (dedicated_agent_deployment_name(&org, &team), DNS_SUBDOMAIN_LIMIT),
            ] {
                prop_assert!(name.len() <= limit, "{}", name);
                let label_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                prop_assert!(label_chars && !name.starts_with('-') && !name.ends_with('-'), "{}", name);
            }
            let label = label_value(&team);
            prop_assert!(label.len() <= DNS_LABEL_LIMIT);
        }
    }
}
