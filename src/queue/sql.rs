//! The SQL both databases run: one text per statement, written once. `sql_store!` stamps the
//! four store traits onto a backend's struct (it has a `writer` pool for writes, a `reader`
//! pool for reads and a `clock`), and the backend's [`Dialect`] says the little where the
//! dialects differ: how an id is bound, how a writing transaction begins, and the row locks
//! PostgreSQL takes where SQLite serializes every writer. Placeholders are `$N` in both.
//!
//! The lease protocol lives here (convention 6): claim with one `UPDATE … RETURNING`, every
//! later transition guarded by the lease owner and checked with `rows_affected`.

use super::QueueError;
use uuid::Uuid;

/// Where SQLite and PostgreSQL differ, for the statements of `sql_store!`.
pub(crate) trait Dialect {
    /// An id as bound and read: a uuid in PostgreSQL, its text in SQLite.
    type Id;
    /// The statement that begins a transaction that writes (SQLite's `BEGIN IMMEDIATE` takes
    /// the write lock at once, so two writers never both read and then collide).
    const BEGIN: &'static str;
    /// Appended to a `SELECT` whose rows the transaction changes next: PostgreSQL locks them;
    /// SQLite's writer holds the database already.
    const LOCK: &'static str;
    /// Appended to the `SELECT` that picks rows to claim: concurrent PostgreSQL claimers each
    /// take other rows instead of queueing behind one another's lock.
    const SKIP_LOCKED: &'static str;
    fn id(u: Uuid) -> Self::Id;
    fn uuid(id: Self::Id) -> Result<Uuid, QueueError>;
}

/// Whether a statement failed on a foreign key (the row it points at was deleted meanwhile).
pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_foreign_key_violation())
}

/// Implements `ModelCatalog`, `JobQueue`, `KeyStore` and `WebhookOutbox` for `$store`, a
/// backend of database `$db` that implements [`Dialect`].
macro_rules! sql_store {
    ($store:ident, $db:ty) => {
        mod shared {
            use super::$store;
            use $crate::error::ErrorCode;
            use $crate::queue::columns::{
                DATASET as DATASET_COLUMNS, DELIVERY as DELIVERY_COLUMNS, JOB as JOB_COLUMNS,
                KEY as KEY_COLUMNS, MODEL as MODEL_COLUMNS,
            };
            use $crate::queue::sql::{is_foreign_key_violation, Dialect};
            use $crate::queue::*;
            use async_trait::async_trait;
            use sqlx::{AssertSqlSafe, Row};
            use uuid::Uuid;

            type R = <$db as sqlx::Database>::Row;
            type Id = <$store as Dialect>::Id;

            fn id(u: Uuid) -> Id {
                <$store as Dialect>::id(u)
            }

            fn uuid_col(row: &R, col: &str) -> Result<Uuid, QueueError> {
                <$store as Dialect>::uuid(row.try_get::<Id, _>(col)?)
            }

            fn json_col(row: &R, col: &str) -> Result<Option<serde_json::Value>, QueueError> {
                let s: Option<String> = row.try_get(col)?;
                s.map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err(|e| QueueError::Corrupt(format!("{col}: {e}")))
            }

            fn count(row: &R, col: &str) -> Result<u64, QueueError> {
                Ok(row.try_get::<i64, _>(col)?.max(0) as u64)
            }

            fn job_from_row(row: &R) -> Result<JobRecord, QueueError> {
                let state: String = row.try_get("state")?;
                Ok(JobRecord {
                    id: uuid_col(row, "id")?,
                    tenant_id: row.try_get("tenant_id")?,
                    model_id: uuid_col(row, "model_id")?,
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

            fn jobs(rows: &[R]) -> Result<Vec<JobRecord>, QueueError> {
                rows.iter().map(job_from_row).collect()
            }

            fn model_from_row(row: &R) -> Result<ModelRecord, QueueError> {
                Ok(ModelRecord {
                    id: uuid_col(row, "id")?,
                    tenant_id: row.try_get("tenant_id")?,
                    name: row.try_get("name")?,
                    format: row.try_get("format")?,
                    size_bytes: count(row, "size_bytes")?,
                    sha256: row.try_get("sha256")?,
                    tensor_count: count(row, "tensor_count")?,
                    parameter_count: count(row, "parameter_count")?,
                    blob_key: row.try_get("blob_key")?,
                    tensors_json: row.try_get("tensors_json")?,
                    inputs_json: row.try_get("inputs_json")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn dataset_from_row(row: &R) -> Result<DatasetRecord, QueueError> {
                Ok(DatasetRecord {
                    id: uuid_col(row, "id")?,
                    tenant_id: row.try_get("tenant_id")?,
                    name: row.try_get("name")?,
                    size_bytes: count(row, "size_bytes")?,
                    sha256: row.try_get("sha256")?,
                    rows: row.try_get::<Option<i64>, _>("rows")?.map(|r| r as u64),
                    has_labels: row.try_get("has_labels")?,
                    arrays_json: row.try_get("arrays_json")?,
                    blob_key: row.try_get("blob_key")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn key_from_row(row: &R) -> Result<KeyRecord, QueueError> {
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

            fn delivery_from_row(row: &R) -> Result<DeliveryRecord, QueueError> {
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

            impl $store {
                /// The tenant's row of `table` with this id.
                async fn one<T>(
                    &self,
                    table: &str,
                    columns: &str,
                    tenant: &str,
                    rid: Uuid,
                    decode: fn(&R) -> Result<T, QueueError>,
                ) -> Result<Option<T>, QueueError> {
                    let row = sqlx::query(AssertSqlSafe(format!(
                        "SELECT {columns} FROM {table} WHERE id = $1 AND tenant_id = $2"
                    )))
                    .bind(id(rid))
                    .bind(tenant)
                    .fetch_optional(&self.reader)
                    .await?;
                    row.as_ref().map(decode).transpose()
                }

                /// A page of the tenant's rows of `table`, newest first, older than `before`.
                async fn page<T>(
                    &self,
                    table: &str,
                    columns: &str,
                    tenant: &str,
                    limit: u32,
                    before: Option<Uuid>,
                    decode: fn(&R) -> Result<T, QueueError>,
                ) -> Result<Vec<T>, QueueError> {
                    let rows = sqlx::query(AssertSqlSafe(format!(
                        "SELECT {columns} FROM {table} WHERE tenant_id = $1 \
                         AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
                    )))
                    .bind(tenant)
                    .bind(before.map(id))
                    .bind(i64::from(limit))
                    .fetch_all(&self.reader)
                    .await?;
                    rows.iter().map(decode).collect()
                }

                async fn begin(&self) -> Result<sqlx::Transaction<'static, $db>, QueueError> {
                    Ok(self
                        .writer
                        .begin_with(<$store as Dialect>::BEGIN)
                        .await?)
                }

                /// The job an idempotency key made, with the fingerprint of its request.
                async fn idempotent_prior(
                    &self,
                    pool: &sqlx::Pool<$db>,
                    tenant: &str,
                    key: &str,
                ) -> Result<Option<(JobRecord, String)>, QueueError> {
                    let row = sqlx::query(AssertSqlSafe(format!(
                        "SELECT {JOB_COLUMNS}, request_fingerprint FROM jobs \
                         WHERE tenant_id = $1 AND idempotency_key = $2"
                    )))
                    .bind(tenant)
                    .bind(key)
                    .fetch_optional(pool)
                    .await?;
                    match row {
                        None => Ok(None),
                        Some(r) => {
                            let fp: Option<String> = r.try_get("request_fingerprint")?;
                            Ok(Some((job_from_row(&r)?, fp.unwrap_or_default())))
                        }
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

            #[async_trait]
            impl ModelCatalog for $store {
                async fn insert_model(&self, m: &ModelRecord) -> Result<(), QueueError> {
                    sqlx::query(
                        "INSERT INTO models (id, tenant_id, name, format, size_bytes, sha256, tensor_count, \
                         parameter_count, blob_key, tensors_json, inputs_json, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    )
                    .bind(id(m.id))
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

                async fn get_model(&self, tenant: &str, mid: Uuid) -> Result<Option<ModelRecord>, QueueError> {
                    self.one("models", MODEL_COLUMNS, tenant, mid, model_from_row).await
                }

                async fn list_models(
                    &self,
                    tenant: &str,
                    limit: u32,
                    before: Option<Uuid>,
                ) -> Result<Vec<ModelRecord>, QueueError> {
                    self.page("models", MODEL_COLUMNS, tenant, limit, before, model_from_row).await
                }

                async fn delete_model(
                    &self,
                    tenant: &str,
                    mid: Uuid,
                    cascade: bool,
                ) -> Result<DeletedModel, QueueError> {
                    let mut tx = self.begin().await?;
                    // PostgreSQL's row lock makes a concurrent enqueue (whose foreign key
                    // check shares-locks the model) wait for this deletion, or this deletion
                    // wait for its commit.
                    let model_key: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                        "SELECT blob_key FROM models WHERE id = $1 AND tenant_id = $2{}",
                        <$store as Dialect>::LOCK
                    )))
                    .bind(id(mid))
                    .bind(tenant)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(model_key) = model_key else {
                        return Err(QueueError::NotFound);
                    };
                    let active: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM jobs WHERE model_id = $1 AND state IN ('queued', 'running')",
                    )
                    .bind(id(mid))
                    .fetch_one(&mut *tx)
                    .await?;
                    if active > 0 {
                        return Err(QueueError::ModelInUse);
                    }
                    let jobs: Vec<Id> = sqlx::query_scalar("SELECT id FROM jobs WHERE model_id = $1")
                        .bind(id(mid))
                        .fetch_all(&mut *tx)
                        .await?;
                    let job_ids = jobs
                        .into_iter()
                        .map(<$store as Dialect>::uuid)
                        .collect::<Result<Vec<_>, _>>()?;
                    if !cascade && !job_ids.is_empty() {
                        return Err(QueueError::ModelHasJobs(job_ids.len()));
                    }
                    sqlx::query("DELETE FROM models WHERE id = $1")
                        .bind(id(mid))
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
                        "INSERT INTO datasets (id, tenant_id, name, size_bytes, sha256, rows, has_labels, \
                         arrays_json, blob_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    )
                    .bind(id(d.id))
                    .bind(&d.tenant_id)
                    .bind(&d.name)
                    .bind(d.size_bytes as i64)
                    .bind(&d.sha256)
                    .bind(d.rows.map(|r| r as i64))
                    .bind(d.has_labels)
                    .bind(&d.arrays_json)
                    .bind(&d.blob_key)
                    .bind(d.created_at)
                    .execute(&self.writer)
                    .await?;
                    Ok(())
                }

                async fn get_dataset(&self, tenant: &str, did: Uuid) -> Result<Option<DatasetRecord>, QueueError> {
                    self.one("datasets", DATASET_COLUMNS, tenant, did, dataset_from_row).await
                }

                async fn list_datasets(
                    &self,
                    tenant: &str,
                    limit: u32,
                    before: Option<Uuid>,
                ) -> Result<Vec<DatasetRecord>, QueueError> {
                    self.page("datasets", DATASET_COLUMNS, tenant, limit, before, dataset_from_row).await
                }

                async fn get_sensitivity(
                    &self,
                    tenant: &str,
                    model: Uuid,
                    dataset: Uuid,
                    key: &str,
                ) -> Result<Option<String>, QueueError> {
                    Ok(sqlx::query_scalar(
                        "SELECT doc FROM sensitivity_cache WHERE tenant_id = $1 AND model_id = $2 \
                         AND dataset_id = $3 AND key = $4",
                    )
                    .bind(tenant)
                    .bind(id(model))
                    .bind(id(dataset))
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
                    // The model or dataset may have been deleted while the job ran: then
                    // nothing is kept.
                    let r = sqlx::query(
                        "INSERT INTO sensitivity_cache (model_id, dataset_id, tenant_id, key, doc, created_at) \
                         SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM models WHERE id = $1) \
                         AND EXISTS (SELECT 1 FROM datasets WHERE id = $2) \
                         ON CONFLICT (model_id, dataset_id, key) DO UPDATE SET tenant_id = excluded.tenant_id, \
                         doc = excluded.doc, created_at = excluded.created_at",
                    )
                    .bind(id(model))
                    .bind(id(dataset))
                    .bind(tenant)
                    .bind(key)
                    .bind(doc)
                    .bind(self.clock.now_ms())
                    .execute(&self.writer)
                    .await;
                    match r {
                        Ok(_) => Ok(()),
                        Err(e) if is_foreign_key_violation(&e) => Ok(()),
                        Err(e) => Err(e.into()),
                    }
                }

                async fn delete_dataset(&self, tenant: &str, did: Uuid) -> Result<String, QueueError> {
                    let mut tx = self.begin().await?;
                    let key: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                        "SELECT blob_key FROM datasets WHERE id = $1 AND tenant_id = $2{}",
                        <$store as Dialect>::LOCK
                    )))
                    .bind(id(did))
                    .bind(tenant)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(key) = key else {
                        return Err(QueueError::NotFound);
                    };
                    // A job names its dataset only in its spec; the id is a uuid (hex digits
                    // and dashes, none a LIKE wildcard), so a substring match on the stored
                    // JSON finds exactly the jobs that name it.
                    let active: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM jobs WHERE tenant_id = $1 AND state IN ('queued', 'running') \
                         AND spec_json LIKE '%' || $2 || '%'",
                    )
                    .bind(tenant)
                    .bind(did.to_string())
                    .fetch_one(&mut *tx)
                    .await?;
                    if active > 0 {
                        return Err(QueueError::DatasetInUse);
                    }
                    sqlx::query("DELETE FROM datasets WHERE id = $1")
                        .bind(id(did))
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(key)
                }

                async fn tenant_usage(&self, tenant: &str, since: i64) -> Result<TenantUsage, QueueError> {
                    let row = sqlx::query(
                        "SELECT CAST(\
                         (SELECT COALESCE(SUM(size_bytes), 0) FROM models WHERE tenant_id = $1) + \
                         (SELECT COALESCE(SUM(size_bytes), 0) FROM datasets WHERE tenant_id = $1) + \
                         (SELECT COALESCE(SUM(size_bytes), 0) FROM artifacts WHERE tenant_id = $1) AS BIGINT) AS stored, \
                         (SELECT COUNT(*) FROM jobs WHERE tenant_id = $1 AND state IN ('queued', 'running')) AS active, \
                         (SELECT COUNT(*) FROM jobs WHERE tenant_id = $1 AND created_at >= $2) AS recent, \
                         (SELECT MIN(created_at) FROM jobs WHERE tenant_id = $1 AND created_at >= $2) AS oldest",
                    )
                    .bind(tenant)
                    .bind(since)
                    .fetch_one(&self.reader)
                    .await?;
                    Ok(TenantUsage {
                        stored_bytes: count(&row, "stored")?,
                        active_jobs: count(&row, "active")?,
                        recent_jobs: count(&row, "recent")?,
                        oldest_recent: row.try_get("oldest")?,
                    })
                }

                async fn ping(&self) -> bool {
                    sqlx::query("SELECT 1").execute(&self.reader).await.is_ok()
                        && sqlx::query("SELECT 1").execute(&self.writer).await.is_ok()
                }
            }

            #[async_trait]
            impl JobQueue for $store {
                async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
                    if let Some(key) = &job.idempotency_key {
                        if let Some(prior) = self.idempotent_prior(&self.writer, &job.tenant_id, key).await? {
                            return replay(prior, &job.fingerprint);
                        }
                    }
                    // The model must be the tenant's; the foreign key catches one deleted
                    // meanwhile, and the unique (tenant, key) decides between two requests
                    // racing with one key.
                    let row = sqlx::query(AssertSqlSafe(format!(
                        "INSERT INTO jobs (id, tenant_id, model_id, state, spec_json, max_attempts, \
                         idempotency_key, request_fingerprint, created_at) \
                         SELECT $1, $2, $3, 'queued', $4, $5, $6, $7, $8 \
                         WHERE EXISTS (SELECT 1 FROM models WHERE id = $3 AND tenant_id = $2) \
                         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING {JOB_COLUMNS}"
                    )))
                    .bind(id(job.id))
                    .bind(&job.tenant_id)
                    .bind(id(job.model_id))
                    .bind(job.spec.to_string())
                    .bind(job.max_attempts)
                    .bind(&job.idempotency_key)
                    .bind(&job.fingerprint)
                    .bind(self.clock.now_ms())
                    .fetch_optional(&self.writer)
                    .await;
                    let row = match row {
                        Err(e) if is_foreign_key_violation(&e) => return Err(QueueError::NotFound),
                        r => r?,
                    };
                    match (row, &job.idempotency_key) {
                        (Some(r), _) => Ok(Enqueued::Created(job_from_row(&r)?)),
                        // Another request with the same key won the race.
                        (None, Some(key)) => {
                            match self.idempotent_prior(&self.writer, &job.tenant_id, key).await? {
                                Some(prior) => replay(prior, &job.fingerprint),
                                None => Err(QueueError::NotFound),
                            }
                        }
                        (None, None) => Err(QueueError::NotFound),
                    }
                }

                async fn get_job(&self, tenant: &str, jid: Uuid) -> Result<Option<JobRecord>, QueueError> {
                    self.one("jobs", JOB_COLUMNS, tenant, jid, job_from_row).await
                }

                async fn find_idempotent(
                    &self,
                    tenant: &str,
                    key: &str,
                ) -> Result<Option<(JobRecord, String)>, QueueError> {
                    self.idempotent_prior(&self.reader, tenant, key).await
                }

                async fn list_jobs(&self, tenant: &str, f: &JobFilter) -> Result<Vec<JobRecord>, QueueError> {
                    let rows = sqlx::query(AssertSqlSafe(format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND ($2 IS NULL OR state = $2) \
                         AND ($3 IS NULL OR model_id = $3) AND ($4 IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
                    )))
                    .bind(tenant)
                    .bind(f.state.map(|s| s.as_str()))
                    .bind(f.model_id.map(id))
                    .bind(f.before.map(id))
                    .bind(i64::from(f.limit))
                    .fetch_all(&self.reader)
                    .await?;
                    jobs(&rows)
                }

                async fn artifacts(&self, job: Uuid) -> Result<Vec<ArtifactRecord>, QueueError> {
                    let rows = sqlx::query(
                        "SELECT name, blob_key, size_bytes, sha256 FROM artifacts WHERE job_id = $1 ORDER BY name",
                    )
                    .bind(id(job))
                    .fetch_all(&self.reader)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            Ok(ArtifactRecord {
                                name: r.try_get("name")?,
                                blob_key: r.try_get("blob_key")?,
                                size_bytes: count(r, "size_bytes")?,
                                sha256: r.try_get("sha256")?,
                            })
                        })
                        .collect()
                }

                async fn claim(&self, worker: &str, lease_ms: i64) -> Result<Option<JobRecord>, QueueError> {
                    let now = self.clock.now_ms();
                    let row = sqlx::query(AssertSqlSafe(format!(
                        "UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = $2, \
                         attempts = attempts + 1, started_at = COALESCE(started_at, $3), stage = 'claimed', progress = 0 \
                         WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= $3) \
                         ORDER BY id LIMIT 1{}) RETURNING {JOB_COLUMNS}",
                        <$store as Dialect>::SKIP_LOCKED
                    )))
                    .bind(worker)
                    .bind(now + lease_ms)
                    .bind(now)
                    .fetch_optional(&self.writer)
                    .await?;
                    row.as_ref().map(job_from_row).transpose()
                }

                async fn heartbeat(
                    &self,
                    jid: Uuid,
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
                    .bind(id(jid))
                    .bind(worker)
                    .fetch_optional(&self.writer)
                    .await?;
                    Ok(match row {
                        Some(cancel_requested) => Heartbeat::Held { cancel_requested },
                        None => Heartbeat::Lost,
                    })
                }

                async fn complete(
                    &self,
                    jid: Uuid,
                    worker: &str,
                    summary: &serde_json::Value,
                    artifacts: &[ArtifactRecord],
                ) -> Result<bool, QueueError> {
                    let mut tx = self.begin().await?;
                    let now = self.clock.now_ms();
                    let done = sqlx::query(
                        "UPDATE jobs SET state = 'succeeded', progress = 1, stage = 'done', summary_json = $1, \
                         finished_at = $2, lease_owner = NULL, lease_expires_at = NULL \
                         WHERE id = $3 AND lease_owner = $4 AND state = 'running'",
                    )
                    .bind(summary.to_string())
                    .bind(now)
                    .bind(id(jid))
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
                        .bind(id(jid))
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(true)
                }

                async fn fail(
                    &self,
                    jid: Uuid,
                    worker: &str,
                    code: ErrorCode,
                    message: &str,
                ) -> Result<bool, QueueError> {
                    let r = sqlx::query(
                        "UPDATE jobs SET state = 'failed', error_code = $1, error_message = $2, finished_at = $3, \
                         stage = 'failed', lease_owner = NULL, lease_expires_at = NULL \
                         WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
                    )
                    .bind(code.as_str())
                    .bind(message)
                    .bind(self.clock.now_ms())
                    .bind(id(jid))
                    .bind(worker)
                    .execute(&self.writer)
                    .await?;
                    Ok(r.rows_affected() == 1)
                }

                async fn retry_later(
                    &self,
                    jid: Uuid,
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
                         error_message = CASE WHEN attempts >= max_attempts \
                             THEN $2 || ' (on each of ' || attempts || ' attempts)' ELSE error_message END, \
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
                    .bind(id(jid))
                    .bind(worker)
                    .fetch_optional(&self.writer)
                    .await?;
                    Ok(state.as_deref().and_then(JobState::parse))
                }

                async fn mark_cancelled(&self, jid: Uuid, worker: &str) -> Result<bool, QueueError> {
                    let r = sqlx::query(
                        "UPDATE jobs SET state = 'cancelled', finished_at = $1, stage = 'cancelled', \
                         lease_owner = NULL, lease_expires_at = NULL \
                         WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
                    )
                    .bind(self.clock.now_ms())
                    .bind(id(jid))
                    .bind(worker)
                    .execute(&self.writer)
                    .await?;
                    Ok(r.rows_affected() == 1)
                }

                async fn release(&self, jid: Uuid, worker: &str) -> Result<bool, QueueError> {
                    let r = sqlx::query(
                        "UPDATE jobs SET state = 'queued', \
                         attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                         stage = 'requeued at shutdown', progress = 0, lease_owner = NULL, lease_expires_at = NULL \
                         WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
                    )
                    .bind(id(jid))
                    .bind(worker)
                    .execute(&self.writer)
                    .await?;
                    Ok(r.rows_affected() == 1)
                }

                async fn request_cancel(&self, tenant: &str, jid: Uuid) -> Result<JobRecord, QueueError> {
                    let mut tx = self.begin().await?;
                    let row = sqlx::query(AssertSqlSafe(format!(
                        "UPDATE jobs SET state = CASE state WHEN 'queued' THEN 'cancelled' ELSE state END, \
                         finished_at = CASE state WHEN 'queued' THEN $1 ELSE finished_at END, \
                         stage = CASE state WHEN 'queued' THEN 'cancelled' ELSE stage END, \
                         cancel_requested = TRUE WHERE id = $2 AND tenant_id = $3 \
                         AND state IN ('queued', 'running') RETURNING {JOB_COLUMNS}"
                    )))
                    .bind(self.clock.now_ms())
                    .bind(id(jid))
                    .bind(tenant)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(row) = row else {
                        let state: Option<String> =
                            sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 AND tenant_id = $2")
                                .bind(id(jid))
                                .bind(tenant)
                                .fetch_optional(&mut *tx)
                                .await?;
                        return Err(match state {
                            Some(s) => QueueError::NotCancellable(s),
                            None => QueueError::NotFound,
                        });
                    };
                    let rec = job_from_row(&row)?;
                    tx.commit().await?;
                    Ok(rec)
                }

                async fn sweep_expired(&self) -> Result<Vec<JobRecord>, QueueError> {
                    // Every process sweeps; each UPDATE re-checks its condition on the rows it
                    // changes, so two sweepers never both requeue one job.
                    let now = self.clock.now_ms();
                    let mut tx = self.begin().await?;
                    // A constant of ErrorCode, not client input.
                    let exhausted = ErrorCode::AttemptsExhausted.as_str();
                    let failed = format!(
                        "state = 'failed', error_code = '{exhausted}', error_message = \
                         'the job''s worker stopped responding on each of its ' || attempts || ' attempts', \
                         stage = 'failed', finished_at = $1"
                    );
                    let mut rows = Vec::new();
                    for (set, condition) in [
                        ("state = 'cancelled', stage = 'cancelled', finished_at = $1", "cancel_requested = TRUE"),
                        (failed.as_str(), "attempts >= max_attempts"),
                        ("state = 'queued', stage = 'requeued after lease expiry', progress = 0", "TRUE"),
                    ] {
                        rows.extend(
                            sqlx::query(AssertSqlSafe(format!(
                                "UPDATE jobs SET {set}, lease_owner = NULL, lease_expires_at = NULL \
                                 WHERE state = 'running' AND lease_expires_at < $1 AND {condition} \
                                 RETURNING {JOB_COLUMNS}"
                            )))
                            .bind(now)
                            .fetch_all(&mut *tx)
                            .await?,
                        );
                    }
                    tx.commit().await?;
                    jobs(&rows)
                }

                async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, QueueError> {
                    let rows: Vec<(String, i64)> =
                        sqlx::query_as("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
                            .fetch_all(&self.reader)
                            .await?;
                    Ok(counts_by_state(rows))
                }
            }

            #[async_trait]
            impl KeyStore for $store {
                async fn insert_key(&self, key: &KeyRecord, hash: &str) -> Result<(), QueueError> {
                    let mut tx = self.begin().await?;
                    sqlx::query(
                        "INSERT INTO tenants (id, name, created_at) VALUES ($1, $1, $2) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(&key.tenant_id)
                    .bind(key.created_at)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO api_keys (id, tenant_id, scope, prefix, hash, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(id(key.id))
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

                async fn revoke_key(&self, kid: Uuid) -> Result<KeyRecord, QueueError> {
                    let row = sqlx::query(AssertSqlSafe(format!(
                        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING {KEY_COLUMNS}"
                    )))
                    .bind(self.clock.now_ms())
                    .bind(id(kid))
                    .fetch_optional(&self.writer)
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
                    .fetch_optional(&self.reader)
                    .await?;
                    row.as_ref().map(key_from_row).transpose()
                }

                async fn any_active_key(&self) -> Result<bool, QueueError> {
                    Ok(sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)",
                    )
                    .fetch_one(&self.reader)
                    .await?)
                }

                async fn touch_key(&self, kid: Uuid, at: i64) -> Result<(), QueueError> {
                    sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                        .bind(at)
                        .bind(id(kid))
                        .execute(&self.writer)
                        .await?;
                    Ok(())
                }
            }

            #[async_trait]
            impl WebhookOutbox for $store {
                async fn webhook_secret(&self, tenant: &str, fresh: &str) -> Result<String, QueueError> {
                    sqlx::query(
                        "INSERT INTO tenant_secrets (tenant_id, webhook_secret, created_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (tenant_id) DO NOTHING",
                    )
                    .bind(tenant)
                    .bind(fresh)
                    .bind(self.clock.now_ms())
                    .execute(&self.writer)
                    .await?;
                    Ok(
                        sqlx::query_scalar("SELECT webhook_secret FROM tenant_secrets WHERE tenant_id = $1")
                            .bind(tenant)
                            .fetch_one(&self.writer)
                            .await?,
                    )
                }

                async fn reseal_webhook_secret(&self, tenant: &str, old: &str, new: &str) -> Result<bool, QueueError> {
                    let r = sqlx::query(
                        "UPDATE tenant_secrets SET webhook_secret = $3 WHERE tenant_id = $1 AND webhook_secret = $2",
                    )
                    .bind(tenant)
                    .bind(old)
                    .bind(new)
                    .execute(&self.writer)
                    .await?;
                    Ok(r.rows_affected() == 1)
                }

                async fn plain_webhook_secrets(&self, sealed: &str) -> Result<Vec<(String, String)>, QueueError> {
                    Ok(sqlx::query_as(
                        "SELECT tenant_id, webhook_secret FROM tenant_secrets \
                         WHERE substr(webhook_secret, 1, length($1)) <> $1 ORDER BY tenant_id",
                    )
                    .bind(sealed)
                    .fetch_all(&self.writer)
                    .await?)
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
                         AND (locked_until IS NULL OR locked_until < $2) ORDER BY id LIMIT $3{}) \
                         RETURNING {DELIVERY_COLUMNS}",
                        <$store as Dialect>::SKIP_LOCKED
                    )))
                    .bind(now + lock_ms)
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

                async fn finish_delivery(&self, did: i64, outcome: &DeliveryOutcome) -> Result<(), QueueError> {
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
                    .bind(did)
                    .execute(&self.writer)
                    .await?;
                    Ok(())
                }

                async fn deliveries(&self, tenant: &str, job: Uuid) -> Result<Vec<DeliveryRecord>, QueueError> {
                    let rows = sqlx::query(AssertSqlSafe(format!(
                        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant_id = $1 AND job_id = $2 ORDER BY id"
                    )))
                    .bind(tenant)
                    .bind(id(job))
                    .fetch_all(&self.reader)
                    .await?;
                    rows.iter().map(delivery_from_row).collect()
                }
            }
        }
    };
}

pub(crate) use sql_store;
