//! The embedded queue: one SQLite file, WAL, one writer connection (so writes serialize
//! without SQLITE_BUSY storms) and a small reader pool. The lease protocol lives in SQL
//! (convention 6): claim with one `UPDATE … RETURNING`, every later transition guarded by
//! the lease owner and checked with `rows_affected`.

use super::*;
use crate::error::ErrorCode;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

use super::columns::{
    DATASET as DATASET_COLUMNS, DELIVERY as DELIVERY_COLUMNS, JOB as JOB_COLUMNS,
    KEY as KEY_COLUMNS, MODEL as MODEL_COLUMNS,
};

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    clock: std::sync::Arc<dyn Clock>,
}

fn uuid_col(row: &SqliteRow, col: &str) -> Result<Uuid, QueueError> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| QueueError::Corrupt(format!("{col}: {e}")))
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord, QueueError> {
    let state: String = row.try_get("state")?;
    let spec: String = row.try_get("spec_json")?;
    let summary: Option<String> = row.try_get("summary_json")?;
    Ok(JobRecord {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        model_id: uuid_col(row, "model_id")?,
        state: JobState::parse(&state)
            .ok_or_else(|| QueueError::Corrupt(format!("state {state}")))?,
        spec: serde_json::from_str(&spec).map_err(|e| QueueError::Corrupt(e.to_string()))?,
        progress: row.try_get("progress")?,
        stage: row.try_get("stage")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        summary: summary
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| QueueError::Corrupt(e.to_string()))?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn model_from_row(row: &SqliteRow) -> Result<ModelRecord, QueueError> {
    Ok(ModelRecord {
        id: uuid_col(row, "id")?,
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

fn dataset_from_row(row: &SqliteRow) -> Result<DatasetRecord, QueueError> {
    Ok(DatasetRecord {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
        sha256: row.try_get("sha256")?,
        rows: row.try_get::<Option<i64>, _>("rows")?.map(|r| r as u64),
        has_labels: row.try_get::<i64, _>("has_labels")? != 0,
        arrays_json: row.try_get("arrays_json")?,
        blob_key: row.try_get("blob_key")?,
        created_at: row.try_get("created_at")?,
    })
}

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

#[async_trait]
impl ModelCatalog for SqliteStore {
    async fn insert_model(&self, m: &ModelRecord) -> Result<(), QueueError> {
        sqlx::query(
            "INSERT INTO models (id, tenant_id, name, format, size_bytes, sha256, tensor_count, parameter_count, blob_key, tensors_json, inputs_json, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(m.id.to_string())
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
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn get_model(&self, tenant: &str, id: Uuid) -> Result<Option<ModelRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE id = ? AND tenant_id = ?"
        )))
        .bind(id.to_string())
        .bind(tenant)
        .fetch_optional(&self.reader)
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
            "SELECT {MODEL_COLUMNS} FROM models WHERE tenant_id = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
        )))
        .bind(tenant)
        .bind(before.map(|b| b.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(model_from_row).collect()
    }

    async fn delete_model(
        &self,
        tenant: &str,
        id: Uuid,
        cascade: bool,
    ) -> Result<DeletedModel, QueueError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let model_key: Option<String> =
            sqlx::query_scalar("SELECT blob_key FROM models WHERE id = ? AND tenant_id = ?")
                .bind(id.to_string())
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(model_key) = model_key else {
            return Err(QueueError::NotFound);
        };
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE model_id = ? AND state IN ('queued', 'running')",
        )
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 {
            return Err(QueueError::ModelInUse);
        }
        let jobs: Vec<String> = sqlx::query_scalar("SELECT id FROM jobs WHERE model_id = ?")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
        let job_ids = jobs
            .iter()
            .map(|j| Uuid::parse_str(j).map_err(|e| QueueError::Corrupt(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        if !cascade && !job_ids.is_empty() {
            return Err(QueueError::ModelHasJobs(job_ids.len()));
        }
        sqlx::query("DELETE FROM models WHERE id = ?")
            .bind(id.to_string())
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(d.id.to_string())
        .bind(&d.tenant_id)
        .bind(&d.name)
        .bind(d.size_bytes as i64)
        .bind(&d.sha256)
        .bind(d.rows.map(|r| r as i64))
        .bind(i64::from(d.has_labels))
        .bind(&d.arrays_json)
        .bind(&d.blob_key)
        .bind(d.created_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn get_dataset(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<Option<DatasetRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ? AND tenant_id = ?"
        )))
        .bind(id.to_string())
        .bind(tenant)
        .fetch_optional(&self.reader)
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
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant_id = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
        )))
        .bind(tenant)
        .bind(before.map(|b| b.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(dataset_from_row).collect()
    }

    async fn get_sensitivity(
        &self,
        tenant: &str,
        model: Uuid,
        dataset: Uuid,
        key: &str,
    ) -> Result<Option<String>, QueueError> {
        Ok(sqlx::query_scalar(
            "SELECT doc FROM sensitivity_cache WHERE tenant_id = ? AND model_id = ? AND dataset_id = ? AND key = ?",
        )
        .bind(tenant)
        .bind(model.to_string())
        .bind(dataset.to_string())
        .bind(key)
        .fetch_optional(&self.reader)
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
        sqlx::query(
            "INSERT OR REPLACE INTO sensitivity_cache (model_id, dataset_id, tenant_id, key, doc, created_at) \
             SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM models WHERE id = ?) \
             AND EXISTS (SELECT 1 FROM datasets WHERE id = ?)",
        )
        .bind(model.to_string())
        .bind(dataset.to_string())
        .bind(tenant)
        .bind(key)
        .bind(doc)
        .bind(self.clock.now_ms())
        .bind(model.to_string())
        .bind(dataset.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn delete_dataset(&self, tenant: &str, id: Uuid) -> Result<String, QueueError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        // A job names its dataset only in its spec: the id is a uuid, so a substring match
        // on the stored JSON finds exactly the jobs that name it.
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE tenant_id = ? AND state IN ('queued', 'running') \
             AND instr(spec_json, ?) > 0",
        )
        .bind(tenant)
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        let key: Option<String> =
            sqlx::query_scalar("SELECT blob_key FROM datasets WHERE id = ? AND tenant_id = ?")
                .bind(id.to_string())
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(key) = key else {
            return Err(QueueError::NotFound);
        };
        if active > 0 {
            return Err(QueueError::DatasetInUse);
        }
        sqlx::query("DELETE FROM datasets WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn tenant_usage(&self, tenant: &str, since: i64) -> Result<TenantUsage, QueueError> {
        let row = sqlx::query(
            "SELECT \
             (SELECT COALESCE(SUM(size_bytes), 0) FROM models WHERE tenant_id = ?1) + \
             (SELECT COALESCE(SUM(size_bytes), 0) FROM datasets WHERE tenant_id = ?1) + \
             (SELECT COALESCE(SUM(size_bytes), 0) FROM artifacts WHERE tenant_id = ?1) AS stored, \
             (SELECT COUNT(*) FROM jobs WHERE tenant_id = ?1 AND state IN ('queued', 'running')) AS active, \
             (SELECT COUNT(*) FROM jobs WHERE tenant_id = ?1 AND created_at >= ?2) AS recent, \
             (SELECT MIN(created_at) FROM jobs WHERE tenant_id = ?1 AND created_at >= ?2) AS oldest",
        )
        .bind(tenant)
        .bind(since)
        .fetch_one(&self.reader)
        .await?;
        Ok(TenantUsage {
            stored_bytes: row.try_get::<i64, _>("stored")?.max(0) as u64,
            active_jobs: row.try_get::<i64, _>("active")?.max(0) as u64,
            recent_jobs: row.try_get::<i64, _>("recent")?.max(0) as u64,
            oldest_recent: row.try_get("oldest")?,
        })
    }

    async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.reader).await.is_ok()
            && sqlx::query("SELECT 1").execute(&self.writer).await.is_ok()
    }
}

#[async_trait]
impl JobQueue for SqliteStore {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(key) = &job.idempotency_key {
            let prior = sqlx::query(AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS}, request_fingerprint FROM jobs WHERE tenant_id = ? AND idempotency_key = ?"
            )))
            .bind(&job.tenant_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = prior {
                let fp: Option<String> = row.try_get("request_fingerprint")?;
                return if fp.as_deref() == Some(job.fingerprint.as_str()) {
                    Ok(Enqueued::Existing(job_from_row(&row)?))
                } else {
                    Err(QueueError::IdempotencyConflict)
                };
            }
        }
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM models WHERE id = ? AND tenant_id = ?")
                .bind(job.model_id.to_string())
                .bind(&job.tenant_id)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Err(QueueError::NotFound);
        }
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO jobs (id, tenant_id, model_id, state, spec_json, max_attempts, idempotency_key, request_fingerprint, created_at) \
             VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?) RETURNING {JOB_COLUMNS}"
        )))
        .bind(job.id.to_string())
        .bind(&job.tenant_id)
        .bind(job.model_id.to_string())
        .bind(job.spec.to_string())
        .bind(job.max_attempts)
        .bind(&job.idempotency_key)
        .bind(&job.fingerprint)
        .bind(self.clock.now_ms())
        .fetch_one(&mut *tx)
        .await?;
        let rec = job_from_row(&row)?;
        tx.commit().await?;
        Ok(Enqueued::Created(rec))
    }

    async fn get_job(&self, tenant: &str, id: Uuid) -> Result<Option<JobRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ? AND tenant_id = ?"
        )))
        .bind(id.to_string())
        .bind(tenant)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn find_idempotent(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(JobRecord, String)>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS}, request_fingerprint FROM jobs WHERE tenant_id = ? AND idempotency_key = ?"
        )))
        .bind(tenant)
        .bind(key)
        .fetch_optional(&self.reader)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let fp: Option<String> = r.try_get("request_fingerprint")?;
                Ok(Some((job_from_row(&r)?, fp.unwrap_or_default())))
            }
        }
    }

    async fn list_jobs(&self, tenant: &str, f: &JobFilter) -> Result<Vec<JobRecord>, QueueError> {
        let state = f.state.map(|s| s.as_str());
        let model = f.model_id.map(|m| m.to_string());
        let before = f.before.map(|b| b.to_string());
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = ?1 AND (?2 IS NULL OR state = ?2) \
             AND (?3 IS NULL OR model_id = ?3) AND (?4 IS NULL OR id < ?4) ORDER BY id DESC LIMIT ?5"
        )))
        .bind(tenant)
        .bind(state)
        .bind(&model)
        .bind(&before)
        .bind(i64::from(f.limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn artifacts(&self, job: Uuid) -> Result<Vec<ArtifactRecord>, QueueError> {
        let rows = sqlx::query("SELECT name, blob_key, size_bytes, sha256 FROM artifacts WHERE job_id = ? ORDER BY name")
            .bind(job.to_string())
            .fetch_all(&self.reader)
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
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'running', lease_owner = ?, lease_expires_at = ?, attempts = attempts + 1, \
             started_at = COALESCE(started_at, ?), stage = 'claimed', progress = 0 \
             WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= ?) \
             ORDER BY id LIMIT 1) RETURNING {JOB_COLUMNS}"
        )))
        .bind(worker)
        .bind(now + lease_ms)
        .bind(now)
        .bind(now)
        .fetch_optional(&self.writer)
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
        let row: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = ?, progress = ?, stage = ? \
             WHERE id = ? AND lease_owner = ? AND state = 'running' RETURNING cancel_requested",
        )
        .bind(self.clock.now_ms() + lease_ms)
        .bind(progress)
        .bind(stage)
        .bind(id.to_string())
        .bind(worker)
        .fetch_optional(&self.writer)
        .await?;
        Ok(match row {
            Some(c) => Heartbeat::Held {
                cancel_requested: c != 0,
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let now = self.clock.now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'succeeded', progress = 1, stage = 'done', summary_json = ?, finished_at = ?, \
             lease_owner = NULL, lease_expires_at = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
        )
        .bind(summary.to_string())
        .bind(now)
        .bind(id.to_string())
        .bind(worker)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        for a in artifacts {
            sqlx::query(
                "INSERT INTO artifacts (job_id, tenant_id, name, blob_key, size_bytes, sha256, created_at) \
                 SELECT id, tenant_id, ?, ?, ?, ?, ? FROM jobs WHERE id = ?",
            )
            .bind(&a.name)
            .bind(&a.blob_key)
            .bind(a.size_bytes as i64)
            .bind(&a.sha256)
            .bind(now)
            .bind(id.to_string())
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
            "UPDATE jobs SET state = 'failed', error_code = ?, error_message = ?, finished_at = ?, stage = 'failed', \
             lease_owner = NULL, lease_expires_at = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
        )
        .bind(code.as_str())
        .bind(message)
        .bind(self.clock.now_ms())
        .bind(id.to_string())
        .bind(worker)
        .execute(&self.writer)
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
             error_code = CASE WHEN attempts >= max_attempts THEN ?1 ELSE error_code END, \
             error_message = CASE WHEN attempts >= max_attempts THEN ?2 || ' (on each of ' || attempts || ' attempts)' ELSE error_message END, \
             finished_at = CASE WHEN attempts >= max_attempts THEN ?3 ELSE finished_at END, \
             stage = CASE WHEN attempts >= max_attempts THEN 'failed' \
                 ELSE 'attempt ' || attempts || ' of ' || max_attempts || ' failed (' || ?1 || '); retrying' END, \
             not_before = CASE WHEN attempts >= max_attempts THEN NULL ELSE ?4 END, \
             progress = CASE WHEN attempts >= max_attempts THEN progress ELSE 0 END, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?5 AND lease_owner = ?6 AND state = 'running' RETURNING state",
        )
        .bind(code.as_str())
        .bind(message)
        .bind(now)
        .bind(now + backoff_ms.max(0))
        .bind(id.to_string())
        .bind(worker)
        .fetch_optional(&self.writer)
        .await?;
        Ok(state.as_deref().and_then(JobState::parse))
    }

    async fn mark_cancelled(&self, id: Uuid, worker: &str) -> Result<bool, QueueError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, stage = 'cancelled', lease_owner = NULL, \
             lease_expires_at = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
        )
        .bind(self.clock.now_ms())
        .bind(id.to_string())
        .bind(worker)
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn release(&self, id: Uuid, worker: &str) -> Result<bool, QueueError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), stage = 'requeued at shutdown', \
             progress = 0, lease_owner = NULL, lease_expires_at = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
        )
        .bind(id.to_string())
        .bind(worker)
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn request_cancel(&self, tenant: &str, id: Uuid) -> Result<JobRecord, QueueError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = CASE state WHEN 'queued' THEN 'cancelled' ELSE state END, \
             finished_at = CASE state WHEN 'queued' THEN ? ELSE finished_at END, \
             stage = CASE state WHEN 'queued' THEN 'cancelled' ELSE stage END, \
             cancel_requested = 1 WHERE id = ? AND tenant_id = ? AND state IN ('queued', 'running') RETURNING {JOB_COLUMNS}"
        )))
        .bind(self.clock.now_ms())
        .bind(id.to_string())
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let rec = match row {
            Some(r) => job_from_row(&r)?,
            None => {
                let state: Option<String> =
                    sqlx::query_scalar("SELECT state FROM jobs WHERE id = ? AND tenant_id = ?")
                        .bind(id.to_string())
                        .bind(tenant)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(match state {
                    Some(s) => QueueError::NotCancellable(s),
                    None => QueueError::NotFound,
                });
            }
        };
        tx.commit().await?;
        Ok(rec)
    }

    async fn sweep_expired(&self) -> Result<Vec<JobRecord>, QueueError> {
        let now = self.clock.now_ms();
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let mut rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'cancelled', stage = 'cancelled', finished_at = ?, lease_owner = NULL, lease_expires_at = NULL \
             WHERE state = 'running' AND lease_expires_at < ? AND cancel_requested = 1 RETURNING {JOB_COLUMNS}",
        )))
        .bind(now)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        // A constant of ErrorCode, not client input.
        let exhausted = ErrorCode::AttemptsExhausted.as_str();
        rows.extend(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE jobs SET state = 'failed', error_code = '{exhausted}', \
             error_message = 'the job''s worker stopped responding on each of its ' || attempts || ' attempts', \
             stage = 'failed', finished_at = ?, lease_owner = NULL, lease_expires_at = NULL \
             WHERE state = 'running' AND lease_expires_at < ? AND attempts >= max_attempts RETURNING {JOB_COLUMNS}",
            )))
            .bind(now)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?,
        );
        rows.extend(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE jobs SET state = 'queued', stage = 'requeued after lease expiry', progress = 0, lease_owner = NULL, \
             lease_expires_at = NULL WHERE state = 'running' AND lease_expires_at < ? RETURNING {JOB_COLUMNS}",
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
            .fetch_all(&self.reader)
            .await?;
        let rows = rows
            .iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect::<Result<Vec<(String, i64)>, QueueError>>()?;
        Ok(counts_by_state(rows))
    }
}

fn key_from_row(row: &SqliteRow) -> Result<KeyRecord, QueueError> {
    Ok(KeyRecord {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        scope: row.try_get("scope")?,
        prefix: row.try_get("prefix")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_key(&self, key: &KeyRecord, hash: &str) -> Result<(), QueueError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT OR IGNORE INTO tenants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(&key.tenant_id)
            .bind(&key.tenant_id)
            .bind(key.created_at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, scope, prefix, hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(key.id.to_string())
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
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, id: Uuid) -> Result<KeyRecord, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING {KEY_COLUMNS}"
        )))
        .bind(self.clock.now_ms())
        .bind(id.to_string())
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref()
            .map(key_from_row)
            .transpose()?
            .ok_or(QueueError::NotFound)
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ? AND revoked_at IS NULL"
        )))
        .bind(hash)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn any_active_key(&self) -> Result<bool, QueueError> {
        let n: i64 =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)")
                .fetch_one(&self.reader)
                .await?;
        Ok(n != 0)
    }

    async fn touch_key(&self, id: Uuid, at: i64) -> Result<(), QueueError> {
        sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
            .bind(at)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

fn delivery_from_row(row: &SqliteRow) -> Result<DeliveryRecord, QueueError> {
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        job_id: uuid_col(row, "job_id")?,
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

#[async_trait]
impl WebhookOutbox for SqliteStore {
    async fn webhook_secret(&self, tenant: &str, fresh: &str) -> Result<String, QueueError> {
        sqlx::query(
            "INSERT INTO tenant_secrets (tenant_id, webhook_secret, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(fresh)
        .bind(self.clock.now_ms())
        .execute(&self.writer)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT webhook_secret FROM tenant_secrets WHERE tenant_id = ?")
                .bind(tenant)
                .fetch_one(&self.writer)
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
            "UPDATE webhook_deliveries SET locked_until = ? WHERE id IN ( \
             SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ? \
             AND (locked_until IS NULL OR locked_until < ?) ORDER BY id LIMIT ?) RETURNING {DELIVERY_COLUMNS}"
        )))
        .bind(now + lock_ms)
        .bind(now)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.writer)
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
            "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, last_status = ?, \
             last_error = ?, next_attempt_at = ?, locked_until = NULL, \
             delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END WHERE id = ?",
        )
        .bind(state)
        .bind(status)
        .bind(error)
        .bind(next)
        .bind(state)
        .bind(now)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn deliveries(&self, tenant: &str, job: Uuid) -> Result<Vec<DeliveryRecord>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant_id = ? AND job_id = ? ORDER BY id"
        )))
        .bind(tenant)
        .bind(job.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(delivery_from_row).collect()
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
