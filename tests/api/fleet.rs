//! The fleet on PostgreSQL: an API process with no workers and a `modelpress worker` process
//! share one database. What one queues the other runs; its progress and state reach the API
//! process's event streams through LISTEN/NOTIFY; a cancel on the API stops the run on the
//! worker. (Both share a data directory here; the object-store step of the fleet issue
//! removes that.)

use crate::events::read_events;
use crate::helpers::{case_file, spawn_app_with, spawn_worker_with, PgDatabase, TestApp};
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
    let model = api
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let job = api
        .submit_json(json!({"model_id": model["id"], "preset": "int8", "latency": false}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_on_the_api_stops_the_run_on_the_worker() {
    if !cfg!(feature = "failpoints") {
        return; // needs a job slow enough to cancel mid-run
    }
    let db = PgDatabase::create().await;
    let (api, worker) = fleet(&db, 400).await;
    let model = api
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let job = api
        .submit_json(json!({"model_id": model["id"], "preset": "int8", "latency": false}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(&api, &id, |j| j["state"] == "running").await;
    assert_eq!(api.cancel(&id).await.status(), 202);
    let end = wait_for(&api, &id, |j| j["state"] != "running").await;
    assert_eq!(end["state"], "cancelled", "{end}");
    worker.stop().await;
    api.stop().await;
    db.drop_now().await;
}
