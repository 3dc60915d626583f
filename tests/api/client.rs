//! A Python client generated from the served openapi.yaml by a real generator
//! (`openapi-python-client`, which `.ci/run` installs from pip) builds, and drives the
//! walkthrough: upload a model and a dataset, submit a pipeline with an eval block, follow
//! the job, download model.onnx and run it (`tests/client/walkthrough.py`).

use crate::helpers::*;
use std::process::Command;

#[tokio::test]
async fn a_client_generated_from_openapi_yaml_runs_the_walkthrough() {
    let app = spawn_app_with(|c| c.workers = Some(1)).await;
    let work = tempfile::tempdir().unwrap();
    // The document the server serves, not the file beside the sources.
    let served = work.path().join("openapi.yaml");
    std::fs::write(&served, app.get_text("/openapi.yaml").await).unwrap();
    let package = work.path().join("modelpress_client");
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let base = app.base.clone();
    let run = move || {
        let generated = Command::new("openapi-python-client")
            .arg("generate")
            .arg("--path")
            .arg(&served)
            .arg("--output-path")
            .arg(&package)
            .args(["--meta", "none"])
            .output()
            .unwrap_or_else(|e| {
                panic!("openapi-python-client does not run ({e}); .ci/run installs it")
            });
        let log = String::from_utf8_lossy(&generated.stdout).to_string()
            + &String::from_utf8_lossy(&generated.stderr);
        assert!(generated.status.success(), "generation failed:\n{log}");
        // A schema the generator cannot read is dropped with a warning, and the client
        // then cannot read what refers to it.
        assert!(!log.contains("Unable to process schema"), "{log}");
        let walked = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/client/walkthrough.py"
            ))
            .arg(&base)
            .arg(cases().join("mnist8/mnist-8.onnx"))
            .arg(cases().join("mnist8/eval.npz"))
            .arg(&out)
            .env("PYTHONPATH", package.parent().unwrap())
            .env("OMP_NUM_THREADS", "1")
            .output()
            .unwrap();
        (
            walked.status.success(),
            String::from_utf8_lossy(&walked.stdout).to_string()
                + &String::from_utf8_lossy(&walked.stderr),
        )
    };
    // The server shares this runtime: run the blocking children off it.
    let (ok, log) = tokio::task::spawn_blocking(run).await.unwrap();
    assert!(ok && log.contains("walkthrough: ok"), "{log}");
    app.stop().await;
}
