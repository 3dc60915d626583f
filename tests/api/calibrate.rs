//! Calibrated quantization over HTTP: a `calibration` block names a stored dataset, the
//! worker runs the original on it, and GPTQ (`"calibrated": true`) or static int8
//! (`"activations"`) use what it measured. Scored on a different dataset than the one
//! calibrated on, in tract and in onnxruntime (evaluate.py).

use crate::helpers::*;
use modelpress::worker::Outcome;
use serde_json::{json, Value};

fn codes(job: &Value) -> Vec<String> {
    job["warnings"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| w["code"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Submit-time refusals of calibration blocks, each naming the field.
#[tokio::test]
async fn calibration_blocks_are_checked_at_submit() {
    let app = spawn_app().await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let weights = app
        .upload(
            case_file("silero_vad/silero_vad_16k.safetensors"),
            "vad.safetensors",
        )
        .await;
    let calib = upload_dataset(&app, "mnist8/calib.npz").await;
    let vad_eval = upload_dataset(&app, "silero_vad/eval.npz").await;
    let refusals = vec![
        (
            json!({"model_id": mnist["id"], "preset": "int4-g32-gptq"}),
            422,
            "invalid_spec",
            "needs a `calibration` block",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int8", "calibration": {"dataset_id": calib["id"]}}),
            422,
            "invalid_spec",
            "calibration: no step uses it",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int4-g32-gptq", "calibration": {"dataset_id": "0190c0de-0000-7000-8000-000000000000"}}),
            404,
            "dataset_not_found",
            "calibration.dataset_id",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int4-g32-gptq", "calibration": {"dataset_id": calib["id"], "rows": 3}}),
            422,
            "invalid_spec",
            "unknown field `rows`",
        ),
        (
            json!({"model_id": mnist["id"], "preset": "int4-g32-gptq", "calibration": {"dataset_id": vad_eval["id"]}}),
            422,
            "dataset_mismatch",
            "calibration.dataset_id",
        ),
        (
            json!({"model_id": weights["id"], "preset": "int4-g32-gptq", "calibration": {"dataset_id": calib["id"]}}),
            422,
            "invalid_spec",
            "calibration runs the model",
        ),
        (
            json!({"model_id": mnist["id"], "pipeline": [{"method": "quantize", "bits": 4, "damp": 0.1}]}),
            422,
            "invalid_spec",
            "pipeline[0].damp: goes with \"calibrated\": true",
        ),
        (
            json!({"model_id": mnist["id"], "pipeline": [{"method": "quantize", "bits": 4, "activations": "minmax"}], "calibration": {"dataset_id": calib["id"]}}),
            422,
            "invalid_spec",
            "pipeline[0].activations",
        ),
        (
            json!({"model_id": mnist["id"], "pipeline": [{"method": "quantize", "bits": 8, "activations": "median"}], "calibration": {"dataset_id": calib["id"]}}),
            422,
            "invalid_spec",
            "pipeline[0].activations",
        ),
    ];
    assert_refused(&app, refusals).await;
    app.stop().await;
}

/// mnist-8 at int4 in groups of 32: GPTQ on calib.npz (500 training images) against round to
/// nearest, both scored on eval.npz (2,000 test images). GPTQ's logits stay closer to the
/// original's, in tract and in onnxruntime; both files have the same bytes.
#[tokio::test]
async fn gptq_on_calibration_data_beats_round_to_nearest() {
    let app = spawn_app().await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let calib = upload_dataset(&app, "mnist8/calib.npz").await;
    let eval = upload_dataset(&app, "mnist8/eval.npz").await;
    let eval_block = json!({"dataset_id": eval["id"], "metric": "top1"});
    let rtn = app
        .submit_json(json!({"model_id": mnist["id"], "preset": "int4-g32", "latency": false, "eval": eval_block}))
        .await;
    let gptq = app
        .submit_json(
            json!({"model_id": mnist["id"], "preset": "int4-g32-gptq", "latency": false,
            "calibration": {"dataset_id": calib["id"]}, "eval": eval_block}),
        )
        .await;
    // The calibration set is in use while a job names it.
    let r = app
        .client
        .delete(app.url(&format!("/v1/datasets/{}", calib["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // Calibrating on the rows it is scored on works, and says it flatters the model.
    let same = app
        .submit_json(
            json!({"model_id": mnist["id"], "preset": "int4-g32-gptq", "latency": false,
            "calibration": {"dataset_id": eval["id"], "max_rows": 200}, "eval": eval_block}),
        )
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded; 3]);
    let rtn = app.job(rtn["id"].as_str().unwrap()).await;
    let gptq = app.job(gptq["id"].as_str().unwrap()).await;
    let same = app.job(same["id"].as_str().unwrap()).await;

    let c = &gptq["summary"]["calibration"];
    assert_eq!(c["rows"], 500, "{c}");
    assert_eq!(c["feed"], "per_sample", "{c}");
    assert_eq!(c["gptq_tensors"], 2, "{c}");
    assert_eq!(c["dataset_id"], calib["id"], "{c}");
    assert_eq!(same["summary"]["calibration"]["rows"], 200);
    assert!(
        !codes(&gptq).contains(&"calibrated_on_eval_data".to_string()),
        "{gptq}"
    );
    assert!(
        codes(&same).contains(&"calibrated_on_eval_data".to_string()),
        "{same}"
    );
    assert!(rtn["summary"].get("calibration").is_none());

    let report: Value = serde_json::from_slice(&app.download(&gptq, "report.json").await).unwrap();
    let conv = report["report"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "Parameter87")
        .unwrap();
    assert_eq!(conv["methods"][0], "quantize(int4,affine,group 32,gptq)");
    assert_eq!(conv["details"]["calibration"]["method"], "gptq");
    // 500 images × 14×14 positions of the second convolution.
    assert_eq!(conv["details"]["calibration"]["samples"], 98_000);

    let bytes = |j: &Value| j["summary"]["deployable_bytes"].as_u64().unwrap();
    assert_eq!(bytes(&rtn), bytes(&gptq), "same grid, same bytes");
    let tract = |j: &Value| {
        j["summary"]["evaluation"]["scores"]["rel_l2_error"]
            .as_f64()
            .unwrap()
    };
    let ort_rtn = evaluate("mnist8", &app.download_to(&rtn, "model.onnx").await);
    let ort_gptq = evaluate("mnist8", &app.download_to(&gptq, "model.onnx").await);
    let ort = |v: &Value| v["rel_l2_error"].as_f64().unwrap();
    // Measured: 0.0639 → 0.0276 (tract and onnxruntime agree to 1e-5).
    assert!(
        tract(&gptq) < 0.7 * tract(&rtn),
        "{} vs {}",
        tract(&gptq),
        tract(&rtn)
    );
    assert!(
        ort(&ort_gptq) < 0.7 * ort(&ort_rtn),
        "{ort_gptq} vs {ort_rtn}"
    );
    assert!((ort(&ort_gptq) - tract(&gptq)).abs() < 1e-4 * (1.0 + ort(&ort_gptq)));
    assert!(
        ort_gptq["top1_accuracy"].as_f64().unwrap() >= 0.98,
        "{ort_gptq}"
    );
    app.stop().await;
}

/// silero_vad: the convolutions (1-D) are calibrated; the LSTM's weights, whose inputs are
/// not measured, round to nearest, and the job says so with a warning naming them.
#[tokio::test]
async fn weights_calibration_cannot_serve_round_to_nearest_with_a_warning() {
    let app = spawn_app().await;
    let vad = app
        .upload(
            case_file("silero_vad/silero_vad_16k_sequence.onnx"),
            "vad.onnx",
        )
        .await;
    let data = upload_dataset(&app, "silero_vad/eval.npz").await;
    let job = app
        .submit_json(
            json!({"model_id": vad["id"], "preset": "int4-g32-gptq", "latency": false,
            "calibration": {"dataset_id": data["id"]}}),
        )
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let job = app.job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["summary"]["calibration"]["feed"], "whole");
    assert_eq!(job["summary"]["calibration"]["gptq_tensors"], 5);
    let w = job["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["code"] == "calibration_missing")
        .unwrap_or_else(|| panic!("{job}"));
    let m = w["message"].as_str().unwrap();
    assert!(m.contains("onnx::LSTM_209") && m.contains("LSTM"), "{m}");
    // The file still runs in onnxruntime.
    let theirs = evaluate("silero_vad", &app.download_to(&job, "model.onnx").await);
    assert!(
        theirs["decision_agreement"].as_f64().unwrap() > 0.9,
        "{theirs}"
    );
    app.stop().await;
}

/// The ops onnxruntime runs `model` with after its graph optimizations.
fn onnxruntime_ops(model: &std::path::Path) -> Value {
    let out = python(
        r#"
import collections, json, os, sys, tempfile
import onnx, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
out = tempfile.mktemp(suffix=".onnx"); so.optimized_model_filepath = out
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
print(json.dumps(collections.Counter(n.op_type for n in onnx.load(out).graph.node)))
os.remove(out)
"#,
        &[model.to_str().unwrap()],
    );
    serde_json::from_str(out.trim()).unwrap()
}

/// Static int8 on mnist-8 (opset 8): calibrated on calib.npz, the model is raised to opset
/// 13 for per-channel QuantizeLinear/DequantizeLinear, onnxruntime runs its convolutions as
/// QLinearConv, and the accuracy on eval.npz is the original's (tract's figure = evaluate.py's).
#[tokio::test]
async fn static_int8_runs_on_integer_kernels_in_onnxruntime() {
    let app = spawn_app().await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let calib = upload_dataset(&app, "mnist8/calib.npz").await;
    let eval = upload_dataset(&app, "mnist8/eval.npz").await;
    let vad = app
        .upload(
            case_file("silero_vad/silero_vad_16k_sequence.onnx"),
            "vad.onnx",
        )
        .await;
    let vad_data = upload_dataset(&app, "silero_vad/eval.npz").await;
    let job = app
        .submit_json(
            json!({"model_id": mnist["id"], "preset": "int8-static", "latency": false,
            "calibration": {"dataset_id": calib["id"]},
            "eval": {"dataset_id": eval["id"], "metric": "top1"}}),
        )
        .await;
    let vad_job = app
        .submit_json(
            json!({"model_id": vad["id"], "preset": "int8-static", "latency": false,
            "calibration": {"dataset_id": vad_data["id"]}}),
        )
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded; 2]);
    let job = app.job(job["id"].as_str().unwrap()).await;
    let c = &job["summary"]["calibration"];
    assert_eq!(c["static_tensors"], 3, "{c}");
    // Each convolution's input and output, and the MatMul's input.
    assert_eq!(c["static_activations"], 5, "{c}");
    let report: Value = serde_json::from_slice(&app.download(&job, "report.json").await).unwrap();
    assert_eq!(report["deployable"]["opset"], 13);
    let model = app.download_to(&job, "model.onnx").await;
    let ops = onnxruntime_ops(&model);
    assert_eq!(ops["QLinearConv"], 2, "{ops}");
    let theirs = evaluate("mnist8", &model);
    let e = &job["summary"]["evaluation"];
    assert_eq!(
        e["compressed"].as_f64(),
        theirs["top1_accuracy"].as_f64(),
        "{e} vs {theirs}"
    );
    assert!(
        theirs["top1_accuracy"].as_f64().unwrap() >= 0.983,
        "{theirs}"
    );
    assert!(
        !codes(&job).contains(&"static_not_applied".to_string()),
        "{job}"
    );

    // silero: its six convolutions (the STFT, four encoder layers, the decoder's 1×1) are
    // static; its LSTM stays weight-only int8, and the job says so.
    let vad_job = app.job(vad_job["id"].as_str().unwrap()).await;
    let w = vad_job["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["code"] == "static_not_applied")
        .unwrap_or_else(|| panic!("{vad_job}"));
    assert!(w["message"].as_str().unwrap().contains("LSTM"), "{w}");
    assert_eq!(vad_job["summary"]["calibration"]["static_tensors"], 6);
    let model = app.download_to(&vad_job, "model.onnx").await;
    assert!(onnxruntime_ops(&model)["QLinearConv"].as_u64().unwrap() >= 4);
    let theirs = evaluate("silero_vad", &model);
    assert!(
        theirs["decision_agreement"].as_f64().unwrap() > 0.95,
        "{theirs}"
    );
    app.stop().await;
}

/// A search given calibration data quantizes by GPTQ: every quantize step of its candidates
/// is calibrated, the chosen pipeline (with the same calibration block) resubmits to the same
/// bytes, and a later search on the same data with calibration does not reuse the table of
/// one without.
#[tokio::test]
async fn a_search_with_calibration_data_quantizes_by_gptq() {
    let app = spawn_app().await;
    let mnist = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let calib = upload_dataset(&app, "mnist8/calib.npz").await;
    let train = upload_dataset(&app, "mnist8/train.npz").await;
    let eval = json!({"dataset_id": train["id"], "metric": "top1"});
    let calibration = json!({"dataset_id": calib["id"]});
    let plain = app
        .submit_json(
            json!({"model_id": mnist["id"], "constraints": {"max_metric_drop": 0.005},
            "eval": eval, "latency": false}),
        )
        .await;
    let job = app
        .submit_json(
            json!({"model_id": mnist["id"], "constraints": {"max_metric_drop": 0.005},
            "eval": eval, "calibration": calibration, "latency": false}),
        )
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded; 2]);
    let plain = app.job(plain["id"].as_str().unwrap()).await;
    let job = app.job(job["id"].as_str().unwrap()).await;
    let s = &job["summary"]["search"];
    assert_eq!(s["calibrated"], true, "{s}");
    assert_eq!(
        s["sensitivity_cached"], false,
        "a plain search's table is not GPTQ's: {s}"
    );
    assert_eq!(plain["summary"]["search"]["calibrated"], false);
    let doc: Value = serde_json::from_slice(&app.download(&job, "search.json").await).unwrap();
    let steps = doc["pipeline"].as_array().unwrap();
    assert!(!steps.is_empty());
    for step in steps {
        assert_eq!(step["calibrated"], true, "{step}");
    }
    assert_eq!(doc["calibration"], calibration);
    assert!(
        job["summary"]["calibration"]["gptq_tensors"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let again = app
        .submit_json(json!({"model_id": mnist["id"], "pipeline": doc["pipeline"],
            "calibration": calibration, "latency": false}))
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let again = app.job(again["id"].as_str().unwrap()).await;
    let sha = |j: &Value| {
        j["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "model.onnx")
            .map(|a| a["sha256"].clone())
            .unwrap()
    };
    assert_eq!(sha(&again), sha(&job));
    // The issue's goal: searched on train.npz, calibrated on calib.npz, scored by
    // evaluate.py (onnxruntime) on eval.npz, which neither saw: at least 6x smaller at a
    // top-1 drop of at most 0.005 (3,846 B, 0.9825 against 0.9840 when measured).
    let model = app.download_to(&job, "model.onnx").await;
    let theirs = evaluate("mnist8", &model);
    let top1 = theirs["top1_accuracy"].as_f64().unwrap();
    let original = theirs["top1_accuracy_original"].as_f64().unwrap();
    assert!(original - top1 <= 0.005, "{theirs}");
    let ratio = 26_454.0 / std::fs::metadata(&model).unwrap().len() as f64;
    assert!(ratio >= 6.0, "{ratio:.2}x: {}", job["summary"]);
    app.stop().await;
}
