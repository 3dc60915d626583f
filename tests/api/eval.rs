//! The evaluation engine (tract, in-process) and the metric module agree with the shared
//! cases' `evaluate.py` (onnxruntime + numpy).

use crate::helpers::*;
use modelpress::eval::metrics::{score, Metric};
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
