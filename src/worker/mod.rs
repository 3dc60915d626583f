//! The worker pool: tasks that claim jobs and run the CPU work on tokio's blocking pool.

use crate::compress::Control;
use crate::error::ErrorCode;
use crate::job::RunError;
use crate::queue::{ArtifactRecord, Heartbeat, JobRecord};
use crate::state::AppState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

pub mod scratch;

/// What one call to [`try_execute_one`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was queued.
    Empty,
    Succeeded,
    Failed,
    Cancelled,
    /// Shutdown stopped the job; it went back to the queue.
    Requeued,
    /// Another worker took the job over (our lease expired); our result was discarded.
    LeaseLost,
    /// The attempt failed for a reason that may pass; the job waits out a backoff.
    Retrying,
    /// The scratch directory has no room (see [`scratch`]): nothing was claimed.
    NoRoom,
}

/// The backoff before a failed attempt's retry: `base_ms` doubled for each attempt already
/// made, at most five minutes.
pub fn retry_backoff_ms(base_ms: u64, attempts_made: i64) -> u64 {
    let doublings = attempts_made.clamp(1, 20) as u32 - 1;
    base_ms.saturating_mul(1u64 << doublings).min(300_000)
}

/// The code and message a failed attempt records: a full disk (the file system's ENOSPC or
/// EDQUOT, or SQLite's SQLITE_FULL) is `insufficient_storage`; anything else is `internal`
/// (the detail goes to the log, not to the user).
fn attempt_error(e: &anyhow::Error) -> (ErrorCode, String) {
    let disk_full = e.chain().any(|c| {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return crate::error::is_disk_full(io);
        }
        if let Some(crate::store::StoreError::Io(io)) = c.downcast_ref::<crate::store::StoreError>()
        {
            return crate::error::is_disk_full(io);
        }
        if let Some(q) = c.downcast_ref::<crate::queue::QueueError>() {
            return q.is_disk_full();
        }
        c.downcast_ref::<RunError>()
            .is_some_and(|r| matches!(r, RunError::Storage { .. }))
    });
    if let Some(no_room) = e.chain().find_map(|c| c.downcast_ref::<scratch::NoRoom>()) {
        (ErrorCode::InsufficientStorage, no_room.0.clone())
    } else if disk_full {
        (
            ErrorCode::InsufficientStorage,
            "the server's disk was full while the job ran".into(),
        )
    } else {
        (
            ErrorCode::Internal,
            "internal error; see the server log".into(),
        )
    }
}

pub fn spawn_pool(state: AppState, workers: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|n| {
            let state = state.clone();
            tokio::spawn(async move {
                let worker = format!("{}/w{n}", state.instance_id);
                let mut errors = 0i64;
                // Without wake-ups from the database, a job another process queued is found
                // by looking; with them, the look is only a safety net (and the moment a
                // retry's backoff ends).
                let idle = Duration::from_millis(if state.wakeups { 5_000 } else { 500 });
                loop {
                    if state.stop_claiming.is_cancelled() {
                        break;
                    }
                    match try_execute_one_as(&state, &worker).await {
                        Ok(Outcome::Empty | Outcome::NoRoom) => {
                            tokio::select! {
                                _ = state.job_queued.notified() => {}
                                _ = tokio::time::sleep(idle) => {}
                                _ = state.stop_claiming.cancelled() => break,
                            }
                        }
                        Ok(_) => errors = 0,
                        Err(e) => {
                            // The queue itself failed (a database error): back off, doubling
                            // up to 30 s, so a broken database does not spin the loop.
                            errors += 1;
                            if attempt_error(&e).0 == ErrorCode::InsufficientStorage {
                                state.note_disk_full();
                            }
                            let pause = retry_backoff_ms(500, errors).min(30_000);
                            tracing::error!(error = %e, pause_ms = pause, "worker loop error");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                                _ = state.stop_claiming.cancelled() => break,
                            }
                            continue;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Periodically requeues jobs whose worker died (lease expired).
pub fn spawn_sweeper(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = Duration::from_millis((state.config.lease_ms / 2).clamp(50, 5_000));
        loop {
            match state.queue.sweep_expired().await {
                Ok(swept) if swept.is_empty() => {}
                Ok(swept) => {
                    tracing::warn!(
                        jobs = swept.len(),
                        "requeued or closed jobs with expired leases"
                    );
                    for j in &swept {
                        state.events.job_changed(j);
                    }
                    state.job_queued.notify_waiters();
                }
                Err(e) => tracing::error!(error = %e, "sweeper failed"),
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// Claims and runs one job to its end. Tests call this to drain the queue without sleeping.
pub async fn try_execute_one(state: &AppState) -> anyhow::Result<Outcome> {
    let worker = format!("{}/direct", state.instance_id);
    try_execute_one_as(state, &worker).await
}

struct JobControl {
    progress: Mutex<(f64, String)>,
    /// The structured detail of the current phase (search trial, training epoch), for the
    /// event streams only.
    detail: Mutex<serde_json::Value>,
    /// Where a new trial or epoch is published at once (not only at the next heartbeat, which
    /// a fast job can outrun): the hub, the job's tenant and id, and the last key published.
    events: (AppState, String, uuid::Uuid),
    detail_key: Mutex<String>,
    cancel: Arc<AtomicBool>,
    hard_stop: tokio_util::sync::CancellationToken,
    #[allow(dead_code)]
    failpoint: Option<String>,
}

impl JobControl {
    /// A `progress` event for the job's streams.
    fn publish(&self, fraction: f64, stage: &str, detail: &serde_json::Value) {
        let (state, tenant, id) = &self.events;
        state.events.progress(tenant, *id, fraction, stage, detail);
    }
}

impl Control for JobControl {
    fn progress(&self, fraction: f64, stage: &str) {
        if let Ok(mut p) = self.progress.lock() {
            *p = (fraction, stage.to_string());
        }
    }
    fn detail(&self, detail: serde_json::Value) {
        // A new trial, epoch or validation figure is news; a training step alone is not.
        let key = ["phase", "trial", "epoch", "validation"]
            .map(|k| detail.get(k).map(|v| v.to_string()).unwrap_or_default())
            .join("/");
        let fresh = self
            .detail_key
            .lock()
            .map(|mut last| {
                let fresh = *last != key;
                *last = key;
                fresh
            })
            .unwrap_or(false);
        if fresh {
            let (p, s) = self.progress.lock().map(|g| g.clone()).unwrap_or_default();
            self.publish(p, &s, &detail);
        }
        if let Ok(mut d) = self.detail.lock() {
            *d = detail;
        }
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.hard_stop.is_cancelled()
    }
    fn tensor_done(&self) {
        #[cfg(feature = "failpoints")]
        if let Some(fp) = &self.failpoint {
            if let Some(ms) = fp
                .strip_prefix("tensor-delay-ms=")
                .and_then(|v| v.parse().ok())
            {
                std::thread::sleep(Duration::from_millis(ms));
            }
            if fp == "panic" {
                panic!("failpoint: panic inside a job");
            }
        }
    }
}

async fn try_execute_one_as(state: &AppState, worker: &str) -> anyhow::Result<Outcome> {
    let lease_ms = state.config.lease_ms as i64;
    // A worker whose scratch directory is full leaves the queue to workers with room.
    if let Some(why) = scratch::refuse(&state.config, 0).await {
        tracing::warn!(worker, "not claiming: {why}");
        return Ok(Outcome::NoRoom);
    }
    let Some(job) = state.queue.claim(worker, lease_ms).await? else {
        return Ok(Outcome::Empty);
    };
    let span = tracing::info_span!("job", job_id = %job.id, model_id = %job.model_id, attempt = job.attempts);
    metrics::gauge!("modelpress_busy_workers").increment(1.0);
    let started = Instant::now();
    state.events.job_changed(&job);
    let (tenant, id, attempt) = (job.tenant_id.clone(), job.id, job.attempts);
    let outcome = run_claimed(state, worker, job)
        .instrument(span.clone())
        .await;
    // An attempt that broke off with an error (a full disk, a failed database or blob-store
    // write) counts: the job goes back to the queue with a backoff, or fails once its
    // attempts are spent. It never loops, and never waits out a whole lease.
    let outcome = match outcome {
        Err(e) => {
            let (code, message) = attempt_error(&e);
            if code == ErrorCode::InsufficientStorage {
                state.note_disk_full();
            }
            let backoff = retry_backoff_ms(state.config.retry_backoff_ms, attempt);
            // In the job's span, but not across the await below: a span guard held over an
            // await is entered on whichever thread resumes it (tracing-subscriber panicked).
            span.in_scope(|| {
                tracing::error!(error = %e, code = code.as_str(), backoff_ms = backoff, "attempt failed");
            });
            match state
                .queue
                .retry_later(id, worker, code, &message, backoff as i64)
                .instrument(span.clone())
                .await
            {
                Ok(Some(crate::queue::JobState::Failed)) => Ok(Outcome::Failed),
                Ok(Some(_)) => Ok(Outcome::Retrying),
                Ok(None) => Ok(Outcome::LeaseLost),
                // The database refused this too: the lease runs out and the sweeper requeues
                // the job (the attempt was counted when it was claimed).
                Err(db) => Err(anyhow::Error::from(db).context(e.to_string())),
            }
        }
        Ok(Outcome::Succeeded) => {
            state.note_write_done();
            Ok(Outcome::Succeeded)
        }
        ok => ok,
    };
    // However the run ended (succeeded, failed, cancelled, requeued, taken over), the event
    // streams learn the state it left in the database.
    match state.queue.get_job(&tenant, id).await {
        Ok(Some(j)) => state.events.job_changed(&j),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the job back for its event"),
    }
    metrics::gauge!("modelpress_busy_workers").decrement(1.0);
    metrics::histogram!("modelpress_job_duration_seconds").record(started.elapsed().as_secs_f64());
    if let Ok(o) = &outcome {
        metrics::counter!("modelpress_jobs_finished_total", "outcome" => format!("{o:?}").to_lowercase()).increment(1);
    }
    outcome
}

/// The job's scratch copy of a dataset its `what` block names, or why there is none
/// (checked at submit; it may have gone since).
async fn dataset_file(
    state: &AppState,
    work: &std::path::Path,
    tenant: &str,
    id: uuid::Uuid,
    what: &str,
) -> anyhow::Result<Result<std::path::PathBuf, String>> {
    let Some(d) = state.models.get_dataset(tenant, id).await? else {
        return Ok(Err(format!(
            "the dataset the job's {what} names no longer exists"
        )));
    };
    // One copy per dataset, however many blocks name it.
    let dest = work.join(format!("dataset-{id}.npz"));
    if tokio::fs::try_exists(&dest).await? {
        return Ok(Ok(dest));
    }
    if let Some(why) = scratch::refuse(&state.config, d.size_bytes).await {
        return Err(scratch::NoRoom(why).into());
    }
    match state.blobs.fetch_to(&d.blob_key, &dest).await {
        Ok(()) => Ok(Ok(dest)),
        Err(crate::store::StoreError::NotFound(_)) => Ok(Err(format!(
            "the dataset file the job's {what} names is missing from the blob store"
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn run_claimed(state: &AppState, worker: &str, job: JobRecord) -> anyhow::Result<Outcome> {
    tracing::info!("job claimed");
    let lease_ms = state.config.lease_ms as i64;
    // A job that cannot run ends here, failed with a code and a message.
    let fail = |code: ErrorCode, message: String| async move {
        state.queue.fail(job.id, worker, code, &message).await?;
        anyhow::Ok(Outcome::Failed)
    };
    let plan = match crate::job::parse_spec(&job.spec) {
        Ok(p) => p,
        Err(e) => return fail(ErrorCode::InvalidSpec, e.to_string()).await,
    };
    let model = match state.models.get_model(&job.tenant_id, job.model_id).await? {
        Some(m) => m,
        None => {
            return fail(
                ErrorCode::ModelNotFound,
                "the job's model no longer exists".into(),
            )
            .await
        }
    };
    // The job's scratch directory: its copies of the model and datasets, and its outputs;
    // removed however the job ends.
    let work = tempfile::Builder::new()
        .prefix("job-")
        .tempdir_in(state.config.scratch_dir())?;
    // A model whose file is gone fails now (retrying cannot bring it back).
    let input = work.path().join("model");
    if let Some(why) = scratch::refuse(&state.config, model.size_bytes).await {
        return Err(scratch::NoRoom(why).into());
    }
    match state.blobs.fetch_to(&model.blob_key, &input).await {
        Ok(()) => {}
        Err(crate::store::StoreError::NotFound(_)) => {
            let why = "the job's model file is missing from the blob store";
            return fail(ErrorCode::ModelNotFound, why.into()).await;
        }
        Err(e) => return Err(e.into()),
    }
    // The dataset an `eval` block names (checked at submit; it may have gone since).
    let eval_spec = plan.eval.clone();
    let dataset_path = match &eval_spec {
        None => None,
        Some(e) => {
            match dataset_file(state, work.path(), &job.tenant_id, e.dataset_id, "eval").await? {
                Ok(p) => Some(p),
                Err(why) => return fail(ErrorCode::DatasetNotFound, why).await,
            }
        }
    };
    // The dataset a `calibration` block names, likewise.
    let calibration_spec = plan.calibration.clone();
    // The datasets a `finetune` block names, likewise.
    let finetune_spec = plan.finetune.clone();
    let distill_spec = plan.distill.clone();
    let mut finetune_paths = Vec::new();
    let training = finetune_spec
        .as_ref()
        .map(|f| (f, "finetune"))
        .or(distill_spec.as_ref().map(|d| (&d.train, "distill")));
    if let Some((f, block)) = training {
        for id in std::iter::once(f.dataset_id).chain(f.validation_dataset_id) {
            match dataset_file(state, work.path(), &job.tenant_id, id, block).await? {
                Ok(p) => finetune_paths.push(p),
                Err(why) => return fail(ErrorCode::DatasetNotFound, why).await,
            }
        }
    }
    let calibration_path = match &calibration_spec {
        None => None,
        Some(c) => match dataset_file(
            state,
            work.path(),
            &job.tenant_id,
            c.dataset_id,
            "calibration",
        )
        .await?
        {
            Ok(p) => Some(p),
            Err(why) => return fail(ErrorCode::DatasetNotFound, why).await,
        },
    };
    // A search reuses the sensitivity table an earlier search measured on this model and
    // dataset with the same metric and settings.
    let cache_key = match (&plan.search, &eval_spec) {
        (Some(search), Some(e)) => {
            let calibrated = calibration_spec.as_ref().map(|c| c.dataset_id);
            Some((
                e.dataset_id,
                crate::search::cache_key(e, search.min_params, calibrated),
            ))
        }
        _ => None,
    };
    let cached_sensitivity: Option<serde_json::Value> = match &cache_key {
        None => None,
        Some((dataset, key)) => state
            .models
            .get_sensitivity(&job.tenant_id, job.model_id, *dataset, key)
            .await?
            .and_then(|doc| serde_json::from_str(&doc).ok()),
    };
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir)?;
    let cancel = Arc::new(AtomicBool::new(job.cancel_requested));
    state
        .running
        .lock()
        .expect("running map")
        .insert(job.id, cancel.clone());
    let ctl = Arc::new(JobControl {
        progress: Mutex::new((0.0, "starting".into())),
        detail: Mutex::new(serde_json::Value::Null),
        events: (state.clone(), job.tenant_id.clone(), job.id),
        detail_key: Mutex::new(String::new()),
        cancel: cancel.clone(),
        hard_stop: state.hard_stop.clone(),
        failpoint: state.config.failpoint.clone(),
    });
    // Heartbeat: extend the lease, publish progress, learn about cancellation.
    let lease_lost = Arc::new(AtomicBool::new(false));
    let hb = {
        let (queue, ctl, lost, id, worker) = (
            state.queue.clone(),
            ctl.clone(),
            lease_lost.clone(),
            job.id,
            worker.to_string(),
        );
        // A third of the lease keeps it alive; at most a second keeps progress fresh for pollers.
        let every = Duration::from_millis((lease_ms as u64 / 3).clamp(20, 1000));
        tokio::spawn(async move {
            let mut published: Option<(f64, String)> = None;
            loop {
                tokio::time::sleep(every).await;
                let (p, s) = ctl.progress.lock().map(|g| g.clone()).unwrap_or_default();
                match queue.heartbeat(id, &worker, lease_ms, p, &s).await {
                    Ok(Heartbeat::Held { cancel_requested }) => {
                        // The streams see what the database now holds, when it moved.
                        if published.as_ref() != Some(&(p, s.clone())) {
                            let detail = ctl.detail.lock().map(|d| d.clone()).unwrap_or_default();
                            ctl.publish(p, &s, &detail);
                            published = Some((p, s));
                        }
                        if cancel_requested {
                            ctl.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(Heartbeat::Lost) => {
                        lost.store(true, Ordering::Relaxed);
                        ctl.cancel.store(true, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        })
    };
    let span = tracing::Span::current();
    let (plan2, out_path, ctl2) = (plan.clone(), out_dir.clone(), ctl.clone());
    let result = tokio::task::spawn_blocking(move || {
        let _g = span.enter();
        let eval = eval_spec
            .as_ref()
            .zip(dataset_path.as_deref())
            .map(|(spec, dataset)| crate::job::EvalInput {
                spec,
                dataset,
                cached_sensitivity: cached_sensitivity.as_ref(),
            });
        let calibration = calibration_spec
            .as_ref()
            .zip(calibration_path.as_deref())
            .map(|(spec, dataset)| crate::job::CalibrationInput { spec, dataset });
        let finetune = finetune_spec
            .as_ref()
            .map(|spec| crate::job::FinetuneInput {
                spec,
                dataset: &finetune_paths[0],
                validation: finetune_paths.get(1).map(|p| p.as_path()),
            });
        let distill = distill_spec.as_ref().map(|spec| crate::job::DistillInput {
            spec,
            dataset: &finetune_paths[0],
            validation: finetune_paths.get(1).map(|p| p.as_path()),
        });
        let data = crate::job::Data {
            eval,
            calibration,
            finetune,
            distill,
        };
        crate::job::execute(&input, &plan2, &out_path, ctl2.as_ref(), data)
    })
    .await;
    hb.abort();
    state.running.lock().expect("running map").remove(&job.id);
    if lease_lost.load(Ordering::Relaxed) {
        tracing::warn!("lease lost; discarding this attempt's result");
        return Ok(Outcome::LeaseLost);
    }
    // Every failure is recorded the same way: a stable code and a message for the user.
    let result: Result<_, (ErrorCode, String)> = match result {
        Err(join) => {
            let why = if join.is_panic() {
                "panicked"
            } else {
                "was aborted"
            };
            tracing::error!(error = %join, "compression {why}");
            Err((
                ErrorCode::Internal,
                format!("the compression {why}; see the server log"),
            ))
        }
        Ok(Err(RunError::Cancelled)) => {
            let outcome = if state.hard_stop.is_cancelled() && !cancel.load(Ordering::Relaxed) {
                state.queue.release(job.id, worker).await?;
                Outcome::Requeued
            } else {
                state.queue.mark_cancelled(job.id, worker).await?;
                Outcome::Cancelled
            };
            return Ok(outcome);
        }
        // Retried with a backoff by the caller.
        Ok(Err(e @ RunError::Storage { .. })) => return Err(e.into()),
        Ok(Err(e)) => match e.code() {
            ErrorCode::Internal => {
                tracing::error!(error = %crate::util::error_chain(&e), "job failed");
                Err((
                    ErrorCode::Internal,
                    "internal error; see the server log".into(),
                ))
            }
            code => Err((code, e.to_string())),
        },
        Ok(Ok(out)) => Ok(out),
    };
    let out = match result {
        Ok(out) => out,
        Err((code, message)) => {
            state.queue.fail(job.id, worker, code, &message).await?;
            return Ok(Outcome::Failed);
        }
    };
    // A table this search measured in full is kept for the next search on this model and
    // dataset.
    if let (Some((dataset, key)), Some(table)) = (&cache_key, &out.measured_sensitivity) {
        let doc = table.to_string();
        if let Err(e) = state
            .models
            .put_sensitivity(&job.tenant_id, job.model_id, *dataset, key, &doc)
            .await
        {
            tracing::warn!(error = %e, "could not cache the sensitivity table");
        }
    }
    // The signed manifest: what went in, what came out.
    let mut out = out;
    let summary_json = serde_json::to_value(&out.summary)?;
    let pipeline = match &plan.search {
        None => serde_json::Value::Array(plan.compress.steps_json.clone()),
        Some(_) => summary_json
            .pointer("/search/chosen")
            .cloned()
            .unwrap_or_default(),
    };
    let manifest = state
        .signer
        .sign(&crate::manifest::payload(&crate::manifest::Facts {
            job_id: job.id,
            tenant: &job.tenant_id,
            model_id: model.id,
            model_name: &model.name,
            model_sha256: &model.sha256,
            spec: &job.spec,
            pipeline,
            attempt: job.attempts,
            created_at_ms: crate::util::now_ms(),
            artifacts: out
                .artifacts
                .iter()
                .map(|a| crate::manifest::Entry {
                    name: &a.name,
                    size_bytes: a.size_bytes,
                    sha256: &a.sha256,
                })
                .collect(),
        }));
    let manifest_path = out_dir.join(crate::manifest::MANIFEST);
    tokio::fs::write(&manifest_path, &manifest).await?;
    out.artifacts.push(crate::job::ArtifactFile {
        name: crate::manifest::MANIFEST.into(),
        path: manifest_path,
        size_bytes: manifest.len() as u64,
        sha256: crate::util::sha256_hex(&manifest),
    });
    let mut records = Vec::with_capacity(out.artifacts.len());
    for a in &out.artifacts {
        // One key per attempt: a crashed attempt's files never collide with these.
        let key = format!("artifacts/{}/{}/{}", job.id, job.attempts, a.name);
        state.blobs.put_file(&key, &a.path).await?;
        metrics::counter!("modelpress_artifact_bytes_written_total").increment(a.size_bytes);
        records.push(ArtifactRecord {
            name: a.name.clone(),
            blob_key: key,
            size_bytes: a.size_bytes,
            sha256: a.sha256.clone(),
        });
    }
    let summary = summary_json;
    let outcome = if state
        .queue
        .complete(job.id, worker, &summary, &records)
        .await?
    {
        tracing::info!(ratio = out.summary.ratio, "job succeeded");
        // Attempts that died between storing artifacts and committing left files behind.
        for earlier in 1..job.attempts {
            let prefix = format!("artifacts/{}/{earlier}", job.id);
            if let Err(e) = state.blobs.delete_prefix(&prefix).await {
                tracing::warn!(error = %e, prefix, "could not remove an earlier attempt's artifacts");
            }
        }
        Outcome::Succeeded
    } else {
        for r in &records {
            let _ = state.blobs.delete(&r.blob_key).await;
        }
        Outcome::LeaseLost
    };
    Ok(outcome)
}
