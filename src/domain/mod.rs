//! The service's vocabulary: identifiers that are valid by construction (`parse`, don't
//! validate) and the statuses and steps of its work, each mapped to the database as text. Depends
//! on nothing else in the crate, so every layer can use it.

mod ids;
mod status;

pub use ids::{AgentName, InvalidValue, OrgId, TeamNodeId};
pub use status::{
    AgentRunStatus, DeploymentMode, DriftPolicy, EventStatus, RunStatus, ScheduleType, Step, StepStatus, TeamStatus,
    TextEnum, UnknownValue, Workflow,
};
