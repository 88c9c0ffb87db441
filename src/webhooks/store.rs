//! The SQL of the webhook inbox (`orchestrator_webhook_events`) and its dedupe keys (`orchestrator_webhook_deliveries`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgExecutor, Postgres, QueryBuilder};

use crate::db::{storable_json, storable_text};
use uuid::Uuid;

/// Every status an inbox event can have (the table's CHECK constraint).
pub const STATUSES: [&str; 6] = [
    "pending",
    "processing",
    "delivered",
    "skipped",
    "unrouted",
    "dead_letter",
];

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    New(Uuid),
    /// The delivery id was seen before; the event it created.
    Duplicate(Uuid),
}

/// Stores a batch of events and their delivery ids in one statement (one transaction). A delivery
/// id seen before, in the table or earlier in the batch, stores nothing. Results are in the order
/// of `events`. Other replicas are told separately ([`notify`]): a NOTIFY in this transaction
/// would make every batch commit under one database-wide lock, held until its WAL is flushed.
pub async fn insert_events(
    executor: impl PgExecutor<'_> + Copy,
    events: &[NewEvent],
) -> Result<Vec<Inserted>, sqlx::Error> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let sources: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let delivery_ids: Vec<&str> = events.iter().map(|e| e.delivery_id.as_str()).collect();
    let headers: Vec<String> = events.iter().map(|e| e.headers.to_string()).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
    let ordering: Vec<Option<&str>> = events.iter().map(|e| e.ordering_key.as_deref()).collect();
    // WITH ORDINALITY keeps the request order, so the first of two deliveries with the same id wins.
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "WITH input AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[])
                 WITH ORDINALITY AS t(id, source, kind, delivery_id, headers, body, ordering_key, n)),
         delivery AS (
             INSERT INTO orchestrator_webhook_deliveries (source, delivery_id, event_id)
             SELECT source, delivery_id, id FROM input ORDER BY n
             ON CONFLICT DO NOTHING RETURNING event_id),
         event AS (
             INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, headers, body, ordering_key)
             SELECT i.id, i.source, i.kind, i.delivery_id, i.headers::jsonb, i.body, i.ordering_key
             FROM input i JOIN delivery d ON d.event_id = i.id ORDER BY i.n
             RETURNING id)
         SELECT id FROM event",
    )
    .bind(&ids)
    .bind(&sources)
    .bind(&kinds)
    .bind(&delivery_ids)
    .bind(&headers)
    .bind(&bodies)
    .bind(&ordering)
    .fetch_all(executor)
    .await?;
    if inserted.len() == events.len() {
        return Ok(ids.into_iter().map(Inserted::New).collect());
    }
    // Some were duplicates: find the events their delivery ids already name.
    let existing: Vec<(String, String, Uuid)> = sqlx::query_as(
        "SELECT d.source, d.delivery_id, d.event_id FROM orchestrator_webhook_deliveries d
         JOIN UNNEST($1::text[], $2::text[]) AS t(source, delivery_id) USING (source, delivery_id)",
    )
    .bind(&sources)
    .bind(&delivery_ids)
    .fetch_all(executor)
    .await?;
    Ok(events
        .iter()
        .map(|event| {
            if inserted.contains(&event.id) {
                return Inserted::New(event.id);
            }
            let original = existing
                .iter()
                .find(|(source, delivery, _)| *source == event.source && *delivery == event.delivery_id)
                .map_or(event.id, |(_, _, id)| *id);
            Inserted::Duplicate(original)
        })
        .collect())
}

#[derive(Clone, Debug, sqlx::FromRow)]
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
}

/// What operators see as an event's status. A claim only takes a lease and leaves `status` alone,
/// so the claim is a HOT update (no column any index depends on changes) and an event being
/// dispatched is one whose lease is live.
const STATUS_EXPR: &str = "CASE WHEN status = 'pending' AND lease_until > now() THEN 'processing' ELSE status END";

/// The claim, `$1` the limit and `$2` the lease in seconds. Run on [`crate::db::queue_pool`],
/// where walking the due index in order is the only plan it can get.
pub const CLAIM_SQL: &str = "UPDATE orchestrator_webhook_events e
         SET lease_owner = gen_random_uuid(), lease_until = now() + make_interval(secs => $2),
             attempts = e.attempts + 1, updated_at = now()
         WHERE e.id IN (
             SELECT c.id FROM orchestrator_webhook_events c
             WHERE c.next_attempt_at <= now()
               AND c.status = 'pending'
               AND (c.lease_until IS NULL OR c.lease_until < now())
               -- Written as OR, not an anti join, so it probes the ordering index per candidate
               -- instead of reading the whole backlog on every claim.
               AND (c.ordering_key IS NULL OR NOT EXISTS (
                   SELECT 1 FROM orchestrator_webhook_events p
                   WHERE p.ordering_key = c.ordering_key
                     AND p.status = 'pending'
                     AND (p.received_at, p.id) < (c.received_at, c.id)))
             ORDER BY c.next_attempt_at, c.received_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED)
         RETURNING e.id, e.lease_owner AS lease, e.source, e.kind, e.delivery_id, e.headers, e.body, e.received_at, e.attempts, e.ordering_key";

/// Claims up to `limit` due events, each with a fresh lease token; only lease columns change, so
/// the update stays HOT. An event waits while an earlier event with the same ordering key is
/// unfinished, which keeps a thread's events in order. An expired lease (its worker died) makes an
/// event claimable again.
pub async fn claim(
    executor: impl PgExecutor<'_>,
    limit: i64,
    lease_secs: f64,
) -> Result<Vec<ClaimedEvent>, sqlx::Error> {
    sqlx::query_as(CLAIM_SQL)
        .bind(limit)
        .bind(lease_secs)
        .fetch_all(executor)
        .await
}

/// Extends a lease while the agent runs; `false` if the lease was lost.
pub async fn renew_lease(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    owner: Uuid,
    lease_secs: f64,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE orchestrator_webhook_events SET lease_until = now() + make_interval(secs => $3)
         WHERE id = $1 AND lease_owner = $2 AND status = 'pending'",
    )
    .bind(id)
    .bind(owner)
    .bind(lease_secs)
    .execute(executor)
    .await?
    .rows_affected()
        == 1)
}

/// The final or next state of a dispatched event, written only if `owner` still holds its lease.
#[derive(Clone, Debug)]
pub struct OutcomeRow {
    pub id: Uuid,
    pub owner: Uuid,
    /// `pending` (to be retried at `next_attempt_at`) or a final status.
    pub status: &'static str,
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
    pub fn new(id: Uuid, owner: Uuid, status: &'static str) -> Self {
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

/// Outcomes from ten parallel arrays, joined to their events by primary key. Run on
/// [`crate::db::queue_pool`], where a lookup per row is the only plan it can get.
pub const RECORD_OUTCOMES_SQL: &str = "UPDATE orchestrator_webhook_events e SET status = o.status, next_attempt_at = coalesce(o.next_attempt_at, e.next_attempt_at),
             last_error = o.last_error, skip_reason = o.skip_reason, org_id = coalesce(o.org_id, e.org_id),
             team_node_id = coalesce(o.team_node_id, e.team_node_id),
             correlation_id = coalesce(o.correlation_id, e.correlation_id),
             agent_result = coalesce(o.agent_result::jsonb, e.agent_result),
             lease_owner = NULL, lease_until = NULL, updated_at = now(),
             finished_at = CASE WHEN o.status <> 'pending' THEN now() END
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::text[])
             AS o(id, owner, status, next_attempt_at, last_error, skip_reason, org_id, team_node_id, correlation_id, agent_result)
         WHERE e.id = o.id AND e.lease_owner = o.owner
         RETURNING e.id";

/// Writes outcomes in one statement. Each result says whether that row's lease was still its
/// owner's (and so whether it was written), in the order of `rows`.
pub async fn record_outcomes(executor: impl PgExecutor<'_>, rows: &[OutcomeRow]) -> Result<Vec<bool>, sqlx::Error> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let owners: Vec<Uuid> = rows.iter().map(|r| r.owner).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status).collect();
    let next: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.next_attempt_at).collect();
    let text = |f: fn(&OutcomeRow) -> &Option<String>| -> Vec<Option<String>> {
        rows.iter().map(|r| f(r).as_deref().map(storable_text)).collect()
    };
    let results: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.agent_result.as_ref().map(|v| storable_json(v).to_string()))
        .collect();
    let written: Vec<Uuid> = sqlx::query_scalar(RECORD_OUTCOMES_SQL)
        .bind(&ids)
        .bind(&owners)
        .bind(&statuses)
        .bind(&next)
        .bind(text(|r| &r.last_error))
        .bind(text(|r| &r.skip_reason))
        .bind(text(|r| &r.org_id))
        .bind(text(|r| &r.team_node_id))
        .bind(text(|r| &r.correlation_id))
        .bind(&results)
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
    sqlx::query_as(&format!(
        "SELECT {} FROM orchestrator_webhook_events WHERE id = $1",
        event_columns()
    ))
    .bind(id)
    .fetch_optional(executor)
    .await
}

pub async fn get_body(executor: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar("SELECT body FROM orchestrator_webhook_events WHERE id = $1")
        .bind(id)
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
    sqlx::query("SELECT pg_notify('orchestrator_webhook_inbox', '')")
        .execute(executor)
        .await?;
    Ok(())
}

/// The statuses of events still waiting or being dispatched, counted from the partial indexes that
/// hold only those rows: cheap however large the inbox's history is.
pub const OPEN_STATUSES: [&str; 2] = ["pending", "processing"];

pub const OPEN_COUNTS_SQL: &str = "SELECT CASE WHEN lease_until > now() THEN 'processing' ELSE 'pending' END, count(*)
     FROM orchestrator_webhook_events WHERE status = 'pending' GROUP BY 1";

pub async fn open_counts(executor: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(OPEN_COUNTS_SQL).fetch_all(executor).await
}

/// Every status, counted over the whole table (a sequential scan of the retained history).
pub async fn counts_by_status(executor: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {STATUS_EXPR}, count(*) FROM orchestrator_webhook_events GROUP BY 1"
    ))
    .fetch_all(executor)
    .await
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
    let events = sqlx::query(
        "DELETE FROM orchestrator_webhook_events WHERE id IN (
             SELECT id FROM orchestrator_webhook_events WHERE status IN ('delivered', 'skipped', 'unrouted')
               AND finished_at < now() - make_interval(days => $1) LIMIT 10000 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention_days as i32)
    .execute(executor)
    .await?
    .rows_affected();
    let deliveries = sqlx::query(
        "DELETE FROM orchestrator_webhook_deliveries WHERE (source, delivery_id) IN (
             SELECT d.source, d.delivery_id FROM orchestrator_webhook_deliveries d
             WHERE d.received_at < now() - make_interval(days => $1)
               AND NOT EXISTS (SELECT 1 FROM orchestrator_webhook_events e WHERE e.id = d.event_id)
             LIMIT 10000 FOR UPDATE SKIP LOCKED)",
    )
    .bind(dedupe_days as i32)
    .execute(executor)
    .await?
    .rows_affected();
    Ok((events, deliveries))
}
