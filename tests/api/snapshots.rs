//! API responses as snapshots, ids and timestamps redacted (convention 12): a change to the
//! shape of a response shows up in review.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn job_and_inventory_responses() {
    let app = spawn_app().await;
    let m = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    insta::assert_json_snapshot!("model", m, { ".id" => "[id]", ".created_at" => "[time]" });
    let (_, tensors) = app
        .get_json(&format!("/v1/models/{}/tensors", m["id"].as_str().unwrap()))
        .await;
    insta::assert_json_snapshot!("tensors", tensors, { ".model_id" => "[id]" });
    let j = app
        // Timings would make report.json differ run to run: the latency has its own test.
        .submit_json(json!({"model_id": m["id"], "preset": "int8", "latency": false}))
        .await;
    app.drain().await;
    let job = app.job(j["id"].as_str().unwrap()).await;
    insta::assert_json_snapshot!("job", job, {
        ".id" => "[id]",
        ".model_id" => "[id]",
        ".created_at" => "[time]",
        ".started_at" => "[time]",
        ".finished_at" => "[time]",
        ".artifacts[].url" => "[url]",
        // The signed manifest names the job and its time: it differs run to run.
        ".artifacts[0].sha256" => "[manifest sha256]",
        ".artifacts[0].size_bytes" => "[manifest size]",
    });
    assert_eq!(job["artifacts"][0]["name"], "manifest.json");
    app.stop().await;
}
