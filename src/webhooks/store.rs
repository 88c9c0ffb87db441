//! The SQL of the webhook inbox (`orchestrator_webhook_events`) and its dedupe keys
//! (`orchestrator_webhook_deliveries`), checked at compile time; the operator views' filters are
//! built at run time.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder};

use crate::db::{storable_json, storable_text};
use crate::domain::EventStatus;
use uuid::Uuid;

/// The statuses operators see: the stored ones, and `processing` for a pending event whose lease
/// is live. The two open ones come first.
pub fn shown_statuses() -> Vec<&'static str> {
    let mut shown = vec!["pending", "processing"];
    shown.extend(EventStatus::ALL.iter().filter(|s| s.is_final()).map(|s| s.as_str()));
    shown
}

/// Channel the ingress notifies so idle dispatchers wake at once.
pub const NOTIFY_CHANNEL: &str = "orchestrator_webhook_inbox";

/// An event to store, owned so it can travel to the batch writer.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub id: Uuid,
    pub source: String,
    pub kind: String,
    pub delivery_id: String,
    pub headers: Value,
    pub body: Vec<u8>,
    pub ordering_key: Option<String>,
    /// Its place in the claim order ([`super::fairness`]).
    pub fair_tag: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    New(Uuid),
    /// Stored with the lease it was offered: the caller dispatches it.
    Leased {
        id: Uuid,
        lease: Uuid,
        received_at: DateTime<Utc>,
    },
    /// The delivery id was seen before; the event it created.
    Duplicate(Uuid),
}

/// Stores a batch of events and their delivery ids in one statement (one transaction,
/// `sql/insert_events.sql`). A delivery id seen before stores nothing. Results are in the order of
/// `events`. Other replicas are told separately ([`notify`]): a NOTIFY in this transaction would
/// make every batch commit under one database-wide lock, held until its WAL is flushed.
///
/// An event offered a lease (`leases`, in the order of `events`; `lease_seconds` long) is stored
/// with it unless its conversation has an unfinished event: the claim's in-order rule, checked
/// against what is committed when the statement starts. Two deliveries of one conversation stored
/// at the same moment by two replicas can both be leased, exactly as a claim between their two
/// commits would take both.
pub async fn insert_events(
    connection: &mut PgConnection,
    events: &[NewEvent],
    leases: &[Option<Uuid>],
    lease_seconds: f64,
) -> Result<Vec<Inserted>, sqlx::Error> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let sources: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let delivery_ids: Vec<&str> = events.iter().map(|e| e.delivery_id.as_str()).collect();
    let headers: Vec<String> = events.iter().map(|e| e.headers.to_string()).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
    let ordering: Vec<Option<&str>> = events.iter().map(|e| e.ordering_key.as_deref()).collect();
    let tags: Vec<i64> = events.iter().map(|e| e.fair_tag).collect();
    debug_assert_eq!(leases.len(), events.len(), "one lease offer (or none) per event");
    let inserted = sqlx::query_file!(
        "src/webhooks/sql/insert_events.sql",
        &ids,
        &sources as &[&str],
        &kinds as &[&str],
        &delivery_ids as &[&str],
        &headers,
        &bodies as &[&[u8]],
        &ordering as &[Option<&str>],
        &tags,
        leases as &[Option<Uuid>],
        lease_seconds,
    )
    .fetch_all(&mut *connection)
    .await?;
    // RETURNING's order is not promised: each event finds its row by id.
    let stored: std::collections::HashMap<Uuid, Inserted> = inserted
        .into_iter()
        .map(|row| {
            let result = match row.lease_owner {
                Some(lease) => Inserted::Leased {
                    id: row.id,
                    lease,
                    received_at: row.received_at,
                },
                None => Inserted::New(row.id),
            };
            (row.id, result)
        })
        .collect();
    if stored.len() == events.len() {
        return Ok(ids.iter().map(|id| stored[id]).collect());
    }
    // Some were duplicates: find the events their delivery ids already name.
    let existing = sqlx::query!(
        "SELECT d.source, d.delivery_id, d.event_id FROM orchestrator_webhook_deliveries d
         JOIN UNNEST($1::text[], $2::text[]) AS t(source, delivery_id) USING (source, delivery_id)",
        &sources as &[&str],
        &delivery_ids as &[&str],
    )
    .fetch_all(&mut *connection)
    .await?;
    Ok(events
        .iter()
        .map(|event| {
            if let Some(result) = stored.get(&event.id) {
                return *result;
            }
            let original = existing
                .iter()
                .find(|row| row.source == event.source && row.delivery_id == event.delivery_id)
                .map_or(event.id, |row| row.event_id);
            Inserted::Duplicate(original)
        })
        .collect())
}

/// The statement of [`insert_events`]; public for the test that pins its plan.
pub const INSERT_EVENTS_SQL: &str = include_str!("sql/insert_events.sql");

#[derive(Clone, Debug)]
pub struct ClaimedEvent {
    pub id: Uuid,
    /// This claim's own lease token: renewals and the outcome are accepted only with it, so a
    /// worker whose lease expired (and the event was claimed again, even by the same replica)
    /// can never write over the new claim.
    pub lease: Uuid,
    pub source: String,
    pub kind: String,
    pub delivery_id: String,
    pub headers: Value,
    pub body: Option<Vec<u8>>,
    pub received_at: DateTime<Utc>,
    pub attempts: i32,
    pub ordering_key: Option<String>,
    pub fair_tag: i64,
}

/// What operators see as an event's status. A claim only takes a lease and leaves `status` alone,
/// so the claim is a HOT update (no column any index depends on changes) and an event being
/// dispatched is one whose lease is live.
const STATUS_EXPR: &str = "CASE WHEN status = 'pending' AND lease_until > now() THEN 'processing' ELSE status END";

/// The claim, `$1` the limit, `$2` the lease in seconds, `$3` and `$4` the lowest and highest tags
/// ([`claim`]); public for the test that pins its plan.
pub const CLAIM_SQL: &str = include_str!("sql/claim.sql");

/// Claims up to `limit` due events tagged within `tags` (`i64::MIN..=i64::MAX`: any), each with a
/// fresh lease token. Run on [`crate::db::queue_pool`], where walking the fair index in order is
/// the only plan it can get.
pub async fn claim(
    executor: impl PgExecutor<'_>,
    limit: i64,
    lease_secs: f64,
    tags: std::ops::RangeInclusive<i64>,
) -> Result<Vec<ClaimedEvent>, sqlx::Error> {
    sqlx::query_file_as!(
        ClaimedEvent,
        "src/webhooks/sql/claim.sql",
        limit,
        lease_secs,
        tags.start(),
        tags.end()
    )
    .fetch_all(executor)
    .await
}

pub const RENEW_LEASES_SQL: &str = include_str!("sql/renew_leases.sql");

/// Renews every lease this replica holds, in one statement, and answers the events whose lease
/// another replica has taken over. An event whose outcome has just been written is not among them:
/// its lease is merely about to be let go (before, every renewal under load reported dozens of
/// such events as lost, and warned).
///
/// It never waits for a row lock: a row another transaction has locked is passed over. The only
/// writer of a row under a live lease is that lease's own outcome (a claim takes expired leases
/// only), so a locked row is an event being finished, which needs no renewal. Waiting made a
/// renewal (events in arbitrary order) and an outcome batch lock each other's rows: measured under
/// the pipeline bench, renewals waited 156 ms on average, and 20 deadlocks in a minute each held
/// their rows for a second (`deadlock_timeout`) before one side failed and its dispatches were
/// abandoned as lost. Taken over is judged from the statement's snapshot, so a row being finished
/// still shows its lease.
pub async fn renew_leases(
    executor: impl PgExecutor<'_>,
    leases: &[(Uuid, Uuid)],
    lease_secs: f64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let (ids, owners): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
    sqlx::query_file_scalar!("src/webhooks/sql/renew_leases.sql", &ids, &owners, lease_secs)
        .fetch_all(executor)
        .await
}

pub const RELEASE_LEASES_SQL: &str = include_str!("sql/release_leases.sql");

/// Gives back leases of claimed events no worker started: they are claimable again at once, and
/// the claim does not count as an attempt.
pub async fn release_leases(executor: impl PgExecutor<'_>, leases: &[(Uuid, Uuid)]) -> Result<(), sqlx::Error> {
    let (ids, owners): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
    sqlx::query_file!("src/webhooks/sql/release_leases.sql", &ids, &owners)
        .execute(executor)
        .await?;
    Ok(())
}

/// When an event may next be claimed: the earliest due time of the events no one holds, or the
/// earliest expiry of a lease (a replica that died holding it). `None`: nothing is pending.
pub async fn next_claimable(executor: impl PgExecutor<'_>) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT least(
             (SELECT next_attempt_at FROM orchestrator_webhook_events
              WHERE status = 'pending' AND (lease_until IS NULL OR lease_until < now())
              ORDER BY next_attempt_at LIMIT 1),
             (SELECT min(lease_until) FROM orchestrator_webhook_events
              WHERE status = 'pending' AND lease_until >= now())) AS "next""#
    )
    .fetch_one(executor)
    .await
}

/// The final or next state of a dispatched event, written only if `owner` still holds its lease.
#[derive(Clone, Debug)]
pub struct OutcomeRow {
    pub id: Uuid,
    pub owner: Uuid,
    /// `pending` (to be retried at `next_attempt_at`) or a final status.
    pub status: EventStatus,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub skip_reason: Option<String>,
    pub org_id: Option<String>,
    pub team_node_id: Option<String>,
    pub correlation_id: Option<String>,
    pub agent_result: Option<Value>,
}

impl OutcomeRow {
    /// An outcome with only its status; callers add what each one carries.
    pub fn new(id: Uuid, owner: Uuid, status: EventStatus) -> Self {
        Self {
            id,
            owner,
            status,
            next_attempt_at: None,
            last_error: None,
            skip_reason: None,
            org_id: None,
            team_node_id: None,
            correlation_id: None,
            agent_result: None,
        }
    }
}

/// The outcome batch ([`record_outcomes`]); public for the test that pins its plan.
pub const RECORD_OUTCOMES_SQL: &str = include_str!("sql/record_outcomes.sql");

/// Writes outcomes in one statement, whose commit waits for the WAL flush even on
/// [`crate::db::queue_pool`] (whose connections' commits do not). Each result says whether that
/// row's lease was still its owner's (and so whether it was written), in the order of `rows`. Run
/// on the queue pool, where a lookup per row is the only plan it can get.
pub async fn record_outcomes(executor: impl PgExecutor<'_>, rows: &[OutcomeRow]) -> Result<Vec<bool>, sqlx::Error> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let owners: Vec<Uuid> = rows.iter().map(|r| r.owner).collect();
    let statuses: Vec<EventStatus> = rows.iter().map(|r| r.status).collect();
    let next: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.next_attempt_at).collect();
    let text = |f: fn(&OutcomeRow) -> &Option<String>| -> Vec<Option<String>> {
        rows.iter().map(|r| f(r).as_deref().map(storable_text)).collect()
    };
    let results: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.agent_result.as_ref().map(|v| storable_json(v).to_string()))
        .collect();
    let written: Vec<Uuid> = sqlx::query_file_scalar!(
        "src/webhooks/sql/record_outcomes.sql",
        &ids,
        &owners,
        &statuses as &[EventStatus],
        &next as &[Option<DateTime<Utc>>],
        &text(|r| &r.last_error) as &[Option<String>],
        &text(|r| &r.skip_reason) as &[Option<String>],
        &text(|r| &r.org_id) as &[Option<String>],
        &text(|r| &r.team_node_id) as &[Option<String>],
        &text(|r| &r.correlation_id) as &[Option<String>],
        &results as &[Option<String>],
    )
    .fetch_all(executor)
    .await?;
    Ok(ids.iter().map(|id| written.contains(id)).collect())
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EventRow {
    pub id: Uuid,
    pub source: String,
    pub kind: String,
    pub delivery_id: String,
    #[schema(value_type = Object)]
    pub headers: Value,
    pub received_at: DateTime<Utc>,
    /// pending, processing, delivered, skipped, unrouted or dead_letter.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub ordering_key: Option<String>,
    pub last_error: Option<String>,
    pub skip_reason: Option<String>,
    pub org_id: Option<String>,
    pub team_node_id: Option<String>,
    pub correlation_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub agent_result: Option<Value>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

fn event_columns() -> String {
    format!(
        "id, source, kind, delivery_id, headers, received_at, {STATUS_EXPR} AS status, attempts, next_attempt_at,
         ordering_key, last_error, skip_reason, org_id, team_node_id, correlation_id, agent_result, updated_at, finished_at"
    )
}

pub async fn get_event(executor: impl PgExecutor<'_>, id: Uuid) -> Result<Option<EventRow>, sqlx::Error> {
    sqlx::query_as!(
        EventRow,
        r#"SELECT id, source, kind, delivery_id, headers, received_at,
             CASE WHEN status = 'pending' AND lease_until > now() THEN 'processing' ELSE status END AS "status!",
             attempts, next_attempt_at, ordering_key, last_error, skip_reason, org_id, team_node_id, correlation_id,
             agent_result, updated_at, finished_at
         FROM orchestrator_webhook_events WHERE id = $1"#,
        id
    )
    .fetch_optional(executor)
    .await
}

pub async fn get_body(executor: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar!("SELECT body FROM orchestrator_webhook_events WHERE id = $1", id)
        .fetch_optional(executor)
        .await
        .map(Option::flatten)
}

#[derive(Clone, Default)]
pub struct EventFilter {
    /// Confines an org admin to events routed to its org.
    pub org_id: Option<String>,
    pub source: Option<String>,
    pub status: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

fn push_filter(sql: &mut QueryBuilder<'_, Postgres>, filter: &EventFilter) {
    if let Some(org) = &filter.org_id {
        sql.push(" AND org_id = ").push_bind(org.clone());
    }
    if let Some(source) = &filter.source {
        sql.push(" AND source = ").push_bind(source.clone());
    }
    if let Some(status) = &filter.status {
        sql.push(format!(" AND {STATUS_EXPR} = ")).push_bind(status.clone());
    }
    if let Some(since) = filter.since {
        sql.push(" AND received_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        sql.push(" AND received_at < ").push_bind(until);
    }
    if let Some((at, id)) = filter.before {
        sql.push(" AND (received_at, id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
}

pub async fn list_events(executor: impl PgExecutor<'_>, filter: &EventFilter) -> Result<Vec<EventRow>, sqlx::Error> {
    let mut sql = QueryBuilder::<Postgres>::new(format!(
        "SELECT {} FROM orchestrator_webhook_events WHERE TRUE",
        event_columns()
    ));
    push_filter(&mut sql, filter);
    sql.push(" ORDER BY received_at DESC, id DESC LIMIT ")
        .push_bind(filter.limit);
    sql.build_query_as().fetch_all(executor).await
}

/// Puts finished events back in the queue with a fresh attempt budget. Events still pending or
/// processing are left alone. Returns the ids replayed.
pub async fn replay(
    executor: impl PgExecutor<'_>,
    filter: &EventFilter,
    ids: Option<&[Uuid]>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut sql = QueryBuilder::<Postgres>::new(
        "WITH chosen AS (SELECT id FROM orchestrator_webhook_events WHERE status IN ('delivered', 'skipped', 'unrouted', 'dead_letter') AND body IS NOT NULL",
    );
    push_filter(&mut sql, filter);
    if let Some(ids) = ids {
        sql.push(" AND id = ANY(").push_bind(ids.to_vec()).push(")");
    }
    sql.push(" ORDER BY received_at LIMIT ").push_bind(filter.limit);
    sql.push(
        " FOR UPDATE SKIP LOCKED)
         UPDATE orchestrator_webhook_events e SET status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL,
             skip_reason = NULL, finished_at = NULL, updated_at = now()
         FROM chosen WHERE e.id = chosen.id
         RETURNING e.id",
    );
    let ids: Vec<Uuid> = sql.build_query_scalar().fetch_all(executor).await?;
    Ok(ids)
}

pub async fn notify(executor: impl PgExecutor<'_>) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT pg_notify('orchestrator_webhook_inbox', '')")
        .execute(executor)
        .await?;
    Ok(())
}

/// Pending events, split into those waiting and those being dispatched, counted from the partial
/// indexes that hold only them: cheap however large the inbox's history is.
pub const OPEN_COUNTS_SQL: &str = include_str!("sql/open_counts.sql");

pub async fn open_counts(executor: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query_file!("src/webhooks/sql/open_counts.sql")
        .fetch_all(executor)
        .await?;
    Ok(rows.into_iter().map(|r| (r.status, r.count)).collect())
}

/// Every status, counted over the whole table (a sequential scan of the retained history).
pub async fn counts_by_status(executor: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT CASE WHEN status = 'pending' AND lease_until > now() THEN 'processing' ELSE status END AS "status!",
             count(*) AS "count!"
         FROM orchestrator_webhook_events GROUP BY 1"#
    )
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|r| (r.status, r.count)).collect())
}

/// Rows one retention statement deletes at most.
pub const PURGE_BATCH: u64 = 10_000;

/// Retention: drops finished events older than `retention_days` (dead letters stay until an
/// operator deals with them), then delivery ids older than `dedupe_days` whose event is gone.
pub async fn purge(
    executor: impl PgExecutor<'_> + Copy,
    retention_days: u32,
    dedupe_days: u32,
) -> Result<(u64, u64), sqlx::Error> {
    let events = sqlx::query!(
        "DELETE FROM orchestrator_webhook_events WHERE id IN (
             SELECT id FROM orchestrator_webhook_events WHERE status IN ('delivered', 'skipped', 'unrouted')
               AND finished_at < now() - make_interval(days => $1) LIMIT 10000 FOR UPDATE SKIP LOCKED)",
        retention_days as i32
    )
    .execute(executor)
    .await?
    .rows_affected();
    let deliveries = sqlx::query!(
        "DELETE FROM orchestrator_webhook_deliveries WHERE (source, delivery_id) IN (
             SELECT d.source, d.delivery_id FROM orchestrator_webhook_deliveries d
             WHERE d.received_at < now() - make_interval(days => $1)
               AND NOT EXISTS (SELECT 1 FROM orchestrator_webhook_events e WHERE e.id = d.event_id)
             LIMIT 10000 FOR UPDATE SKIP LOCKED)",
        dedupe_days as i32
    )
    .execute(executor)
    .await?
    .rows_affected();
    Ok((events, deliveries))
}
