//! The fleet's queue: PostgreSQL, shared by any number of API and worker processes. Same
//! traits, same lease protocol and same meaning as `sqlite.rs` (convention 6): claim with one
//! `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED) RETURNING`, every later transition
//! guarded by the lease owner and checked with `rows_affected`. Where SQLite serializes
//! writers with `BEGIN IMMEDIATE`, this takes row locks (`FOR UPDATE`) or lets a unique or
//! foreign key decide a race.
//!
//! `LISTEN/NOTIFY` carries what other processes must learn at once: a job became claimable
//! (a trigger announces it on `modelpress_job_queued` when its transaction commits) and job
//! events for the event streams (`modelpress_events`, see `crate::events`).

use super::sql::{sql_store, Dialect};
use super::*;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use std::sync::Arc;
use std::time::Duration;

/// A connection of `pool` that listens on both channels.
async fn open_listener(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([QUEUED_CHANNEL, EVENTS_CHANNEL])
        .await?;
    Ok(listener)
}

/// The channel a trigger notifies when a job becomes claimable.
pub const QUEUED_CHANNEL: &str = "modelpress_job_queued";
/// The channel job events travel on between processes.
pub const EVENTS_CHANNEL: &str = "modelpress_events";

pub struct PgStore {
    /// One pool; `reader` is a handle on the same one (the shared statements read there).
    writer: PgPool,
    reader: PgPool,
    clock: Arc<dyn Clock>,
    /// Stops the listener task (it holds a pool connection, which `close` waits for).
    closing: tokio_util::sync::CancellationToken,
}

impl Dialect for PgStore {
    type Id = Uuid;
    const BEGIN: &'static str = "BEGIN";
    const LOCK: &'static str = " FOR UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    fn id(u: Uuid) -> Uuid {
        u
    }
    fn uuid(id: Uuid) -> Result<Uuid, QueueError> {
        Ok(id)
    }
}

sql_store!(PgStore, sqlx::Postgres);

impl PgStore {
    /// Connects, and runs the migrations of `migrations/postgres` (sqlx holds an advisory
    /// lock meanwhile, so processes starting together migrate once).
    pub async fn open(url: &str, clock: Arc<dyn Clock>) -> Result<PgStore, QueueError> {
        let max = std::env::var("MODELPRESS_DATABASE_MAX_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| QueueError::Db(e.into()))?;
        Ok(PgStore {
            reader: pool.clone(),
            writer: pool,
            clock,
            closing: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub async fn close(&self) {
        self.closing.cancel();
        self.writer.close().await;
    }

    /// Listens on both channels and forwards what arrives. A lost connection is reopened, and
    /// once this process listens again, [`Notice::Gap`] says that what was announced
    /// meanwhile is gone (sent then, not before: what a stream re-reads on it is current).
    pub async fn listen(&self, tx: tokio::sync::mpsc::Sender<Notice>) -> Result<(), QueueError> {
        let mut listener = open_listener(&self.writer).await?;
        let (closing, pool) = (self.closing.clone(), self.writer.clone());
        tokio::spawn(async move {
            loop {
                // `try_recv` (not `recv`, which reconnects silently) tells of a lost
                // connection.
                let next = tokio::select! {
                    n = listener.try_recv() => n,
                    _ = closing.cancelled() => break,
                    _ = tx.closed() => break,
                };
                let notice = match next {
                    Err(sqlx::Error::PoolClosed) => break,
                    Ok(Some(n)) if n.channel() == QUEUED_CHANNEL => Notice::JobQueued,
                    Ok(Some(n)) => Notice::Event(n.payload().to_string()),
                    // Lost: the connection closed (Ok(None); sqlx would reconnect only on the
                    // next call, which may fail in turn) or failed. Either way a new listener
                    // is opened, at once and then every second, and the gap is said once,
                    // when this process listens again: saying it on the loss as well gave a
                    // stream two resyncs for one outage when the socket's end was seen before
                    // the server's error.
                    lost => {
                        let why = lost.err().map(|e| e.to_string());
                        tracing::warn!(error = ?why, "database notifications interrupted; reconnecting");
                        listener = loop {
                            match open_listener(&pool).await {
                                Ok(l) => break l,
                                Err(sqlx::Error::PoolClosed) => return,
                                Err(e) => tracing::debug!(error = %e, "still reconnecting"),
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = closing.cancelled() => return,
                            }
                        };
                        tracing::warn!("database notifications listening again");
                        Notice::Gap
                    }
                };
                if tx.send(notice).await.is_err() {
                    break;
                }
            }
        });
        Ok(())
    }

    /// Sends `payload` to every process listening on the events channel.
    pub async fn announce(&self, payload: &str) -> Result<(), QueueError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(EVENTS_CHANNEL)
            .bind(payload)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

/// Creates an empty database beside the one `admin_url` names and returns its URL: each
/// test and benchmark gets its own, so they run in parallel on one server.
pub async fn scratch_database(admin_url: &str, prefix: &str) -> Result<String, QueueError> {
    use sqlx::Connection;
    let name = format!("{prefix}_{}", Uuid::new_v4().simple());
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(QueueError::UnsupportedUrl("a database name prefix".into()));
    }
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let base = admin_url
        .split('?')
        .next()
        .and_then(|u| u.rsplit_once('/'))
        .map(|(b, _)| b)
        .ok_or_else(|| QueueError::UnsupportedUrl("a URL without a database".into()))?;
    Ok(format!("{base}/{name}"))
}

/// Drops a database [`scratch_database`] made, closing its connections.
pub async fn drop_scratch_database(admin_url: &str, url: &str) -> Result<(), QueueError> {
    use sqlx::Connection;
    let name = url.rsplit('/').next().unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(QueueError::UnsupportedUrl("not a scratch database".into()));
    }
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(())
}
