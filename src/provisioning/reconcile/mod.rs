//! The reconciler: keeps every team's Kubernetes objects as they should be. Every replica runs
//! one, with no leader: it watches the objects with the managed-by label and lists them all every
//! `ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS`; a correction happens only under the team's advisory
//! lock (the one provisioning runs hold) and after reading the team and its objects again, so two
//! replicas never correct one drift twice and never fight a run. Every correction is an audit row
//! with the before and after.

pub mod drift;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::watcher::Event;
use kube::runtime::WatchStreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::drift::{Desired, Drift, DriftKind, Expectation, ObjectKind, Resource, TeamState};
use super::lock::TeamLock;
use super::objects::{self, TeamObjects};
use super::store::{self, ScheduleRow, TeamRow};
use crate::audit::{self, AuditEntry};
use crate::clients::kubernetes::KubeClient;
use crate::config::{KubernetesConfig, ReconcileConfig};
use crate::domain::{DriftPolicy, ScheduleType, TeamStatus};
use crate::metrics::Metrics;

/// Who the audit rows name.
const ACTOR: &str = "reconciler";

/// Watch events are handled in batches: a burst (a provisioning run applies two or three objects)
/// costs one database read, not one per event.
const EVENT_BATCH_WINDOW: Duration = Duration::from_millis(200);
const EVENT_QUEUE: usize = 4096;

/// After a failed resync, the next one comes this soon, doubling up to the interval.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// A watch event only a resync can attribute (an object without ownership annotations) brings
/// the next resync forward, but never closer than this to the last one: such an object's status
/// updates would otherwise cost a full resync each.
const MIN_RESYNC_GAP: Duration = Duration::from_secs(5);

/// The handles the reconciler uses, and nothing else.
#[derive(Clone)]
pub struct Reconciler(Arc<Parts>);

pub struct Parts {
    pub db: PgPool,
    pub lock_db: PgPool,
    pub kube: KubeClient,
    pub metrics: Arc<Metrics>,
    pub kubernetes: KubernetesConfig,
    pub config_service_url: String,
    pub settings: ReconcileConfig,
    /// Uids of unknown teams' objects already reported (there is no team row to record them in).
    pub reported: std::sync::Mutex<HashSet<String>>,
}

/// Why a pass did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes: {0}")]
    Kubernetes(#[from] kube::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl ReconcileError {
    fn stage(&self) -> &'static str {
        match self {
            ReconcileError::Kubernetes(_) => "list",
            ReconcileError::Database(_) => "database",
        }
    }
}

/// One changed object a watch saw: as it is now, or as it was when it was deleted.
struct WatchEvent {
    resource: Resource,
    name: String,
    object: Value,
    deleted: bool,
}

/// The owner an object names: exactly (its annotations) or as sanitised labels (an object the
/// existing service created).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owner {
    Exact(String, String),
    Labelled(String, String),
}

fn owner_of(object: &Value) -> Option<Owner> {
    let get = |pointer: &str, key: &str| {
        object
            .pointer(pointer)
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    match (
        get("/metadata/annotations", objects::ANNOTATION_ORG),
        get("/metadata/annotations", objects::ANNOTATION_TEAM),
    ) {
        (Some(org), Some(team)) => Some(Owner::Exact(org, team)),
        _ => match (
            get("/metadata/labels", objects::LABEL_ORG),
            get("/metadata/labels", objects::LABEL_TEAM),
        ) {
            (Some(org), Some(team)) => Some(Owner::Labelled(org, team)),
            _ => None,
        },
    }
}

/// What a pass found and did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PassReport {
    pub objects: usize,
    pub teams_judged: usize,
    pub drift_found: usize,
    pub repaired: usize,
}

/// A team's drift as the API answers it.
#[derive(Debug, serde::Serialize)]
pub struct TeamDrift {
    pub policy: DriftPolicy,
    pub in_sync: bool,
    pub drift: Vec<Drift>,
}

fn label_selector() -> String {
    format!("{}={}", objects::LABEL_MANAGED_BY, objects::MANAGED_BY)
}

fn to_values<K: serde::Serialize>(items: Vec<K>) -> Vec<Value> {
    items
        .into_iter()
        .filter_map(|item| serde_json::to_value(item).ok())
        .collect()
}

fn name_of(object: &Value) -> String {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl Reconciler {
    pub fn new(parts: Parts) -> Self {
        Self(Arc::new(parts))
    }

    fn builder<'a>(&'a self, org: &'a str, team: &'a str) -> TeamObjects<'a> {
        TeamObjects {
            kubernetes: &self.0.kubernetes,
            config_service_url: &self.0.config_service_url,
            org,
            team,
        }
    }

    fn policy(&self, team: Option<&TeamRow>) -> DriftPolicy {
        team.and_then(|t| t.drift_policy)
            .unwrap_or(self.0.settings.default_policy)
    }

    async fn list(&self, resource: Resource) -> Result<Vec<Value>, kube::Error> {
        let selector = label_selector();
        let kube = &self.0.kube;
        Ok(match resource {
            Resource::CronJob => to_values(kube.list::<CronJob>(&selector).await?),
            Resource::Deployment => to_values(kube.list::<Deployment>(&selector).await?),
            Resource::Service => to_values(kube.list::<Service>(&selector).await?),
        })
    }

    async fn get(&self, resource: Resource, name: &str) -> Result<Option<Value>, kube::Error> {
        let kube = &self.0.kube;
        Ok(match resource {
            Resource::CronJob => kube
                .get::<CronJob>(name)
                .await?
                .and_then(|o| serde_json::to_value(o).ok()),
            Resource::Deployment => kube
                .get::<Deployment>(name)
                .await?
                .and_then(|o| serde_json::to_value(o).ok()),
            Resource::Service => kube
                .get::<Service>(name)
                .await?
                .and_then(|o| serde_json::to_value(o).ok()),
        })
    }

    async fn delete(&self, resource: Resource, name: &str, uid: Option<&str>) -> Result<(), kube::Error> {
        let kube = &self.0.kube;
        match resource {
            Resource::CronJob => kube.delete::<CronJob>(name, uid).await,
            Resource::Deployment => kube.delete::<Deployment>(name, uid).await,
            Resource::Service => kube.delete::<Service>(name, uid).await,
        }
    }

    async fn apply(&self, desired: &Desired) -> Result<(), kube::Error> {
        let kube = &self.0.kube;
        match desired {
            Desired::CronJob(o) => kube.apply(o.as_ref()).await.map(drop),
            Desired::Deployment(o) => kube.apply(o.as_ref()).await.map(drop),
            Desired::Service(o) => kube.apply(o.as_ref()).await.map(drop),
        }
    }

    /// The team's drift, judged from `live` (the objects at the team's names, `None` where a kind
    /// was not observed) without changing anything. Also returns the CronJobs to adopt.
    fn judge_team(
        &self,
        state: &TeamState<'_>,
        live: &HashMap<ObjectKind, Option<Value>>,
    ) -> (Vec<Drift>, Vec<(ScheduleType, Value)>) {
        let builder = self.builder(state.org, state.team);
        let owner = drift::owner_meta(&builder);
        let mut found = Vec::new();
        let mut adopt = Vec::new();
        for kind in ObjectKind::ALL {
            let Some(observed) = live.get(&kind) else {
                continue;
            };
            // An object of another team that shares the name is that team's business; one the
            // team's deprovisioning chose to keep stays.
            if observed
                .as_ref()
                .is_some_and(|o| !drift::is_teams_object(o, &owner) || created_before(o, state.deprovisioned_at))
            {
                continue;
            }
            let name = kind.name(state.org, state.team);
            let expectation = state.expectation(&builder, kind);
            if let (Expectation::Adopt, Some(object), Some(schedule_type)) =
                (&expectation, observed, kind.schedule_type())
            {
                adopt.push((schedule_type, object.clone()));
            }
            let orphaned = state.status == TeamStatus::Deprovisioned;
            found.extend(drift::judge(kind, &name, expectation, observed.as_ref(), orphaned));
        }
        (found, adopt)
    }

    /// The plan for one team: what would change, read from live state, changing nothing.
    pub async fn plan(&self, team: &TeamRow) -> Result<TeamDrift, ReconcileError> {
        let schedules = store::team_schedules(&self.0.db, team.org_id.as_str(), team.team_node_id.as_str()).await?;
        let state = team_state(team, &schedules);
        let live = self.read_team(state.org, state.team).await?;
        let drift = if state.is_judged() {
            self.judge_team(&state, &live).0
        } else {
            Vec::new()
        };
        Ok(TeamDrift {
            policy: self.policy(Some(team)),
            in_sync: drift.is_empty(),
            drift,
        })
    }

    async fn read_team(&self, org: &str, team: &str) -> Result<HashMap<ObjectKind, Option<Value>>, kube::Error> {
        let mut live = HashMap::new();
        for kind in ObjectKind::ALL {
            live.insert(kind, self.get(kind.resource(), &kind.name(org, team)).await?);
        }
        Ok(live)
    }

    /// Corrects one team under its lock, from a fresh read of the team and its objects. Does
    /// nothing when the lock is busy: a run is changing the team, or another replica is
    /// correcting it (and the next pass looks again).
    pub async fn correct_team(&self, org: &str, team: &str) -> Result<PassReport, ReconcileError> {
        let mut report = PassReport::default();
        let Some(lock) = TeamLock::try_acquire(&self.0.lock_db, org, team).await? else {
            return Ok(report);
        };
        let result = self.correct_locked(org, team, &mut report).await;
        lock.release().await;
        result.map(|()| report)
    }

    async fn correct_locked(&self, org: &str, team: &str, report: &mut PassReport) -> Result<(), ReconcileError> {
        let db = &self.0.db;
        let Some(row) = store::get_team(db, org, team).await? else {
            return Ok(());
        };
        let schedules = store::team_schedules(db, org, team).await?;
        let state = team_state(&row, &schedules);
        if !state.is_judged() {
            return Ok(());
        }
        report.teams_judged += 1;
        let live = self.read_team(org, team).await?;
        let (found, adopt) = self.judge_team(&state, &live);
        for (schedule_type, object) in adopt {
            adopt_schedule(db, org, team, schedule_type, &object).await?;
        }
        if found.is_empty() {
            return Ok(());
        }
        let policy = self.policy(Some(&row));
        let mut recorded = Vec::new();
        if policy == DriftPolicy::Report {
            // The same drift is found on every pass: recorded (and counted) once.
            recorded.extend(found.iter().map(reported_entry));
            let summary = json!({"policy": policy, "drift": recorded});
            if row.last_drift.as_ref().is_none_or(|last| last.0 != summary) {
                for item in &found {
                    self.count_found(item, report);
                }
                store::record_drift(db, org, team, &summary).await?;
            }
            return Ok(());
        }
        for item in &found {
            let outcome = self.repair(item).await;
            recorded.push(self.account(Some((org, team)), item, outcome, report).await?);
        }
        store::record_drift(db, org, team, &json!({"policy": policy, "drift": recorded})).await?;
        Ok(())
    }

    fn count_found(&self, item: &Drift, report: &mut PassReport) {
        report.drift_found += 1;
        self.0
            .metrics
            .reconcile_drift_found_total
            .with_label_values(&[item.kind.as_str(), item.drift.as_str()])
            .inc();
    }

    async fn repair(&self, item: &Drift) -> Result<(), kube::Error> {
        match (&item.drift, &item.desired) {
            (DriftKind::Missing | DriftKind::Modified, Some(desired)) => self.apply(desired).await,
            _ => self.delete(item.kind.resource(), &item.name, item.uid.as_deref()).await,
        }
    }

    /// Metrics and the audit row of one repair (or failed repair); the entry the team view keeps.
    async fn account(
        &self,
        owner: Option<(&str, &str)>,
        item: &Drift,
        outcome: Result<(), kube::Error>,
        report: &mut PassReport,
    ) -> Result<Value, ReconcileError> {
        self.count_found(item, report);
        let metrics = &self.0.metrics;
        let mut entry = serde_json::to_value(item).unwrap_or(Value::Null);
        let (action, result) = match &outcome {
            Ok(()) => {
                metrics
                    .reconcile_drift_repaired_total
                    .with_label_values(&[item.kind.as_str(), item.drift.as_str()])
                    .inc();
                report.repaired += 1;
                entry["repaired"] = json!(true);
                ("team.drift_repaired", "repaired")
            }
            Err(e) => {
                metrics.reconcile_errors_total.with_label_values(&["repair"]).inc();
                tracing::warn!(kind = item.kind.as_str(), name = %item.name, error = %e, "repairing drift failed; the next pass tries again");
                entry["repaired"] = json!(false);
                entry["error"] = json!(crate::clients::truncate(&e.to_string(), 300));
                ("team.drift_repair_failed", "failed")
            }
        };
        tracing::info!(kind = item.kind.as_str(), drift = item.drift.as_str(), name = %item.name, outcome = result, "drift corrected");
        let mut audit_row = AuditEntry::new(ACTOR, action, result);
        audit_row.org_id = owner.map(|o| o.0);
        audit_row.team_node_id = owner.map(|o| o.1);
        audit_row.detail = entry.clone();
        audit::record(&self.0.db, audit_row).await?;
        Ok(entry)
    }

    /// An object no living team claims: one of a deprovisioned team (`team`, whose real ids lock
    /// it) or of a team this service does not know (`None`). Deleted under that team's lock if it
    /// is still the object that was found, or only reported.
    async fn correct_orphan(
        &self,
        resource: Resource,
        found: &Value,
        team: Option<&TeamRow>,
        report: &mut PassReport,
    ) -> Result<(), ReconcileError> {
        let Some(owner) = owner_of(found) else {
            return Ok(());
        };
        if team.is_some_and(|t| created_before(found, t.deprovisioned_at)) {
            // Its deprovisioning was asked to keep it (`delete_k8s_resources: false`).
            return Ok(());
        }
        let (org, team_id) = match (team, &owner) {
            (Some(t), _) => (t.org_id.as_str(), t.team_node_id.as_str()),
            (None, Owner::Exact(org, team) | Owner::Labelled(org, team)) => (org.as_str(), team.as_str()),
        };
        let name = name_of(found);
        let uid = found.pointer("/metadata/uid").and_then(Value::as_str);
        let kind = ObjectKind::ALL
            .into_iter()
            .find(|k| k.resource() == resource && k.name(org, team_id) == name)
            .unwrap_or(match resource {
                Resource::CronJob => ObjectKind::PipelineCronjob,
                Resource::Deployment => ObjectKind::Deployment,
                Resource::Service => ObjectKind::Service,
            });
        let item = drift::judge(kind, &name, Expectation::Absent, Some(found), true)
            .expect("an object that should not exist is drift");
        // An object the existing service created (no ownership annotations) for a team this
        // service never knew may be a team it provisioned some other way (its sync-cronjobs):
        // reported, never deleted. What this service created for a team it no longer knows is
        // an orphan like any other.
        let policy = match (team, &owner) {
            (None, Owner::Labelled(..)) => DriftPolicy::Report,
            _ => self.policy(team),
        };
        if policy == DriftPolicy::Report {
            // Reported once, before any lock or call: a reported object costs nothing later.
            match team {
                Some(team) => {
                    let summary = json!({"policy": policy, "drift": [reported_entry(&item)]});
                    if team.last_drift.as_ref().is_none_or(|last| last.0 != summary) {
                        self.count_found(&item, report);
                        store::record_drift(&self.0.db, org, team_id, &summary).await?;
                    }
                }
                None => {
                    if self.first_report(uid) {
                        self.count_found(&item, report);
                        tracing::warn!(resource = resource.plural(), %name, "an object of an unknown team: reported, not deleted");
                    }
                }
            }
            return Ok(());
        }
        let Some(lock) = TeamLock::try_acquire(&self.0.lock_db, org, team_id).await? else {
            return Ok(());
        };
        let result = async {
            // Provisioned again since it was listed: no longer an orphan.
            let now = store::get_team(&self.0.db, org, team_id).await?;
            if now.as_ref().is_some_and(|t| t.status != TeamStatus::Deprovisioned) {
                return Ok(());
            }
            let Some(live) = self.get(resource, &name).await? else {
                return Ok(());
            };
            if live.pointer("/metadata/uid").and_then(Value::as_str) != uid {
                return Ok(());
            }
            let outcome = self.delete(resource, &name, uid).await;
            let entry = self.account(Some((org, team_id)), &item, outcome, report).await?;
            if team.is_some() {
                store::record_drift(&self.0.db, org, team_id, &json!({"policy": policy, "drift": [entry]})).await?;
            }
            Ok::<(), ReconcileError>(())
        }
        .await;
        lock.release().await;
        result
    }

    /// Whether an unknown team's object is reported for the first time. The set is bounded: past
    /// its size it starts again (an object is then reported once more).
    fn first_report(&self, uid: Option<&str>) -> bool {
        const REPORTED_LIMIT: usize = 10_000;
        let Some(uid) = uid else {
            return false;
        };
        let mut reported = self.0.reported.lock().unwrap_or_else(|p| p.into_inner());
        if reported.len() >= REPORTED_LIMIT {
            reported.clear();
        }
        reported.insert(uid.to_string())
    }

    /// A full resync: one list per resource, the teams and schedules in two reads, and a
    /// correction (with its own reads) only for a team whose objects drifted.
    pub async fn resync(&self) -> Result<PassReport, ReconcileError> {
        let started = Instant::now();
        let mut listed: BTreeMap<Resource, HashMap<String, Value>> = BTreeMap::new();
        for resource in Resource::ALL {
            let objects = self.list(resource).await?;
            self.0
                .metrics
                .reconcile_objects_watched
                .with_label_values(&[resource.plural()])
                .set(objects.len() as i64);
            listed.insert(resource, objects.into_iter().map(|o| (name_of(&o), o)).collect());
        }
        let mut report = PassReport {
            objects: listed.values().map(HashMap::len).sum(),
            ..PassReport::default()
        };
        let teams = store::all_teams(&self.0.db).await?;
        let schedules = store::all_schedules(&self.0.db).await?;
        let mut by_team: HashMap<(&str, &str), Vec<&ScheduleRow>> = HashMap::new();
        for row in &schedules {
            by_team
                .entry((row.org_id.as_str(), row.team_node_id.as_str()))
                .or_default()
                .push(row);
        }

        let mut last_runs = Vec::new();
        let mut drifted = Vec::new();
        for team in &teams {
            let mut state = team_state(team, &[]);
            state.schedules = by_team
                .remove(&(team.org_id.as_str(), team.team_node_id.as_str()))
                .unwrap_or_default();
            let builder = self.builder(state.org, state.team);
            let owner = drift::owner_meta(&builder);
            // Claim the team's objects, so that what is left over belongs to nobody known.
            let mut live = HashMap::new();
            for kind in ObjectKind::ALL {
                let objects = listed.entry(kind.resource()).or_default();
                let name = kind.name(state.org, state.team);
                let object = match objects.get(&name) {
                    Some(object) if drift::is_teams_object(object, &owner) => objects.remove(&name),
                    _ => None,
                };
                if let (Some(object), Some(schedule_type)) = (&object, kind.schedule_type()) {
                    if let Some(at) = last_schedule_time(object) {
                        last_runs.push((state.org.to_string(), state.team.to_string(), schedule_type, at));
                    }
                }
                live.insert(kind, object);
            }
            if !state.is_judged() {
                continue;
            }
            report.teams_judged += 1;
            // Drift is corrected, and CronJobs adopted, only under the team's lock from a fresh read.
            let (found, adopt) = self.judge_team(&state, &live);
            if !found.is_empty() || !adopt.is_empty() {
                drifted.push((state.org.to_string(), state.team.to_string()));
            }
        }
        store::record_last_runs(&self.0.db, &last_runs).await?;

        // One team's failure does not hold up the others; a run of them (the database or the API
        // server gone) ends the pass, which is retried with backoff.
        let mut failures = Failures::default();
        for (org, team) in drifted {
            match self.correct_team(&org, &team).await {
                Ok(corrected) => {
                    report.drift_found += corrected.drift_found;
                    report.repaired += corrected.repaired;
                }
                Err(e) => failures.record(&self.0.metrics, e)?,
            }
        }

        // What no team claimed: objects of deprovisioned or unknown teams.
        let mut by_label: HashMap<(String, String), &TeamRow> = HashMap::new();
        let mut by_id: HashMap<(&str, &str), &TeamRow> = HashMap::new();
        for team in &teams {
            by_id.insert((team.org_id.as_str(), team.team_node_id.as_str()), team);
            by_label.insert(
                (
                    objects::label_value(team.org_id.as_str()),
                    objects::label_value(team.team_node_id.as_str()),
                ),
                team,
            );
        }
        for (resource, objects) in &listed {
            for object in objects.values() {
                let team = match owner_of(object) {
                    Some(Owner::Exact(org, team)) => by_id.get(&(org.as_str(), team.as_str())).copied(),
                    // Labels are sanitised (`sre_eu` and `sre.eu` share them): the team is the
                    // labels' only if its pods' ids say so too.
                    Some(Owner::Labelled(org, team)) => by_label.get(&(org, team)).copied().filter(|t| {
                        let builder = self.builder(t.org_id.as_str(), t.team_node_id.as_str());
                        drift::is_teams_object(object, &drift::owner_meta(&builder))
                    }),
                    None => continue,
                };
                // An object of a known, living team at a name that is not its own is left alone.
                if team.is_some_and(|t| t.status != TeamStatus::Deprovisioned) {
                    continue;
                }
                if let Err(e) = self.correct_orphan(*resource, object, team, &mut report).await {
                    failures.record(&self.0.metrics, e)?;
                }
            }
        }
        self.0
            .metrics
            .reconcile_duration_seconds
            .with_label_values(&["resync"])
            .observe(started.elapsed().as_secs_f64());
        Ok(report)
    }

    /// The objects of a batch of watch events, judged against their teams (one read for all of
    /// them); a team whose object drifted is corrected. Returns whether a full resync is needed
    /// (an object without ownership annotations, which only a resync can attribute).
    async fn check_events(&self, events: Vec<WatchEvent>) -> Result<bool, ReconcileError> {
        let started = Instant::now();
        let mut latest: HashMap<(Resource, String), (Value, bool)> = HashMap::new();
        for event in events {
            latest.insert((event.resource, event.name), (event.object, event.deleted));
        }
        let mut needs_resync = false;
        let mut keys: HashSet<(String, String)> = HashSet::new();
        for (object, _) in latest.values() {
            match owner_of(object) {
                Some(Owner::Exact(org, team)) => {
                    keys.insert((org, team));
                }
                Some(Owner::Labelled(..)) => needs_resync = true,
                None => {}
            }
        }
        let keys: Vec<(String, String)> = keys.into_iter().collect();
        let teams = store::teams_by_keys(&self.0.db, &keys).await?;
        let schedules = store::schedules_by_keys(&self.0.db, &keys).await?;
        let mut report = PassReport::default();
        let mut to_correct = HashSet::new();
        for ((resource, name), (object, deleted)) in &latest {
            let Some(Owner::Exact(org, team_id)) = owner_of(object) else {
                continue;
            };
            let live = (!deleted).then(|| object.clone());
            let team = teams
                .iter()
                .find(|t| t.org_id.as_str() == org && t.team_node_id.as_str() == team_id);
            let Some(team) = team else {
                if !deleted {
                    self.correct_orphan(*resource, object, None, &mut report).await?;
                }
                continue;
            };
            let rows: Vec<ScheduleRow> = schedules
                .iter()
                .filter(|s| s.org_id == org && s.team_node_id == team_id)
                .cloned()
                .collect();
            let state = team_state(team, &rows);
            if !state.is_judged() {
                continue;
            }
            let Some(kind) = ObjectKind::ALL
                .into_iter()
                .find(|k| k.resource() == *resource && k.name(&org, &team_id) == *name)
            else {
                if team.status == TeamStatus::Deprovisioned && !deleted {
                    self.correct_orphan(*resource, object, Some(team), &mut report).await?;
                }
                continue;
            };
            let (found, adopt) = self.judge_team(&state, &HashMap::from([(kind, live)]));
            if !found.is_empty() || !adopt.is_empty() {
                to_correct.insert((org, team_id));
            }
        }
        for (org, team) in to_correct {
            self.correct_team(&org, &team).await?;
        }
        self.0
            .metrics
            .reconcile_duration_seconds
            .with_label_values(&["watch"])
            .observe(started.elapsed().as_secs_f64());
        Ok(needs_resync)
    }
}

fn team_state<'a>(team: &'a TeamRow, schedules: &'a [ScheduleRow]) -> TeamState<'a> {
    TeamState {
        org: team.org_id.as_str(),
        team: team.team_node_id.as_str(),
        status: team.status,
        spec: team.desired.as_ref().map(|d| &d.0),
        schedules: schedules.iter().collect(),
        deprovisioned_at: team.deprovisioned_at,
    }
}

/// Whether the object existed before `at` (a team's deprovisioning): what a deprovisioning with
/// `delete_k8s_resources: false` kept. Kubernetes keeps whole seconds: an object created in the
/// second of the deprovisioning counts as created after it.
fn created_before(object: &Value, at: Option<chrono::DateTime<chrono::Utc>>) -> bool {
    let created = object
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    matches!((created, at), (Some(created), Some(at)) if created + chrono::Duration::seconds(1) <= at)
}

/// A drift as report mode records it.
fn reported_entry(item: &Drift) -> Value {
    let mut entry = serde_json::to_value(item).unwrap_or(Value::Null);
    entry["repaired"] = json!(false);
    entry
}

/// Failures of single teams within a pass: counted and logged; the third ends the pass.
#[derive(Default)]
struct Failures(u32);

impl Failures {
    fn record(&mut self, metrics: &Metrics, e: ReconcileError) -> Result<(), ReconcileError> {
        metrics.reconcile_errors_total.with_label_values(&[e.stage()]).inc();
        self.0 += 1;
        if self.0 >= 3 {
            return Err(e);
        }
        tracing::warn!(error = %e, "correcting one team failed; going on with the others");
        Ok(())
    }
}

fn last_schedule_time(object: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    object
        .pointer("/status/lastScheduleTime")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Records a CronJob of an active team that no schedule row describes, as it is.
async fn adopt_schedule(
    db: &PgPool,
    org: &str,
    team: &str,
    schedule_type: ScheduleType,
    object: &Value,
) -> Result<(), sqlx::Error> {
    let cron = object
        .pointer("/spec/schedule")
        .and_then(Value::as_str)
        .unwrap_or(schedule_type.default_cron());
    let suspended = object
        .pointer("/spec/suspend")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    store::put_schedule(db, org, team, schedule_type, cron, !suspended, &name_of(object), false).await?;
    if schedule_type == ScheduleType::Ingestion {
        // Part of the team's desired state from now on: provisioning it again keeps it.
        store::set_desired_pipeline_schedule(db, org, team, Some((cron, !suspended))).await?;
    }
    Ok(())
}

/// Runs until `stop`: the watches feed batches of events, and a full resync runs every interval
/// (sooner after a failure, backing off from 1 s). Never ends on its own.
pub async fn run(reconciler: Reconciler, stop: CancellationToken) {
    let settings = reconciler.0.settings.clone();
    if !settings.enabled {
        stop.cancelled().await;
        return;
    }
    let (events, mut received) = mpsc::channel::<WatchEvent>(EVENT_QUEUE);
    let watches = tokio_util::task::TaskTracker::new();
    for resource in Resource::ALL {
        watches.spawn(watch(reconciler.clone(), resource, events.clone(), stop.clone()));
    }
    drop(events);

    let mut next_resync = tokio::time::Instant::now();
    let mut last_resync = next_resync;
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next_resync) => {
                last_resync = tokio::time::Instant::now();
                match reconciler.resync().await {
                    Ok(report) => {
                        if report.drift_found > 0 {
                            tracing::info!(?report, "resync found drift");
                        }
                        backoff = FIRST_BACKOFF;
                        next_resync = tokio::time::Instant::now() + settings.interval;
                    }
                    Err(e) => {
                        reconciler.0.metrics.reconcile_errors_total.with_label_values(&[e.stage()]).inc();
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "resync failed");
                        next_resync = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(settings.interval);
                    }
                }
            }
            Some(first) = received.recv() => {
                let mut batch = vec![first];
                let window = tokio::time::sleep(EVENT_BATCH_WINDOW);
                tokio::pin!(window);
                loop {
                    tokio::select! {
                        () = &mut window => break,
                        more = received.recv() => match more {
                            Some(event) => batch.push(event),
                            None => break,
                        },
                    }
                }
                match reconciler.check_events(batch).await {
                    Ok(true) => next_resync = next_resync.min(last_resync + MIN_RESYNC_GAP),
                    Ok(false) => {}
                    Err(e) => {
                        // The resync finds what this batch would have.
                        reconciler.0.metrics.reconcile_errors_total.with_label_values(&[e.stage()]).inc();
                        tracing::warn!(error = %e, "checking watch events failed");
                    }
                }
            }
        }
    }
    watches.close();
    watches.wait().await;
}

/// One resource's watch, feeding `events` until `stop`. kube's watcher lists, then watches, and
/// backs off after errors (a refused watch included); the resync covers whatever it misses.
async fn watch(reconciler: Reconciler, resource: Resource, events: mpsc::Sender<WatchEvent>, stop: CancellationToken) {
    let selector = label_selector();
    let kube = reconciler.0.kube.clone();
    let stream = match resource {
        Resource::CronJob => kube.watch::<CronJob>(&selector).default_backoff().map(values).boxed(),
        Resource::Deployment => kube
            .watch::<Deployment>(&selector)
            .default_backoff()
            .map(values)
            .boxed(),
        Resource::Service => kube.watch::<Service>(&selector).default_backoff().map(values).boxed(),
    };
    tokio::pin!(stream);
    let mut errors_logged = 0u32;
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = stream.next() => next,
        };
        match next {
            None => return,
            Some(Ok(None)) => {}
            Some(Ok(Some((name, object, deleted)))) => {
                errors_logged = 0;
                let event = WatchEvent {
                    resource,
                    name,
                    object,
                    deleted,
                };
                // A full queue only delays detection until the next resync.
                let _ = events.try_send(event);
            }
            Some(Err(e)) => {
                reconciler
                    .0
                    .metrics
                    .reconcile_errors_total
                    .with_label_values(&["watch"])
                    .inc();
                if errors_logged < 3 {
                    tracing::warn!(resource = resource.plural(), error = %e, "watch failed; retrying with backoff (the resync still runs)");
                }
                errors_logged = errors_logged.saturating_add(1);
            }
        }
    }
}

/// A watch event as (name, the object, deleted); the initial list's events are skipped (the
/// resync judges those objects).
type Change = (String, Value, bool);

fn values<K: serde::Serialize + kube::Resource>(
    event: Result<Event<K>, kube::runtime::watcher::Error>,
) -> Result<Option<Change>, kube::runtime::watcher::Error> {
    let (object, deleted) = match event? {
        Event::Apply(object) => (object, false),
        Event::Delete(object) => (object, true),
        Event::Init | Event::InitApply(_) | Event::InitDone => return Ok(None),
    };
    let name = object.meta().name.clone().unwrap_or_default();
    Ok(serde_json::to_value(&object).ok().map(|value| (name, value, deleted)))
}
