//! The fleet as separate OS processes of this build: one `modelpress serve --workers 0` and
//! three `modelpress worker --workers 1`, on one PostgreSQL database and one S3 bucket (moto's
//! server over HTTP), sharing no directory but the manifest signing key file.
//!
//! 60 mnist-8 jobs, each tensor slowed by the `tensor-delay-ms` failpoint (a job takes about
//! 0.8 s, past a heartbeat), so that every worker is mid-job when worker 1 is SIGKILLed and
//! worker 2 is stopped (SIGTERM) and started again.
//! Every job must end exactly once and succeed, its artifacts must download through the API
//! with the sha256 it lists, no artifact of a dead attempt may stay, the API's event stream
//! must carry the progress that the worker processes report, and no scratch file may stay.
#![cfg(feature = "failpoints")]

use crate::events::read_events;
use crate::helpers::{assert_artifacts_download, case_file, PgDatabase, Process};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

const JOBS: usize = 60;

async fn get(client: &reqwest::Client, url: String) -> Value {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn all_jobs(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = get(client, format!("{base}/v1/jobs?limit=500{cursor}")).await;
        out.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

fn scratch_entries(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_exit(p: &mut Process) {
    let status = p.child.wait().unwrap();
    assert!(
        status.success(),
        "a worker stopped by SIGTERM exits 0: {status}"
    );
}

fn terminal(j: &Value) -> bool {
    matches!(
        j["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_and_three_worker_processes_survive_a_sigkill_and_a_restart() {
    let s3 = modelpress::store::s3::LocalS3::start().expect("moto[server] (see .ci/run)");
    s3.create_bucket("fleet").await.unwrap();
    let db = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let fleet_env = |data: &str| {
        vec![
            (
                "MODELPRESS_DATA_DIR",
                dir.path().join(data).display().to_string(),
            ),
            ("MODELPRESS_DATABASE_URL", db.url.clone()),
            (
                "MODELPRESS_BLOB_URL",
                format!(
                    "s3://fleet/{}",
                    dir.path().file_name().unwrap().to_string_lossy()
                ),
            ),
            ("MODELPRESS_BLOB_OPTIONS", s3.options().join(",")),
            (
                "MODELPRESS_SIGNING_KEY_FILE",
                dir.path().join("fleet.key").display().to_string(),
            ),
            // A dead worker's job goes back to the queue 1.5 s after its last heartbeat, and a
            // live one beats (and reports progress) every 500 ms.
            ("MODELPRESS_LEASE_MS", "1500".to_string()),
            // Four processes beside the rest of the suite on one server's 100 connections.
            ("MODELPRESS_DATABASE_MAX_CONNECTIONS", "4".to_string()),
            ("MODELPRESS_FAILPOINT", "tensor-delay-ms=400".to_string()),
            (
                "MODELPRESS_WORKERS",
                if data == "api" { "0" } else { "1" }.to_string(),
            ),
        ]
    };
    let api = Process::start(&["serve"], &fleet_env("api"));
    let start_worker = |name: &str| Process::start(&["worker"], &fleet_env(name));
    let mut workers: HashMap<&str, Process> = ["w1", "w2", "w3"]
        .into_iter()
        .map(|w| (w, start_worker(w)))
        .collect();
    let client = reqwest::Client::new();
    let base = api.base.clone();

    // The API process's event stream, opened before anything is queued.
    let resp = client
        .get(format!("{base}/v1/events"))
        .send()
        .await
        .unwrap();
    let events = tokio::spawn(read_events(resp, Duration::from_secs(300), |evs| {
        evs.iter().filter(|e| e.event == "done").count() >= JOBS
            || evs.iter().any(|e| e.event == "resync")
    }));

    let model: Value = client
        .post(format!("{base}/v1/models?name=mnist-8.onnx"))
        .body(case_file("mnist8/mnist-8.onnx"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut accepted = HashSet::new();
    for _ in 0..JOBS {
        let r = client
            .post(format!("{base}/v1/jobs"))
            .json(&json!({"model_id": model["id"], "preset": "int8", "latency": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let job: Value = r.json().await.unwrap();
        accepted.insert(job["id"].as_str().unwrap().to_string());
    }

    // Every worker mid-job: three jobs running, and worker 1's copy of its job in its
    // scratch directory.
    let w1_data = dir.path().join("w1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = all_jobs(&client, &base).await;
        let mid = jobs.iter().filter(|j| j["state"] == "running").count();
        if mid >= 3 && !scratch_entries(&w1_data).is_empty() {
            break;
        }
        assert!(
            jobs.iter().filter(|j| terminal(j)).count() < JOBS / 2,
            "too fast to kill mid-job: {mid} running, w1 scratch {:?}, {:?}",
            scratch_entries(&w1_data),
            jobs.iter()
                .map(|j| (
                    j["state"].clone(),
                    j["progress"].clone(),
                    j["attempts"].clone()
                ))
                .collect::<Vec<_>>()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the workers never ran 3 jobs at once"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut w1 = workers.remove("w1").unwrap();
    w1.child.kill().unwrap(); // SIGKILL: no clean-up, no release, its lease just runs out
    w1.child.wait().unwrap();
    let mut w2 = workers.remove("w2").unwrap();
    w2.terminate(); // SIGTERM: its job goes back to the queue
    wait_exit(&mut w2);
    // The killed worker's copy of its job stays in its scratch directory until it starts again.
    assert!(
        !scratch_entries(&w1_data).is_empty(),
        "a SIGKILLed worker cannot have cleaned up its job"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    workers.insert("w2", start_worker("w2"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let jobs = loop {
        let jobs = all_jobs(&client, &base).await;
        if jobs.iter().all(terminal) {
            break jobs;
        }
        assert!(tokio::time::Instant::now() < deadline, "jobs did not end");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Each accepted job listed once, and each succeeded; the killed worker's job ran again.
    let listed: Vec<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), JOBS, "neither lost nor duplicated");
    assert_eq!(listed.iter().cloned().collect::<HashSet<_>>(), accepted);
    for j in &jobs {
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    assert!(
        jobs.iter().any(|j| j["attempts"].as_i64().unwrap() >= 2),
        "the SIGKILLed worker's job was run again by another worker"
    );
    // Every artifact downloads through the API process, with the sha256 the job lists.
    for j in &jobs {
        assert_artifacts_download(&client, &base, j).await;
    }
    // Only the finishing attempt's artifacts are recorded.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let stray: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM artifacts a JOIN jobs j ON j.id = a.job_id \
         WHERE a.blob_key NOT LIKE 'artifacts/' || j.id || '/' || j.attempts || '/%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stray, 0, "artifact rows of a dead attempt");
    pool.close().await;

    // The API's stream carried the worker processes' progress and one `done` per job.
    let evs = events.await.unwrap();
    assert!(
        evs.iter().any(|e| e.event == "progress"),
        "no progress reached the API process: {:?}",
        evs.iter().map(|e| e.event.as_str()).collect::<Vec<_>>()
    );
    let mut done = HashSet::new();
    for e in evs.iter().filter(|e| e.event == "done") {
        let id = e.data["job_id"].as_str().unwrap().to_string();
        assert!(done.insert(id.clone()), "job {id} ended twice");
    }
    if !evs.iter().any(|e| e.event == "resync") {
        assert_eq!(done, accepted, "a `done` for every job");
    }

    // Started again (as a supervisor would), the killed worker empties its scratch directory.
    workers.insert("w1", start_worker("w1"));
    for (_, mut w) in workers.drain() {
        w.terminate();
        wait_exit(&mut w);
    }
    api.terminate();
    let mut api = api;
    api.child.wait().unwrap();
    for w in ["w1", "w2", "w3"] {
        let left = scratch_entries(&dir.path().join(w));
        assert!(left.is_empty(), "{w} left scratch files: {left:?}");
    }
    db.drop_now().await;
}
