//! The Postgres pools and the embedded migrations.

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool, Postgres};

use crate::config::DatabaseConfig;

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

fn connect_options(config: &DatabaseConfig) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(config.url.expose())?.application_name("orchestrator"))
}

/// The request pool. Lazy, so the service starts (and answers `/health` with 503) while the
/// database is still coming up.
pub fn request_pool(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    Ok(pinged_when_idle(PgPoolOptions::new())
        .max_connections(config.pool_size)
        .acquire_timeout(config.acquire_timeout)
        .connect_lazy_with(connect_options(config)?))
}

/// Connections for the inbox queue's hot statements: stored batches, claims, outcomes, lease
/// renewals. Their plans are pinned by disabling what the planner must never choose for them, on
/// these connections only.
/// The planner costs a plan from the table's statistics, and those say the backlog is tiny
/// whenever it has just grown (a burst into an inbox whose events are all finished, or a new
/// database). It then reads every due event and sorts them for a claim, and joins an outcome batch
/// by reading the whole table: each statement costs time in proportion to the table (30 to 50 ms
/// with 6,000 waiting and 17,000 stored, measured) and dispatch falls further behind exactly when it
/// is busiest. Without bitmap scans, sorts, sequential scans, hash and merge joins, the claim walks
/// the fair index in order and stops after its limit, and an outcome batch looks each row up by its
/// primary key: time in proportion to the rows touched, whatever the statistics say.
///
/// Their commits do not wait for the WAL flush (`synchronous_commit = off`): a claim, a renewal or
/// a released lease lost to a database crash (at most the last 0.6 s) only makes its event
/// claimable again: at worst its agent is called a second time, as when the replica holding it
/// dies. Stored batches (acknowledged after it) and outcomes (and dead letters with them) ask for
/// a flushed commit ([`crate::webhooks::store::insert_events`],
/// [`crate::webhooks::store::record_outcomes`]). Waiting for the flush made each claim a disk
/// round trip, and the claim loop one at a time.
pub fn queue_pool(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(config)?.options([
        ("enable_bitmapscan", "off"),
        ("enable_sort", "off"),
        ("enable_seqscan", "off"),
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
        // A sort the statement cannot do without (a stored batch keeps its order) still runs,
        // costed as disabled: a cost in the billions, which turns on JIT compilation (measured:
        // 360 ms to store one event).
        ("jit", "off"),
        // Each statement here has one sensible plan whatever its parameters, and the generic one
        // is it. Left to choose, Postgres kept planning an outcome batch afresh on 38% of its
        // executions: the generic plan is costed for ten rows of each array, a custom one for the
        // two or three a batch holds under load, so the custom one looked cheaper (30 µs of
        // planning an event, 7% of Postgres's CPU under `scripts/bench pipeline` at 2,000/s,
        // measured with pg_stat_statements).
        ("plan_cache_mode", "force_generic_plan"),
        ("synchronous_commit", "off"),
    ]);
    Ok(pinged_when_idle(PgPoolOptions::new())
        // The claim loop, the inbox batch and the outcome batches in flight, and renewals and
        // dead letters.
        .max_connections(QUEUE_POOL_SIZE)
        .acquire_timeout(config.acquire_timeout)
        .connect_lazy_with(options))
}

/// Connections in [`queue_pool`].
pub const QUEUE_POOL_SIZE: u32 = 5;

/// A ping on every acquire is a round trip per query, and under load most of the pool's work; a
/// connection in steady use is known to be alive. One that sat idle (the server may have restarted
/// or a proxy dropped it) is checked before it is handed out.
fn pinged_when_idle(options: PgPoolOptions) -> PgPoolOptions {
    options.test_before_acquire(false).before_acquire(|conn, meta| {
        Box::pin(async move {
            if meta.idle_for >= PING_IF_IDLE_FOR {
                conn.ping().await?;
            }
            Ok(true)
        })
    })
}

/// An idle connection older than this is pinged before use.
const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// A few of a pool's connections kept out of it between uses, for statements on a latency-critical
/// path. sqlx pings every connection its pool takes back (`return_to_pool`, still in 0.9.1): a round
/// trip after every use, run beside whatever the request does next. A perf profile of
/// `scripts/bench proxy` put 8% of the service's CPU per proxied run in those pings, the first one
/// beside the agent call. A connection kept here longer than [`PING_IF_IDLE_FOR`] goes back to
/// the pool, which checks it; one whose statement failed is not kept.
pub struct HeldConnections {
    pool: PgPool,
    idle: std::sync::Mutex<Vec<(PoolConnection<Postgres>, std::time::Instant)>>,
    /// How many are kept at most; 0 once released.
    most: std::sync::atomic::AtomicUsize,
}

impl HeldConnections {
    pub fn new(pool: PgPool, most: usize) -> Self {
        Self {
            pool,
            idle: std::sync::Mutex::new(Vec::new()),
            most: most.into(),
        }
    }

    /// Gives every held connection back to the pool and keeps none from now on. Called before
    /// the pool is closed: `close` can wait for the connections taken from the pool, held ones
    /// included (the queue pool's, full with them, made a shutdown wait forever).
    pub fn release(&self) {
        self.most.store(0, std::sync::atomic::Ordering::Relaxed);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The most recently used held connection, or one from the pool.
    pub async fn take(&self) -> Result<HeldConnection<'_>, sqlx::Error> {
        let (reused, stale) = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            // The oldest are at the front: those idle too long go back to the pool.
            let stale = idle
                .iter()
                .take_while(|(_, since)| since.elapsed() >= PING_IF_IDLE_FOR)
                .count();
            let stale: Vec<_> = idle.drain(..stale).collect();
            (idle.pop().map(|(connection, _)| connection), stale)
        };
        drop(stale);
        let connection = match reused {
            Some(connection) => connection,
            None => self.pool.acquire().await?,
        };
        Ok(HeldConnection {
            home: self,
            connection: Some(connection),
        })
    }
}

/// A connection from [`HeldConnections`]: [`HeldConnection::keep`] it after a successful
/// statement; dropped otherwise, it returns to the pool (which checks it).
pub struct HeldConnection<'a> {
    home: &'a HeldConnections,
    connection: Option<PoolConnection<Postgres>>,
}

impl HeldConnection<'_> {
    pub fn keep(mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        let mut idle = self.home.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.home.most.load(std::sync::atomic::Ordering::Relaxed) {
            idle.push((connection, std::time::Instant::now()));
        }
    }
}

impl std::ops::Deref for HeldConnection<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.connection.as_ref().expect("present until kept")
    }
}

impl std::ops::DerefMut for HeldConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.connection.as_mut().expect("present until kept")
    }
}

/// Connections that hold session-level advisory locks for the length of a provisioning run.
/// Separate from the request pool so long-held locks can never starve request handling.
pub fn lock_pool(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    // A connection whose unlock failed is closed, never pooled (`TeamLock::release`); one that sat
    // idle is pinged like the request pool's.
    Ok(pinged_when_idle(PgPoolOptions::new())
        .max_connections(config.lock_pool_size)
        .acquire_timeout(config.acquire_timeout)
        .connect_lazy_with(connect_options(config)?))
}

/// Where applied migrations are recorded. Not sqlx's `_sqlx_migrations`: the database is shared, and
/// another service may keep its own history under that name.
const MIGRATIONS_TABLE: &str = "orchestrator_schema_migrations";

/// Keeps two migrators (the Helm hook and a replica with `ORCHESTRATOR_AUTO_CREATE_TABLES`, or two
/// replicas) from applying the same migration at once.
const MIGRATION_LOCK: i64 = 0x6f72_6368_6d69_6772; // "orchmigr"
/// How long a migrator waits for another one to finish.
const MIGRATION_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    #[error("migration {version} ({description}) failed: {source}")]
    Failed {
        version: i64,
        description: String,
        source: sqlx::Error,
    },
    #[error("migration {0} was changed after it was applied; migrations only go forward")]
    Changed(i64),
    #[error("another migrator held the lock for {0:?}")]
    Busy(std::time::Duration),
}

/// Applies the embedded migrations that are not applied yet, in order, each in its own
/// transaction, recording each in `orchestrator_schema_migrations`.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let mut conn = pool.acquire().await?;
    let deadline = std::time::Instant::now() + MIGRATION_LOCK_WAIT;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .fetch_one(&mut *conn)
        .await?
    {
        if std::time::Instant::now() >= deadline {
            return Err(MigrateError::Busy(MIGRATION_LOCK_WAIT));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let result = apply_pending(&mut conn).await;
    // Closing the connection would release the lock too; unlocking lets it go back to the pool.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    result
}

async fn apply_pending(conn: &mut sqlx::PgConnection) -> Result<(), MigrateError> {
    // Executed as a plain string (no arguments), which Postgres runs with the simple query
    // protocol: a migration file may hold many statements.
    conn.execute(
        format!(
            "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
                 version BIGINT PRIMARY KEY,
                 description TEXT NOT NULL,
                 checksum BYTEA NOT NULL,
                 installed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                 execution_ms BIGINT NOT NULL
             )"
        )
        .as_str(),
    )
    .await?;
    let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as(&format!("SELECT version, checksum FROM {MIGRATIONS_TABLE}"))
        .fetch_all(&mut *conn)
        .await?;
    // A plain loop: an iterator adaptor's closure held across the awaits below makes the future
    // fail rustc's Send check ("not general enough").
    for migration in MIGRATOR.iter() {
        if !migration.migration_type.is_up_migration() {
            continue;
        }
        let recorded = applied.iter().position(|(version, _)| *version == migration.version);
        if let Some(index) = recorded {
            if applied[index].1.as_slice() != &*migration.checksum {
                return Err(MigrateError::Changed(migration.version));
            }
            continue;
        }
        let started = std::time::Instant::now();
        // A file that starts with `-- no-transaction` (a CONCURRENTLY index build) runs on its own
        // and is recorded after; if it fails, nothing is recorded and it runs again.
        let mut tx;
        let applied = if migration.no_tx {
            conn.execute("SET lock_timeout = '5s'").await?;
            let applied = conn.execute(&*migration.sql).await;
            conn.execute("RESET lock_timeout").await?;
            tx = conn.begin().await?;
            applied
        } else {
            tx = conn.begin().await?;
            tx.execute(&*migration.sql).await
        };
        if let Err(source) = applied {
            return Err(MigrateError::Failed {
                version: migration.version,
                description: migration.description.to_string(),
                source,
            });
        }
        sqlx::query(&format!(
            "INSERT INTO {MIGRATIONS_TABLE} (version, description, checksum, execution_ms) VALUES ($1, $2, $3, $4)"
        ))
        .bind(migration.version)
        .bind(&*migration.description)
        .bind(&*migration.checksum)
        .bind(started.elapsed().as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// The newest migration this binary knows about.
pub fn latest_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Whether every migration this binary embeds has been applied to the database.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Option<i64> = sqlx::query_scalar(&format!("SELECT max(version) FROM {MIGRATIONS_TABLE}"))
        .fetch_one(pool)
        .await
        .or_else(|e| match &e {
            // No migrations table yet: nothing has been applied.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
            _ => Err(e),
        })?;
    Ok(applied.unwrap_or(0) >= latest_migration())
}

/// Postgres text and jsonb refuse the NUL character, and neighbours' answers or webhook payloads
/// may carry one (`\u0000`). Everything untrusted that is stored goes through these, so a
/// stray NUL can never make a write fail (and a run or an event retry forever).
pub fn storable_text(text: &str) -> String {
    text.replace('\0', "")
}

pub fn storable_json(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(storable_text(s)),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (storable_text(k), storable_json(v))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(storable_json).collect()),
        other => other.clone(),
    }
}
