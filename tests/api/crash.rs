//! kill -9 while a job runs: after a restart the job completes exactly once.
#![cfg_attr(not(feature = "failpoints"), allow(unused_imports))]

use crate::helpers::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn start(data: &std::path::Path, failpoint: Option<&str>) -> Process {
    let mut env = vec![
        ("MODELPRESS_DATA_DIR", data.display().to_string()),
        ("MODELPRESS_WORKERS", "1".to_string()),
        ("MODELPRESS_LEASE_MS", "1500".to_string()),
    ];
    if let Some(fp) = failpoint {
        env.push(("MODELPRESS_FAILPOINT", fp.to_string()));
    }
    Process::start(&[], &env)
}

async fn get(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn kill_9_during_a_job_then_restart_completes_it_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let client = reqwest::Client::new();
    // Slow every tensor so the job is surely mid-flight when the process dies.
    let mut server = start(&data, Some("tensor-delay-ms=500"));
    let m: Value = client
        .post(format!("{}/v1/models", server.base))
        .body(case_file("silero_vad/silero_vad_16k.safetensors"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job: Value = client
        .post(format!("{}/v1/jobs", server.base))
        .json(&json!({"model_id": m["id"], "preset": "int8"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = get(&client, format!("{}/v1/jobs/{id}", server.base)).await;
        if j["state"] == "running" && j["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        assert_ne!(j["state"], "succeeded", "the job finished before the kill");
        assert!(Instant::now() < deadline, "job never ran: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();

    let mut server = start(&data, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let j = get(&client, format!("{}/v1/jobs/{id}", server.base)).await;
        if j["state"] == "succeeded" {
            break j;
        }
        assert!(
            !["failed", "cancelled"].contains(&j["state"].as_str().unwrap()),
            "{j}"
        );
        assert!(
            Instant::now() < deadline,
            "job not completed after restart: {j}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        done["attempts"], 2,
        "one attempt died with the process, one finished"
    );
    let names = artifact_names(&done);
    assert_eq!(
        names,
        vec![
            "manifest.json",
            "model.mpz",
            "model.safetensors",
            "report.json",
            "restored.safetensors"
        ],
        "no duplicate artifacts"
    );
    assert_artifacts_download(&client, &server.base, &done).await;
    let jobs = get(&client, format!("{}/v1/jobs", server.base)).await;
    assert_eq!(
        jobs["items"].as_array().unwrap().len(),
        1,
        "the job was neither lost nor duplicated"
    );
    // The dead attempt's staging files were swept at start-up, and the finished attempt
    // left none.
    let staged: Vec<_> = std::fs::read_dir(data.join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "staging files left: {staged:?}");
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_the_server_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(&dir.path().join("data"), None);
    let client = reqwest::Client::new();
    let h = get(&client, format!("{}/healthz", server.base)).await;
    assert_eq!(h["status"], "ok");
    server.terminate();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
