//! The embedded queue: one SQLite file, WAL, one writer connection (so writes serialize
//! without SQLITE_BUSY storms) and a small reader pool. The statements are `sql.rs`'s, shared
//! with PostgreSQL; what is SQLite's own is here: the pools, and ids stored as their text.

use super::sql::{sql_store, Dialect};
use super::*;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    clock: std::sync::Arc<dyn Clock>,
}

impl Dialect for SqliteStore {
    type Id = String;
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const LOCK: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    fn id(u: Uuid) -> String {
        u.to_string()
    }
    fn uuid(id: String) -> Result<Uuid, QueueError> {
        Uuid::parse_str(&id).map_err(|e| QueueError::Corrupt(format!("id {id:?}: {e}")))
    }
}

sql_store!(SqliteStore, sqlx::Sqlite);

impl SqliteStore {
    /// Opens (creating if needed) the database and runs the migrations.
    pub async fn open(url: &str) -> Result<SqliteStore, QueueError> {
        SqliteStore::open_with_clock(url, std::sync::Arc::new(SystemClock)).await
    }

    /// As [`SqliteStore::open`], reading the time from `clock`.
    pub async fn open_with_clock(
        url: &str,
        clock: std::sync::Arc<dyn Clock>,
    ) -> Result<SqliteStore, QueueError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            // Set explicitly: sqlx no longer picks WAL for us, and it must not be set
            // inside a migration's transaction.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            // When a write fails with SQLITE_FULL or an I/O error, SQLite may roll the whole
            // transaction back by itself; sqlx's COMMIT and ROLLBACK then fail and it still
            // counts the connection as inside a transaction, so every later `begin_with`
            // failed ("non-zero transaction depth") until a restart. A connection that comes
            // back still counted inside a transaction is closed; the pool opens a fresh one.
            .after_release(|conn, _meta| {
                Box::pin(async move {
                    // The ping queues behind the rollback a dropped transaction started.
                    conn.ping().await?;
                    if conn.is_in_transaction() {
                        tracing::warn!(
                            "a database write left its connection inside a transaction; reopening it"
                        );
                        return Ok(false);
                    }
                    Ok(true)
                })
            })
            .connect_with(opts.clone())
            .await?;
        sqlx::migrate!("./migrations")
            .run(&writer)
            .await
            .map_err(|e| QueueError::Db(e.into()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await?;
        Ok(SqliteStore {
            writer,
            reader,
            clock,
        })
    }

    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After SQLITE_FULL or an I/O error inside a transaction, SQLite may roll the whole
    /// transaction back by itself; sqlx's COMMIT then fails and its count of open
    /// transactions stayed at one, so every later `begin_with` failed until a restart (the
    /// full-disk finding). The raw ROLLBACK below does what SQLite does by itself.
    #[tokio::test]
    async fn a_transaction_sqlite_rolled_back_by_itself_does_not_wedge_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        {
            let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.unwrap();
            sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
            assert!(tx.commit().await.is_err(), "COMMIT finds no transaction");
        }
        for _ in 0..3 {
            let tx = store
                .writer
                .begin_with("BEGIN IMMEDIATE")
                .await
                .expect("a fresh transaction after the broken one");
            tx.commit().await.unwrap();
        }
        assert!(store.sweep_expired().await.unwrap().is_empty());
        store.close().await;
    }
}
