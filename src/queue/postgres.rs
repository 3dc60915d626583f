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

use super::*;
use crate::error::ErrorCode;
use sqlx::postgres::{PgListener, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgPool, Row};
use std::sync::Arc;
use std::time::Duration;

use super::columns::{
    DATASET as DATASET_COLUMNS, DELIVERY as DELIVERY_COLUMNS, JOB as JOB_COLUMNS,
    KEY as KEY_COLUMNS, MODEL as MODEL_COLUMNS,
};

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
    pool: PgPool,
    clock: Arc<dyn Clock>,
    /// Stops the listener task (it holds a pool connection, which `close` waits for).
    closing: tokio_util::sync::CancellationToken,
}

fn json_col(row: &PgRow, col: &str) -> Result<Option<serde_json::Value>, QueueError> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| QueueError::Corrupt(format!("{col}: {e}")))
}

fn job_from_row(row: &PgRow) -> Result<JobRecord, QueueError> {
    let state: String = row.try_get("state")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        model_id: row.try_get("model_id")?,
        state: JobState::parse(&state)
            .ok_or_else(|| QueueError::Corrupt(format!("state {state}")))?,
        spec: json_col(row, "spec_json")?
            .ok_or_else(|| QueueError::Corrupt("spec_json is null".into()))?,
        progress: row.try_get("progress")?,
        stage: row.try_get("stage")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        cancel_requested: row.try_get("cancel_requested")?,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        summary: json_col(row, "summary_json")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn model_from_row(row: &PgRow) -> Result<ModelRecord, QueueError> {
    Ok(ModelRecord {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        format: row.try_get("format")?,
        size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
        sha256: row.try_get("sha256")?,
        tensor_count: row.try_get::<i64, _>("tensor_count")? as u64,
        parameter_count: row.try_get::<i64, _>("parameter_count")? as u64,
        blob_key: row.try_get("blob_key")?,
        tensors_json: row.try_get("tensors_json")?,
        inputs_json: row.try_get("inputs_json")?,
        created_at: row.try_get("created_at")?,
    })
}

fn dataset_from_row(row: &PgRow) -> Result<DatasetRecord, QueueError> {
    Ok(DatasetRecord {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
        sha256: row.try_get("sha256")?,
        rows: row.try_get::<Option<i64>, _>("rows")?.map(|r| r as u64),
        has_labels: row.try_get("has_labels")?,
        arrays_json: row.try_get("arrays_json")?,
        blob_key: row.try_get("blob_key")?,
        created_at: row.try_get("created_at")?,
    })
}

fn key_from_row(row: &PgRow) -> Result<KeyRecord, QueueError> {
    Ok(KeyRecord {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        scope: row.try_get("scope")?,
        prefix: row.try_get("prefix")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

fn delivery_from_row(row: &PgRow) -> Result<DeliveryRecord, QueueError> {
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        tenant_id: row.try_get("tenant_id")?,
        url: row.try_get("url")?,
        event: row.try_get("event")?,
        state: row.try_get("state")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status: row.try_get("last_status")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        delivered_at: row.try_get("delivered_at")?,
    })
}

/// Whether a statement failed on a foreign key (the row it points at was deleted meanwhile).
fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23503"))
}

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
            pool,
            clock,
            closing: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub async fn close(&self) {
        self.closing.cancel();
        self.pool.close().await;
    }

    /// Listens on both channels and forwards what arrives. A lost connection is reopened, and
    /// once this process listens again, [`Notice::Gap`] says that what was announced
    /// meanwhile is gone (sent then, not before: what a stream re-reads on it is current).
    pub async fn listen(&self, tx: tokio::sync::mpsc::Sender<Notice>) -> Result<(), QueueError> {
        let mut listener = open_listener(&self.pool).await?;
        let (closing, pool) = (self.closing.clone(), self.pool.clone());
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
            .execute(&self.pool)
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

#[async_trait]
impl ModelCatalog for PgStore {
    async fn insert_model(&self, m: &ModelRecord) -> Result<(), QueueError> {
        sqlx::query(
            "INSERT INTO models (id, tenant_id, name, format, size_bytes, sha256, tensor_count, parameter_count, blob_key, tensors_json, inputs_json, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(m.id)
        .bind(&m.tenant_id)
        .bind(&m.name)
        .bind(&m.format)
        .bind(m.size_bytes as i64)
        .bind(&m.sha256)
        .bind(m.tensor_count as i64)
        .bind(m.parameter_count as i64)
        .bind(&m.blob_key)
        .bind(&m.tensors_json)
        .bind(&m.inputs_json)
        .bind(m.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_model(&self, tenant: &str, id: Uuid) -> Result<Option<ModelRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE id = $1 AND tenant_id = $2"
        )))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(model_from_row).transpose()
    }

    async fn list_models(
        &self,
        tenant: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<ModelRecord>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        )))
        .bind(tenant)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(model_from_row).collect()
    }

    async fn delete_model(
        &self,
        tenant: &str,
        id: Uuid,
        cascade: bool,
    ) -> Result<DeletedModel, QueueError> {
        let mut tx = self.pool.begin().await?;
        // The row lock makes a concurrent enqueue (whose foreign key check shares-locks the
        // model) wait for this deletion, or this deletion wait for its commit.
        let model_key: Option<String> = sqlx::query_scalar(
            "SELECT blob_key FROM models WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(model_key) = model_key else {
            return Err(QueueError::NotFound);
        };
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE model_id = $1 AND state IN ('queued', 'running')",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 {
            return Err(QueueError::ModelInUse);
        }
        let job_ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE model_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        if !cascade && !job_ids.is_empty() {
            return Err(QueueError::ModelHasJobs(job_ids.len()));
        }
        sqlx::query("DELETE FROM models WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(DeletedModel {
            blob_key: model_key,
            job_ids,
        })
    }

    async fn insert_dataset(&self, d: &DatasetRecord) -> Result<(), QueueError> {
        sqlx::query(
            "INSERT INTO datasets (id, tenant_id, name, size_bytes, sha256, rows, has_labels, arrays_json, blob_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(d.id)
        .bind(&d.tenant_id)
        .bind(&d.name)
        .bind(d.size_bytes as i64)
        .bind(&d.sha256)
        .bind(d.rows.map(|r| r as i64))
        .bind(d.has_labels)
        .bind(&d.arrays_json)
        .bind(&d.blob_key)
        .bind(d.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_dataset(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<Option<DatasetRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE id = $1 AND tenant_id = $2"
        )))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(dataset_from_row).transpose()
    }

    async fn list_datasets(
        &self,
        tenant: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<DatasetRecord>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        )))
        .bind(tenant)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(dataset_from_row).collect()
    }

    async fn delete_dataset(&self, tenant: &str, id: Uuid) -> Result<String, QueueError> {
        let mut tx = self.pool.begin().await?;
        let key: Option<String> = sqlx::query_scalar(
            "SELECT blob_key FROM datasets WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(key) = key else {
            return Err(QueueError::NotFound);
        };
        // A job names its dataset only in its spec; the id is a uuid, so a substring match on
        // the stored JSON finds exactly the jobs that name it.
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE tenant_id = $1 AND state IN ('queued', 'running') \
             AND strpos(spec_json, $2) > 0",
        )
        .bind(tenant)
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 {
            return Err(QueueError::DatasetInUse);
        }
        sqlx::query("DELETE FROM datasets WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn get_sensitivity(
        &self,
        tenant: &str,
        model: Uuid,
        dataset: Uuid,
        key: &str,
    ) -> Result<Option<String>, QueueError> {
        Ok(sqlx::query_scalar(
            "SELECT doc FROM sensitivity_cache WHERE tenant_id = $1 AND model_id = $2 AND dataset_id = $3 AND key = $4",
        )
        .bind(tenant)
        .bind(model)
        .bind(dataset)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn put_sensitivity(
        &self,
        tenant: &str,
        model: Uuid,
        dataset: Uuid,
        key: &str,
        doc: &str,
    ) -> Result<(), QueueError> {
        // The model or dataset may have been deleted while the job ran: then nothing is kept.
        let r = sqlx::query(
            "INSERT INTO sensitivity_cache (model_id, dataset_id, tenant_id, key, doc, created_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM models WHERE id = $1) \
             AND EXISTS (SELECT 1 FROM datasets WHERE id = $2) \
             ON CONFLICT (model_id, dataset_id, key) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, \
             doc = EXCLUDED.doc, created_at = EXCLUDED.created_at",
        )
        .bind(model)
        .bind(dataset)
        .bind(tenant)
        .bind(key)
        .bind(doc)
        .bind(self.clock.now_ms())
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_foreign_key_violation(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    async fn tenant_usage(&self, tenant: &str, since: i64) -> Result<TenantUsage, QueueError> {
        let row = sqlx::query(
            "SELECT \
             ((SELECT COALESCE(SUM(size_bytes), 0) FROM models WHERE tenant_id = $1) + \
              (SELECT COALESCE(SUM(size_bytes), 0) FROM datasets WHERE tenant_id = $1) + \
              (SELECT COALESCE(SUM(size_bytes), 0) FROM artifacts WHERE tenant_id = $1))::BIGINT AS stored, \
             (SELECT COUNT(*) FROM jobs WHERE tenant_id = $1 AND state IN ('queued', 'running')) AS active, \
             (SELECT COUNT(*) FROM jobs WHERE tenant_id = $1 AND created_at >= $2) AS recent, \
             (SELECT MIN(created_at) FROM jobs WHERE tenant_id = $1 AND created_at >= $2) AS oldest",
        )
        .bind(tenant)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(TenantUsage {
            stored_bytes: row.try_get::<i64, _>("stored")?.max(0) as u64,
            active_jobs: row.try_get::<i64, _>("active")?.max(0) as u64,
            recent_jobs: row.try_get::<i64, _>("recent")?.max(0) as u64,
            oldest_recent: row.try_get("oldest")?,
        })
    }
}

impl PgStore {
    async fn idempotent_prior(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(JobRecord, String)>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS}, request_fingerprint FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2"
        )))
        .bind(tenant)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let fp: Option<String> = r.try_get("request_fingerprint")?;
                Ok(Some((job_from_row(&r)?, fp.unwrap_or_default())))
            }
        }
    }

    fn replay(prior: (JobRecord, String), fingerprint: &str) -> Result<Enqueued, QueueError> {
        if prior.1 == fingerprint {
            Ok(Enqueued::Existing(prior.0))
        } else {
            Err(QueueError::IdempotencyConflict)
        }
    }
}

#[async_trait]
impl JobQueue for PgStore {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        if let Some(key) = &job.idempotency_key {
            if let Some(prior) = self.idempotent_prior(&job.tenant_id, key).await? {
                return PgStore::replay(prior, &job.fingerprint);
            }
        }
        // The model must be the tenant's; the foreign key catches one deleted meanwhile, and
        // the unique (tenant, key) decides between two requests racing with one key.
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO jobs (id, tenant_id, model_id, state, spec_json, max_attempts, idempotency_key, request_fingerprint, created_at) \
             SELECT $1, $2, $3, 'queued', $4, $5, $6, $7, $8 \
             WHERE EXISTS (SELECT 1 FROM models WHERE id = $3 AND tenant_id = $2) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING {JOB_COLUMNS}"
        )))
        .bind(job.id)
        .bind(&job.tenant_id)
        .bind(job.model_id)
        .bind(job.spec.to_string())
        .bind(job.max_attempts)
        .bind(&job.idempotency_key)
        .bind(&job.fingerprint)
        .bind(self.clock.now_ms())
        .fetch_optional(&self.pool)
        .await;
        let row = match row {
            Err(e) if is_foreign_key_violation(&e) => return Err(QueueError::NotFound),
            r => r?,
        };
        match row {
            Some(r) => Ok(Enqueued::Created(job_from_row(&r)?)),
            None => match &job.idempotency_key {
                // Another request with the same key won the race.
                Some(key) => match self.idempotent_prior(&job.tenant_id, key).await? {
                    Some(prior) => PgStore::replay(prior, &job.fingerprint),
                    None => Err(QueueError::NotFound),
                },
                None => Err(QueueError::NotFound),
            },
        }
    }

    async fn get_job(&self, tenant: &str, id: Uuid) -> Result<Option<JobRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2"
        )))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn find_idempotent(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(JobRecord, String)>, QueueError> {
        self.idempotent_prior(tenant, key).await
    }

    async fn list_jobs(&self, tenant: &str, f: &JobFilter) -> Result<Vec<JobRecord>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND ($2::text IS NULL OR state = $2) \
             AND ($3::uuid IS NULL OR model_id = $3) AND ($4::uuid IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
        )))
        .bind(tenant)
        .bind(f.state.map(|s| s.as_str()))
        .bind(f.model_id)
        .bind(f.before)
        .bind(i64::from(f.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn artifacts(&self, job: Uuid) -> Result<Vec<ArtifactRecord>, QueueError> {
        let rows = sqlx::query(
            "SELECT name, blob_key, size_bytes, sha256 FROM artifacts WHERE job_id = $1 ORDER BY name",
        )
        .bind(job)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ArtifactRecord {
                    name: r.try_get("name")?,
                    blob_key: r.try_get("blob_key")?,
                    size_bytes: r.try_get::<i64, _>("size_bytes")? as u64,
                    sha256: r.try_get("sha256")?,
                })
            })
            .collect()
    }

    async fn claim(&self, worker: &str, lease_ms: i64) -> Result<Option<JobRecord>, QueueError> {
        let now = self.clock.now_ms();
        // SKIP LOCKED: concurrent claimers each take a different queued row instead of
        // queueing behind one another's lock.
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = $2, attempts = attempts + 1, \
             started_at = COALESCE(started_at, $3), stage = 'claimed', progress = 0 \
             WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= $3) \
             ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {JOB_COLUMNS}"
        )))
        .bind(worker)
        .bind(now + lease_ms)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn heartbeat(
        &self,
        id: Uuid,
        worker: &str,
        lease_ms: i64,
        progress: f64,
        stage: &str,
    ) -> Result<Heartbeat, QueueError> {
        let row: Option<bool> = sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = $1, progress = $2, stage = $3 \
             WHERE id = $4 AND lease_owner = $5 AND state = 'running' RETURNING cancel_requested",
        )
        .bind(self.clock.now_ms() + lease_ms)
        .bind(progress)
        .bind(stage)
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(c) => Heartbeat::Held {
                cancel_requested: c,
            },
            None => Heartbeat::Lost,
        })
    }

    async fn complete(
        &self,
        id: Uuid,
        worker: &str,
        summary: &serde_json::Value,
        artifacts: &[ArtifactRecord],
    ) -> Result<bool, QueueError> {
        let mut tx = self.pool.begin().await?;
        let now = self.clock.now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'succeeded', progress = 1, stage = 'done', summary_json = $1, finished_at = $2, \
             lease_owner = NULL, lease_expires_at = NULL WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
        )
        .bind(summary.to_string())
        .bind(now)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        for a in artifacts {
            sqlx::query(
                "INSERT INTO artifacts (job_id, tenant_id, name, blob_key, size_bytes, sha256, created_at) \
                 SELECT id, tenant_id, $1, $2, $3, $4, $5 FROM jobs WHERE id = $6",
            )
            .bind(&a.name)
            .bind(&a.blob_key)
            .bind(a.size_bytes as i64)
            .bind(&a.sha256)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn fail(
        &self,
        id: Uuid,
        worker: &str,
        code: ErrorCode,
        message: &str,
    ) -> Result<bool, QueueError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'failed', error_code = $1, error_message = $2, finished_at = $3, stage = 'failed', \
             lease_owner = NULL, lease_expires_at = NULL WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(code.as_str())
        .bind(message)
        .bind(self.clock.now_ms())
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn retry_later(
        &self,
        id: Uuid,
        worker: &str,
        code: ErrorCode,
        message: &str,
        backoff_ms: i64,
    ) -> Result<Option<JobState>, QueueError> {
        let now = self.clock.now_ms();
        let state: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET \
             state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
             error_code = CASE WHEN attempts >= max_attempts THEN $1 ELSE error_code END, \
             error_message = CASE WHEN attempts >= max_attempts THEN $2 || ' (on each of ' || attempts || ' attempts)' ELSE error_message END, \
             finished_at = CASE WHEN attempts >= max_attempts THEN $3 ELSE finished_at END, \
             stage = CASE WHEN attempts >= max_attempts THEN 'failed' \
                 ELSE 'attempt ' || attempts || ' of ' || max_attempts || ' failed (' || $1 || '); retrying' END, \
             not_before = CASE WHEN attempts >= max_attempts THEN NULL ELSE $4 END, \
             progress = CASE WHEN attempts >= max_attempts THEN progress ELSE 0 END, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $5 AND lease_owner = $6 AND state = 'running' RETURNING state",
        )
        .bind(code.as_str())
        .bind(message)
        .bind(now)
        .bind(now + backoff_ms.max(0))
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(state.as_deref().and_then(JobState::parse))
    }

    async fn mark_cancelled(&self, id: Uuid, worker: &str) -> Result<bool, QueueError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = $1, stage = 'cancelled', lease_owner = NULL, \
             lease_expires_at = NULL WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
        )
        .bind(self.clock.now_ms())
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn release(&self, id: Uuid, worker: &str) -> Result<bool, QueueError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = GREATEST(attempts - 1, 0), stage = 'requeued at shutdown', \
             progress = 0, lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn request_cancel(&self, tenant: &str, id: Uuid) -> Result<JobRecord, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = CASE state WHEN 'queued' THEN 'cancelled' ELSE state END, \
             finished_at = CASE state WHEN 'queued' THEN $1 ELSE finished_at END, \
             stage = CASE state WHEN 'queued' THEN 'cancelled' ELSE stage END, \
             cancel_requested = TRUE WHERE id = $2 AND tenant_id = $3 AND state IN ('queued', 'running') RETURNING {JOB_COLUMNS}"
        )))
        .bind(self.clock.now_ms())
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => job_from_row(&r),
            None => {
                let state: Option<String> =
                    sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 AND tenant_id = $2")
                        .bind(id)
                        .bind(tenant)
                        .fetch_optional(&self.pool)
                        .await?;
                Err(match state {
                    Some(s) => QueueError::NotCancellable(s),
                    None => QueueError::NotFound,
                })
            }
        }
    }

    async fn sweep_expired(&self) -> Result<Vec<JobRecord>, QueueError> {
        // Every process sweeps; each UPDATE re-checks its condition on the rows it locks, so
        // two sweepers never both requeue one job.
        let now = self.clock.now_ms();
        let mut tx = self.pool.begin().await?;
        let mut rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'cancelled', stage = 'cancelled', finished_at = $1, lease_owner = NULL, lease_expires_at = NULL \
             WHERE state = 'running' AND lease_expires_at < $1 AND cancel_requested RETURNING {JOB_COLUMNS}",
        )))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        // A constant of ErrorCode, not client input.
        let exhausted = ErrorCode::AttemptsExhausted.as_str();
        rows.extend(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE jobs SET state = 'failed', error_code = '{exhausted}', \
             error_message = 'the job''s worker stopped responding on each of its ' || attempts || ' attempts', \
             stage = 'failed', finished_at = $1, lease_owner = NULL, lease_expires_at = NULL \
             WHERE state = 'running' AND lease_expires_at < $1 AND attempts >= max_attempts RETURNING {JOB_COLUMNS}",
            )))
            .bind(now)
            .fetch_all(&mut *tx)
            .await?,
        );
        rows.extend(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE jobs SET state = 'queued', stage = 'requeued after lease expiry', progress = 0, lease_owner = NULL, \
             lease_expires_at = NULL WHERE state = 'running' AND lease_expires_at < $1 RETURNING {JOB_COLUMNS}",
            )))
            .bind(now)
            .fetch_all(&mut *tx)
            .await?,
        );
        tx.commit().await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, QueueError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let rows = rows
            .iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect::<Result<Vec<(String, i64)>, QueueError>>()?;
        Ok(counts_by_state(rows))
    }
}

#[async_trait]
impl KeyStore for PgStore {
    async fn insert_key(&self, key: &KeyRecord, hash: &str) -> Result<(), QueueError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenants (id, name, created_at) VALUES ($1, $1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&key.tenant_id)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, scope, prefix, hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(key.id)
        .bind(&key.tenant_id)
        .bind(&key.scope)
        .bind(&key.prefix)
        .bind(hash)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, id: Uuid) -> Result<KeyRecord, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING {KEY_COLUMNS}"
        )))
        .bind(self.clock.now_ms())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(key_from_row)
            .transpose()?
            .ok_or(QueueError::NotFound)
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1 AND revoked_at IS NULL"
        )))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn any_active_key(&self) -> Result<bool, QueueError> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn touch_key(&self, id: Uuid, at: i64) -> Result<(), QueueError> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl WebhookOutbox for PgStore {
    async fn webhook_secret(&self, tenant: &str, fresh: &str) -> Result<String, QueueError> {
        sqlx::query(
            "INSERT INTO tenant_secrets (tenant_id, webhook_secret, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(fresh)
        .bind(self.clock.now_ms())
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT webhook_secret FROM tenant_secrets WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn due_deliveries(
        &self,
        now: i64,
        lock_ms: i64,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE webhook_deliveries SET locked_until = $1 WHERE id IN ( \
             SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= $2 \
             AND (locked_until IS NULL OR locked_until < $2) ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING {DELIVERY_COLUMNS}"
        )))
        .bind(now + lock_ms)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<DeliveryRecord> = rows
            .iter()
            .map(delivery_from_row)
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    async fn finish_delivery(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        let (state, status, error, next) = outcome.columns(now);
        sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, attempts = attempts + 1, last_status = $2, \
             last_error = $3, next_attempt_at = $4, locked_until = NULL, \
             delivered_at = CASE WHEN $1 = 'delivered' THEN $5 ELSE delivered_at END WHERE id = $6",
        )
        .bind(state)
        .bind(status)
        .bind(error)
        .bind(next)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn deliveries(&self, tenant: &str, job: Uuid) -> Result<Vec<DeliveryRecord>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant_id = $1 AND job_id = $2 ORDER BY id"
        )))
        .bind(tenant)
        .bind(job)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }
}
