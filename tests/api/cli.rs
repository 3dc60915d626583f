//! The CLI writes the same artifacts as a server job.

use crate::helpers::*;
use serde_json::json;
use std::process::Command;

#[tokio::test]
async fn cli_compress_matches_the_server_job_and_inspect_lists_tensors() {
    let input = cases().join("digits_mlp_control/digits_mlp.safetensors");
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .args([
            "compress",
            input.to_str().unwrap(),
            "--preset",
            "prune50-int8",
            "--quiet",
            "-o",
        ])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let app = spawn_app().await;
    let m = app
        .upload(std::fs::read(&input).unwrap(), "d.safetensors")
        .await;
    let r = app
        .submit(json!({"model_id": m["id"], "preset": "prune50-int8"}))
        .await;
    let job: serde_json::Value = r.json().await.unwrap();
    app.drain().await;
    let job = app.job(job["id"].as_str().unwrap()).await;
    for name in ["model.safetensors", "restored.safetensors"] {
        let server = app.download(&job, name).await;
        let cli = std::fs::read(out.path().join(name)).unwrap();
        assert!(server == cli, "{name}: CLI and server differ");
    }
    app.stop().await;

    let inspect = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .args(["inspect", "--json"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(inspect.status.success());
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["parameter_count"], 50_826);
    let bad = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .args(["inspect"])
        .arg(cases().join("README.md"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a non-model is a user error");
    let spec = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        spec.path(),
        r#"{"pipeline":[{"method":"prune","sparsity":2}]}"#,
    )
    .unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .args([
            "compress",
            input.to_str().unwrap(),
            "--spec",
            spec.path().to_str().unwrap(),
            "-o",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("pipeline[0].sparsity"));
}

/// `modelpress compress` distills the digits MLP with `--distill-data` standing for the
/// block's dataset (the same student as a job: 128 and 64 hidden units, scored by
/// evaluate.py); a spec whose training block has no data file is refused, not run as if the
/// block were absent.
#[test]
fn cli_distills_and_refuses_a_training_block_without_its_file() {
    let case = cases().join("digits_mlp_control");
    let input = case.join("digits_mlp.onnx");
    let out = tempfile::tempdir().unwrap();
    let spec = out.path().join("spec.json");
    std::fs::write(&spec, r#"{"distill": {"student": {"width": 0.5}}}"#).unwrap();
    let run = |extra: &[&std::path::Path]| {
        Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args(["compress", input.to_str().unwrap(), "--quiet", "--spec"])
            .arg(&spec)
            .args(extra)
            .arg("-o")
            .arg(out.path().join("out"))
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--distill-data"),
        "{refused:?}"
    );
    let data = case.join("train.npz");
    let flag = std::path::Path::new("--distill-data");
    let ok = run(&[flag, &data]);
    assert!(ok.status.success(), "{ok:?}");
    let model = out.path().join("out/model.onnx");
    let scored = evaluate("digits_mlp_control", &model);
    assert!(
        scored["top1_accuracy"].as_f64().unwrap() >= 0.97,
        "{scored}"
    );
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("out/training.json")).unwrap())
            .unwrap();
    let kept: Vec<u64> = log["student"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kept"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, [128, 64], "{log}");
}
