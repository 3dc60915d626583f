//! One contract for every [`Database`]: the same tests run against SQLite and PostgreSQL
//! (`contract_tests!` below writes one `#[tokio::test]` per store and test). Time is a
//! [`ManualClock`], so lease expiry and backoff are tested by moving it, never by sleeping.
//!
//! PostgreSQL tests each create their own database on `MODELPRESS_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`, the server `.ci/run` checks is up)
//! and drop it when they pass, so they run in parallel.

use super::*;
use crate::error::ErrorCode;
use std::collections::HashSet;
use std::sync::Arc;

type Db = Arc<dyn Database>;

const T: &str = super::DEFAULT_TENANT;

fn admin_url() -> String {
    std::env::var("MODELPRESS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh SQLite file in a temp dir (kept alive by the returned guard).
async fn sqlite(clock: Arc<ManualClock>) -> (Db, Box<dyn std::any::Any + Send>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let db = open(&url, clock).await.expect("open sqlite");
    (db, Box::new(dir))
}

/// A fresh PostgreSQL database, dropped by [`PgDrop`] when the test passes.
async fn postgres(clock: Arc<ManualClock>) -> (Db, Box<dyn std::any::Any + Send>) {
    let admin = admin_url();
    let url = postgres::scratch_database(&admin, "mp_contract")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} (is it running? see .ci/run): {e}"));
    let db = open(&url, clock).await.expect("open postgres");
    (db, Box::new(PgDrop { admin, url }))
}

/// Drops a test's database on a thread of its own (Drop cannot await).
struct PgDrop {
    admin: String,
    url: String,
}

impl Drop for PgDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // kept for a look at what failed
        }
        let (admin, url) = (self.admin.clone(), self.url.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(postgres::drop_scratch_database(&admin, &url))
        })
        .join();
    }
}

fn model(tenant: &str) -> ModelRecord {
    let id = Uuid::now_v7();
    ModelRecord {
        id,
        tenant_id: tenant.into(),
        name: "m.onnx".into(),
        format: "onnx".into(),
        size_bytes: 1000,
        sha256: "ab".repeat(32),
        tensor_count: 2,
        parameter_count: 250,
        blob_key: format!("models/{id}"),
        tensors_json: "[]".into(),
        inputs_json: Some(r#"[{"name":"x"}]"#.into()),
        created_at: 1,
    }
}

fn new_job(tenant: &str, model: Uuid, spec: serde_json::Value, max_attempts: i64) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        tenant_id: tenant.into(),
        model_id: model,
        spec,
        max_attempts,
        idempotency_key: None,
        fingerprint: "fp".into(),
    }
}

async fn enqueue(db: &Db, tenant: &str, model: Uuid, max_attempts: i64) -> JobRecord {
    match db
        .enqueue(new_job(
            tenant,
            model,
            serde_json::json!({"preset": "int8"}),
            max_attempts,
        ))
        .await
        .unwrap()
    {
        Enqueued::Created(j) => j,
        Enqueued::Existing(_) => panic!("a job without a key is always new"),
    }
}

async fn tenant(db: &Db, name: &str) {
    let key = KeyRecord {
        id: Uuid::now_v7(),
        tenant_id: name.into(),
        scope: "write".into(),
        prefix: "mp_1234".into(),
        created_at: 1,
        revoked_at: None,
        last_used_at: None,
    };
    db.insert_key(&key, &format!("hash-{}", key.id))
        .await
        .unwrap();
}

async fn with_model(db: &Db) -> ModelRecord {
    let m = model(T);
    db.insert_model(&m).await.unwrap();
    m
}

pub async fn enqueue_get_list_and_idempotency(db: Db, _clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    assert_eq!(
        db.get_model(T, m.id).await.unwrap().unwrap().blob_key,
        m.blob_key
    );
    assert!(db.get_model("other", m.id).await.unwrap().is_none());
    let jobs = [
        enqueue(&db, T, m.id, 3).await,
        enqueue(&db, T, m.id, 3).await,
        enqueue(&db, T, m.id, 3).await,
    ];
    assert_eq!(jobs[0].state, JobState::Queued);
    assert_eq!(jobs[0].spec, serde_json::json!({"preset": "int8"}));
    let all = db
        .list_jobs(
            T,
            &JobFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ids: Vec<Uuid> = all.iter().map(|j| j.id).collect();
    assert_eq!(
        ids,
        vec![jobs[2].id, jobs[1].id, jobs[0].id],
        "newest first"
    );
    let page = db
        .list_jobs(
            T,
            &JobFilter {
                limit: 10,
                before: Some(jobs[2].id),
                model_id: Some(m.id),
                state: Some(JobState::Queued),
            },
        )
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let running = db
        .list_jobs(
            T,
            &JobFilter {
                limit: 10,
                state: Some(JobState::Running),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(running.is_empty());
    assert!(db.get_job("other", jobs[0].id).await.unwrap().is_none());

    // Idempotency: the same key and request replay; another request with the key conflicts;
    // another tenant's key is its own.
    let mut keyed = new_job(T, m.id, serde_json::json!({"preset": "int4"}), 3);
    keyed.idempotency_key = Some("k1".into());
    let first = match db.enqueue(keyed.clone()).await.unwrap() {
        Enqueued::Created(j) => j,
        Enqueued::Existing(_) => panic!("first use of a key creates"),
    };
    let mut again = keyed.clone();
    again.id = Uuid::now_v7();
    match db.enqueue(again.clone()).await.unwrap() {
        Enqueued::Existing(j) => assert_eq!(j.id, first.id),
        Enqueued::Created(_) => panic!("a replay must not create"),
    }
    let mut other = again.clone();
    other.fingerprint = "different".into();
    assert!(matches!(
        db.enqueue(other).await,
        Err(QueueError::IdempotencyConflict)
    ));
    let (found, fp) = db.find_idempotent(T, "k1").await.unwrap().unwrap();
    assert_eq!((found.id, fp.as_str()), (first.id, "fp"));

    tenant(&db, "t2").await;
    let m2 = model("t2");
    db.insert_model(&m2).await.unwrap();
    let mut theirs = new_job("t2", m2.id, serde_json::json!({}), 3);
    theirs.idempotency_key = Some("k1".into());
    assert!(matches!(
        db.enqueue(theirs).await.unwrap(),
        Enqueued::Created(_)
    ));
    // Another tenant's model is not found.
    assert!(matches!(
        db.enqueue(new_job(T, m2.id, serde_json::json!({}), 3))
            .await,
        Err(QueueError::NotFound)
    ));
    assert!(matches!(
        db.enqueue(new_job(T, Uuid::now_v7(), serde_json::json!({}), 3))
            .await,
        Err(QueueError::NotFound)
    ));
    let models = db.list_models(T, 10, None).await.unwrap();
    assert_eq!(models.iter().map(|m| m.id).collect::<Vec<_>>(), vec![m.id]);
}

pub async fn claimers_take_the_oldest_and_never_share_a_job(db: Db, _clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let mut ids = Vec::new();
    for _ in 0..24 {
        ids.push(enqueue(&db, T, m.id, 3).await.id);
    }
    let first = db.claim("w0", 60_000).await.unwrap().unwrap();
    assert_eq!(first.id, ids[0], "the oldest queued job first");
    assert_eq!((first.state, first.attempts), (JobState::Running, 1));
    let mut tasks = Vec::new();
    for w in 1..=8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(j) = db.claim(&format!("w{w}"), 60_000).await.unwrap() {
                got.push(j.id);
            }
            got
        }));
    }
    let mut claimed = vec![first.id];
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let unique: HashSet<Uuid> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), 24, "every job claimed once: {claimed:?}");
    assert_eq!(unique, ids.iter().copied().collect::<HashSet<_>>());
    let counts = db.count_by_state().await.unwrap();
    assert!(counts.contains(&(JobState::Running, 24)), "{counts:?}");
    assert!(counts.contains(&(JobState::Queued, 0)), "{counts:?}");
}

pub async fn an_expired_lease_is_requeued_then_exhausted(db: Db, clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let job = enqueue(&db, T, m.id, 2).await;
    let c = db.claim("w1", 1_000).await.unwrap().unwrap();
    assert_eq!(c.id, job.id);
    clock.advance(1_000);
    assert!(
        db.sweep_expired().await.unwrap().is_empty(),
        "not expired at the boundary"
    );
    clock.advance(1);
    let swept = db.sweep_expired().await.unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].state, JobState::Queued);
    assert_eq!(
        swept[0].stage.as_deref(),
        Some("requeued after lease expiry")
    );
    // The old owner lost it: its heartbeat, completion and failure are refused.
    assert!(matches!(
        db.heartbeat(job.id, "w1", 1_000, 0.5, "x").await.unwrap(),
        Heartbeat::Lost
    ));
    assert!(!db
        .complete(job.id, "w1", &serde_json::json!({}), &[])
        .await
        .unwrap());
    assert!(!db
        .fail(job.id, "w1", ErrorCode::Internal, "x")
        .await
        .unwrap());
    let c2 = db.claim("w2", 1_000).await.unwrap().unwrap();
    assert_eq!((c2.id, c2.attempts), (job.id, 2));
    clock.advance(5_000);
    let swept = db.sweep_expired().await.unwrap();
    assert_eq!(swept.len(), 1);
    let j = db.get_job(T, job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error_code.as_deref(), Some("attempts_exhausted"));
    assert!(j
        .error_message
        .unwrap()
        .contains("on each of its 2 attempts"));
    assert!(db.claim("w3", 1_000).await.unwrap().is_none());
}

pub async fn heartbeats_extend_the_lease_and_carry_cancel(db: Db, clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let job = enqueue(&db, T, m.id, 3).await;
    db.claim("w1", 1_000).await.unwrap().unwrap();
    clock.advance(800);
    match db
        .heartbeat(job.id, "w1", 1_000, 0.25, "quantize")
        .await
        .unwrap()
    {
        Heartbeat::Held { cancel_requested } => assert!(!cancel_requested),
        Heartbeat::Lost => panic!("the owner holds its lease"),
    }
    assert!(matches!(
        db.heartbeat(job.id, "intruder", 1_000, 0.9, "x")
            .await
            .unwrap(),
        Heartbeat::Lost
    ));
    clock.advance(800);
    assert!(
        db.sweep_expired().await.unwrap().is_empty(),
        "the heartbeat extended the lease"
    );
    let j = db.get_job(T, job.id).await.unwrap().unwrap();
    assert_eq!((j.progress, j.stage.as_deref()), (0.25, Some("quantize")));

    let r = db.request_cancel(T, job.id).await.unwrap();
    assert_eq!((r.state, r.cancel_requested), (JobState::Running, true));
    match db
        .heartbeat(job.id, "w1", 1_000, 0.3, "quantize")
        .await
        .unwrap()
    {
        Heartbeat::Held { cancel_requested } => assert!(cancel_requested),
        Heartbeat::Lost => panic!("still held"),
    }
    assert!(db.mark_cancelled(job.id, "w1").await.unwrap());
    assert!(matches!(
        db.request_cancel(T, job.id).await,
        Err(QueueError::NotCancellable(s)) if s == "cancelled"
    ));
    assert!(matches!(
        db.request_cancel(T, Uuid::now_v7()).await,
        Err(QueueError::NotFound)
    ));

    // A queued job is cancelled at once; a running one whose worker died with a cancel
    // requested ends cancelled when its lease runs out.
    let q = enqueue(&db, T, m.id, 3).await;
    let r = db.request_cancel(T, q.id).await.unwrap();
    assert_eq!(r.state, JobState::Cancelled);
    assert!(r.finished_at.is_some());
    let dead = enqueue(&db, T, m.id, 3).await;
    db.claim("w9", 1_000).await.unwrap().unwrap();
    db.request_cancel(T, dead.id).await.unwrap();
    clock.advance(2_000);
    let swept = db.sweep_expired().await.unwrap();
    assert_eq!((swept.len(), swept[0].state), (1, JobState::Cancelled));
}

pub async fn a_failed_attempt_waits_out_its_backoff(db: Db, clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let job = enqueue(&db, T, m.id, 2).await;
    db.claim("w1", 60_000).await.unwrap().unwrap();
    let left = db
        .retry_later(
            job.id,
            "w1",
            ErrorCode::InsufficientStorage,
            "disk full",
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(left, Some(JobState::Queued));
    let j = db.get_job(T, job.id).await.unwrap().unwrap();
    assert_eq!(
        j.stage.as_deref(),
        Some("attempt 1 of 2 failed (insufficient_storage); retrying")
    );
    assert!(
        db.claim("w2", 60_000).await.unwrap().is_none(),
        "in its backoff"
    );
    clock.advance(999);
    assert!(
        db.claim("w2", 60_000).await.unwrap().is_none(),
        "still in its backoff"
    );
    clock.advance(1);
    let c = db.claim("w2", 60_000).await.unwrap().unwrap();
    assert_eq!(c.attempts, 2);
    assert_eq!(
        db.retry_later(job.id, "w1", ErrorCode::Internal, "x", 1_000)
            .await
            .unwrap(),
        None,
        "not the owner"
    );
    let left = db
        .retry_later(
            job.id,
            "w2",
            ErrorCode::InsufficientStorage,
            "disk full",
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(left, Some(JobState::Failed));
    let j = db.get_job(T, job.id).await.unwrap().unwrap();
    assert_eq!(j.error_code.as_deref(), Some("insufficient_storage"));
    assert_eq!(
        j.error_message.as_deref(),
        Some("disk full (on each of 2 attempts)")
    );
}

pub async fn completion_records_artifacts_once(db: Db, _clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let job = enqueue(&db, T, m.id, 3).await;
    db.claim("w1", 60_000).await.unwrap().unwrap();
    assert!(db.release(job.id, "w1").await.unwrap());
    let j = db.get_job(T, job.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts),
        (JobState::Queued, 0),
        "a release gives the attempt back"
    );
    assert!(!db.release(job.id, "w1").await.unwrap());
    db.claim("w1", 60_000).await.unwrap().unwrap();
    let arts = [
        ArtifactRecord {
            name: "report.json".into(),
            blob_key: format!("artifacts/{}/report.json", job.id),
            size_bytes: 20,
            sha256: "cd".repeat(32),
        },
        ArtifactRecord {
            name: "model.onnx".into(),
            blob_key: format!("artifacts/{}/model.onnx", job.id),
            size_bytes: 300,
            sha256: "ef".repeat(32),
        },
    ];
    let summary = serde_json::json!({"ratio": 3.5});
    assert!(db.complete(job.id, "w1", &summary, &arts).await.unwrap());
    assert!(
        !db.complete(job.id, "w1", &summary, &arts).await.unwrap(),
        "only once"
    );
    assert!(!db
        .fail(job.id, "w1", ErrorCode::Internal, "x")
        .await
        .unwrap());
    let j = db.get_job(T, job.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.progress, j.summary),
        (JobState::Succeeded, 1.0, Some(summary))
    );
    let listed = db.artifacts(job.id).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|a| (a.name.as_str(), a.size_bytes))
            .collect::<Vec<_>>(),
        vec![("model.onnx", 300), ("report.json", 20)]
    );
    let usage = db.tenant_usage(T, 0).await.unwrap();
    assert_eq!(usage.stored_bytes, 1000 + 300 + 20);
    assert_eq!((usage.active_jobs, usage.recent_jobs), (0, 1));
    assert!(usage.oldest_recent.is_some());
}

pub async fn deleting_a_model_waits_for_its_jobs(db: Db, _clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let job = enqueue(&db, T, m.id, 3).await;
    // Not while a job of it is queued, cascade or not.
    for cascade in [false, true] {
        assert!(matches!(
            db.delete_model(T, m.id, cascade).await,
            Err(QueueError::ModelInUse)
        ));
    }
    assert!(matches!(
        db.delete_model("other", m.id, true).await,
        Err(QueueError::NotFound)
    ));
    db.request_cancel(T, job.id).await.unwrap();
    // A finished job keeps the model unless the caller asks for both to go.
    assert!(matches!(
        db.delete_model(T, m.id, false).await,
        Err(QueueError::ModelHasJobs(1))
    ));
    assert!(db.get_model(T, m.id).await.unwrap().is_some());
    assert!(db.get_job(T, job.id).await.unwrap().is_some());
    let gone = db.delete_model(T, m.id, true).await.unwrap();
    assert_eq!(
        (gone.blob_key, gone.job_ids),
        (m.blob_key.clone(), vec![job.id])
    );
    assert!(db.get_model(T, m.id).await.unwrap().is_none());
    assert!(
        db.get_job(T, job.id).await.unwrap().is_none(),
        "its jobs go with it"
    );
}

pub async fn datasets_and_the_sensitivity_cache(db: Db, _clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let id = Uuid::now_v7();
    let d = DatasetRecord {
        id,
        tenant_id: T.into(),
        name: "eval.npz".into(),
        size_bytes: 500,
        sha256: "12".repeat(32),
        rows: Some(64),
        has_labels: true,
        arrays_json: "[]".into(),
        blob_key: format!("datasets/{id}"),
        created_at: 2,
    };
    db.insert_dataset(&d).await.unwrap();
    let got = db.get_dataset(T, id).await.unwrap().unwrap();
    assert_eq!(
        (got.rows, got.has_labels, got.size_bytes),
        (Some(64), true, 500)
    );
    assert_eq!(db.list_datasets(T, 10, None).await.unwrap().len(), 1);
    assert!(db.list_datasets(T, 10, Some(id)).await.unwrap().is_empty());
    let job = db
        .enqueue(new_job(
            T,
            m.id,
            serde_json::json!({"eval": {"dataset_id": id}}),
            3,
        ))
        .await
        .unwrap();
    let Enqueued::Created(job) = job else {
        panic!()
    };
    assert!(matches!(
        db.delete_dataset(T, id).await,
        Err(QueueError::DatasetInUse)
    ));
    db.put_sensitivity(T, m.id, id, "k", "{\"layers\":[]}")
        .await
        .unwrap();
    db.put_sensitivity(T, m.id, id, "k", "{\"layers\":[1]}")
        .await
        .unwrap();
    assert_eq!(
        db.get_sensitivity(T, m.id, id, "k")
            .await
            .unwrap()
            .as_deref(),
        Some("{\"layers\":[1]}")
    );
    assert!(db
        .get_sensitivity(T, m.id, id, "other")
        .await
        .unwrap()
        .is_none());
    // A cache entry for a model deleted meanwhile is dropped without an error.
    db.put_sensitivity(T, Uuid::now_v7(), id, "k", "{}")
        .await
        .unwrap();
    db.request_cancel(T, job.id).await.unwrap();
    assert_eq!(db.delete_dataset(T, id).await.unwrap(), d.blob_key);
    assert!(
        db.get_sensitivity(T, m.id, id, "k")
            .await
            .unwrap()
            .is_none(),
        "goes with its dataset"
    );
    assert!(matches!(
        db.delete_dataset(T, id).await,
        Err(QueueError::NotFound)
    ));
}

pub async fn api_keys(db: Db, clock: Arc<ManualClock>) {
    assert!(!db.any_active_key().await.unwrap());
    let key = KeyRecord {
        id: Uuid::now_v7(),
        tenant_id: "acme".into(),
        scope: "admin".into(),
        prefix: "mp_abcd".into(),
        created_at: clock.now_ms(),
        revoked_at: None,
        last_used_at: None,
    };
    db.insert_key(&key, "h1").await.unwrap();
    assert!(db.any_active_key().await.unwrap());
    let found = db.key_by_hash("h1").await.unwrap().unwrap();
    assert_eq!(
        (found.id, found.tenant_id.as_str(), found.scope.as_str()),
        (key.id, "acme", "admin")
    );
    db.touch_key(key.id, 42).await.unwrap();
    assert_eq!(db.list_keys().await.unwrap()[0].last_used_at, Some(42));
    clock.advance(10);
    let revoked = db.revoke_key(key.id).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(clock.now_ms()));
    assert!(db.key_by_hash("h1").await.unwrap().is_none());
    assert!(!db.any_active_key().await.unwrap());
    assert!(matches!(
        db.revoke_key(Uuid::now_v7()).await,
        Err(QueueError::NotFound)
    ));
    // The tenant now exists: its models can be stored.
    db.insert_model(&model("acme")).await.unwrap();
}

pub async fn the_webhook_outbox(db: Db, clock: Arc<ManualClock>) {
    let m = with_model(&db).await;
    let secret = db.webhook_secret(T, "whsec_first").await.unwrap();
    assert_eq!(secret, "whsec_first");
    assert_eq!(
        db.webhook_secret(T, "whsec_second").await.unwrap(),
        "whsec_first"
    );
    // Sealing a secret stored in plain text: replaced only while it is still the old value.
    let plain = db.plain_webhook_secrets("sealed:").await.unwrap();
    assert_eq!(plain, vec![(T.to_string(), "whsec_first".to_string())]);
    assert!(!db
        .reseal_webhook_secret(T, "whsec_other", "sealed:x")
        .await
        .unwrap());
    assert!(db
        .reseal_webhook_secret(T, "whsec_first", "sealed:x")
        .await
        .unwrap());
    assert!(db
        .plain_webhook_secrets("sealed:")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        db.webhook_secret(T, "whsec_third").await.unwrap(),
        "sealed:x"
    );
    let spec =
        serde_json::json!({"preset": "int8", "webhook": {"url": "https://example.com/hook"}});
    let Enqueued::Created(job) = db.enqueue(new_job(T, m.id, spec, 3)).await.unwrap() else {
        panic!()
    };
    let plain = enqueue(&db, T, m.id, 3).await;
    db.claim("w1", 60_000).await.unwrap().unwrap();
    db.claim("w1", 60_000).await.unwrap().unwrap();
    assert!(db
        .fail(job.id, "w1", ErrorCode::InvalidModel, "bad")
        .await
        .unwrap());
    assert!(db
        .complete(plain.id, "w1", &serde_json::json!({}), &[])
        .await
        .unwrap());
    // Only the job with a webhook has a delivery, written with its terminal state.
    let later = clock.now_ms() + 60_000;
    let due = db.due_deliveries(later, 30_000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].job_id, due[0].event.as_str()),
        (job.id, "job.failed")
    );
    assert_eq!(due[0].url, "https://example.com/hook");
    assert!(
        db.due_deliveries(later, 30_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "locked"
    );
    db.finish_delivery(
        due[0].id,
        &DeliveryOutcome::Retry {
            status: Some(500),
            error: "HTTP 500".into(),
            at: later + 1_000,
        },
    )
    .await
    .unwrap();
    assert!(
        db.due_deliveries(later, 30_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    let again = db.due_deliveries(later + 1_000, 30_000, 10).await.unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1));
    db.finish_delivery(again[0].id, &DeliveryOutcome::Delivered { status: 200 })
        .await
        .unwrap();
    let list = db.deliveries(T, job.id).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0].state.as_str(),
            list[0].attempts,
            list[0].last_status
        ),
        ("delivered", 2, Some(200))
    );
    assert!(list[0].delivered_at.is_some());
    assert!(db.deliveries("other", job.id).await.unwrap().is_empty());
    assert!(db.deliveries(T, plain.id).await.unwrap().is_empty());
}

/// A shared database tells every listening process when a job becomes claimable and relays
/// job events; one that is not shared says so.
pub async fn notices_between_processes(db: Db, _clock: Arc<ManualClock>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    db.listen(tx).await.unwrap();
    let m = with_model(&db).await;
    let job = enqueue(&db, T, m.id, 3).await;
    db.announce("{\"hello\":1}").await.unwrap();
    if !db.shared() {
        let got = tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await;
        assert!(
            !matches!(got, Ok(Some(_))),
            "an unshared database relays nothing"
        );
        return;
    }
    // What arrives, in order: the wake-up and the job's state (both from triggers, in the
    // enqueue's commit), then the announced text.
    let state_of = |n: &Notice| match n {
        Notice::Event(t) => {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            v["state"]
                .as_str()
                .map(|s| format!("state {s}"))
                .unwrap_or(t.clone())
        }
        Notice::JobQueued => "wake".into(),
        Notice::Gap => "gap".into(),
    };
    async fn take(rx: &mut tokio::sync::mpsc::Receiver<Notice>, n: usize) -> Vec<Notice> {
        let mut out = Vec::new();
        for _ in 0..n {
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await;
            out.push(got.expect("a notice in time").expect("the channel is open"));
        }
        out
    }
    let got: Vec<String> = take(&mut rx, 3).await.iter().map(state_of).collect();
    assert_eq!(got, ["wake", "state queued", "{\"hello\":1}"]);
    // A claim announces its state; a retry's requeue wakes workers and announces its state;
    // a heartbeat announces nothing.
    db.claim("w1", 60_000).await.unwrap().unwrap();
    db.heartbeat(job.id, "w1", 60_000, 0.5, "x").await.unwrap();
    db.retry_later(job.id, "w1", ErrorCode::Internal, "x", 0)
        .await
        .unwrap();
    let got: Vec<String> = take(&mut rx, 3).await.iter().map(state_of).collect();
    assert_eq!(got, ["state running", "wake", "state queued"]);
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await;
    assert!(quiet.is_err(), "nothing more: {quiet:?}");
}

/// One `#[tokio::test]` per store and contract test.
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let clock = std::sync::Arc::new(super::ManualClock::new(crate::util::now_ms()));
                    let (db, _guard) = super::sqlite(clock.clone()).await;
                    super::$name(db.clone(), clock).await;
                    db.close().await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let clock = std::sync::Arc::new(super::ManualClock::new(crate::util::now_ms()));
                    let (db, _guard) = super::postgres(clock.clone()).await;
                    super::$name(db.clone(), clock).await;
                    db.close().await;
                }
            )*
        }
    };
}

contract_tests!(
    enqueue_get_list_and_idempotency,
    claimers_take_the_oldest_and_never_share_a_job,
    an_expired_lease_is_requeued_then_exhausted,
    heartbeats_extend_the_lease_and_carry_cancel,
    a_failed_attempt_waits_out_its_backoff,
    completion_records_artifacts_once,
    deleting_a_model_waits_for_its_jobs,
    datasets_and_the_sensitivity_cache,
    api_keys,
    the_webhook_outbox,
    notices_between_processes,
);
