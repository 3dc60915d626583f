//! README's curl walkthrough runs as written against a real server.

use crate::helpers::*;
use std::process::Command;

fn walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("README has a walkthrough");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walkthrough end marker");
    let mut script = String::new();
    let mut in_block = false;
    for line in readme[start..end].lines() {
        if line.starts_with("```sh") {
            in_block = true;
        } else if line.starts_with("```") {
            in_block = false;
        } else if in_block {
            script.push_str(line);
            script.push('\n');
        }
    }
    script
}

#[tokio::test]
async fn readme_walkthrough_runs() {
    let app = spawn_app_with(|c| c.workers = Some(1)).await;
    let script = walkthrough();
    assert!(script.contains("curl"), "{script}");
    let work = tempfile::tempdir().unwrap();
    let (base, dir) = (app.base.clone(), work.path().to_path_buf());
    // The server shares this runtime: run the blocking child off it.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg("-euo")
            .arg("pipefail")
            .arg("-c")
            .arg(&script)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("MODELPRESS", base)
            .env("OUT", dir)
            .env("MODELPRESS_CLI", env!("CARGO_BIN_EXE_modelpress"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walkthrough failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Step 6 printed the job's evaluation on the uploaded dataset.
    assert!(
        stdout.contains("'metric': 'top1'") && stdout.contains("'original': 0.984"),
        "{stdout}"
    );
    let restored = work.path().join("restored.onnx");
    assert!(
        restored.exists(),
        "walkthrough did not download restored.onnx:\n{stdout}"
    );
    let score = evaluate("mnist8", &restored);
    assert!(score["top1_accuracy"].as_f64().unwrap() >= 0.981);
    // Step 5 rebuilt the Deep Compression archive into a model onnxruntime runs.
    let rebuilt = work.path().join("rebuilt.onnx");
    let score = evaluate("mnist8", &rebuilt);
    assert!(score["top1_accuracy"].as_f64().unwrap() >= 0.981);
    // Step 7's search met its goal and left its candidates.
    assert!(stdout.contains("'verdict': 'met'"), "{stdout}");
    let search: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("search.json")).unwrap()).unwrap();
    assert!(search["candidates"].as_array().unwrap().len() >= 3);
    // Step 8 calibrated on calib.npz: static int8 that onnxruntime runs and that keeps top-1.
    assert!(
        stdout.contains("'rows': 500") && stdout.contains("'static_tensors': 3"),
        "{stdout}"
    );
    let score = evaluate("mnist8", &work.path().join("static.onnx"));
    assert!(score["top1_accuracy"].as_f64().unwrap() >= 0.983, "{score}");
    // Step 9 fine-tuned ternary weights on train.npz: onnxruntime scores the file above the
    // 0.9165 of ternary alone on eval.npz.
    assert!(stdout.contains("'validation_after'"), "{stdout}");
    let score = evaluate("mnist8", &work.path().join("tuned.onnx"));
    assert!(score["top1_accuracy"].as_f64().unwrap() >= 0.97, "{score}");
    app.stop().await;
}
