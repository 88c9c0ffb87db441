//! Kubernetes API server stand-in for the three resources the orchestrator owns: `batch/v1`
//! CronJobs, `apps/v1` Deployments and `v1` Services. Plain HTTP, no authentication.
//!
//! It follows the real API server where a client could tell the difference: `Status` error bodies,
//! resource versions and optimistic concurrency, name and label validation, server-side apply
//! requiring a field manager, no-op writes not bumping the resource version, watches (`?watch=1`)
//! that resume from a resource version and answer `410 Gone` (as an `ERROR` event) when it is
//! older than the retained history.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::json::{merge_patch, now_rfc3339, parse_body, random_hex};

/// A resource type this API server serves.
#[derive(Debug)]
struct ResourceKind {
    /// Plural, as in the URL.
    resource: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    /// CronJob names end up in Job and Pod names with a suffix, hence 52; the others follow the
    /// DNS label limit.
    max_name_len: usize,
    /// Services names must be DNS-1035 labels; the others DNS-1123 subdomains.
    dns1035_label: bool,
}

const RESOURCES: &[ResourceKind] = &[
    ResourceKind {
        resource: "cronjobs",
        group: "batch",
        version: "v1",
        kind: "CronJob",
        max_name_len: 52,
        dns1035_label: false,
    },
    ResourceKind {
        resource: "deployments",
        group: "apps",
        version: "v1",
        kind: "Deployment",
        max_name_len: 63,
        dns1035_label: false,
    },
    ResourceKind {
        resource: "services",
        group: "",
        version: "v1",
        kind: "Service",
        max_name_len: 63,
        dns1035_label: true,
    },
];

impl ResourceKind {
    fn find(group: &str, version: &str, resource: &str) -> Option<&'static ResourceKind> {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.resource == resource)
    }

    fn by_resource(resource: &str) -> Option<&'static ResourceKind> {
        RESOURCES.iter().find(|r| r.resource == resource)
    }

    fn api_version(&self) -> String {
        qualify_group_version(self.group, self.version)
    }

    /// `cronjobs.batch`, `services`: how the API server names the resource in messages.
    fn qualified_resource(&self) -> String {
        qualify(self.resource, self.group)
    }

    /// `CronJob.batch`, `Service`: how validation errors name the kind.
    fn qualified_kind(&self) -> String {
        qualify(self.kind, self.group)
    }

    fn details(&self, name: &str, kind: &str) -> Value {
        let mut details = json!({ "name": name, "kind": kind });
        if !self.group.is_empty() {
            details["group"] = json!(self.group);
        }
        details
    }
}

fn qualify(name: &str, group: &str) -> String {
    if group.is_empty() {
        name.to_owned()
    } else {
        format!("{name}.{group}")
    }
}

/// State of the Kubernetes stand-in. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct Kubernetes {
    inner: Arc<Mutex<KubeState>>,
}

/// How many changes watches can resume from; an older resource version is `410 Gone`, as etcd's
/// compaction makes it in a real cluster.
const WATCH_HISTORY: usize = 10_000;

/// One change, as a watch sends it.
struct Change {
    resource_version: u64,
    resource: String,
    namespace: String,
    /// ADDED, MODIFIED or DELETED.
    kind: &'static str,
    object: Value,
    /// A modified object as it was: a watch whose selector it enters or leaves sees ADDED or
    /// DELETED, as from a real API server.
    previous: Option<Value>,
}

struct KubeState {
    /// Every change, oldest first, at most `WATCH_HISTORY`.
    changes: VecDeque<Change>,
    /// The resource version of the newest change, for watches waiting for the next one.
    latest: tokio::sync::watch::Sender<u64>,
    /// Watches answer 403, as an API server whose RBAC does not grant `watch`.
    refuse_watches: bool,
    /// Keyed by (resource, namespace, name).
    objects: BTreeMap<(String, String, String), Value>,
    /// The cluster-wide resource version counter, like etcd's revision.
    resource_version: u64,
    /// Keyed by (resource, name): writes that created or changed the object.
    writes: HashMap<(String, String), usize>,
    /// The last configuration each field manager applied to an object, keyed by (resource,
    /// namespace, name) then manager: what server-side apply needs to know which fields a manager
    /// stopped applying (and so gives up).
    applied: HashMap<(String, String, String), BTreeMap<String, Value>>,
}

impl Default for KubeState {
    fn default() -> Self {
        Self {
            changes: VecDeque::new(),
            latest: tokio::sync::watch::channel(0).0,
            refuse_watches: false,
            objects: BTreeMap::new(),
            // Like etcd's revision, never 0: a list's "0" would mean "any version" to a watch.
            resource_version: 1,
            writes: HashMap::new(),
            applied: HashMap::new(),
        }
    }
}

impl Kubernetes {
    /// Every stored object of a resource (`"cronjobs"`, `"deployments"`, `"services"`), all
    /// namespaces, ordered by namespace then name.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        let state = self.inner.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, object)| object.clone())
            .collect()
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.inner.lock().unwrap();
        state.objects.get(&object_key(resource, namespace, name)).cloned()
    }

    /// Create/replace/apply/patch requests that created or changed the named object (any
    /// namespace). No-op writes are not counted.
    pub fn write_count(&self, resource: &str, name: &str) -> usize {
        let state = self.inner.lock().unwrap();
        state
            .writes
            .get(&(resource.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Deletes an object behind the client's back (a test playing an operator or a controller):
    /// watches see it. Returns whether it existed.
    pub fn delete_behind(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let mut state = self.inner.lock().unwrap();
        state.remove_object(&object_key(resource, namespace, name)).is_some()
    }

    /// Changes an object behind the client's back (`edit` gets it as stored; identity and
    /// resource version are kept and bumped as an update through the API would): watches see it.
    pub fn edit_behind(&self, resource: &str, namespace: &str, name: &str, edit: impl FnOnce(&mut Value)) -> bool {
        let Some(kind) = ResourceKind::by_resource(resource) else {
            return false;
        };
        let mut state = self.inner.lock().unwrap();
        let Some(mut object) = state.objects.get(&object_key(resource, namespace, name)).cloned() else {
            return false;
        };
        edit(&mut object);
        state.update(kind, namespace, name, object, false).is_ok()
    }

    /// Watches answer 403 Forbidden from now on (`true`), and the open ones end (as a revoked
    /// permission ends them in a real cluster); `false`: they work again.
    pub fn refuse_watches(&self, refuse: bool) {
        let mut state = self.inner.lock().unwrap();
        state.refuse_watches = refuse;
        let latest = state.resource_version;
        state.latest.send_replace(latest);
    }

    /// Store an object directly (for seeding a test), as if created through the API: validated
    /// and stamped with uid, resource version and timestamps. Namespace defaults to `default`.
    pub fn insert(&self, resource: &str, object: Value) -> anyhow::Result<Value> {
        let kind =
            ResourceKind::by_resource(resource).ok_or_else(|| anyhow::anyhow!("unknown resource {resource:?}"))?;
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
        let mut state = self.inner.lock().unwrap();
        state
            .create(kind, &namespace, object, false)
            .map_err(|status| anyhow::anyhow!("{}", status.body["message"].as_str().unwrap_or("invalid object")))
    }
}

fn object_key(resource: &str, namespace: &str, name: &str) -> (String, String, String) {
    (resource.to_owned(), namespace.to_owned(), name.to_owned())
}

/// A Kubernetes `Status` failure, as the API server sends it.
struct KubeStatus {
    code: StatusCode,
    body: Value,
}

impl KubeStatus {
    fn new(code: StatusCode, reason: &str, message: String, details: Option<Value>) -> Self {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        });
        if let Some(details) = details {
            body["details"] = details;
        }
        KubeStatus { code, body }
    }

    fn not_found(kind: &ResourceKind, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified_resource()),
            Some(kind.details(name, kind.resource)),
        )
    }

    fn already_exists(kind: &ResourceKind, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified_resource()),
            Some(kind.details(name, kind.resource)),
        )
    }

    fn conflict(kind: &ResourceKind, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.qualified_resource()
            ),
            Some(kind.details(name, kind.resource)),
        )
    }

    /// 422 with one cause, e.g. `metadata.name: Invalid value: "x": must be no more than 52 characters`.
    fn invalid(kind: &ResourceKind, name: &str, field: &str, cause: FieldError) -> Self {
        let mut details = kind.details(name, kind.kind);
        details["causes"] = json!([{ "reason": cause.reason, "message": cause.message, "field": field }]);
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: {field}: {}",
                kind.qualified_kind(),
                cause.message
            ),
            Some(details),
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message.into(), None)
    }

    fn resource_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
            Some(json!({})),
        )
    }
}

impl IntoResponse for KubeStatus {
    fn into_response(self) -> Response {
        (self.code, Json(self.body)).into_response()
    }
}

/// Body of an injected failure: a `Status`, so that Kubernetes clients parse it as an API error.
pub(crate) fn fault_body(code: u16) -> Value {
    let reason = match code {
        409 => "Conflict",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("devstack: injected fault (status {code})"),
        "reason": reason,
        "code": code,
    })
}

struct FieldError {
    reason: &'static str,
    message: String,
}

impl FieldError {
    fn invalid(value: &str, why: impl std::fmt::Display) -> Self {
        FieldError {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: \"{value}\": {why}"),
        }
    }
}

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
    alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character \
    (e.g. 'example.com', regex used for validation is \
    '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric \
    characters or '-', start with an alphabetic character, and end with an alphanumeric character \
    (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric \
    characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. \
    'MyValue',  or 'my_value',  or '12345', regex used for validation is \
    '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const LABEL_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', \
    and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or \
    '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// `(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?`, at most 63 characters.
fn is_label_value(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.is_empty()
        || (s.len() <= 63
            && s.starts_with(alnum)
            && s.ends_with(alnum)
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

fn validate_name(kind: &ResourceKind, name: &str) -> Option<FieldError> {
    if name.is_empty() {
        return Some(FieldError {
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".to_owned(),
        });
    }
    if name.len() > kind.max_name_len {
        return Some(FieldError::invalid(
            name,
            format!("must be no more than {} characters", kind.max_name_len),
        ));
    }
    let (valid, why) = if kind.dns1035_label {
        (is_dns1035_label(name), DNS1035_LABEL_MSG)
    } else {
        (is_dns1123_subdomain(name), DNS1123_SUBDOMAIN_MSG)
    };
    (!valid).then(|| FieldError::invalid(name, why))
}

/// Label keys are `[prefix/]name` (prefix a DNS subdomain); values are short and restricted.
fn validate_labels(object: &Value) -> Option<(String, FieldError)> {
    let labels = object["metadata"]["labels"].as_object()?;
    for (key, value) in labels {
        let Some(value) = value.as_str() else {
            return Some((
                "metadata.labels".to_owned(),
                FieldError::invalid(&value.to_string(), "label values must be strings"),
            ));
        };
        let (prefix, name) = match key.split_once('/') {
            Some((prefix, name)) => (Some(prefix), name),
            None => (None, key.as_str()),
        };
        let prefix_ok = prefix.is_none_or(is_dns1123_subdomain);
        if !prefix_ok || name.is_empty() || !is_label_value(name) {
            return Some(("metadata.labels".to_owned(), FieldError::invalid(key, LABEL_NAME_MSG)));
        }
        if !is_label_value(value) {
            let why = if value.len() > 63 {
                "must be no more than 63 characters"
            } else {
                LABEL_VALUE_MSG
            };
            return Some(("metadata.labels".to_owned(), FieldError::invalid(value, why)));
        }
    }
    None
}

fn validate_object(kind: &ResourceKind, name: &str, object: &Value) -> Result<(), KubeStatus> {
    if let Some(cause) = validate_name(kind, name) {
        return Err(KubeStatus::invalid(kind, name, "metadata.name", cause));
    }
    if let Some((field, cause)) = validate_labels(object) {
        return Err(KubeStatus::invalid(kind, name, &field, cause));
    }
    Ok(())
}

fn metadata_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object["metadata"][field].as_str().filter(|s| !s.is_empty())
}

impl KubeState {
    fn next_resource_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn create(
        &mut self,
        kind: &ResourceKind,
        namespace: &str,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, KubeStatus> {
        if !object.is_object() {
            return Err(KubeStatus::bad_request("the body must be a JSON object"));
        }
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let name = match (metadata_str(&object, "name"), metadata_str(&object, "generateName")) {
            (Some(name), _) => name.to_owned(),
            (None, Some(prefix)) => format!("{prefix}{}", random_hex(5)),
            (None, None) => String::new(),
        };
        if metadata_str(&object, "namespace").is_some_and(|ns| ns != namespace) {
            return Err(KubeStatus::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        validate_object(kind, &name, &object)?;
        let key = object_key(kind.resource, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(KubeStatus::already_exists(kind, &name));
        }

        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(name);
        metadata["namespace"] = json!(namespace);
        metadata["uid"] = json!(uuid::Uuid::new_v4().to_string());
        metadata["creationTimestamp"] = json!(now_rfc3339());
        metadata["generation"] = json!(1);
        if let Some(meta) = metadata.as_object_mut() {
            meta.remove("resourceVersion");
            meta.remove("generateName");
        }
        // Status belongs to the status subresource: clients cannot set it on create.
        if let Some(fields) = object.as_object_mut() {
            fields.remove("status");
        }
        simulate_controllers(kind, &mut object, None);
        if dry_run {
            object["metadata"]["resourceVersion"] = json!("");
            return Ok(object);
        }
        object["metadata"]["resourceVersion"] = json!(self.next_resource_version());
        self.objects.insert(key, object.clone());
        self.count_write(kind, &name);
        self.record("ADDED", kind.resource, namespace, &object, None);
        Ok(object)
    }

    /// Store `candidate` (already merged/replaced, same identity) over the existing object. A
    /// write that changes nothing keeps the resource version and is not counted, as in Kubernetes.
    fn update(
        &mut self,
        kind: &ResourceKind,
        namespace: &str,
        name: &str,
        mut candidate: Value,
        dry_run: bool,
    ) -> Result<Value, KubeStatus> {
        let key = object_key(kind.resource, namespace, name);
        let Some(stored) = self.objects.get(&key).cloned() else {
            return Err(KubeStatus::not_found(kind, name));
        };
        validate_object(kind, name, &candidate)?;
        if kind.resource == "deployments" && candidate["spec"]["selector"] != stored["spec"]["selector"] {
            return Err(KubeStatus::invalid(
                kind,
                name,
                "spec.selector",
                FieldError::invalid(&candidate["spec"]["selector"].to_string(), "field is immutable"),
            ));
        }

        // Identity and server-managed fields come from the stored object.
        candidate["apiVersion"] = json!(kind.api_version());
        candidate["kind"] = json!(kind.kind);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "generation",
        ] {
            candidate["metadata"][field] = stored["metadata"][field].clone();
        }
        // Status belongs to the status subresource: writes to the main resource keep it.
        match stored.get("status") {
            Some(status) => candidate["status"] = status.clone(),
            None => {
                if let Some(object) = candidate.as_object_mut() {
                    object.remove("status");
                }
            }
        }
        simulate_controllers(kind, &mut candidate, Some(&stored));
        if candidate == stored {
            return Ok(stored);
        }
        if candidate["spec"] != stored["spec"] {
            let generation = stored["metadata"]["generation"].as_u64().unwrap_or(1);
            candidate["metadata"]["generation"] = json!(generation + 1);
            simulate_controllers(kind, &mut candidate, Some(&stored));
        }
        if dry_run {
            return Ok(candidate);
        }
        candidate["metadata"]["resourceVersion"] = json!(self.next_resource_version());
        self.objects.insert(key, candidate.clone());
        self.count_write(kind, name);
        self.record("MODIFIED", kind.resource, namespace, &candidate, Some(&stored));
        Ok(candidate)
    }

    /// Removes an object; watches see its last state with a new resource version.
    fn remove_object(&mut self, key: &(String, String, String)) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.applied.remove(key);
        object["metadata"]["resourceVersion"] = json!(self.next_resource_version());
        self.record("DELETED", &key.0, &key.1, &object, None);
        Some(object)
    }

    fn record(
        &mut self,
        kind: &'static str,
        resource: &str,
        namespace: &str,
        object: &Value,
        previous: Option<&Value>,
    ) {
        if self.changes.len() == WATCH_HISTORY {
            self.changes.pop_front();
        }
        self.changes.push_back(Change {
            resource_version: self.resource_version,
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            kind,
            object: object.clone(),
            previous: previous.cloned(),
        });
        self.latest.send_replace(self.resource_version);
    }

    fn count_write(&mut self, kind: &ResourceKind, name: &str) {
        *self
            .writes
            .entry((kind.resource.to_owned(), name.to_owned()))
            .or_default() += 1;
    }
}

/// What the cluster's controllers would do right away: Services get a cluster IP (kept across
/// updates), Deployments report themselves rolled out.
fn simulate_controllers(kind: &ResourceKind, object: &mut Value, previous: Option<&Value>) {
    match kind.resource {
        "services" => {
            let wants_ip = object["spec"]["type"].as_str().is_none_or(|t| t == "ClusterIP")
                && object["spec"]["clusterIP"].as_str().is_none_or(str::is_empty);
            if wants_ip {
                let ip = previous
                    .and_then(|p| p["spec"]["clusterIP"].as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        let n = uuid::Uuid::new_v4().as_u128();
                        format!("10.96.{}.{}", (n >> 8) as u8, (n as u8).max(2))
                    });
                object["spec"]["clusterIP"] = json!(ip);
                object["spec"]["clusterIPs"] = json!([ip]);
            }
        }
        "deployments" => {
            let replicas = object["spec"]["replicas"].as_u64().unwrap_or(1);
            let generation = object["metadata"]["generation"].as_u64().unwrap_or(1);
            object["status"] = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            });
        }
        _ => {}
    }
}

/// One requirement of a label selector.
#[derive(Debug, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &Map<String, Value>) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// Parse `a=b,c!=d,e,!f,g in (x,y),h notin (z)`.
fn parse_label_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);

    let set = |values: &str| -> Result<Vec<String>, String> {
        let inner = values
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("unable to parse requirement: expected a set in {values:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    let mut requirements = Vec::new();
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let requirement = if let Some(key) = part.strip_prefix('!') {
            Requirement::DoesNotExist(key.trim().to_owned())
        } else if let Some((key, values)) = part.split_once(" notin ") {
            Requirement::NotIn(key.trim().to_owned(), set(values)?)
        } else if let Some((key, values)) = part.split_once(" in ") {
            Requirement::In(key.trim().to_owned(), set(values)?)
        } else if let Some((key, value)) = part.split_once("!=") {
            Requirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
        } else {
            Requirement::Exists(part.to_owned())
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// Field selectors: only `metadata.name` and `metadata.namespace`, `=`/`==`/`!=`.
fn field_selector_matches(selector: &str, object: &Value) -> Result<bool, String> {
    for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, negate, value) = if let Some((f, v)) = part.split_once("!=") {
            (f, true, v)
        } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (f, false, v)
        } else {
            return Err(format!("invalid field selector: {part:?}"));
        };
        let actual = match field.trim() {
            "metadata.name" => object["metadata"]["name"].as_str(),
            "metadata.namespace" => object["metadata"]["namespace"].as_str(),
            other => return Err(format!("field label not supported: {other}")),
        };
        if (actual == Some(value.trim())) == negate {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(crate) fn router(kube: Kubernetes) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api", get(core_api_versions))
        .route("/apis", get(api_groups))
        .route("/api/{version}", get(core_api_resources))
        .route("/apis/{group}/{version}", get(group_api_resources))
        .route("/api/v1/namespaces/{namespace}", get(namespace))
        .route("/api/{version}/{resource}", get(list))
        .route("/apis/{group}/{version}/{resource}", get(list))
        .route(
            "/api/{version}/namespaces/{namespace}/{resource}",
            get(list).post(create),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{namespace}/{resource}",
            get(list).post(create),
        )
        .route(
            "/api/{version}/namespaces/{namespace}/{resource}/{name}",
            get(read).put(replace).patch(patch).delete(remove),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{namespace}/{resource}/{name}",
            get(read).put(replace).patch(patch).delete(remove),
        )
        .fallback(|| async { KubeStatus::resource_not_found() })
        .with_state(kube)
}

/// Path parameters of every resource route; `group` is absent for the core API.
type PathParams = Path<HashMap<String, String>>;
type QueryParams = Query<HashMap<String, String>>;

struct Target {
    kind: &'static ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
}

fn target(params: &HashMap<String, String>) -> Result<Target, KubeStatus> {
    let param = |k: &str| params.get(k).map(String::as_str);
    let kind = ResourceKind::find(
        param("group").unwrap_or(""),
        param("version").unwrap_or(""),
        param("resource").unwrap_or(""),
    )
    .ok_or_else(KubeStatus::resource_not_found)?;
    Ok(Target {
        kind,
        namespace: params.get("namespace").cloned(),
        name: params.get("name").cloned(),
    })
}

fn is_dry_run(query: &HashMap<String, String>) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

fn body_object(body: &Bytes) -> Result<Value, KubeStatus> {
    match parse_body(body) {
        Ok(Some(value @ Value::Object(_))) => Ok(value),
        Ok(_) => Err(KubeStatus::bad_request("the body of the request must be an object")),
        Err(err) => Err(KubeStatus::bad_request(format!("error decoding from json: {err}"))),
    }
}

async fn version() -> Json<Value> {
    Json(json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0",
        "gitCommit": "devstack",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    }))
}

async fn core_api_versions() -> Json<Value> {
    Json(json!({ "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [] }))
}

async fn api_groups() -> Json<Value> {
    let groups: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty())
        .map(|r| {
            let gv = json!({ "groupVersion": r.api_version(), "version": r.version });
            json!({ "name": r.group, "versions": [gv], "preferredVersion": gv })
        })
        .collect();
    Json(json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups }))
}

async fn core_api_resources(Path(version): Path<String>) -> Result<Json<Value>, KubeStatus> {
    api_resources("", &version)
}

async fn group_api_resources(Path((group, version)): Path<(String, String)>) -> Result<Json<Value>, KubeStatus> {
    api_resources(&group, &version)
}

/// Discovery for one group/version, enough for `kubectl` to map kinds to resources.
fn api_resources(group: &str, version: &str) -> Result<Json<Value>, KubeStatus> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.resource,
                "singularName": r.kind.to_ascii_lowercase(),
                "namespaced": true,
                "kind": r.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update"],
            })
        })
        .collect();
    if resources.is_empty() {
        return Err(KubeStatus::resource_not_found());
    }
    Ok(Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": qualify_group_version(group, version),
        "resources": resources,
    })))
}

fn qualify_group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    }
}

/// Every namespace exists (objects can be created anywhere); `kubectl` asks after a 404.
async fn namespace(Path(namespace): Path<String>) -> Json<Value> {
    Json(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": namespace, "labels": { "kubernetes.io/metadata.name": namespace } },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    }))
}

async fn list(
    State(kube): State<Kubernetes>,
    Path(params): PathParams,
    Query(query): QueryParams,
) -> Result<Response, KubeStatus> {
    let target = target(&params)?;
    let requirements = match query.get("labelSelector") {
        Some(selector) => parse_label_selector(selector).map_err(KubeStatus::bad_request)?,
        None => Vec::new(),
    };
    if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
        return watch(kube, target, requirements, &query);
    }
    let state = kube.inner.lock().unwrap();
    let mut items = Vec::new();
    for ((resource, namespace, _), object) in &state.objects {
        if resource != target.kind.resource || target.namespace.as_ref().is_some_and(|ns| ns != namespace) {
            continue;
        }
        let empty = Map::new();
        let labels = object["metadata"]["labels"].as_object().unwrap_or(&empty);
        if !requirements.iter().all(|r| r.matches(labels)) {
            continue;
        }
        if let Some(selector) = query.get("fieldSelector") {
            if !field_selector_matches(selector, object).map_err(KubeStatus::bad_request)? {
                continue;
            }
        }
        items.push(object.clone());
    }
    Ok(Json(json!({
        "apiVersion": target.kind.api_version(),
        "kind": format!("{}List", target.kind.kind),
        "metadata": { "resourceVersion": state.resource_version.to_string() },
        "items": items,
    }))
    .into_response())
}

/// The changes of a resource from a resource version on, as newline-separated JSON events, until
/// `timeoutSeconds` (default 30 minutes) or the client goes away. No resource version (or "0"):
/// the current objects first, as ADDED. A version older than the retained history: one ERROR
/// event with a 410 Expired status, as a real API server sends after compaction.
fn watch(
    kube: Kubernetes,
    target: Target,
    requirements: Vec<Requirement>,
    query: &HashMap<String, String>,
) -> Result<Response, KubeStatus> {
    let resource = target.kind.resource.to_owned();
    let namespace = target.namespace.clone();
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800)
        .min(3600);
    let field_selector = query.get("fieldSelector").cloned();
    if let Some(selector) = &field_selector {
        field_selector_matches(selector, &json!({})).map_err(KubeStatus::bad_request)?;
    }
    let matches = move |change_resource: &str, change_namespace: &str, object: &Value| {
        let empty = Map::new();
        let labels = object["metadata"]["labels"].as_object().unwrap_or(&empty);
        change_resource == resource
            && namespace.as_ref().is_none_or(|ns| ns == change_namespace)
            && requirements.iter().all(|r| r.matches(labels))
            && field_selector
                .as_ref()
                .is_none_or(|selector| field_selector_matches(selector, object).unwrap_or(false))
    };
    let (start, initial, mut latest) = {
        let state = kube.inner.lock().unwrap();
        if state.refuse_watches {
            return Err(KubeStatus::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{} is forbidden: User \"system:serviceaccount:incidentfox:orchestrator\" cannot watch resource \"{}\"",
                    target.kind.qualified_resource(),
                    target.kind.resource
                ),
                Some(target.kind.details("", target.kind.resource)),
            ));
        }
        match query.get("resourceVersion").map(String::as_str) {
            None | Some("" | "0") => {
                let initial: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((r, ns, _), object)| matches(r, ns, object))
                    .map(|(_, object)| json!({"type": "ADDED", "object": object}))
                    .collect();
                (state.resource_version, initial, state.latest.subscribe())
            }
            Some(version) => {
                let start: u64 = version
                    .parse()
                    .map_err(|_| KubeStatus::bad_request(format!("invalid resourceVersion {version:?}")))?;
                let oldest_kept = state
                    .changes
                    .front()
                    .map_or(state.resource_version, |c| c.resource_version);
                let compacted = state.changes.len() == WATCH_HISTORY && start + 1 < oldest_kept;
                let initial = if compacted {
                    vec![json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {start} ({oldest_kept})"),
                        "reason": "Expired", "code": 410}})]
                } else {
                    Vec::new()
                };
                if compacted {
                    (u64::MAX, initial, state.latest.subscribe())
                } else {
                    (start, initial, state.latest.subscribe())
                }
            }
        }
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(256);
    tokio::spawn(async move {
        let line = |event: &Value| Ok(Bytes::from(format!("{event}\n")));
        for event in &initial {
            if sender.send(line(event)).await.is_err() {
                return;
            }
        }
        if start == u64::MAX {
            return;
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
        let mut sent_up_to = start;
        loop {
            let events: Vec<Value> = {
                let state = kube.inner.lock().unwrap();
                if state.refuse_watches {
                    return;
                }
                let events = state
                    .changes
                    .iter()
                    .filter(|c| c.resource_version > sent_up_to)
                    .filter_map(|c| {
                        let now = matches(&c.resource, &c.namespace, &c.object);
                        let before = c
                            .previous
                            .as_ref()
                            .is_some_and(|p| matches(&c.resource, &c.namespace, p));
                        let kind = match (c.kind, before, now) {
                            ("MODIFIED", false, true) => "ADDED",
                            ("MODIFIED", true, false) => "DELETED",
                            (kind, _, true) => kind,
                            _ => return None,
                        };
                        Some(json!({"type": kind, "object": c.object}))
                    })
                    .collect();
                sent_up_to = sent_up_to.max(state.resource_version);
                events
            };
            for event in &events {
                if sender.send(line(event)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = latest.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
                () = sender.closed() => return,
            }
        }
    });
    let body = axum::body::Body::from_stream(futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    }));
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn create(
    State(kube): State<Kubernetes>,
    Path(params): PathParams,
    Query(query): QueryParams,
    body: Bytes,
) -> Result<Response, KubeStatus> {
    let target = target(&params)?;
    let namespace = target.namespace.unwrap_or_default();
    let object = body_object(&body)?;
    let mut state = kube.inner.lock().unwrap();
    let created = state.create(target.kind, &namespace, object, is_dry_run(&query))?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn read(State(kube): State<Kubernetes>, Path(params): PathParams) -> Result<Response, KubeStatus> {
    let target = target(&params)?;
    let (namespace, name) = (target.namespace.unwrap_or_default(), target.name.unwrap_or_default());
    kube.get(target.kind.resource, &namespace, &name)
        .map(|object| Json(object).into_response())
        .ok_or_else(|| KubeStatus::not_found(target.kind, &name))
}

/// The object's name in a body must be absent or the one in the URL.
fn check_body_name(body: &Value, name: &str) -> Result<(), KubeStatus> {
    match metadata_str(body, "name") {
        Some(in_body) if in_body != name => Err(KubeStatus::bad_request(format!(
            "the name of the object ({in_body}) does not match the name on the URL ({name})"
        ))),
        _ => Ok(()),
    }
}

/// Optimistic concurrency: a resourceVersion in the body must be the stored one.
fn check_resource_version(kind: &ResourceKind, name: &str, body: &Value, stored: &Value) -> Result<(), KubeStatus> {
    match metadata_str(body, "resourceVersion") {
        Some(rv) if Some(rv) != stored["metadata"]["resourceVersion"].as_str() => Err(KubeStatus::conflict(kind, name)),
        _ => Ok(()),
    }
}

async fn replace(
    State(kube): State<Kubernetes>,
    Path(params): PathParams,
    Query(query): QueryParams,
    body: Bytes,
) -> Result<Response, KubeStatus> {
    let target = target(&params)?;
    let (namespace, name) = (target.namespace.unwrap_or_default(), target.name.unwrap_or_default());
    let object = body_object(&body)?;
    check_body_name(&object, &name)?;
    let mut state = kube.inner.lock().unwrap();
    let stored = state
        .objects
        .get(&object_key(target.kind.resource, &namespace, &name))
        .ok_or_else(|| KubeStatus::not_found(target.kind, &name))?;
    check_resource_version(target.kind, &name, &object, stored)?;
    let updated = state.update(target.kind, &namespace, &name, object, is_dry_run(&query))?;
    Ok(Json(updated).into_response())
}

async fn patch(
    State(kube): State<Kubernetes>,
    Path(params): PathParams,
    Query(query): QueryParams,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, KubeStatus> {
    let target = target(&params)?;
    let kind = target.kind;
    let (namespace, name) = (target.namespace.unwrap_or_default(), target.name.unwrap_or_default());
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let dry_run = is_dry_run(&query);
    match content_type.as_str() {
        "application/apply-patch+yaml" | "application/apply-patch+json" => {
            apply(&kube, kind, &namespace, &name, &query, &body, dry_run)
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let patch = body_object(&body)?;
            check_body_name(&patch, &name)?;
            let mut state = kube.inner.lock().unwrap();
            let stored = state
                .objects
                .get(&object_key(kind.resource, &namespace, &name))
                .cloned()
                .ok_or_else(|| KubeStatus::not_found(kind, &name))?;
            check_resource_version(kind, &name, &patch, &stored)?;
            let mut merged = stored;
            merge_patch(&mut merged, &patch);
            let updated = state.update(kind, &namespace, &name, merged, dry_run)?;
            Ok(Json(updated).into_response())
        }
        other => Err(KubeStatus::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({other}) - accepted media \
                 types include: application/merge-patch+json, \
                 application/strategic-merge-patch+json, application/apply-patch+yaml"
            ),
            None,
        )),
    }
}

/// Server-side apply, simplified: creates the object if missing; otherwise labels and
/// annotations are merged and every other applied top-level field replaces the stored one.
fn apply(
    kube: &Kubernetes,
    kind: &'static ResourceKind,
    namespace: &str,
    name: &str,
    query: &HashMap<String, String>,
    body: &Bytes,
    dry_run: bool,
) -> Result<Response, KubeStatus> {
    if query.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return Err(KubeStatus::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required \
             for apply patch"
                .to_owned(),
            Some(json!({
                "group": "meta.k8s.io",
                "kind": "PatchOptions",
                "causes": [{
                    "reason": "FieldValueRequired",
                    "message": "Required value: is required for apply patch",
                    "field": "fieldManager",
                }],
            })),
        ));
    }
    // kube-rs and kubectl send JSON, which is valid YAML; real YAML is not supported here.
    let applied = body_object(body)?;
    let (api_version, applied_kind) = (
        applied["apiVersion"].as_str().unwrap_or(""),
        applied["kind"].as_str().unwrap_or(""),
    );
    if api_version != kind.api_version() || applied_kind != kind.kind {
        return Err(KubeStatus::bad_request(format!(
            "invalid object type: {api_version}, Kind={applied_kind}; expected {}, Kind={}",
            kind.api_version(),
            kind.kind
        )));
    }
    check_body_name(&applied, name)?;

    let mut state = kube.inner.lock().unwrap();
    let Some(stored) = state.objects.get(&object_key(kind.resource, namespace, name)).cloned() else {
        let owned = applied_fields(&applied);
        let mut object = applied;
        object["metadata"]["name"] = json!(name);
        let created = state.create(kind, namespace, object, dry_run)?;
        if !dry_run {
            let manager = query.get("fieldManager").cloned().unwrap_or_default();
            state
                .applied
                .entry(object_key(kind.resource, namespace, name))
                .or_default()
                .insert(manager, owned);
        }
        return Ok((StatusCode::CREATED, Json(created)).into_response());
    };
    check_resource_version(kind, name, &applied, &stored)?;

    let manager = query.get("fieldManager").cloned().unwrap_or_default();
    let key = object_key(kind.resource, namespace, name);
    let previous = state.applied.get(&key).and_then(|m| m.get(&manager)).cloned();
    let mut merged = stored;
    let owned = applied_fields(&applied);
    if let Some(previous) = &previous {
        give_up_fields(&mut merged, previous, &owned);
    }
    merge_applied(&mut merged, &owned);
    let updated = state.update(kind, namespace, name, merged, dry_run)?;
    if !dry_run {
        state.applied.entry(key).or_default().insert(manager, owned);
    }
    Ok(Json(updated).into_response())
}

/// The part of an applied configuration that server-side apply merges into the object: `spec`
/// and friends, and of `metadata` only labels and annotations.
fn applied_fields(applied: &Value) -> Value {
    let mut owned = Map::new();
    if let Value::Object(fields) = applied {
        for (field, value) in fields {
            match field.as_str() {
                "metadata" => {
                    let mut metadata = Map::new();
                    for map in ["labels", "annotations"] {
                        if let Some(entries) = value.get(map).filter(|v| v.is_object()) {
                            metadata.insert(map.to_owned(), entries.clone());
                        }
                    }
                    owned.insert("metadata".to_owned(), Value::Object(metadata));
                }
                "status" | "apiVersion" | "kind" => {}
                _ => {
                    owned.insert(field.clone(), value.clone());
                }
            }
        }
    }
    Value::Object(owned)
}

/// Server-side apply, as far as a client can tell: maps merge field by field and anything else
/// (lists included, which is right for the atomic lists and close enough for the keyed ones)
/// replaces. Fields applied by other managers, or set by a plain create or update, stay.
fn merge_applied(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) => {
            for (key, value) in applied {
                match target.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => merge_applied(existing, value),
                    _ => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

/// Removes what a manager applied before and no longer applies: it gives those fields up, and
/// with no other owner (this stand-in does not track others) they are deleted.
fn give_up_fields(target: &mut Value, previous: &Value, now: &Value) {
    let (Value::Object(target), Value::Object(previous)) = (target, previous) else {
        return;
    };
    for (key, before) in previous {
        match now.get(key) {
            None => {
                target.remove(key);
            }
            Some(after) if before.is_object() && after.is_object() => {
                if let Some(inner) = target.get_mut(key) {
                    give_up_fields(inner, before, after);
                }
            }
            Some(_) => {}
        }
    }
}

async fn remove(
    State(kube): State<Kubernetes>,
    Path(params): PathParams,
    Query(query): QueryParams,
    body: Bytes,
) -> Result<Response, KubeStatus> {
    let target = target(&params)?;
    let (namespace, name) = (target.namespace.unwrap_or_default(), target.name.unwrap_or_default());
    let key = object_key(target.kind.resource, &namespace, &name);
    // DeleteOptions may carry preconditions: the object must still be the one the client saw.
    let options = parse_body(&body).ok().flatten().unwrap_or(Value::Null);
    let mut state = kube.inner.lock().unwrap();
    let stored = state
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| KubeStatus::not_found(target.kind, &name))?;
    if let Some(uid) = options["preconditions"]["uid"].as_str() {
        let actual = stored["metadata"]["uid"].as_str().unwrap_or_default();
        if uid != actual {
            return Err(KubeStatus::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}",
                    target.kind.qualified_resource()
                ),
                Some(target.kind.details(&name, target.kind.resource)),
            ));
        }
    }
    if !is_dry_run(&query) {
        state.remove_object(&key);
    }
    Ok(Json(stored).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_parse_and_match() {
        let reqs = parse_label_selector("a=1,b!=2,c,!d,e in (x, y),f notin (z)").unwrap();
        assert_eq!(reqs.len(), 6);
        let labels = json!({"a": "1", "c": "", "e": "y", "f": "w"});
        let labels = labels.as_object().unwrap();
        assert!(reqs.iter().all(|r| r.matches(labels)));
        let other = json!({"a": "1", "b": "2", "c": "", "e": "y"});
        assert!(!reqs.iter().all(|r| r.matches(other.as_object().unwrap())));
    }

    #[test]
    fn names_are_validated_like_the_api_server() {
        let cronjobs = &RESOURCES[0];
        let services = &RESOURCES[2];
        assert!(validate_name(cronjobs, "ai-pipeline-acme-team").is_none());
        assert!(validate_name(cronjobs, &"a".repeat(52)).is_none());
        assert!(validate_name(cronjobs, &"a".repeat(53)).is_some());
        assert!(validate_name(cronjobs, "Upper").is_some());
        assert!(validate_name(cronjobs, "a.b").is_none());
        assert!(validate_name(services, "a.b").is_some());
        assert!(validate_name(services, "1abc").is_some());
    }

    #[test]
    fn label_values_are_validated() {
        let ok = json!({"metadata": {"labels": {"incidentfox.io/org-id": "acme_1.x"}}});
        assert!(validate_labels(&ok).is_none());
        let bad = json!({"metadata": {"labels": {"incidentfox.io/org-id": "a/b"}}});
        assert!(validate_labels(&bad).is_some());
        let long = json!({"metadata": {"labels": {"k": "a".repeat(64)}}});
        assert!(validate_labels(&long).is_some());
    }
}
