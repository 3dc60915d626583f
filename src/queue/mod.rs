//! Durable job queue and model catalog. Handlers and workers use the traits; `sql.rs` holds
//! the statements both databases run, `sqlite.rs` the embedded database's own part and
//! `postgres.rs` that of the one a fleet of processes shares. The database URL picks one
//! ([`open`]).

#[cfg(test)]
mod contract;
#[cfg(test)]
mod schema;

pub mod postgres;
mod sql;
pub mod sqlite;

use crate::error::{ApiError, ErrorCode};
use async_trait::async_trait;
use serde::Serialize;
use uuid::Uuid;

/// The tenant of anonymous requests (no key exists yet, or `--allow-anonymous`); the
/// migrations create it.
pub const DEFAULT_TENANT: &str = "default";

/// What a client is told of a database error.
impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        use QueueError as Q;
        match e {
            Q::IdempotencyConflict => ApiError::new(
                ErrorCode::IdempotencyConflict,
                "this Idempotency-Key was already used with a different request",
            ),
            Q::ModelInUse => ApiError::new(
                ErrorCode::ModelInUse,
                "a queued or running job uses this model",
            ),
            Q::ModelHasJobs(n) => ApiError::new(
                ErrorCode::ModelHasJobs,
                format!(
                    "{n} job(s) were made from this model; their artifacts would go with it. \
                     DELETE /v1/models/{{id}}?cascade=true deletes them too"
                ),
            ),
            Q::DatasetInUse => ApiError::new(
                ErrorCode::DatasetInUse,
                "a queued or running job evaluates on this dataset",
            ),
            Q::NotCancellable(state) => ApiError::new(
                ErrorCode::JobNotCancellable,
                format!("the job is already {state}"),
            ),
            Q::NotFound => ApiError::new(ErrorCode::NotFound, "not found"),
            full if full.is_disk_full() => {
                tracing::warn!(error = %full, "disk full: the database refused a write");
                ApiError::disk_full()
            }
            other => ApiError::internal(other),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("not found")]
    NotFound,
    #[error("the idempotency key was used with a different request")]
    IdempotencyConflict,
    #[error("model is used by a queued or running job")]
    ModelInUse,
    #[error("{0} finished job(s) were made from the model")]
    ModelHasJobs(usize),
    #[error("dataset is used by a queued or running job")]
    DatasetInUse,
    #[error("job is already {0}")]
    NotCancellable(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

impl QueueError {
    /// The database could not write for want of space: SQLite's SQLITE_FULL (13; the write
    /// was rolled back), PostgreSQL's disk_full, or ENOSPC/EDQUOT from the file system.
    pub fn is_disk_full(&self) -> bool {
        match self {
            // SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100).
            QueueError::Db(sqlx::Error::Database(d)) => {
                matches!(d.code().as_deref(), Some("13") | Some("53100"))
            }
            QueueError::Db(sqlx::Error::Io(e)) => crate::error::is_disk_full(e),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone)]
pub struct ModelRecord {
    pub id: Uuid,
    pub tenant_id: String,
    pub name: String,
    pub format: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub tensor_count: u64,
    pub parameter_count: u64,
    pub blob_key: String,
    pub tensors_json: String,
    /// `[{name, dtype, shape}]` of a graph's inputs (ONNX); None for weight-only formats
    /// and for models stored before inputs were recorded.
    pub inputs_json: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct DatasetRecord {
    pub id: Uuid,
    pub tenant_id: String,
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
    /// The arrays' common axis-0 length; None when they differ (a dataset fed whole).
    pub rows: Option<u64>,
    pub has_labels: bool,
    /// `[{name, dtype, shape}]` of every array but `labels`.
    pub arrays_json: String,
    pub blob_key: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: Uuid,
    pub tenant_id: String,
    pub model_id: Uuid,
    pub state: JobState,
    pub spec: serde_json::Value,
    pub progress: f64,
    pub stage: Option<String>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub cancel_requested: bool,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub summary: Option<serde_json::Value>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ArtifactRecord {
    pub name: String,
    pub blob_key: String,
    pub size_bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub tenant_id: String,
    pub model_id: Uuid,
    pub spec: serde_json::Value,
    pub max_attempts: i64,
    pub idempotency_key: Option<String>,
    pub fingerprint: String,
}

/// What a model deletion leaves to remove from the blob store.
pub struct DeletedModel {
    pub blob_key: String,
    /// Their artifacts live under `artifacts/{job_id}/`.
    pub job_ids: Vec<Uuid>,
}

pub enum Enqueued {
    Created(JobRecord),
    /// The same idempotency key and request were seen before: the earlier job.
    Existing(JobRecord),
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub model_id: Option<Uuid>,
    pub limit: u32,
    /// Return jobs older than this id (ids are time-ordered uuid v7).
    pub before: Option<Uuid>,
}

/// What a heartbeat learns.
pub enum Heartbeat {
    Held {
        cancel_requested: bool,
    },
    /// Another worker (or the sweeper) took the job: stop and discard the result.
    Lost,
}

#[async_trait]
pub trait ModelCatalog: Send + Sync + 'static {
    async fn insert_model(&self, m: &ModelRecord) -> Result<(), QueueError>;
    async fn get_model(&self, tenant: &str, id: Uuid) -> Result<Option<ModelRecord>, QueueError>;
    async fn list_models(
        &self,
        tenant: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<ModelRecord>, QueueError>;
    /// Deletes the model; returns what to remove from the blob store. Never while a job of
    /// it is queued or running ([`QueueError::ModelInUse`]); with finished jobs only when
    /// `cascade` (they go with it), else [`QueueError::ModelHasJobs`].
    async fn delete_model(
        &self,
        tenant: &str,
        id: Uuid,
        cascade: bool,
    ) -> Result<DeletedModel, QueueError>;
    async fn insert_dataset(&self, d: &DatasetRecord) -> Result<(), QueueError>;
    async fn get_dataset(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<Option<DatasetRecord>, QueueError>;
    async fn list_datasets(
        &self,
        tenant: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<DatasetRecord>, QueueError>;
    /// Deletes the dataset's row; returns its blob key to remove.
    async fn delete_dataset(&self, tenant: &str, id: Uuid) -> Result<String, QueueError>;
    /// A search's sensitivity table measured on this model and dataset under `key`.
    async fn get_sensitivity(
        &self,
        tenant: &str,
        model: Uuid,
        dataset: Uuid,
        key: &str,
    ) -> Result<Option<String>, QueueError>;
    async fn put_sensitivity(
        &self,
        tenant: &str,
        model: Uuid,
        dataset: Uuid,
        key: &str,
        doc: &str,
    ) -> Result<(), QueueError>;
    async fn ping(&self) -> bool;
    /// The tenant's stored bytes and jobs (those created since `since` counted apart).
    async fn tenant_usage(&self, tenant: &str, since: i64) -> Result<TenantUsage, QueueError>;
}

/// What a tenant holds and does, for its quotas.
#[derive(Debug, Clone, Default)]
pub struct TenantUsage {
    /// Bytes of its models, datasets and artifacts.
    pub stored_bytes: u64,
    /// Its jobs queued or running.
    pub active_jobs: u64,
    /// Its jobs created at or after `since`.
    pub recent_jobs: u64,
    /// When the oldest of those was created.
    pub oldest_recent: Option<i64>,
}

/// An API key as stored: never the key itself, only its hash and first characters.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub id: Uuid,
    pub tenant_id: String,
    pub scope: String,
    pub prefix: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// API keys (see `crate::auth`).
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a key's hash for `tenant` (created if new).
    async fn insert_key(&self, key: &KeyRecord, hash: &str) -> Result<(), QueueError>;
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, QueueError>;
    /// Marks the key revoked; NotFound when no such key.
    async fn revoke_key(&self, id: Uuid) -> Result<KeyRecord, QueueError>;
    /// The unrevoked key with this hash.
    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, QueueError>;
    /// Whether any unrevoked key exists (then every request needs one).
    async fn any_active_key(&self) -> Result<bool, QueueError>;
    async fn touch_key(&self, id: Uuid, at: i64) -> Result<(), QueueError>;
}

/// A webhook delivery from the outbox (`crate::webhook`).
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: i64,
    pub job_id: Uuid,
    pub tenant_id: String,
    pub url: String,
    /// `job.succeeded`, `job.failed` or `job.cancelled`.
    pub event: String,
    /// `pending`, `delivered` or `gave_up`.
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

/// How one delivery attempt ended.
pub enum DeliveryOutcome {
    Delivered {
        status: i64,
    },
    Retry {
        status: Option<i64>,
        error: String,
        at: i64,
    },
    GaveUp {
        status: Option<i64>,
        error: String,
    },
}

/// The webhook outbox and the tenants' signing secrets.
#[async_trait]
pub trait WebhookOutbox: Send + Sync + 'static {
    /// The tenant's webhook secret; `fresh` becomes it if the tenant has none yet.
    async fn webhook_secret(&self, tenant: &str, fresh: &str) -> Result<String, QueueError>;
    /// Replaces the tenant's stored secret `old` by `new` (sealing it); false when it is no
    /// longer `old`.
    async fn reseal_webhook_secret(
        &self,
        tenant: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, QueueError>;
    /// The (tenant, secret) pairs whose stored secret does not start with `sealed` (written
    /// by a server that did not seal them).
    async fn plain_webhook_secrets(
        &self,
        sealed: &str,
    ) -> Result<Vec<(String, String)>, QueueError>;
    /// Pending deliveries due at `now`, locked for `lock_ms` so that no other process sends
    /// them meanwhile.
    async fn due_deliveries(
        &self,
        now: i64,
        lock_ms: i64,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>, QueueError>;
    async fn finish_delivery(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), QueueError>;
    /// A job's deliveries, oldest first.
    async fn deliveries(&self, tenant: &str, job: Uuid) -> Result<Vec<DeliveryRecord>, QueueError>;
}

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError>;
    async fn get_job(&self, tenant: &str, id: Uuid) -> Result<Option<JobRecord>, QueueError>;
    /// The job an idempotency key created, with its request fingerprint.
    async fn find_idempotent(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(JobRecord, String)>, QueueError>;
    async fn list_jobs(
        &self,
        tenant: &str,
        filter: &JobFilter,
    ) -> Result<Vec<JobRecord>, QueueError>;
    async fn artifacts(&self, job: Uuid) -> Result<Vec<ArtifactRecord>, QueueError>;
    /// Claims the oldest queued job for `worker`, with one `UPDATE … RETURNING`.
    async fn claim(&self, worker: &str, lease_ms: i64) -> Result<Option<JobRecord>, QueueError>;
    async fn heartbeat(
        &self,
        id: Uuid,
        worker: &str,
        lease_ms: i64,
        progress: f64,
        stage: &str,
    ) -> Result<Heartbeat, QueueError>;
    /// Records success and its artifacts in one transaction; false when the lease was lost.
    async fn complete(
        &self,
        id: Uuid,
        worker: &str,
        summary: &serde_json::Value,
        artifacts: &[ArtifactRecord],
    ) -> Result<bool, QueueError>;
    async fn fail(
        &self,
        id: Uuid,
        worker: &str,
        code: ErrorCode,
        message: &str,
    ) -> Result<bool, QueueError>;
    /// An attempt failed for a reason that may pass (a full disk, a failed database or
    /// blob-store write): the job goes back to the queue, not claimed for `backoff_ms`, or,
    /// when it has used all its attempts, fails with `code` and `message`. Returns the state
    /// it is left in (None when the lease was lost).
    async fn retry_later(
        &self,
        id: Uuid,
        worker: &str,
        code: ErrorCode,
        message: &str,
        backoff_ms: i64,
    ) -> Result<Option<JobState>, QueueError>;
    async fn mark_cancelled(&self, id: Uuid, worker: &str) -> Result<bool, QueueError>;
    /// Gives a claimed job back to the queue without counting the attempt (shutdown).
    async fn release(&self, id: Uuid, worker: &str) -> Result<bool, QueueError>;
    /// Queued → cancelled at once; running → cancel requested.
    async fn request_cancel(&self, tenant: &str, id: Uuid) -> Result<JobRecord, QueueError>;
    /// Requeues jobs whose lease expired; exhausted ones fail with `attempts_exhausted`.
    /// Returns the jobs it changed, as they are now.
    async fn sweep_expired(&self) -> Result<Vec<JobRecord>, QueueError>;
    async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, QueueError>;
}

/// The columns each store reads back, in the order its row decoders expect (the same names
/// in SQLite and PostgreSQL).
pub(crate) mod columns {
    pub const JOB: &str = "id, tenant_id, model_id, state, spec_json, progress, stage, attempts, max_attempts, \
         cancel_requested, error_code, error_message, summary_json, created_at, started_at, finished_at";
    pub const MODEL: &str =
        "id, tenant_id, name, format, size_bytes, sha256, tensor_count, parameter_count, \
         blob_key, tensors_json, inputs_json, created_at";
    pub const DATASET: &str =
        "id, tenant_id, name, size_bytes, sha256, rows, has_labels, arrays_json, blob_key, created_at";
    pub const KEY: &str = "id, tenant_id, scope, prefix, created_at, revoked_at, last_used_at";
    pub const DELIVERY: &str =
        "id, job_id, tenant_id, url, event, state, attempts, next_attempt_at, last_status, \
         last_error, created_at, delivered_at";
}

impl DeliveryOutcome {
    /// The delivery's new state, last status, last error and next attempt time.
    pub(crate) fn columns(&self, now: i64) -> (&'static str, Option<i64>, Option<&str>, i64) {
        match self {
            DeliveryOutcome::Delivered { status } => ("delivered", Some(*status), None, now),
            DeliveryOutcome::Retry { status, error, at } => {
                ("pending", *status, Some(error.as_str()), *at)
            }
            DeliveryOutcome::GaveUp { status, error } => {
                ("gave_up", *status, Some(error.as_str()), now)
            }
        }
    }
}

/// Every state with its count, from `(state, count)` rows (a state with no job counts 0).
pub(crate) fn counts_by_state(rows: Vec<(String, i64)>) -> Vec<(JobState, i64)> {
    let mut out: Vec<(JobState, i64)> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
    for (s, n) in rows {
        if let Some(slot) = out.iter_mut().find(|(st, _)| st.as_str() == s) {
            slot.1 = n;
        }
    }
    out
}

/// What other processes announce through a database they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A job became claimable: idle workers try to claim.
    JobQueued,
    /// A job event another process published (`crate::events`), as its JSON text.
    Event(String),
    /// The connection that listens was lost and has been reopened: whatever was announced
    /// meanwhile is gone (idle workers look for jobs, event streams catch up).
    Gap,
}

/// Everything the server keeps in its database, behind one handle.
#[async_trait]
pub trait Database: ModelCatalog + JobQueue + KeyStore + WebhookOutbox {
    async fn close(&self);
    /// Whether processes on other hosts may share this database: then wake-ups and job events
    /// travel through it ([`Database::listen`], [`Database::announce`]).
    fn shared(&self) -> bool;
    /// Forwards what other processes announce to `tx`, until `tx` is closed. Nothing arrives
    /// from a database that is not shared.
    async fn listen(&self, tx: tokio::sync::mpsc::Sender<Notice>) -> Result<(), QueueError>;
    /// Sends a job event's JSON text to every process listening (a shared database only).
    async fn announce(&self, payload: &str) -> Result<(), QueueError>;
}

#[async_trait]
impl Database for sqlite::SqliteStore {
    async fn close(&self) {
        sqlite::SqliteStore::close(self).await
    }
    fn shared(&self) -> bool {
        false
    }
    async fn listen(&self, _tx: tokio::sync::mpsc::Sender<Notice>) -> Result<(), QueueError> {
        Ok(())
    }
    async fn announce(&self, _payload: &str) -> Result<(), QueueError> {
        Ok(())
    }
}

#[async_trait]
impl Database for postgres::PgStore {
    async fn close(&self) {
        postgres::PgStore::close(self).await
    }
    fn shared(&self) -> bool {
        true
    }
    async fn listen(&self, tx: tokio::sync::mpsc::Sender<Notice>) -> Result<(), QueueError> {
        postgres::PgStore::listen(self, tx).await
    }
    async fn announce(&self, payload: &str) -> Result<(), QueueError> {
        postgres::PgStore::announce(self, payload).await
    }
}

/// Opens the database a URL names, running its migrations: `sqlite://PATH` (the embedded
/// default) or `postgres://…` / `postgresql://…`.
pub async fn open(
    url: &str,
    clock: std::sync::Arc<dyn Clock>,
) -> Result<std::sync::Arc<dyn Database>, QueueError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            postgres::PgStore::open(url, clock).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            sqlite::SqliteStore::open_with_clock(url, clock).await?,
        ))
    } else {
        // Never echo credentials a URL may carry.
        let scheme = url.split(':').next().unwrap_or_default();
        Err(QueueError::UnsupportedUrl(format!("{scheme}:…")))
    }
}

/// The time the queue reads for leases, backoffs and timestamps. Injected so that lease
/// expiry and backoff are tested by moving a clock instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock: what every server uses.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::util::now_ms()
    }
}

/// A clock that moves only when told to (the queue contract tests).
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    pub fn new(start_ms: i64) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicI64::new(start_ms))
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
