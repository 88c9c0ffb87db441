//! One provisioning run at a time per team, across replicas: a session-level Postgres advisory
//! lock held on a dedicated connection for the whole run. If the process dies, Postgres drops
//! the connection and with it the lock, which is how another replica knows to resume the run.
//!
//! Needs a direct or session-pooled connection: behind a transaction-pooling proxy the unlock
//! could land on another server session and strand the lock.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// Separates our keys from any other advisory lock user of the same database.
const NAMESPACE: &str = "incidentfox-orchestrator/provisioning";

/// Keyed by the team's sanitised name, not its raw ids: teams whose Kubernetes names collide
/// (`acme`/`eu-sre` and `acme-eu`/`sre`) must never be provisioned at the same time, or both could
/// pass the ownership check before either object exists.
pub fn lock_key(org: &str, team: &str) -> i64 {
    let class = super::objects::name_class(org, team);
    let digest = Sha256::digest(format!("{NAMESPACE}\u{0}{class}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// A lock-pool connection that holds (or is about to hold) a team's lock. A run's own writes go
/// through it too, so the transaction that ends the run can release the lock as it commits.
pub struct TeamLock {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
}

/// Takes the lock on `conn` if it is free, without waiting; inside a transaction, the session
/// keeps it after the commit (and a rollback does not release it either).
pub async fn try_lock(conn: &mut PgConnection, key: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1) AS "locked!""#, key)
        .fetch_one(conn)
        .await
}

/// Releases the lock on `conn`; inside a transaction, at once (not at the commit), so whoever
/// takes it next must not trust rows this transaction is still changing (they lock them).
pub async fn unlock(conn: &mut PgConnection, key: i64) -> Result<(), sqlx::Error> {
    sqlx::query_scalar!("SELECT pg_advisory_unlock($1) AS unlocked", key)
        .fetch_one(conn)
        .await?;
    Ok(())
}

impl TeamLock {
    /// A lock-pool connection for the team, in the guard before any lock is taken on it: if the
    /// caller is cancelled mid-query, Drop closes the connection rather than pool one that may
    /// hold the lock.
    pub async fn connect(pool: &PgPool, org: &str, team: &str) -> Result<TeamLock, sqlx::Error> {
        Ok(TeamLock {
            conn: Some(pool.acquire().await?),
            key: lock_key(org, team),
        })
    }

    pub fn key(&self) -> i64 {
        self.key
    }

    /// The session that holds the lock. `None` once released.
    pub fn connection(&mut self) -> Option<&mut PgConnection> {
        self.conn.as_deref_mut()
    }

    /// Returns the connection to the pool: only when it is known not to hold the lock (it was
    /// never taken, or a committed transaction released it).
    pub fn release_unlocked(mut self) {
        drop(self.conn.take());
    }

    /// Tries once, without waiting. The connection is returned to the pool when the lock is busy,
    /// so waiting requests never hold lock connections.
    pub async fn try_acquire(pool: &PgPool, org: &str, team: &str) -> Result<Option<TeamLock>, sqlx::Error> {
        // The connection is inside the guard before the lock query runs: if this future is
        // cancelled mid-query, Drop closes the connection rather than pooling one that may hold
        // the lock.
        let mut guard = Self::connect(pool, org, team).await?;
        let key = guard.key;
        let locked = match guard.connection() {
            Some(conn) => try_lock(conn, key).await?,
            None => false,
        };
        if locked {
            Ok(Some(guard))
        } else {
            // Not locked: the connection holds nothing and may go back to the pool.
            drop(guard.conn.take());
            Ok(None)
        }
    }

    /// Tries until `timeout`, backing off from 5 ms to 100 ms between tries.
    pub async fn acquire_within(
        pool: &PgPool,
        org: &str,
        team: &str,
        timeout: Duration,
    ) -> Result<Option<TeamLock>, sqlx::Error> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(lock) = Self::try_acquire(pool, org, team).await? {
                return Ok(Some(lock));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Releases the lock. If the unlock fails the connection is closed instead, which releases
    /// the lock on the server all the same.
    pub async fn release(mut self) {
        // The connection stays in the guard while unlocking: cancelled mid-query, Drop closes it.
        let key = self.key;
        let unlocked = match self.connection() {
            Some(conn) => unlock(conn, key).await.is_ok(),
            None => return,
        };
        if unlocked {
            // Unlocked: safe to pool.
            drop(self.conn.take());
        }
        // Otherwise Drop closes the connection, which releases the lock on the server.
    }
}

impl Drop for TeamLock {
    fn drop(&mut self) {
        // Dropped without release (a panic or an aborted task): never put a connection that may
        // still hold the lock back in the pool. Closing it releases the lock.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}
