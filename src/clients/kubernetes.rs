//! The few calls the orchestrator makes on the Kubernetes objects it owns: server-side apply with
//! one field manager, get, delete. What the objects are, and whose, is provisioning's business
//! (`provisioning::objects`).

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "incidentfox-orchestrator";

/// The verbs `KubeClient` uses: `get` (is the name free, or ours?), server-side apply is `patch`,
/// rollback and orphans are `delete`, the reconciler's resync is `list` and its watches `watch`
/// (both only with the managed-by label selector). Nothing else is called, so nothing else is
/// granted.
pub const VERBS: &[&str] = &["delete", "get", "list", "patch", "watch"];

/// Every (API group, resource, verbs) the service uses. The Helm chart's Role grants exactly
/// these; a test compares the two.
pub const RBAC_RULES: &[(&str, &str, &[&str])] = &[
    ("batch", "cronjobs", VERBS),
    ("apps", "deployments", VERBS),
    ("", "services", VERBS),
];

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

    /// The object of that name, if there is one.
    pub async fn get<K>(&self, name: &str) -> Result<Option<K>, kube::Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        let started = Instant::now();
        let existing = self.api::<K>().get_opt(name).await;
        self.metrics
            .observe_neighbour(NEIGHBOUR, outcome(&existing), started.elapsed());
        existing
    }

    /// Every object of the kind in the namespace that matches the label selector, in one call
    /// (the reconciler's resync; the namespace holds a few thousand at most).
    pub async fn list<K>(&self, label_selector: &str) -> Result<Vec<K>, kube::Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        let started = Instant::now();
        let listed = self
            .api::<K>()
            .list(&ListParams::default().labels(label_selector))
            .await;
        self.metrics
            .observe_neighbour(NEIGHBOUR, outcome(&listed), started.elapsed());
        Ok(listed?.items)
    }

    /// A watch of the kind's objects that match the label selector (kube's watcher: it lists,
    /// then watches from there, and lists again when the watch expires). It never retries on its
    /// own; the caller decides how to back off.
    pub fn watch<K>(
        &self,
        label_selector: &str,
    ) -> impl futures::Stream<Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>> + Send + use<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
        <K as Resource>::DynamicType: Default,
    {
        kube::runtime::watcher(
            self.api::<K>(),
            kube::runtime::watcher::Config::default().labels(label_selector),
        )
    }

    /// Server-side apply: creates or updates, and is idempotent.
    pub async fn apply<K>(&self, object: &K) -> Result<AppliedObject, kube::Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        let name = object.meta().name.clone().unwrap_or_default();
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
