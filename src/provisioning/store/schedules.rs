//! `orchestrator_pipeline_schedules`: one row per team and schedule type, present exactly when its
//! CronJob should exist (suspended when the row is disabled).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::domain::ScheduleType;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ScheduleRow {
    #[serde(skip)]
    pub org_id: String,
    #[serde(skip)]
    pub team_node_id: String,
    pub schedule_type: ScheduleType,
    pub cron_expression: String,
    pub enabled: bool,
    /// The CronJob it owns.
    pub k8s_cronjob_name: Option<String>,
    /// The CronJob's last scheduled run, as Kubernetes reported it.
    pub last_run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn team_schedules(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as!(
        ScheduleRow,
        r#"SELECT org_id, team_node_id, schedule_type AS "schedule_type: ScheduleType", cron_expression, enabled,
             k8s_cronjob_name, last_run_at, created_at, updated_at
         FROM orchestrator_pipeline_schedules WHERE org_id = $1 AND team_node_id = $2 ORDER BY schedule_type"#,
        org,
        team
    )
    .fetch_all(executor)
    .await
}

/// Every schedule, for a full resync (a few thousand rows at most).
pub async fn all_schedules(executor: impl PgExecutor<'_>) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as!(
        ScheduleRow,
        r#"SELECT org_id, team_node_id, schedule_type AS "schedule_type: ScheduleType", cron_expression, enabled,
             k8s_cronjob_name, last_run_at, created_at, updated_at
         FROM orchestrator_pipeline_schedules"#
    )
    .fetch_all(executor)
    .await
}

/// Creates the team's schedule of that type, or changes it; with `replace` false an existing row
/// wins (a CronJob adopted from the cluster never overrides what was asked).
#[allow(clippy::too_many_arguments)]
pub async fn put_schedule(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
    schedule_type: ScheduleType,
    cron: &str,
    enabled: bool,
    cronjob_name: &str,
    replace: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO orchestrator_pipeline_schedules
             (org_id, team_node_id, schedule_type, cron_expression, enabled, k8s_cronjob_name)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (org_id, team_node_id, schedule_type) DO UPDATE
         SET cron_expression = EXCLUDED.cron_expression, enabled = EXCLUDED.enabled,
             k8s_cronjob_name = EXCLUDED.k8s_cronjob_name, updated_at = now()
         WHERE $7",
        org,
        team,
        schedule_type.as_str(),
        cron,
        enabled,
        cronjob_name,
        replace
    )
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn delete_schedule(
    executor: impl PgExecutor<'_>,
    org: &str,
    team: &str,
    schedule_type: ScheduleType,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM orchestrator_pipeline_schedules WHERE org_id = $1 AND team_node_id = $2 AND schedule_type = $3",
        org,
        team,
        schedule_type.as_str()
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// The last scheduled runs Kubernetes reports, where they are newer than what is recorded: one
/// statement for every CronJob that ran since the last resync.
pub async fn record_last_runs(
    executor: impl PgExecutor<'_>,
    runs: &[(String, String, ScheduleType, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    if runs.is_empty() {
        return Ok(());
    }
    let orgs: Vec<&str> = runs.iter().map(|r| r.0.as_str()).collect();
    let teams: Vec<&str> = runs.iter().map(|r| r.1.as_str()).collect();
    let types: Vec<&str> = runs.iter().map(|r| r.2.as_str()).collect();
    let times: Vec<DateTime<Utc>> = runs.iter().map(|r| r.3).collect();
    sqlx::query!(
        "UPDATE orchestrator_pipeline_schedules s SET last_run_at = r.at
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS r(org_id, team_node_id, schedule_type, at)
         WHERE s.org_id = r.org_id AND s.team_node_id = r.team_node_id AND s.schedule_type = r.schedule_type
           AND (s.last_run_at IS NULL OR s.last_run_at < r.at)",
        &orgs as &[&str],
        &teams as &[&str],
        &types as &[&str],
        &times
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// The schedules of these (org, team) pairs, in one statement.
pub async fn schedules_by_keys(
    executor: impl PgExecutor<'_>,
    keys: &[(String, String)],
) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    let orgs: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let teams: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    sqlx::query_as!(
        ScheduleRow,
        r#"SELECT s.org_id, s.team_node_id, s.schedule_type AS "schedule_type: ScheduleType", s.cron_expression, s.enabled,
             s.k8s_cronjob_name, s.last_run_at, s.created_at, s.updated_at
         FROM orchestrator_pipeline_schedules s
         JOIN unnest($1::text[], $2::text[]) AS k(org_id, team_node_id)
           ON s.org_id = k.org_id AND s.team_node_id = k.team_node_id"#,
        &orgs as &[&str],
        &teams as &[&str]
    )
    .fetch_all(executor)
    .await
}
