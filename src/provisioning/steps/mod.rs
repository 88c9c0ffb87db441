//! The steps of every workflow. Each knows how to apply itself (idempotently, from what earlier
//! attempts recorded), how to undo what it did (from the handles it recorded, never from
//! recomputed state) and how to read the live state of what it owns.

mod config;
mod dedicated;
mod schedule;
mod token;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use super::engine::Engine;
use super::objects::{self, TeamObjects};
use super::workflow::RunInput;
use crate::clients::kubernetes::{self as k8s, KubeClient};
use crate::clients::NeighbourError;
use crate::config::Secret;
use crate::domain::{OrgId, Step, TeamNodeId};

pub(crate) use schedule::observe_all as observe_cronjobs;
pub(crate) use token::revoke_unfinished as revoke_unfinished_token;

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

    /// The run is no longer this execution's: another replica took it over.
    pub(crate) fn run_lost() -> Self {
        Self::permanent("run_taken_over", "another replica took this run over")
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

/// A step's recorded result, and the team token it issued (sealed in the same statement).
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

/// A team, and the authority to act on it: what reading live state needs.
pub struct TeamScope<'a> {
    pub engine: &'a Engine,
    pub org: &'a OrgId,
    pub team: &'a TeamNodeId,
    pub credential: &'a Secret,
}

impl TeamScope<'_> {
    fn objects(&self) -> TeamObjects<'_> {
        TeamObjects {
            kubernetes: &self.engine.kubernetes,
            config_service_url: &self.engine.config_service_url,
            org: self.org,
            team: self.team,
        }
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a step records what it is about to do, before doing it.
pub trait IntentJournal: Sync {
    fn record_intent<'a>(&'a self, position: i16, intent: &'a Value) -> BoxFuture<'a, Result<(), StepError>>;
}

/// One attempt of one step of a run.
pub struct StepContext<'a> {
    pub scope: TeamScope<'a>,
    pub run_id: Uuid,
    pub position: i16,
    pub input: &'a RunInput,
    /// What earlier attempts of this step recorded.
    pub recorded: Option<&'a Value>,
    pub journal: &'a dyn IntentJournal,
}

impl Step {
    /// One attempt. Every step is idempotent: done twice, it leaves what it leaves once.
    pub async fn apply(self, cx: &StepContext<'_>) -> Result<StepDone, StepError> {
        match (self, cx.input) {
            (Step::ConfigPatch, RunInput::Provision { spec, .. }) => config::patch(cx, spec).await,
            (Step::TeamToken, _) => token::issue_once(cx).await,
            (Step::Bootstrap, _) => {
                let key = format!("{}:{self}", cx.run_id);
                let scope = &cx.scope;
                let answer = scope
                    .engine
                    .ai_pipeline
                    .bootstrap(scope.credential, scope.team, &key)
                    .await?;
                Ok(json!({"run": bounded(answer), "idempotency_key": key}).into())
            }
            (Step::PipelineCronjob, RunInput::Provision { spec, .. }) => schedule::converge(cx, spec).await,
            (Step::DedicatedDeployment, RunInput::Provision { spec, .. }) => dedicated::converge(cx, spec).await,
            (Step::ClearRouting, _) => config::clear_routing(&cx.scope).await,
            (Step::RevokeTokens, _) => token::revoke_all(&cx.scope).await,
            (Step::DeleteCronjobs, _) => schedule::delete_all(&cx.scope).await,
            (Step::DeleteDedicatedAgent, _) => dedicated::delete(&cx.scope).await,
            (step, input) => Err(StepError::permanent(
                "step_not_in_workflow",
                format!("{step} is not a step of {}", input.workflow()),
            )),
        }
    }

    /// Undoes what a completed step did, from what it recorded. Returns a note for the record.
    pub async fn undo(self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        match self {
            Step::DedicatedDeployment => dedicated::undo(cx).await,
            Step::PipelineCronjob => schedule::undo(cx).await,
            Step::TeamToken => token::undo(cx).await,
            // Neither can be undone safely: the bootstrap already ran, and the config patch
            // merged into config we did not snapshot. Both are idempotent on the next run.
            Step::ConfigPatch | Step::Bootstrap => Ok(json!({"note": "left in place: not reversible"})),
            Step::ClearRouting | Step::RevokeTokens | Step::DeleteCronjobs | Step::DeleteDedicatedAgent => {
                Ok(json!({"note": "left as it is: what was removed comes back by provisioning the team again"}))
            }
        }
    }

    /// The live state of what the step owns. For a deprovisioning step: what it would remove,
    /// in the shape of its result (the plan of a dry run).
    pub async fn observe(self, scope: &TeamScope<'_>) -> Result<Value, StepError> {
        match self {
            Step::ConfigPatch => config::observe_routing(scope).await,
            Step::TeamToken => token::observe(scope).await,
            Step::Bootstrap => Ok(Value::Null),
            Step::PipelineCronjob => schedule::observe_pipeline(scope).await,
            Step::DedicatedDeployment => dedicated::observe(scope).await,
            Step::ClearRouting => config::plan_clear_routing(scope).await,
            Step::RevokeTokens => token::plan_revoke_all(scope).await,
            Step::DeleteCronjobs => schedule::plan_delete_all(scope).await,
            Step::DeleteDedicatedAgent => dedicated::plan_delete(scope).await,
        }
    }
}

/// A kind of object a team owns (CronJob, Deployment, Service): namespaced, readable, appliable.
pub(crate) trait TeamObject:
    kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
{
}

impl<K> TeamObject for K where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
{
}

/// Whether `existing` is the team's object (never another team's that shares its name).
fn is_teams<K: TeamObject>(existing: &K, expected: &K) -> bool {
    objects::same_owner(existing.meta(), expected.meta())
        && serde_json::to_value(existing).is_ok_and(|value| objects::env_names_owner(&value, expected.meta()))
}

/// Applies a team's object unless an object of that name belongs to someone else: another team
/// whose name sanitises alike, or something this service did not create. Says whether the object
/// was created (it did not exist), which is what an undo may delete.
pub(crate) async fn apply_owned<K: TeamObject>(
    kube: &KubeClient,
    object: &K,
) -> Result<(k8s::AppliedObject, bool), StepError> {
    let name = object.meta().name.clone().unwrap_or_default();
    let existing = kube.get::<K>(&name).await?;
    if let Some(existing) = &existing {
        if !is_teams(existing, object) {
            return Err(StepError::permanent(
                "kubernetes_name_taken",
                format!("{} {name} already exists and belongs to another team", K::kind(&())),
            ));
        }
    }
    Ok((kube.apply(object).await?, existing.is_none()))
}

/// The team's object of `expected`'s name, if it exists and is the team's.
pub(crate) async fn owned<K: TeamObject>(kube: &KubeClient, expected: &K) -> Result<Option<K>, StepError> {
    let name = expected.meta().name.clone().unwrap_or_default();
    Ok(kube
        .get::<K>(&name)
        .await?
        .filter(|existing| is_teams(existing, expected)))
}

/// Deletes the team's object of `expected`'s name if it exists and is the team's, only as long
/// as it is still the object read (its uid). `None` when there was nothing of the team's to
/// delete; else `(name, uid)`.
pub(crate) async fn delete_owned<K: TeamObject>(
    kube: &KubeClient,
    expected: &K,
) -> Result<Option<(String, Option<String>)>, StepError> {
    let Some(existing) = owned(kube, expected).await? else {
        return Ok(None);
    };
    let name = existing.meta().name.clone().unwrap_or_default();
    let uid = existing.meta().uid.clone();
    kube.delete::<K>(&name, uid.as_deref()).await?;
    Ok(Some((name, uid)))
}

fn bounded(value: Value) -> Value {
    if value.to_string().len() <= RESULT_LIMIT {
        value
    } else {
        json!({"truncated": true})
    }
}

/// A value a step's result recorded, by JSON pointer.
fn recorded_str<'a>(recorded: Option<&'a Value>, pointer: &str) -> Option<&'a str> {
    recorded.and_then(|r| r.pointer(pointer)).and_then(Value::as_str)
}
