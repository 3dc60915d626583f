//! The fleet on PostgreSQL: an API process with no workers and a `modelpress worker` process
//! share one database. What one queues the other runs; its progress and state reach the API
//! process's event streams through LISTEN/NOTIFY; a cancel on the API stops the run on the
//! worker. (Both share a data directory here; the object-store step of the fleet issue
//! removes that.)

use crate::events::read_events;
use crate::helpers::{
    case_file, mnist_int8_job, spawn_app_with, spawn_worker_with, PgDatabase, TestApp,
};
use serde_json::{json, Value};
use std::time::Duration;

async fn fleet(db: &PgDatabase, tensor_delay_ms: u64) -> (TestApp, TestApp) {
    let api = spawn_app_with(|c| {
        c.database_url = Some(db.url.clone());
        c.workers = Some(0);
        c.lease_ms = 600;
    })
    .await;
    let data = api.state.config.data_dir.clone();
    let worker = spawn_worker_with(|c| {
        c.database_url = Some(db.url.clone());
        c.data_dir = data;
        c.workers = Some(1);
        c.lease_ms = 600;
        if cfg!(feature = "failpoints") && tensor_delay_ms > 0 {
            c.failpoint = Some(format!("tensor-delay-ms={tensor_delay_ms}"));
        }
    })
    .await;
    (api, worker)
}

async fn wait_for(app: &TestApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let job = app.job(id).await;
        if done(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited too long: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until both fleet processes hold a `LISTEN` connection to `database` (the
/// connection asking is left out: its own query text names LISTEN).
async fn await_listeners(admin: &sqlx::PgPool, database: &str, within: Duration, fail: &str) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = $1 AND query ILIKE '%LISTEN%' AND pid <> pg_backend_pid()",
        )
        .bind(database)
        .fetch_one(admin)
        .await
        .unwrap();
        if listening == 2 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listeners {fail}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The states a `/v1/events` stream reported for one job, in order.
fn job_states<'a>(evs: &'a [crate::events::Sse], id: &str) -> Vec<&'a str> {
    evs.iter()
        .filter(|e| e.event == "state" && e.data["job_id"] == *id)
        .filter_map(|e| e.data["state"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_process_runs_what_the_api_queued_and_the_api_streams_its_progress() {
    let db = PgDatabase::create().await;
    let (api, worker) = fleet(&db, 150).await;
    // The worker's listener serves health and metrics only.
    assert_eq!(worker.get_json("/healthz").await.0, 200);
    assert_eq!(worker.get_json("/readyz").await.0, 200);
    assert!(worker
        .get_text("/metrics")
        .await
        .contains("modelpress_jobs"));
    assert_eq!(worker.get_json("/v1/models").await.0, 404);

    let resp = api.client.get(api.url("/v1/events")).send().await.unwrap();
    let reader = tokio::spawn(read_events(resp, Duration::from_secs(120), |evs| {
        evs.iter().any(|e| e.event == "done")
    }));
    let id = mnist_int8_job(&api).await;
    let evs = reader.await.unwrap();
    let mine: Vec<_> = evs.iter().filter(|e| e.data["job_id"] == *id).collect();
    let states: Vec<&str> = mine
        .iter()
        .filter(|e| e.event == "state")
        .filter_map(|e| e.data["state"].as_str())
        .collect();
    assert_eq!(states, ["queued", "running", "succeeded"], "{mine:?}");
    assert_eq!(mine.last().unwrap().event, "done");
    if cfg!(feature = "failpoints") {
        assert!(
            mine.iter()
                .any(|e| e.event == "progress" && e.data["progress"].as_f64().unwrap() > 0.0),
            "the worker's progress reaches the API's stream: {mine:?}"
        );
    }
    // Each event once, although every process relays and receives.
    let ids: Vec<&str> = evs.iter().filter_map(|e| e.id.as_deref()).collect();
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");

    let done = api.job(&id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let onnx = api.download(&done, "model.onnx").await;
    assert!(onnx.len() > 1000);
    let manifest: Value =
        serde_json::from_slice(&api.download(&done, "manifest.json").await).unwrap();
    assert!(manifest["signature"]["value"].is_string());
    worker.stop().await;
    api.stop().await;
    db.drop_now().await;
}

/// The connection that listens for other processes' notices is cut (PostgreSQL terminates
/// it). What was announced meanwhile is gone, so the API's `/v1/events` stream gets `resync`
/// (the client lists the jobs again); the listener reconnects at once, and a job queued
/// afterwards is run by the worker and streamed by the API as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_notification_connection_resyncs_the_streams_and_reconnects() {
    let db = PgDatabase::create().await;
    let (api, worker) = fleet(&db, 0).await;
    let resp = api.client.get(api.url("/v1/events")).send().await.unwrap();
    let reader = tokio::spawn(read_events(resp, Duration::from_secs(120), |evs| {
        evs.iter().any(|e| e.event == "done")
    }));
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE '%LISTEN%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(cut.len(), 2, "one listening connection per process");
    pool.close().await;
    // Both processes listen again; then a job goes through as usual.
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap();
    await_listeners(&admin, name, Duration::from_secs(30), "did not reconnect").await;
    admin.close().await;
    let id = mnist_int8_job(&api).await;
    let evs = reader.await.unwrap();
    let resync: Vec<_> = evs.iter().filter(|e| e.event == "resync").collect();
    assert_eq!(resync.len(), 1, "{evs:?}");
    assert!(resync[0].data["reason"].is_string(), "{evs:?}");
    assert_eq!(
        job_states(&evs, &id),
        ["queued", "running", "succeeded"],
        "{evs:?}"
    );
    worker.stop().await;
    api.stop().await;
    db.drop_now().await;
}

/// A longer outage: the database refuses every new connection for 3 s while all of the
/// fleet's connections are cut, so reconnecting fails a few times. The API's `/v1/events`
/// stream gets one `resync`, once its process listens again (not one per failed attempt,
/// sent while nothing was listening), and a job queued afterwards goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_outage_the_streams_resync_once_the_processes_listen_again() {
    let db = PgDatabase::create().await;
    let (api, worker) = fleet(&db, 0).await;
    let resp = api.client.get(api.url("/v1/events")).send().await.unwrap();
    let reader = tokio::spawn(read_events(resp, Duration::from_secs(120), |evs| {
        evs.iter().any(|e| e.event == "done")
    }));
    // From the server's maintenance database, not the fleet's.
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let admin_url = format!("{}/test", db.url.rsplit_once('/').unwrap().0);
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    let allow = |on: bool| {
        let sql = format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {on}");
        let admin = admin.clone();
        async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .unwrap()
        }
    };
    allow(false).await;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    allow(true).await;
    await_listeners(&admin, &name, Duration::from_secs(60), "did not come back").await;
    admin.close().await;
    let id = mnist_int8_job(&api).await;
    let evs = reader.await.unwrap();
    let resync = evs.iter().filter(|e| e.event == "resync").count();
    assert_eq!(resync, 1, "{evs:?}");
    assert_eq!(
        job_states(&evs, &id),
        ["queued", "running", "succeeded"],
        "{evs:?}"
    );
    worker.stop().await;
    api.stop().await;
    db.drop_now().await;
}

/// Needs a job slow enough to cancel mid-run (the `failpoints` feature, which CI builds
/// with): without it the test does not exist, rather than passing having checked nothing.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_on_the_api_stops_the_run_on_the_worker() {
    let db = PgDatabase::create().await;
    let (api, worker) = fleet(&db, 400).await;
    let id = mnist_int8_job(&api).await;
    wait_for(&api, &id, |j| j["state"] == "running").await;
    assert_eq!(api.cancel(&id).await.status(), 202);
    let end = wait_for(&api, &id, |j| j["state"] != "running").await;
    assert_eq!(end["state"], "cancelled", "{end}");
    worker.stop().await;
    api.stop().await;
    db.drop_now().await;
}

/// PostgreSQL and S3: the API process and the worker process share no directory, only the
/// manifest signing key file (`--signing-key-file`, which an operator mounts in each). The
/// worker pulls the model from the object store into its scratch directory, pushes the
/// artifacts, and cleans up; the API serves them, ranges included, and they verify under the
/// API's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_on_postgres_and_s3_shares_no_directory() {
    let s3 = modelpress::store::s3::LocalS3::start().expect("moto[server] (see .ci/run)");
    s3.create_bucket("fleet").await.unwrap();
    let db = PgDatabase::create().await;
    let blob_url = format!("s3://fleet/{}", uuid::Uuid::new_v4().simple());
    let shared = tempfile::tempdir().unwrap();
    let key_file = shared.path().join("fleet.key");
    // What every process of the fleet is told; each keeps its own data directory.
    let fleet = |c: &mut modelpress::config::ServeConfig, workers: usize| {
        c.database_url = Some(db.url.clone());
        c.blob_url = Some(blob_url.clone());
        c.blob_options = s3.options();
        c.signing_key_file = Some(key_file.clone());
        c.workers = Some(workers);
    };
    let api = spawn_app_with(|c| fleet(c, 0)).await;
    let worker = spawn_worker_with(|c| fleet(c, 1)).await;
    let worker_data = worker.state.config.data_dir.clone();
    let model = api
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let job = api
        .submit_json(json!({"model_id": model["id"], "preset": "int8", "latency": false}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_for(&api, &id, |j| {
        j["state"] != "queued" && j["state"] != "running"
    })
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // Downloaded through the API, from the object store; a range too.
    let out = api.dir.path().join("download");
    std::fs::create_dir_all(&out).unwrap();
    for name in crate::helpers::artifact_names(&done) {
        std::fs::write(out.join(&name), api.download(&done, &name).await).unwrap();
    }
    let url = done["artifacts"][0]["url"].as_str().unwrap().to_string();
    let part = api
        .client
        .get(api.url(&url))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().len(), 10);
    let trusted = api.state.signer.public_key();
    let verified = modelpress::manifest::verify_dir(&out, Some(&trusted)).expect("verifies");
    assert!(verified.missing.is_empty(), "{:?}", verified.missing);
    // Neither process keeps blobs or a key of its own on disk, and the worker's scratch
    // directory is empty.
    for data in [&api.state.config.data_dir, &worker_data] {
        assert!(!data.join("blobs").exists(), "{}", data.display());
        assert!(!data.join(modelpress::manifest::KEY_FILE).exists());
    }
    let left: Vec<_> = std::fs::read_dir(worker_data.join("tmp"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
    // Deleting the model removes its objects from the store.
    let r = api
        .client
        .delete(api.url(&format!(
            "/v1/models/{}?cascade=true",
            model["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, _) = api.get_json(&url).await;
    assert_eq!(s, 404);
    worker.stop().await;
    api.stop().await;
    db.drop_now().await;
}
