//! `orchestrator_teams`: one row per team, written in the transactions that start and end its runs.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

use serde_json::Value;

use crate::domain::{DriftPolicy, OrgId, TeamNodeId, TeamStatus};
use crate::provisioning::request::TeamSpec;

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TeamRow {
    pub org_id: OrgId,
    pub team_node_id: TeamNodeId,
    pub status: TeamStatus,
    /// What its last successful provisioning run applied; `None` until one did (and for a team
    /// the existing service provisioned, what its runs show, `inferred`).
    pub desired: Option<Json<TeamSpec>>,
    pub last_run_id: Option<Uuid>,
    pub bootstrapped_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deprovisioned_at: Option<DateTime<Utc>>,
    /// `None`: the service's default (`ORCHESTRATOR_DRIFT_POLICY`).
    pub drift_policy: Option<DriftPolicy>,
    /// What the reconciler found the last time the team's objects were not as they should be.
    pub last_drift: Option<Json<Value>>,
    pub last_drift_at: Option<DateTime<Utc>>,
}

impl TeamRow {
    /// What was asked of the team before, if anything still stands: a deprovisioned team starts
    /// again from nothing.
    pub fn standing_spec(&self) -> Option<&TeamSpec> {
        match self.status {
            TeamStatus::Deprovisioned => None,
            _ => self.desired.as_ref().map(|d| &d.0),
        }
    }
}

const TEAM_COLUMNS: &str =
    "org_id, team_node_id, status, desired, last_run_id, bootstrapped_at, created_at, updated_at, \
     deprovisioned_at, drift_policy, last_drift, last_drift_at";

pub async fn get_team(executor: impl PgExecutor<'_>, org: &str, team: &str) -> Result<Option<TeamRow>, sqlx::Error> {
    sqlx::query_as!(
        TeamRow,
        r#"SELECT org_id AS "org_id: OrgId", team_node_id AS "team_node_id: TeamNodeId", status AS "status: TeamStatus",
             desired AS "desired: Json<TeamSpec>", last_run_id, bootstrapped_at, created_at, updated_at, deprovisioned_at,
             drift_policy AS "drift_policy: DriftPolicy", last_drift AS "last_drift: Json<Value>", last_drift_at
         FROM orchestrator_teams WHERE org_id = $1 AND team_node_id = $2"#,
        org,
        team
    )
    .fetch_optional(executor)
    .await
}

/// The team, its row locked until the transaction ends. Whoever holds the team's lock reads it
/// so: the run that held the lock before releases it inside the statement that ends the run, and
/// this waits for that statement's commit rather than read the team as it was.
pub async fn get_team_for_update(
    conn: &mut PgConnection,
    org: &str,
    team: &str,
) -> Result<Option<TeamRow>, sqlx::Error> {
    sqlx::query_as!(
        TeamRow,
        r#"SELECT org_id AS "org_id: OrgId", team_node_id AS "team_node_id: TeamNodeId", status AS "status: TeamStatus",
             desired AS "desired: Json<TeamSpec>", last_run_id, bootstrapped_at, created_at, updated_at, deprovisioned_at,
             drift_policy AS "drift_policy: DriftPolicy", last_drift AS "last_drift: Json<Value>", last_drift_at
         FROM orchestrator_teams WHERE org_id = $1 AND team_node_id = $2
         FOR UPDATE"#,
        org,
        team
    )
    .fetch_optional(conn)
    .await
}

impl TeamRow {
    /// The run still going for the team, if one is: its status says a run is changing it, and
    /// that run is its latest.
    pub fn running_run(&self) -> Option<Uuid> {
        match self.status {
            TeamStatus::Provisioning | TeamStatus::Deprovisioning => self.last_run_id,
            _ => None,
        }
    }
}

/// Records that a run (a retried one) changes the team again.
pub async fn team_run_started(
    conn: &mut PgConnection,
    org: &str,
    team: &str,
    status: TeamStatus,
    run_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_teams SET status = $3, last_run_id = $4, updated_at = now()
         WHERE org_id = $1 AND team_node_id = $2",
        org,
        team,
        status.as_str(),
        run_id
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// How a run left the team.
pub struct TeamRunEnd {
    pub status: TeamStatus,
    /// The AI pipeline's first ingestion ran in this run.
    pub bootstrapped: bool,
}

pub struct TeamFilter {
    pub org_id: Option<String>,
    pub status: Option<TeamStatus>,
    /// Keyset: the last (org, team) of the previous page.
    pub after: Option<(String, String)>,
    pub limit: i64,
}

/// Teams in (org, team) order. Built at run time for its optional filters.
pub async fn list_teams(executor: impl PgExecutor<'_>, filter: &TeamFilter) -> Result<Vec<TeamRow>, sqlx::Error> {
    let mut sql = QueryBuilder::<Postgres>::new(format!("SELECT {TEAM_COLUMNS} FROM orchestrator_teams WHERE TRUE"));
    if let Some(org) = &filter.org_id {
        sql.push(" AND org_id = ").push_bind(org);
    }
    if let Some(status) = filter.status {
        sql.push(" AND status = ").push_bind(status);
    }
    if let Some((org, team)) = &filter.after {
        sql.push(" AND (org_id, team_node_id) > (")
            .push_bind(org)
            .push(", ")
            .push_bind(team)
            .push(")");
    }
    sql.push(" ORDER BY org_id, team_node_id LIMIT ")
        .push_bind(filter.limit);
    sql.build_query_as().fetch_all(executor).await
}

/// Every team, for a full resync (one row per team the service ever managed).
pub async fn all_teams(executor: impl PgExecutor<'_>) -> Result<Vec<TeamRow>, sqlx::Error> {
    sqlx::query_as!(
        TeamRow,
        r#"SELECT org_id AS "org_id: OrgId", team_node_id AS "team_node_id: TeamNodeId", status AS "status: TeamStatus",
             desired AS "desired: Json<TeamSpec>", last_run_id, bootstrapped_at, created_at, updated_at, deprovisioned_at,
             drift_policy AS "drift_policy: DriftPolicy", last_drift AS "last_drift: Json<Value>", last_drift_at
         FROM orchestrator_teams"#
    )
    .fetch_all(executor)
    .await
}

/// The drift the reconciler just found (and what it did about it).
pub async fn record_drift(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
    drift: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_teams SET last_drift = $3, last_drift_at = now() WHERE org_id = $1 AND team_node_id = $2",
        org,
        team,
        crate::db::storable_json(drift)
    )
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn set_drift_policy(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
    policy: DriftPolicy,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE orchestrator_teams SET drift_policy = $3, updated_at = now() WHERE org_id = $1 AND team_node_id = $2",
        org,
        team,
        policy.as_str()
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// The ingestion schedule as an operator left it (`PUT .../schedules`, `sync-cronjobs`), in the
/// team's desired state too: provisioning the team again keeps it.
pub async fn set_desired_pipeline_schedule(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
    schedule: Option<(&str, bool)>,
) -> Result<(), sqlx::Error> {
    let (enabled, cron, suspended) = match schedule {
        Some((cron, enabled)) => (true, Some(cron), !enabled),
        None => (false, None, false),
    };
    sqlx::query!(
        r#"UPDATE orchestrator_teams
         SET desired = coalesce(desired, '{}'::jsonb)
                 || jsonb_build_object('pipeline_schedule_enabled', $3::boolean, 'pipeline_schedule', $4::text,
                                       'pipeline_schedule_suspended', $5::boolean),
             updated_at = now()
         WHERE org_id = $1 AND team_node_id = $2"#,
        org,
        team,
        enabled,
        cron,
        suspended
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// The teams of these (org, team) pairs, in one statement (a batch of watch events).
pub async fn teams_by_keys(
    executor: impl PgExecutor<'_>,
    keys: &[(String, String)],
) -> Result<Vec<TeamRow>, sqlx::Error> {
    let orgs: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let teams: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    sqlx::query_as!(
        TeamRow,
        r#"SELECT t.org_id AS "org_id: OrgId", t.team_node_id AS "team_node_id: TeamNodeId", t.status AS "status: TeamStatus",
             t.desired AS "desired: Json<TeamSpec>", t.last_run_id, t.bootstrapped_at, t.created_at, t.updated_at,
             t.deprovisioned_at, t.drift_policy AS "drift_policy: DriftPolicy", t.last_drift AS "last_drift: Json<Value>",
             t.last_drift_at
         FROM orchestrator_teams t
         JOIN unnest($1::text[], $2::text[]) AS k(org_id, team_node_id)
           ON t.org_id = k.org_id AND t.team_node_id = k.team_node_id"#,
        &orgs as &[&str],
        &teams as &[&str]
    )
    .fetch_all(executor)
    .await
}
