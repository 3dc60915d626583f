//! Distillation over HTTP: a `distill` block cuts a narrower student from the uploaded model
//! (each hidden layer keeps its most important channels), trains it on the model's outputs
//! over a stored dataset (the digits MLP's training rows, no labels used), and the job's
//! `model.onnx` is the student, scored by the cases' evaluate.py (onnxruntime) on eval.npz.

use crate::helpers::*;
use modelpress::worker::Outcome;
use serde_json::{json, Value};

/// Submit-time refusals of distill blocks, each naming the field.
#[tokio::test]
async fn distill_blocks_are_checked_at_submit() {
    let app = spawn_app().await;
    let digits = app
        .upload(case_file("digits_mlp_control/digits_mlp.onnx"), "d.onnx")
        .await;
    let weights = app
        .upload(
            case_file("digits_mlp_control/digits_mlp.safetensors"),
            "d.safetensors",
        )
        .await;
    let train = upload_dataset(&app, "digits_mlp_control/train.npz").await;
    let mnist = upload_dataset(&app, "mnist8/train.npz").await;
    let block = |extra: Value| {
        let mut b = json!({"dataset_id": train["id"], "student": {"width": 0.5}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let refusals = vec![
        (
            json!({"model_id": digits["id"], "distill": {"dataset_id": train["id"]}}),
            422,
            "invalid_spec",
            "distill.student",
        ),
        (
            json!({"model_id": digits["id"], "distill": block(json!({"student": {"width": 1.5}}))}),
            422,
            "invalid_spec",
            "distill.student.width",
        ),
        (
            json!({"model_id": digits["id"], "distill": block(json!({"student": {"depth": 2}}))}),
            422,
            "invalid_spec",
            "unknown field `depth`",
        ),
        (
            json!({"model_id": digits["id"], "distill": block(json!({"epoch": 3}))}),
            422,
            "invalid_spec",
            "unknown field `epoch`",
        ),
        (
            json!({"model_id": digits["id"], "distill": block(json!({"dataset_id": "0190c0de-0000-7000-8000-000000000000"}))}),
            404,
            "dataset_not_found",
            "distill.dataset_id",
        ),
        (
            json!({"model_id": digits["id"], "preset": "int8", "distill": block(json!({})), "finetune": {"dataset_id": train["id"]}}),
            422,
            "invalid_spec",
            "distill or finetune, not both",
        ),
        (
            json!({"model_id": digits["id"], "preset": "auto", "eval": {"dataset_id": train["id"], "metric": "top1"}, "distill": block(json!({}))}),
            422,
            "invalid_spec",
            "not with distill",
        ),
        (
            json!({"model_id": weights["id"], "distill": block(json!({}))}),
            422,
            "invalid_spec",
            "distill trains the model",
        ),
        (
            json!({"model_id": digits["id"], "distill": block(json!({"dataset_id": mnist["id"]}))}),
            422,
            "dataset_mismatch",
            "distill.dataset_id",
        ),
    ];
    assert_refused(&app, refusals).await;
    app.stop().await;
}

fn top1(v: &Value) -> f64 {
    v["top1_accuracy"].as_f64().unwrap_or_else(|| panic!("{v}"))
}

/// The shape of each initializer of an ONNX file, read by the `onnx` package.
fn shapes(model: &std::path::Path) -> Value {
    let out = python(
        "import sys, json, onnx\n\
         m = onnx.load(sys.argv[1])\n\
         print(json.dumps({i.name: list(i.dims) for i in m.graph.initializer}))",
        &[model.to_str().unwrap()],
    );
    serde_json::from_str(out.trim()).unwrap()
}

/// The distillation case: the digits MLP (64-256-128-10, top-1 0.9796) distilled into
/// a student with half the hidden width (64-128-64-10) on train.npz keeps top-1 ≥ 0.97 on
/// eval.npz, and its float `model.onnx` holds a third of the parameters. The job's own
/// evaluation compares the student with the original on eval.npz; a second run of the same
/// spec gives the same bytes.
#[tokio::test]
async fn distill_digits_mlp_into_half_width() {
    let app = spawn_app().await;
    let original = case_file("digits_mlp_control/digits_mlp.onnx");
    let digits = app.upload(original.clone(), "d.onnx").await;
    let train = upload_dataset(&app, "digits_mlp_control/train.npz").await;
    let eval = upload_dataset(&app, "digits_mlp_control/eval.npz").await;
    let spec = json!({"model_id": digits["id"],
        "distill": {"dataset_id": train["id"], "student": {"width": 0.5}},
        "eval": {"dataset_id": eval["id"], "metric": "top1"}});
    let job = app.submit_json(spec.clone()).await;
    // The same spec again (an idempotency key would return the first job; this is a second).
    let again = app.submit_json(spec).await;
    let outcomes = app.drain().await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        outcomes,
        vec![Outcome::Succeeded; 2],
        "{}",
        app.job(id).await
    );
    let job = app.job(id).await;
    let model = app.download_to(&job, "model.onnx").await;
    // Deterministic: the same data and seed cut and train the same student, byte for byte.
    let again = app.job(again["id"].as_str().unwrap()).await;
    assert_eq!(
        std::fs::read(&model).unwrap(),
        app.download(&again, "model.onnx").await
    );
    let s = shapes(&model);
    assert_eq!(s["coefficient"], json!([64, 128]), "{s}");
    assert_eq!(s["intercepts"], json!([1, 128]), "{s}");
    assert_eq!(s["coefficient1"], json!([128, 64]), "{s}");
    assert_eq!(s["coefficient2"], json!([64, 10]), "{s}");
    let scored = evaluate("digits_mlp_control", &model);
    assert!(top1(&scored) >= 0.97, "student: {scored}");

    let summary = &job["summary"];
    let d = &summary["distill"];
    assert_eq!(d["student"]["float_parameters"], 17226, "{d}");
    assert_eq!(d["student"]["teacher_float_parameters"], 50826, "{d}");
    assert_eq!(d["rows"]["validation"], 126, "{d}");
    // 17,226 of 50,826 float parameters: a third of the bytes (the 30 % needs a
    // narrower student, width 0.45 below).
    let ratio = summary["deployable_bytes"].as_f64().unwrap() / original.len() as f64;
    assert!(ratio < 0.35, "{summary}");
    // The job's evaluation (tract) agrees with evaluate.py (onnxruntime) on the student.
    let e = &summary["evaluation"];
    assert!(
        (e["compressed"].as_f64().unwrap() - top1(&scored)).abs() < 1e-9,
        "{e} vs {scored}"
    );
    let log: Value = serde_json::from_slice(&app.download(&job, "training.json").await).unwrap();
    assert_eq!(
        log["student"]["layers"].as_array().unwrap().len(),
        2,
        "{log}"
    );
    assert!(log["best_epoch"].as_u64().unwrap() > 0, "{log}");
    app.stop().await;
}

/// A narrower student (width 0.45: 64-115-58-10) is under 30 % of the original file and still
/// above 0.97; followed by `int8`, the stored student is a further 4x smaller. An evaluation
/// on the training rows warns `trained_on_eval_data`.
#[tokio::test]
async fn distill_then_quantize_digits_mlp() {
    let app = spawn_app().await;
    let original = case_file("digits_mlp_control/digits_mlp.onnx");
    let digits = app.upload(original.clone(), "d.onnx").await;
    let train = upload_dataset(&app, "digits_mlp_control/train.npz").await;
    // Scored on its own training rows: it says the evaluation flatters it.
    let float = app
        .submit_json(json!({"model_id": digits["id"], "latency": false,
            "distill": {"dataset_id": train["id"], "student": {"width": 0.45}},
            "eval": {"dataset_id": train["id"], "metric": "top1"}}))
        .await;
    let int8 = app
        .submit_json(
            json!({"model_id": digits["id"], "preset": "int8", "latency": false,
            "distill": {"dataset_id": train["id"], "student": {"width": 0.45}}}),
        )
        .await;
    assert_eq!(app.drain().await, vec![Outcome::Succeeded; 2]);
    let original_bytes = original.len() as f64;
    let warned = app.job(float["id"].as_str().unwrap()).await;
    assert!(
        warned["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "trained_on_eval_data"),
        "{warned}"
    );
    for (job, most, least_top1) in [(float, 0.30, 0.97), (int8, 0.10, 0.965)] {
        let job = app.job(job["id"].as_str().unwrap()).await;
        let model = app.download_to(&job, "model.onnx").await;
        let share = std::fs::metadata(&model).unwrap().len() as f64 / original_bytes;
        assert!(share <= most, "{share} of the original: {}", job["summary"]);
        let scored = evaluate("digits_mlp_control", &model);
        assert!(top1(&scored) >= least_top1, "{scored}: {}", job["summary"]);
    }
    app.stop().await;
}
