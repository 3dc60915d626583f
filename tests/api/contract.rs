//! The served API against its description, judged by outside tools: openapi.yaml parsed by a
//! strict YAML 1.2 parser and validated as OpenAPI 3.1, schemathesis generating requests
//! from it and checking every answer, and promtool checking /metrics. `.ci/run` installs
//! the three (pip `schemathesis openapi-spec-validator ruamel.yaml`, Debian `prometheus`).

use crate::helpers::*;
use std::process::Command;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not run ({e}); .ci/run installs it"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// YAML 1.2 (ruamel, strict: duplicate keys are errors) and OpenAPI 3.1's own schema.
#[test]
fn openapi_is_strict_yaml_1_2_and_valid_openapi_3_1() {
    let script = r#"
import sys
from ruamel.yaml import YAML
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
yaml = YAML(typ="safe", pure=True)
yaml.allow_duplicate_keys = False
doc = yaml.load(open(sys.argv[1]))
assert doc["openapi"].startswith("3.1"), doc["openapi"]
validate(doc, cls=OpenAPIV31SpecValidator)
print("valid", len(doc["paths"]))
"#;
    let out = python(
        script,
        &[concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")],
    );
    assert!(out.starts_with("valid"), "{out}");
}

/// schemathesis against the running server: every check, a bounded number of examples per
/// operation, 0 failures. Some of acme's things exist so that links and ids can resolve.
/// The never-ending `/v1/events` stream is left out (its status and type have their own test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_mismatch_between_the_server_and_openapi_yaml() {
    let app = spawn_app().await;
    let job = mnist_int8_job(&app).await;
    app.drain().await;
    let (_, j) = app.get_json(&format!("/v1/jobs/{job}")).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let model = j["model_id"].as_str().unwrap().to_string();
    let dataset = upload_dataset(&app, "mnist8/eval.npz").await;
    let dataset = dataset["id"].as_str().unwrap().to_string();
    let spare_model = app
        .upload(case_file("mnist8/mnist-8.onnx"), "spare.onnx")
        .await;
    let spare_model = spare_model["id"].as_str().unwrap().to_string();
    let spare_dataset = upload_dataset(&app, "mnist8/eval.npz").await;
    let spare_dataset = spare_dataset["id"].as_str().unwrap().to_string();
    let base = app.base.clone();
    let report = app.dir.path().join("schemathesis");
    let (ok, out) = tokio::task::spawn_blocking(move || {
        run(Command::new("schemathesis")
            .arg("--config-file")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/schemathesis.toml"
            ))
            .arg("run")
            .arg(format!("{base}/openapi.yaml"))
            .args(["--url", &base])
            .args(["--checks", "all"])
            .args(["--max-examples", "15"])
            .args(["--max-time", "150"])
            .args(["--seed", "20261205"])
            // One worker: two threads tripped CPython 3.11's ast recursion check inside hypothesis.
            .args(["--workers", "1"])
            .args(["--request-timeout", "20"])
            .args(["--exclude-path", "/v1/events"])
            .args(["--exclude-path-regex", "/events$"])
            .arg("--no-shrink")
            .arg("--report-dir")
            .arg(&report)
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_TELEMETRY", "false")
            // The ids tests/schemathesis.toml gives the operations on one thing.
            .env("MP_MODEL_ID", &model)
            .env("MP_DATASET_ID", &dataset)
            .env("MP_JOB_ID", &job)
            .env("MP_SPARE_MODEL_ID", &spare_model)
            .env("MP_SPARE_DATASET_ID", &spare_dataset))
    })
    .await
    .unwrap();
    let tail: String = out
        .lines()
        .rev()
        .take(200)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(ok, "schemathesis found mismatches:\n{tail}");
    // With the real ids, every operation on one thing reaches its handler.
    assert!(
        !out.contains("Missing test data"),
        "operations that only met 404:\n{tail}"
    );
    app.stop().await;
}

/// `promtool check metrics` on /metrics after some traffic: every family has help text and
/// a valid name, type and unit.
#[tokio::test]
async fn promtool_finds_metrics_clean() {
    let app = spawn_app().await;
    mnist_int8_job(&app).await;
    app.drain().await;
    let _ = app.get_json("/v1/jobs/nope").await;
    let metrics = app.get_text("/metrics").await;
    let path = app.dir.path().join("metrics.txt");
    std::fs::write(&path, &metrics).unwrap();
    let (ok, out) = run(Command::new("sh")
        .arg("-c")
        .arg("promtool check metrics < \"$1\"")
        .arg("sh")
        .arg(&path));
    assert!(ok && out.trim().is_empty(), "promtool:\n{out}\n{metrics}");
    app.stop().await;
}
