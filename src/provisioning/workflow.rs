//! What a run does, decided once when it is created: the workflow's steps that apply to this team
//! (the others are `skipped` from the start), and what the team's record says before and after.

use serde_json::Value;

use super::request::{DeprovisionRequest, ProvisionRequest, TeamSpec};
use super::store::{RunRow, TeamRow};
use crate::domain::{DeploymentMode, RunStatus, Step, StepStatus, TeamStatus, Workflow};

/// A run's input, typed by its workflow.
#[derive(Clone, Debug)]
pub enum RunInput {
    Provision {
        request: ProvisionRequest,
        /// The desired state the run converges the team to.
        spec: TeamSpec,
    },
    Deprovision(DeprovisionRequest),
}

impl RunInput {
    /// `None` for a run the existing service recorded (no request): it is never executed.
    pub fn of(run: &RunRow) -> Option<Result<RunInput, serde_json::Error>> {
        let request = run.request.clone()?;
        Some(match run.workflow {
            Workflow::Provision => serde_json::from_value::<ProvisionRequest>(request).map(|request| {
                let spec = match &run.desired {
                    Some(desired) => desired.0.clone(),
                    // Runs recorded before desired state existed converge to their request alone.
                    None => TeamSpec::resolve(None, &request),
                };
                RunInput::Provision { request, spec }
            }),
            Workflow::Deprovision => serde_json::from_value(request).map(RunInput::Deprovision),
        })
    }

    pub fn workflow(&self) -> Workflow {
        match self {
            RunInput::Provision { .. } => Workflow::Provision,
            RunInput::Deprovision(_) => Workflow::Deprovision,
        }
    }

    /// Whether a failed run undoes what it did (provisioning's `rollback_on_failure`).
    pub fn rolls_back_on_failure(&self) -> bool {
        matches!(self, RunInput::Provision { request, .. } if request.rollback_on_failure)
    }

    /// The Slack channels the request routes: the existing service's `slack_channel_map` count.
    pub fn slack_channels(&self) -> usize {
        match self {
            RunInput::Provision { request, .. } => request.routing.get("slack_channel_ids").map_or(0, Vec::len),
            RunInput::Deprovision(_) => 0,
        }
    }

    pub fn request_json(&self) -> Value {
        match self {
            RunInput::Provision { request, .. } => serde_json::to_value(request),
            RunInput::Deprovision(request) => serde_json::to_value(request),
        }
        .unwrap_or(Value::Null)
    }
}

/// Each step of the run's workflow, and whether it runs (`Pending`) or not (`Skipped`).
///
/// Provisioning converges: a CronJob or dedicated agent the team should no longer have is
/// removed by the same step that would create it. That step is skipped only when the team cannot
/// have one: never provisioned by either service, or last left active, by a run of this service,
/// without it. The first ingestion (bootstrap) runs once per team (again after deprovisioning),
/// not on every change.
pub fn plan(input: &RunInput, team: Option<&TeamRow>) -> Vec<(Step, StepStatus)> {
    let status = |runs: bool| if runs { StepStatus::Pending } else { StepStatus::Skipped };
    match input {
        RunInput::Provision { spec, .. } => {
            let may_have = |had: fn(&TeamSpec) -> bool| {
                team.is_some_and(|t| match (&t.desired, t.status) {
                    (Some(previous), TeamStatus::Active) if !previous.0.inferred => had(&previous.0),
                    // Mid-change, failed, inferred from the existing service's runs, or
                    // deprovisioned (perhaps keeping its objects): what exists is not known.
                    _ => true,
                })
            };
            let schedule = spec.pipeline_schedule_enabled || may_have(|p| p.pipeline_schedule_enabled);
            let dedicated = spec.deployment_mode == DeploymentMode::Dedicated
                || may_have(|p| p.deployment_mode == DeploymentMode::Dedicated);
            let bootstrapped =
                team.is_some_and(|t| t.status != TeamStatus::Deprovisioned && t.bootstrapped_at.is_some());
            Workflow::Provision
                .steps()
                .iter()
                .map(|step| {
                    let runs = match step {
                        Step::Bootstrap => !bootstrapped,
                        Step::PipelineCronjob => schedule,
                        Step::DedicatedDeployment => dedicated,
                        _ => true,
                    };
                    (*step, status(runs))
                })
                .collect()
        }
        RunInput::Deprovision(request) => Workflow::Deprovision
            .steps()
            .iter()
            .map(|step| {
                let runs = match step {
                    Step::DeleteCronjobs | Step::DeleteDedicatedAgent => request.delete_k8s_resources,
                    _ => true,
                };
                (*step, status(runs))
            })
            .collect(),
    }
}

/// The team's status while a run of this workflow goes.
pub fn team_status_while(workflow: Workflow) -> TeamStatus {
    match workflow {
        Workflow::Provision => TeamStatus::Provisioning,
        Workflow::Deprovision => TeamStatus::Deprovisioning,
    }
}

/// The team's status after a run of this workflow ended so.
pub fn team_status_after(workflow: Workflow, status: RunStatus) -> TeamStatus {
    match (workflow, status) {
        (Workflow::Provision, RunStatus::Succeeded) => TeamStatus::Active,
        (Workflow::Deprovision, RunStatus::Succeeded) => TeamStatus::Deprovisioned,
        _ => TeamStatus::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrgId, TeamNodeId};
    use serde_json::json;
    use sqlx::types::Json;

    fn provision(body: Value, previous: Option<&TeamSpec>) -> RunInput {
        let request = ProvisionRequest::parse(&body).unwrap();
        let spec = TeamSpec::resolve(previous, &request);
        RunInput::Provision { request, spec }
    }

    fn team(status: TeamStatus, desired: TeamSpec, bootstrapped: bool) -> TeamRow {
        TeamRow {
            org_id: OrgId::parse("acme").unwrap(),
            team_node_id: TeamNodeId::parse("sre").unwrap(),
            status,
            desired: Some(Json(desired)),
            last_run_id: None,
            bootstrapped_at: bootstrapped.then(chrono::Utc::now),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            deprovisioned_at: None,
            drift_policy: None,
            last_drift: None,
            last_drift_at: None,
        }
    }

    fn runs(plan: &[(Step, StepStatus)], step: Step) -> bool {
        plan.iter()
            .any(|(s, status)| *s == step && *status == StepStatus::Pending)
    }

    #[test]
    fn a_new_team_runs_only_what_it_asks_for() {
        let plan = plan(&provision(json!({"org_id": "acme", "team_node_id": "sre"}), None), None);
        assert!(runs(&plan, Step::ConfigPatch) && runs(&plan, Step::TeamToken) && runs(&plan, Step::Bootstrap));
        assert!(!runs(&plan, Step::PipelineCronjob) && !runs(&plan, Step::DedicatedDeployment));
    }

    #[test]
    fn a_change_removes_what_was_there_and_does_not_bootstrap_again() {
        let before = TeamSpec {
            pipeline_schedule_enabled: true,
            deployment_mode: DeploymentMode::Dedicated,
            ..TeamSpec::default()
        };
        let active = team(TeamStatus::Active, before.clone(), true);
        let body = json!({"org_id": "acme", "team_node_id": "sre", "create_pipeline_schedule": false, "deployment_mode": "shared"});
        let plan = plan(&provision(body, Some(&before)), Some(&active));
        assert!(runs(&plan, Step::PipelineCronjob) && runs(&plan, Step::DedicatedDeployment));
        assert!(!runs(&plan, Step::Bootstrap));
        // Known to have neither: nothing to remove.
        let shared = team(TeamStatus::Active, TeamSpec::default(), true);
        let plan = super::plan(
            &provision(json!({"org_id": "acme", "team_node_id": "sre"}), None),
            Some(&shared),
        );
        assert!(!runs(&plan, Step::PipelineCronjob) && !runs(&plan, Step::DedicatedDeployment));
        // A failed team may have anything.
        let failed = team(TeamStatus::Failed, TeamSpec::default(), true);
        let plan = super::plan(
            &provision(json!({"org_id": "acme", "team_node_id": "sre"}), None),
            Some(&failed),
        );
        assert!(runs(&plan, Step::PipelineCronjob) && runs(&plan, Step::DedicatedDeployment));
    }

    #[test]
    fn deprovisioning_keeps_the_objects_when_asked() {
        let request =
            DeprovisionRequest::parse(&json!({"org_id": "acme", "team_node_id": "sre", "delete_k8s_resources": false}))
                .unwrap();
        let plan = plan(&RunInput::Deprovision(request), None);
        assert!(runs(&plan, Step::ClearRouting) && runs(&plan, Step::RevokeTokens));
        assert!(!runs(&plan, Step::DeleteCronjobs) && !runs(&plan, Step::DeleteDedicatedAgent));
    }
}
