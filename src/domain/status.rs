//! Statuses and steps, each a closed set of text values in the database.

use std::fmt;
use std::str::FromStr;

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// A text value that is not one of the set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a {what}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

/// A closed set of text values.
pub trait TextEnum: FromStr + Copy {
    /// Every value, as the API's error messages list them.
    fn names() -> String;
}

/// An enum stored as one of its text values: serde, Postgres text (any text-like column, the
/// existing service's VARCHARs included), Display and FromStr all use the same names.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Every value, as the API's error messages list them.
            pub fn names() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }

        impl TextEnum for $name {
            fn names() -> String {
                $name::names()
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(value: &str) -> Result<Self, UnknownValue> {
                match value {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue { what: $what, value: other.to_string() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }
            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }
    };
}

text_enum!(
    /// Where a run is.
    RunStatus, "run status" {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// Failed, and what it had done was undone.
        RolledBack = "rolled_back",
        /// Stopped by an operator at a step boundary (and undone, if asked).
        Cancelled = "cancelled",
        /// Stopped at a step boundary past its deadline.
        TimedOut = "timed_out",
    }
);

impl RunStatus {
    pub fn is_final(self) -> bool {
        self != RunStatus::Running
    }

    /// A run that can be resumed from where it stopped by an operator's retry.
    pub fn is_retryable(self) -> bool {
        matches!(self, RunStatus::Failed | RunStatus::TimedOut)
    }
}

text_enum!(
    /// What a run does to its team: provisioning creates or changes it, deprovisioning removes
    /// everything the platform holds for it.
    Workflow, "workflow" {
        Provision = "provision",
        Deprovision = "deprovision",
    }
);

impl Workflow {
    /// Its steps, in the order they run (and the reverse of the order they are undone in).
    pub fn steps(self) -> &'static [Step] {
        match self {
            Workflow::Provision => &[
                Step::ConfigPatch,
                Step::TeamToken,
                Step::Bootstrap,
                Step::PipelineCronjob,
                Step::DedicatedDeployment,
            ],
            // Routing first: from then on webhooks for the team answer `unrouted`.
            Workflow::Deprovision => &[
                Step::ClearRouting,
                Step::RevokeTokens,
                Step::DeleteCronjobs,
                Step::DeleteDedicatedAgent,
            ],
        }
    }
}

text_enum!(
    /// Where a team stands in its lifecycle.
    TeamStatus, "team status" {
        /// A provisioning run is creating or changing it.
        Provisioning = "provisioning",
        /// Its last run succeeded: it is as asked.
        Active = "active",
        /// Its last run did not succeed: it may be partly as asked; retry or provision again.
        Failed = "failed",
        Deprovisioning = "deprovisioning",
        /// Nothing of it is left on the platform; its runs stay readable.
        Deprovisioned = "deprovisioned",
    }
);

text_enum!(
    /// A team's scheduled work, one CronJob each.
    ScheduleType, "schedule type" {
        /// The AI pipeline's scheduled ingestion (`ai-pipeline-<org>-<team>`).
        Ingestion = "ingestion",
        /// Dependency discovery (`dep-discovery-<org>-<team>`).
        DependencyDiscovery = "dependency_discovery",
    }
);

impl ScheduleType {
    /// Its cron expression when nobody set one (`contracts.md`).
    pub fn default_cron(self) -> &'static str {
        match self {
            ScheduleType::Ingestion => "0 2 * * *",
            ScheduleType::DependencyDiscovery => "0 */2 * * *",
        }
    }

    /// Its section of the team config (`ai_pipeline`, `dependency_discovery`), which
    /// `sync-cronjobs` reads, and the key it answers under.
    pub fn config_key(self) -> &'static str {
        match self {
            ScheduleType::Ingestion => "ai_pipeline",
            ScheduleType::DependencyDiscovery => "dependency_discovery",
        }
    }
}

text_enum!(
    /// What the reconciler does when a team's objects are not as they should be.
    DriftPolicy, "drift policy" {
        /// Put them back, and record the before and after.
        Repair = "repair",
        /// Only record what differs (visible in the team view and `.../drift`).
        Report = "report",
    }
);

text_enum!(
    /// Where one step of a run is.
    StepStatus, "step status" {
        Pending = "pending",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// Not part of this run (no schedule asked for, a shared team).
        Skipped = "skipped",
        RolledBack = "rolled_back",
    }
);

impl StepStatus {
    /// Nothing left to do for the step in this execution.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded | StepStatus::Skipped | StepStatus::RolledBack
        )
    }
}

text_enum!(
    /// A step of a workflow. Provisioning's are named as the existing service named them in its
    /// answers.
    Step, "step" {
        ConfigPatch = "config_patch",
        TeamToken = "team_token",
        Bootstrap = "bootstrap",
        PipelineCronjob = "pipeline_cronjob",
        DedicatedDeployment = "dedicated_deployment",
        ClearRouting = "clear_routing",
        RevokeTokens = "revoke_tokens",
        DeleteCronjobs = "delete_cronjobs",
        DeleteDedicatedAgent = "delete_dedicated_agent",
    }
);

text_enum!(
    /// An inbox event's stored status. "processing" is not one: it is a pending event whose lease
    /// is live, shown as such.
    EventStatus, "event status" {
        Pending = "pending",
        Delivered = "delivered",
        Skipped = "skipped",
        Unrouted = "unrouted",
        DeadLetter = "dead_letter",
    }
);

impl EventStatus {
    /// Done with: only an operator's replay puts it back in the queue.
    pub fn is_final(self) -> bool {
        self != EventStatus::Pending
    }
}

text_enum!(
    /// Where an admin-triggered agent run is, in the orchestrator's own record of it.
    AgentRunStatus, "agent run status" {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
    }
);

text_enum!(
    /// How a team's agent runs: on the shared agent service or a dedicated Deployment of its own.
    #[derive(Default)]
    DeploymentMode, "deployment mode" {
        #[default]
        Shared = "shared",
        Dedicated = "dedicated",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for step in Step::ALL {
            assert_eq!(step.as_str().parse::<Step>().unwrap(), *step);
            assert_eq!(serde_json::to_value(step).unwrap(), step.as_str());
        }
        assert_eq!("rolled_back".parse::<RunStatus>().unwrap(), RunStatus::RolledBack);
        assert!("processing".parse::<EventStatus>().is_err());
        assert_eq!(DeploymentMode::names(), "shared, dedicated");
        for workflow in Workflow::ALL {
            assert!(!workflow.steps().is_empty());
        }
    }
}
