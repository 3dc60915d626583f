//! The evaluation engine (tract, in-process) and the metric module agree with the shared
//! cases' `evaluate.py` (onnxruntime + numpy).

use crate::helpers::*;
use modelpress::eval::metrics::{score, Metric};
use modelpress::worker::Outcome;
use serde_json::json;
use serde_json::Value;
use std::process::Command;

/// Relative tolerance between tract's and onnxruntime's float outputs, through each figure.
const RUNTIME_TOL: f64 = 1e-5;
/// Same arrays in, same figures out (the issue's "same numbers to 1e-6").
const METRIC_TOL: f64 = 1e-6;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

fn case_json(case: &str) -> Value {
    serde_json::from_slice(&std::fs::read(cases().join(case).join("case.json")).unwrap()).unwrap()
}

fn metric_of(case: &Value) -> &'static str {
    match case["kind"].as_str().unwrap() {
        "classifier" => "top1",
        "detector" => "decision_agreement",
        _ => "cosine",
    }
}

/// `modelpress evaluate` on a job's int4 model.onnx gives evaluate.py's figures on every
/// shipped case: counts exactly, continuous figures within the runtimes' rounding.
#[test]
fn cli_evaluate_matches_evaluate_py_on_every_shipped_case() {
    for name in ["mnist8", "silero_vad", "digits_mlp_control"] {
        let case = case_json(name);
        let dir = cases().join(name);
        let original = dir.join(case["model"]["file"].as_str().unwrap());
        let out = tempfile::tempdir().unwrap();
        let ok = Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args([
                "compress",
                original.to_str().unwrap(),
                "--preset",
                "int4",
                "--quiet",
                "-o",
            ])
            .arg(out.path())
            .status()
            .unwrap();
        assert!(ok.success(), "{name}");
        let candidate = out.path().join("model.onnx");
        let ev = &case["eval"];
        let threshold = ev["threshold"].as_f64().unwrap_or(0.5).to_string();
        let run = Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args([
                "evaluate",
                original.to_str().unwrap(),
                candidate.to_str().unwrap(),
            ])
            .args(["--data", dir.join("eval.npz").to_str().unwrap()])
            .args([
                "--metric",
                metric_of(&case),
                "--feed",
                ev["feed"].as_str().unwrap(),
            ])
            .args([
                "--output",
                ev["output"].as_str().unwrap(),
                "--threshold",
                &threshold,
            ])
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let ours: Value = serde_json::from_slice(&run.stdout).unwrap();
        let theirs = evaluate(name, &candidate);
        let mut compared = 0;
        for (k, v) in theirs.as_object().unwrap() {
            let Some(b) = v.as_f64() else { continue };
            let a = ours[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: no {k} in {ours}"));
            let exact = k.contains("accuracy")
                || k.contains("agreement")
                || k.contains("fraction")
                || k == "samples"
                || k.ends_with("bytes");
            let tol = if exact { 0.0 } else { RUNTIME_TOL };
            assert!(close(a, b, tol), "{name}: {k} {a} vs evaluate.py {b}");
            compared += 1;
        }
        assert!(compared >= 6, "{name}: {theirs}");
    }
}

/// The metric module on the very arrays evaluate.py's `metrics()` scores: the same numbers.
#[test]
fn metric_module_matches_evaluate_py_on_the_same_arrays() {
    let script = r#"
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("evaluate", sys.argv[1])
ev = importlib.util.module_from_spec(spec); spec.loader.exec_module(ev)
rng = np.random.default_rng(7)
out = []
for kind, shape in [("classifier", (300, 10)), ("detector", (500, 1)), ("embedding", (64, 48))]:
    ref = rng.normal(size=shape).astype(np.float32)
    cand = (ref + rng.normal(scale=0.3, size=shape)).astype(np.float32)
    labels = rng.integers(0, shape[1], size=shape[0]) if kind == "classifier" else None
    case = {"kind": kind, "eval": {"threshold": 0.25}}
    d = ev.metrics(case, ref, cand, labels)
    out.append({"kind": kind, "shape": shape, "ref": ref.ravel().tolist(), "cand": cand.ravel().tolist(),
                "labels": None if labels is None else labels.tolist(), "scores": d})
print(json.dumps(out))
"#;
    let out = python(script, &[cases().join("evaluate.py").to_str().unwrap()]);
    let runs: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    for r in runs {
        let f = |k: &str| -> Vec<f32> {
            r[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        };
        let labels: Option<Vec<i64>> = r["labels"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_i64().unwrap()).collect());
        let rows = r["shape"][0].as_u64().unwrap() as usize;
        let metric = match r["kind"].as_str().unwrap() {
            "classifier" => Metric::Top1,
            "detector" => Metric::DecisionAgreement,
            _ => Metric::Cosine,
        };
        let ours = score(metric, &f("ref"), &f("cand"), rows, labels.as_deref(), 0.25).unwrap();
        let ours = serde_json::to_value(&ours).unwrap();
        for (k, v) in r["scores"].as_object().unwrap() {
            let (a, b) = (ours[k].as_f64().unwrap(), v.as_f64().unwrap());
            assert!(close(a, b, METRIC_TOL), "{}: {k} {a} vs {b}", r["kind"]);
        }
    }
}

/// A job with `eval` scores the original and model.onnx on an uploaded dataset: the figures
/// are evaluate.py's on the downloaded model.onnx. mnist-8 fixes its batch to 1, so the
/// default feed falls back to one row at a time; silero's data is fed whole. The dataset
/// cannot be deleted while a queued job names it.
#[tokio::test]
async fn jobs_evaluate_model_onnx_on_an_uploaded_dataset() {
    let app = spawn_app().await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let mnist_eval = upload_dataset(&app, "mnist8/eval.npz").await;
    let vad = app
        .upload(
            case_file("silero_vad/silero_vad_16k_sequence.onnx"),
            "vad.onnx",
        )
        .await;
    let vad_eval = upload_dataset(&app, "silero_vad/eval.npz").await;
    let threshold = case_json("silero_vad")["eval"]["threshold"]
        .as_f64()
        .unwrap();

    // Refusals at submit time, naming the field.
    let refusals = vec![
        (
            json!({"model_id": mnist["id"], "preset": "int8", "eval": {"dataset_id": "0190c0de-0000-7000-8000-000000000000", "metric": "top1"}}),
            404,
            "dataset_not_found",
            "eval.dataset_id",
        ),
        (
            json!({"model_id": vad["id"], "preset": "int8", "eval": {"dataset_id": vad_eval["id"], "metric": "top1"}}),
            422,
            "invalid_spec",
            "eval.metric: top1 needs `labels`",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int8", "eval": {"dataset_id": mnist_eval["id"], "metric": "f1"}}),
            422,
            "invalid_spec",
            "eval.metric",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int8", "eval": {"dataset_id": mnist_eval["id"], "metric": "top1", "batch": 3}}),
            422,
            "invalid_spec",
            "eval.batch: unknown field",
        ),
        // Another model's data: no array named after the graph input.
        (
            json!({"model_id": mnist["id"], "preset": "int8", "eval": {"dataset_id": vad_eval["id"], "metric": "agreement"}}),
            422,
            "dataset_mismatch",
            "no array \"Input3\" for the model's input \"Input3\" (float32 [1, 1, 28, 28])",
        ),
        // silero's state fed in rows would split h and c.
        (
            json!({"model_id": vad["id"], "preset": "int8", "eval": {"dataset_id": vad_eval["id"], "metric": "agreement", "feed": "per_sample"}}),
            422,
            "dataset_mismatch",
            "do not share a row count",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int8", "gate": {"max_metric_drop": 0.01}}),
            422,
            "invalid_spec",
            "gate: needs an `eval` block",
        ),
    ];
    assert_refused(&app, refusals).await;

    let jobs = [
        app.submit_json(json!({"model_id": mnist["id"], "preset": "int8", "latency": false,
            "eval": {"dataset_id": mnist_eval["id"], "metric": "top1"}, "gate": {"max_metric_drop": 0.01}})).await,
        app.submit_json(json!({"model_id": vad["id"], "preset": "int8-tensor", "latency": false,
            "eval": {"dataset_id": vad_eval["id"], "metric": "decision_agreement", "output": "speech_probs", "threshold": threshold},
            "gate": {"max_metric_drop": 0.01}})).await,
    ];
    // Queued jobs hold their dataset.
    let r = app
        .client
        .delete(app.url(&format!(
            "/v1/datasets/{}",
            mnist_eval["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        error_code(&r.json::<Value>().await.unwrap()),
        "dataset_in_use"
    );
    assert_eq!(
        app.drain().await,
        vec![Outcome::Succeeded, Outcome::Succeeded]
    );

    for (job, case, key, feed) in [
        (&jobs[0], "mnist8", "top1_accuracy", "per_sample"),
        (&jobs[1], "silero_vad", "decision_agreement", "whole"),
    ] {
        let job = app.job(job["id"].as_str().unwrap()).await;
        let e = &job["summary"]["evaluation"];
        assert_eq!(e["feed"], feed, "{case}: {e}");
        assert!(e.get("skipped").is_none(), "{case}: {e}");
        let model = app.download_to(&job, "model.onnx").await;
        let theirs = evaluate(case, &model);
        assert_eq!(
            e["compressed"].as_f64(),
            theirs[key].as_f64(),
            "{case}: {e} vs {theirs}"
        );
        assert_eq!(e["scores"][key], theirs[key], "{case}");
        let drop = e["original"].as_f64().unwrap() - e["compressed"].as_f64().unwrap();
        assert!(
            close(e["drop"].as_f64().unwrap(), drop, 1e-12),
            "{case}: {e}"
        );
        let report: Value =
            serde_json::from_slice(&app.download(&job, "report.json").await).unwrap();
        assert_eq!(report["summary"]["evaluation"], *e, "{case}");
    }
    // The figures say what the weight warning only suspected: int8-tensor breaks silero,
    // and the gate marks it (the job still succeeds, with its artifacts).
    let vad_job = app.job(jobs[1]["id"].as_str().unwrap()).await;
    assert!(
        vad_job["summary"]["evaluation"]["compressed"]
            .as_f64()
            .unwrap()
            < 0.5
    );
    assert_eq!(vad_job["quality"], "failed_gate");
    assert_eq!(vad_job["summary"]["quality"], "failed_gate");
    let warned: Vec<&str> = vad_job["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert!(warned.contains(&"failed_gate"), "{warned:?}");
    let mnist_job = app.job(jobs[0]["id"].as_str().unwrap()).await;
    assert_eq!(
        mnist_job["summary"]["evaluation"]["original"].as_f64(),
        Some(0.984)
    );
    assert_eq!(mnist_job["quality"], "passed_gate");
    assert_eq!(
        mnist_job["summary"]["evaluation"]["gate"],
        json!({"max_metric_drop": 0.01, "quality": "passed_gate"})
    );
    // Both models timed per row on the dataset.
    for job in [&vad_job, &mnist_job] {
        let l = &job["summary"]["evaluation"]["latency"];
        assert!(l["original_ms_per_row"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["compressed_ms_per_row"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert_eq!(mnist_job["summary"]["evaluation"]["latency"]["rows"], 2000);
    let r = app
        .client
        .delete(app.url(&format!(
            "/v1/datasets/{}",
            mnist_eval["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    app.stop().await;
}

/// Preset `auto` on mnist-8 with its eval set: a search that keeps top-1 within 0.01 of the
/// original, verified by evaluate.py on the downloaded model.onnx; search.json lists every
/// candidate with the frontier, sensitivity.json the per-layer table, and the chosen
/// pipeline resubmitted unchanged gives the same model.onnx.
#[tokio::test]
async fn preset_auto_searches_within_the_metric_drop() {
    let app = spawn_app().await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let data = upload_dataset(&app, "mnist8/eval.npz").await;
    let eval = json!({"dataset_id": data["id"], "metric": "top1"});
    for (body, says) in [
        (
            json!({"model_id": mnist["id"], "preset": "auto"}),
            "constraints: a search needs an `eval` block",
        ),
        (
            json!({"model_id": mnist["id"], "pipeline": [{"method": "quantize", "bits": 8}], "constraints": {"max_metric_drop": 0.01}, "eval": eval}),
            "constraints: a search chooses the pipeline",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int8", "max_seconds": 5}),
            "max_seconds: bounds a search",
        ),
        (
            json!({"model_id": mnist["id"], "constraints": {"max_metric_drop": 0.01, "min_ratio": 2}, "eval": eval}),
            "not both",
        ),
    ] {
        let r = app.submit(body.clone()).await;
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!((s, error_code(&v)), (422, "invalid_spec"), "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {v}"
        );
    }
    let job = app
        .submit_json(
            json!({"model_id": mnist["id"], "preset": "auto", "eval": eval, "latency": false}),
        )
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let job = app.job(job["id"].as_str().unwrap()).await;
    let s = &job["summary"]["search"];
    assert_eq!(s["verdict"], "met", "{s}");
    assert_eq!(s["sensitivity_cached"], false, "{s}");
    let e = &job["summary"]["evaluation"];
    assert!(e["drop"].as_f64().unwrap() <= 0.01, "{e}");
    let model = app.download_to(&job, "model.onnx").await;
    let theirs = evaluate("mnist8", &model);
    assert!(
        theirs["top1_accuracy"].as_f64().unwrap() >= 0.984 - 0.01,
        "{theirs}"
    );
    assert_eq!(e["compressed"].as_f64(), theirs["top1_accuracy"].as_f64());
    let size = std::fs::metadata(&model).unwrap().len();
    assert_eq!(s["chosen"]["bytes"].as_u64(), Some(size), "{s}");
    // int3 on every layer (3,846 B) is within 0.01 of top-1 here: more than 5x.
    assert!(
        job["summary"]["ratio"].as_f64().unwrap() > 5.0,
        "{}",
        job["summary"]
    );

    let doc: Value = serde_json::from_slice(&app.download(&job, "search.json").await).unwrap();
    let cands = doc["candidates"].as_array().unwrap();
    assert!(cands.len() >= 3, "{doc}");
    assert!(cands.iter().any(|c| c["frontier"] == true));
    assert!(cands
        .iter()
        .any(|c| c["name"] == "int8 per tensor, every layer"));
    // The chosen one is the smallest that meets the goal.
    let chosen = &cands[doc["chosen"].as_u64().unwrap() as usize];
    assert_eq!(chosen["meets"], true);
    for c in cands.iter().filter(|c| c["meets"] == true) {
        assert!(c["bytes"].as_u64() >= chosen["bytes"].as_u64(), "{c}");
    }
    let sens: Value =
        serde_json::from_slice(&app.download(&job, "sensitivity.json").await).unwrap();
    let layers = sens["layers"].as_array().unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    // Every layer of at least 128 weights, the 200-weight first convolution included.
    assert_eq!(
        names,
        ["Parameter193", "Parameter87", "Parameter5"],
        "{sens}"
    );
    for l in layers {
        assert_eq!(
            l["settings"].as_array().unwrap().len(),
            modelpress::search::LADDER.len(),
            "{l}"
        );
    }
    // The chosen pipeline resubmits unchanged, to the same bytes.
    let again = app
        .submit_json(
            json!({"model_id": mnist["id"], "pipeline": doc["pipeline"], "latency": false}),
        )
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let again = app.job(again["id"].as_str().unwrap()).await;
    let sha = |j: &Value| {
        j["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "model.onnx")
            .unwrap()["sha256"]
            .clone()
    };
    assert_eq!(sha(&again), sha(&job));

    // max_seconds is honoured: out of time after the baselines, the best so far is returned
    // and the search says it is incomplete. (Its sensitivity table comes from the cache.)
    let hurried = app
        .submit_json(json!({"model_id": mnist["id"], "constraints": {"min_ratio": 2.5, "objective": "best_metric"},
            "max_seconds": 0.001, "eval": eval, "latency": false}))
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let hurried = app.job(hurried["id"].as_str().unwrap()).await;
    let s = &hurried["summary"]["search"];
    // The four baselines (int8 per channel and per tensor, int4 and int3 on every layer).
    assert_eq!(s["complete"], false, "{s}");
    assert_eq!(s["candidates"], 4, "{s}");
    // The first search's table was kept for this model and dataset: no layer was re-measured.
    assert_eq!(s["sensitivity_cached"], true, "{s}");
    assert_eq!(s["trials"], 4, "{s}");
    assert_eq!(
        s["goal"],
        json!({"objective": "best_metric", "min_ratio": 2.5})
    );
    // int8 on every layer is 3.7x: the goal is met by a baseline.
    assert_eq!(s["verdict"], "met", "{s}");

    // "analyze": true beside a preset: each layer alone at every strength, then the preset.
    let r = app
        .submit(json!({"model_id": mnist["id"], "preset": "int8", "analyze": true}))
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "invalid_spec", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("analyze: a sensitivity analysis needs an `eval` block"));
    let analyzed = app
        .submit_json(json!({"model_id": mnist["id"], "preset": "int8", "analyze": true, "eval": eval, "latency": false}))
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let analyzed = app.job(analyzed["id"].as_str().unwrap()).await;
    assert_eq!(
        analyzed["summary"]["sensitivity"]["layers"], 3,
        "{}",
        analyzed["summary"]
    );
    let sens: Value =
        serde_json::from_slice(&app.download(&analyzed, "sensitivity.json").await).unwrap();
    assert_eq!(sens["complete"], true);
    let labels: Vec<&str> = sens["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 13, "{labels:?}");
    for l in sens["layers"].as_array().unwrap() {
        let drop = |label: &str| {
            l["settings"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["setting"] == label)
                .and_then(|c| c["drop"].as_f64())
                .unwrap_or_else(|| panic!("{label}: {l}"))
        };
        // Two bits hurt more than eight, 90 % sparsity more than 30 %.
        assert!(drop("int2") > drop("int8"), "{l}");
        assert!(drop("sparsity-0.9") > drop("sparsity-0.3"), "{l}");
    }
    // The preset still ran: model.onnx is its int8 file.
    assert!(analyzed["summary"]["ratio"].as_f64().unwrap() > 2.5);
    app.stop().await;
}

/// A search stops between trials when its job is cancelled: no artifact is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_search_stops_on_cancel() {
    let app = spawn_app_with(|c| c.lease_ms = 600).await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let data = upload_dataset(&app, "mnist8/eval.npz").await;
    let j = app
        .submit_json(
            json!({"model_id": mnist["id"], "preset": "auto", "latency": false,
            "eval": {"dataset_id": data["id"], "metric": "top1"}}),
        )
        .await;
    let id = j["id"].as_str().unwrap().to_string();
    // Cancel once the search reports its trials.
    let ready = |j: &Value| {
        j["stage"]
            .as_str()
            .is_some_and(|s| s.starts_with("search: trial"))
    };
    assert_eq!(cancel_when(&app, &id, ready).await, Outcome::Cancelled);
    let job = app.job(&id).await;
    assert_eq!(job["state"], "cancelled");
    assert!(job["artifacts"].as_array().unwrap().is_empty());
    app.stop().await;
}
