//! Deployable `model.onnx`: every preset on every shared ONNX case loads and runs in
//! onnxruntime at its compressed size, with the outputs of `restored.onnx`; size and quality
//! goals against onnxruntime's own quantizer; warnings for jobs that compress nothing.

use crate::helpers::*;
use modelpress::compress::{self, NoControl};
use modelpress::job;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Relative L2 error of `model.onnx`'s scored output against `restored.onnx`'s on the same
/// rows. The compact forms rebuild the restored weights exactly (integer codes, codebooks,
/// casts) or up to the summation order of a MatMul of factors, so anything above float
/// rounding means the graph edit is wrong.
const DEPLOYED_VS_RESTORED_REL_L2: f64 = 1e-4;

const ONNX_CASES: &[(&str, &str)] = &[
    ("mnist8", "mnist8/mnist-8.onnx"),
    ("silero_vad", "silero_vad/silero_vad_16k_sequence.onnx"),
    ("digits_mlp_control", "digits_mlp_control/digits_mlp.onnx"),
];

fn compress_to(input: &Path, spec: Value, dir: &Path) -> Value {
    let plan = modelpress::job::parse_spec(&spec).expect("spec");
    job::execute(input, &plan, dir, &NoControl, job::Data::default()).expect("compress");
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

/// Runs each (case, candidate, reference) in onnxruntime; returns the metrics per pair.
fn compare(pairs: &[(String, PathBuf, PathBuf)], rows: usize) -> Vec<Value> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let list: Vec<Value> = pairs
        .iter()
        .map(|(case, cand, reference)| {
            json!({"case": case, "candidate": cand, "reference": reference, "rows": rows})
        })
        .collect();
    std::fs::write(tmp.path(), serde_json::to_vec(&list).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/compare_onnx.py");
    let out = python(
        &std::fs::read_to_string(script).unwrap(),
        &[cases().to_str().unwrap(), tmp.path().to_str().unwrap()],
    );
    serde_json::from_str(&out).expect("json")
}

/// Each (case, model.onnx, restored.onnx) gives restored.onnx's output in onnxruntime on the
/// case's first `rows` rows, up to [`DEPLOYED_VS_RESTORED_REL_L2`].
fn assert_runs_as_restored(pairs: &[(String, PathBuf, PathBuf)], rows: usize) {
    for m in compare(pairs, rows) {
        let err = m["output_rel_l2"].as_f64().unwrap();
        assert!(
            err <= DEPLOYED_VS_RESTORED_REL_L2,
            "{}: onnxruntime output differs from restored.onnx by {err}",
            m["candidate"]
        );
    }
}

#[test]
fn every_onnx_case_and_preset_deploys_and_runs_in_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (case, file) in ONNX_CASES {
        let input = cases().join(file);
        for preset in compress::PRESET_NAMES {
            let dir = tmp.path().join(format!("{case}-{preset}"));
            std::fs::create_dir_all(&dir).unwrap();
            let report = compress_case(&input, json!({"preset": preset}), &dir)
                .expect("an ONNX model can be calibrated");
            let model = dir.join("model.onnx");
            let restored = dir.join("restored.onnx");
            let summary = &report["summary"];
            if !model.exists() {
                // Nothing was encoded (pruning alone): restored.onnx is the deployable file.
                assert_eq!(
                    summary["deployable_bytes"].as_u64().unwrap(),
                    std::fs::metadata(&restored).unwrap().len(),
                    "{case} {preset}"
                );
                continue;
            }
            let model_len = std::fs::metadata(&model).unwrap().len();
            assert_eq!(
                summary["deployable_bytes"].as_u64().unwrap(),
                model_len,
                "{case} {preset}"
            );
            assert_eq!(summary["compressed_bytes"], summary["deployable_bytes"]);
            let forms = report["deployable"]["tensors"].as_array().unwrap();
            assert!(!forms.is_empty(), "{case} {preset}: no deployable forms");
            if forms.iter().any(|f| f["form"] != "dense") {
                assert!(
                    model_len < std::fs::metadata(&restored).unwrap().len(),
                    "{case} {preset}: model.onnx ({model_len} B) is not smaller than restored.onnx"
                );
            }
            if summary["calibration"]["static_activations"].as_u64() > Some(0) {
                // Static int8 quantizes activations too: model.onnx is meant to differ from
                // restored.onnx (which holds the weights alone). It must run and still agree.
                let theirs = evaluate(case, &model);
                let agreement = theirs["top1_agreement"]
                    .as_f64()
                    .or(theirs["decision_agreement"].as_f64())
                    .unwrap();
                assert!(agreement > 0.95, "{case} {preset}: {theirs}");
                continue;
            }
            pairs.push((case.to_string(), model, restored));
        }
    }
    // The other deployment styles of the presets that have a choice.
    for (case, file) in ONNX_CASES {
        for preset in ["int8", "int4-g32", "int4-g128"] {
            for style in ["folded", "operators"] {
                let dir = tmp.path().join(format!("{case}-{preset}-{style}"));
                std::fs::create_dir_all(&dir).unwrap();
                let report = compress_to(
                    &cases().join(file),
                    json!({"preset": preset, "deploy": style}),
                    &dir,
                );
                let forms = report["deployable"]["tensors"].as_array().unwrap();
                let nbits = forms
                    .iter()
                    .any(|f| f["form"].as_str().unwrap().contains("MatMulNBits"));
                assert!(
                    !(style == "folded" && nbits),
                    "{case} {preset} {style}: {forms:?}"
                );
                pairs.push((
                    case.to_string(),
                    dir.join("model.onnx"),
                    dir.join("restored.onnx"),
                ));
            }
        }
    }
    assert!(
        pairs.len() >= 3 * 10,
        "only {} deployable models",
        pairs.len()
    );
    assert_runs_as_restored(&pairs, 300);
}

#[test]
fn mnist8_int8_is_smaller_than_onnxruntimes_file_and_keeps_top1() {
    let tmp = tempfile::tempdir().unwrap();
    let report = compress_to(
        &cases().join("mnist8/mnist-8.onnx"),
        json!({"preset": "int8"}),
        tmp.path(),
    );
    let bytes = report["summary"]["deployable_bytes"].as_u64().unwrap();
    // onnxruntime 1.32's quantize_dynamic writes 17,687 bytes (../shared/cases/README.md).
    assert!(bytes < 17_687, "model.onnx is {bytes} bytes");
    let forms = report["deployable"]["tensors"].as_array().unwrap();
    // mnist-8 is opset 8: per-axis DequantizeLinear needs 13, so the form is Cast+Mul.
    assert!(forms.iter().all(|f| f["form"] == "Cast+Mul"), "{forms:?}");
    let m = evaluate("mnist8", &tmp.path().join("model.onnx"));
    let (top1, original) = (
        m["top1_accuracy"].as_f64().unwrap(),
        m["top1_accuracy_original"].as_f64().unwrap(),
    );
    assert!(top1 >= original - 0.003, "top-1 {top1} vs {original}");
}

#[test]
fn silero_int8_model_onnx_keeps_decisions_where_onnxruntimes_int8_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    // The default form, and the same codes as DequantizeLinear operators.
    for (style, form) in [("auto", "Cast+Mul"), ("operators", "DequantizeLinear")] {
        let dir = tmp.path().join(style);
        std::fs::create_dir_all(&dir).unwrap();
        let report = compress_to(
            &cases().join("silero_vad/silero_vad_16k_sequence.onnx"),
            json!({"preset": "int8", "deploy": style}),
            &dir,
        );
        let forms = report["deployable"]["tensors"].as_array().unwrap();
        assert!(
            forms.iter().all(|f| f["form"] == form),
            "{style}: {forms:?}"
        );
        let m = evaluate("silero_vad", &dir.join("model.onnx"));
        // onnxruntime's dynamic int8 of this model agrees on 0.235 of the decisions...
        let agreement = m["decision_agreement"].as_f64().unwrap();
        assert!(agreement >= 0.99, "{style}: decision agreement {agreement}");
        // ...and its file is 331,513 bytes.
        assert!(m["candidate_bytes"].as_u64().unwrap() < 400_000, "{m}");
    }
}

#[tokio::test]
async fn a_job_that_compresses_nothing_says_so() {
    let app = spawn_app().await;
    let m = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let spec = json!({"model_id": m["id"], "pipeline": [
        {"method": "quantize", "bits": 8, "include": ["no_such_tensor*"]}
    ]});
    let job = app.submit_json(spec).await;
    app.drain().await;
    let job = app.job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["warnings"][0]["code"], "nothing_compressed", "{job}");
    assert_eq!(
        job["summary"]["warnings"][0]["code"], "nothing_compressed",
        "{job}"
    );
    let report: Value = serde_json::from_slice(&app.download(&job, "report.json").await).unwrap();
    assert_eq!(
        report["report"]["warnings"][0]["code"],
        "nothing_compressed"
    );
    // A job that did compress carries no warning (timing off: a timing on a loaded machine
    // could warn that model.onnx ran slower).
    let job = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8", "latency": false}))
        .await;
    app.drain().await;
    let job = app.job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["warnings"], json!([]), "{job}");
    app.stop().await;

    // The CLI prints the warning.
    let out = tempfile::tempdir().unwrap();
    let spec = out.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"pipeline":[{"method":"quantize","bits":8,"include":["nothing*"]}]}"#,
    )
    .unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .arg("compress")
        .arg(cases().join("mnist8/mnist-8.onnx"))
        .arg("--spec")
        .arg(&spec)
        .arg("-o")
        .arg(out.path().join("o"))
        .output()
        .unwrap();
    assert!(run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("warning[nothing_compressed]"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Runs `model`, `restored` and the original on both branches of the If; prints the
/// relative errors of model vs restored (basic optimizations: the rebuilt weights, see
/// compare_onnx.py) and of model vs original (default optimizations: as deployed).
const IF_CHECK: &str = r#"
import json, sys, numpy as np, onnxruntime as ort
x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
def run(p, c, basic=False):
    so = ort.SessionOptions()
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x, "cond": np.array(c)})[0].astype(np.float64)
out = {}
for c in (True, False):
    m, r, o = run(sys.argv[1], c), run(sys.argv[2], c), run(sys.argv[3], c)
    mb, rb = run(sys.argv[1], c, True), run(sys.argv[2], c, True)
    out[str(c)] = {"vs_restored": float(np.linalg.norm(mb - rb) / np.linalg.norm(rb)),
                   "vs_original": float(np.linalg.norm(m - o) / np.linalg.norm(o)),
                   "argmax_agreement": float((m.argmax(1) == o.argmax(1)).mean())}
print(json.dumps(out))
"#;

#[test]
fn constant_weights_inside_both_branches_of_an_if_are_compressed_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("if.onnx");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/if_constants_model.py");
    python(
        &std::fs::read_to_string(script).unwrap(),
        &[original.to_str().unwrap()],
    );
    let set = modelpress::formats::read_path(&original).unwrap();
    let weights: Vec<&str> = set
        .tensors
        .iter()
        .filter(|t| t.role == modelpress::formats::Role::Weight)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        weights,
        ["W3", "W4", "W1", "W2", "W5"],
        "every Constant is a tensor"
    );
    for preset in ["int8", "int4-g32", "kmeans4", "fp16"] {
        let dir = tmp.path().join(preset);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = json!({"latency": false, "pipeline": compress::preset(preset, &Default::default()).unwrap().unwrap()
            .into_iter()
            .map(|mut s| { s["min_params"] = json!(1); s })
            .collect::<Vec<_>>()});
        let report = compress_to(&original, spec, &dir);
        let forms = report["deployable"]["tensors"].as_array().unwrap();
        assert_eq!(forms.len(), 5, "{preset}: {forms:?}");
        assert!(forms.iter().all(|f| f["form"] != "dense"), "{forms:?}");
        assert!(report["summary"]["warnings"].is_null(), "{report}");
        let model = dir.join("model.onnx");
        let restored = dir.join("restored.onnx");
        assert!(
            std::fs::metadata(&model).unwrap().len() < std::fs::metadata(&original).unwrap().len()
        );
        let out = python(
            IF_CHECK,
            &[
                model.to_str().unwrap(),
                restored.to_str().unwrap(),
                original.to_str().unwrap(),
            ],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        for branch in ["True", "False"] {
            let b = &v[branch];
            assert!(
                b["vs_restored"].as_f64().unwrap() <= DEPLOYED_VS_RESTORED_REL_L2,
                "{preset} {branch}: {b}"
            );
            // Random Gaussian weights: int4 moves 1 argmax in 8 (relative error ~0.09); int8
            // and k-means keep nearly all.
            assert!(
                b["argmax_agreement"].as_f64().unwrap() >= 0.8
                    && b["vs_original"].as_f64().unwrap() <= 0.15,
                "{preset} {branch}: {b}"
            );
        }
        // The archive rebuilds restored.onnx bit for bit, Constant nodes included.
        let archive = std::fs::read(dir.join("model.mpz")).unwrap();
        let rebuilt = modelpress::formats::write_bytes(
            &modelpress::compress::archive::read(&archive).unwrap(),
        )
        .unwrap();
        assert!(rebuilt == std::fs::read(&restored).unwrap(), "{preset}");
    }
    // Untouched, the model is written back byte for byte as prost re-encodes it.
    let untouched = modelpress::formats::write_bytes(&set).unwrap();
    let reencoded = {
        use prost::Message;
        tract_onnx::pb::ModelProto::decode(std::fs::read(&original).unwrap().as_slice())
            .unwrap()
            .encode_to_vec()
    };
    assert!(untouched == reencoded);
}

/// Runs an ONNX file in tract, in-process, on zeros of its declared input shapes (as the
/// summary's timing does); returns every float output as f32.
fn tract_run(path: &Path) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let (outputs, _) = modelpress::deploy::latency::run_on_zeros(&bytes, 0).expect("tract runs");
    outputs
        .iter()
        .filter_map(|o| {
            o.cast_to::<f32>().ok().map(|t| {
                t.to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .copied()
                    .collect()
            })
        })
        .collect()
}

#[test]
fn deployable_models_run_in_tract_in_process() {
    let tmp = tempfile::tempdir().unwrap();
    for (case, file) in ONNX_CASES {
        for preset in ["int8", "int4", "int4-g32", "kmeans4", "fp16", "lowrank-90"] {
            let dir = tmp.path().join(format!("{case}-{preset}"));
            std::fs::create_dir_all(&dir).unwrap();
            compress_to(&cases().join(file), json!({"preset": preset}), &dir);
            let model = dir.join("model.onnx");
            if !model.exists() {
                continue;
            }
            let got = tract_run(&model);
            let want = tract_run(&dir.join("restored.onnx"));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                let num: f64 = g.iter().zip(w).map(|(a, b)| f64::from(a - b).powi(2)).sum();
                let den: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum();
                let err = (num / den.max(1e-30)).sqrt();
                assert!(
                    err <= DEPLOYED_VS_RESTORED_REL_L2,
                    "{case} {preset}: tract output differs from restored by {err}"
                );
            }
        }
    }
}

/// The loader in docs/FORMATS.md rebuilds `restored.<ext>` from `model.<ext>` bit for bit,
/// for every preset on the silero and digits safetensors and the digits .npz.
#[test]
fn docs_loader_rebuilds_restored() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMATS.md")).unwrap();
    let start = doc.find("```python\n").expect("a python block") + "```python\n".len();
    let loader = &doc[start..start + doc[start..].find("```").unwrap()];
    let driver = r#"
import sys
model, restored = sys.argv[1], sys.argv[2]
dense = load_dense(model)
if restored.endswith(".npz"):
    with np.load(restored) as f:
        want = {k: f[k] for k in f.files}
else:
    from safetensors.numpy import load_file
    want = load_file(restored)
assert sorted(dense) == sorted(want), (sorted(dense), sorted(want))
bad = [k for k in want if dense[k].shape != want[k].shape or dense[k].tobytes() != want[k].tobytes()]
print("ok" if not bad else "differ: " + ", ".join(bad))
"#;
    let script = format!("{loader}\n{driver}");
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for file in [
        "silero_vad/silero_vad_16k.safetensors",
        "digits_mlp_control/digits_mlp.safetensors",
        "digits_mlp_control/digits_mlp_weights.npz",
    ] {
        let input = cases().join(file);
        let ext = modelpress::formats::read_path(&input)
            .unwrap()
            .format
            .extension();
        for preset in compress::PRESET_NAMES {
            let dir = tmp.path().join(format!("{checked}"));
            std::fs::create_dir_all(&dir).unwrap();
            if compress_case(&input, json!({"preset": preset}), &dir).is_none() {
                continue;
            }
            let model = dir.join(format!("model.{ext}"));
            if !model.exists() {
                continue;
            }
            let out = python(
                &script,
                &[
                    model.to_str().unwrap(),
                    dir.join(format!("restored.{ext}")).to_str().unwrap(),
                ],
            );
            assert_eq!(out.trim(), "ok", "{file} {preset}");
            checked += 1;
        }
    }
    assert!(checked >= 30, "{checked}");
}

#[test]
fn the_summary_times_the_original_and_model_onnx_in_tract() {
    let tmp = tempfile::tempdir().unwrap();
    let report = compress_to(
        &cases().join("silero_vad/silero_vad_16k_sequence.onnx"),
        json!({"preset": "int8"}),
        tmp.path(),
    );
    let l = &report["summary"]["latency"];
    let (o, d) = (
        l["original_ms"].as_f64().unwrap(),
        l["deployable_ms"].as_f64().unwrap(),
    );
    assert!(o > 0.0 && d > 0.0, "{l}");
    assert!((l["ratio"].as_f64().unwrap() - d / o).abs() < 1e-9);
    assert_eq!(l["slower_than_original"], json!(d > o));
    assert!(l["engine"].as_str().unwrap().contains("tract"));
    // A model tract cannot load gets the reason instead of a number.
    let model = std::fs::read(tmp.path().join("model.onnx")).unwrap();
    let l = modelpress::deploy::latency::compare(b"not a model", &model);
    assert!(l.skipped.unwrap().contains("tract cannot load"));
    assert!(l.original_ms.is_none() && l.ratio.is_none() && !l.slower_than_original);
    // "latency": false skips the timing.
    let dir = tmp.path().join("off");
    std::fs::create_dir_all(&dir).unwrap();
    let report = compress_to(
        &cases().join("mnist8/mnist-8.onnx"),
        json!({"preset": "int8", "latency": false}),
        &dir,
    );
    assert!(report["summary"]["latency"].is_null());
}

/// A Constant whose value points at external data (e.g. /etc/passwd) is refused, as an
/// initializer that does is: modelpress never follows, nor passes on, such a reference.
#[tokio::test]
async fn a_constant_with_external_data_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ext.onnx");
    python(
        r#"
import sys, onnx
from onnx import helper, TensorProto
t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[64, 64])
t.data_location = TensorProto.EXTERNAL
e = t.external_data.add(); e.key = "location"; e.value = "/etc/passwd"
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
g = helper.make_graph([helper.make_node("Constant", [], ["w"], value=t),
                       helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y])
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
"#,
        &[path.to_str().unwrap()],
    );
    let err = modelpress::formats::read_path(&path).unwrap_err();
    assert!(err.to_string().contains("external data"), "{err}");
    let app = spawn_app().await;
    let r = app
        .client
        .post(app.url("/v1/models?name=ext.onnx"))
        .body(std::fs::read(&path).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_code(&body), "invalid_model", "{body}");
    app.stop().await;
}

/// Tucker-2 kernels become three convolutions in the compute path (1×1 to R_in channels,
/// the core with the original window, 1×1 to the outputs with the bias).
#[test]
fn tucker2_kernels_run_as_three_convolutions() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (case, file) in &ONNX_CASES[..2] {
        let dir = tmp.path().join(case);
        std::fs::create_dir_all(&dir).unwrap();
        let report = compress_to(
            &cases().join(file),
            json!({"pipeline": [{"method": "tucker2", "ratio": 0.5}], "latency": false}),
            &dir,
        );
        let forms = report["deployable"]["tensors"].as_array().unwrap();
        assert!(
            forms.iter().any(|f| f["form"]
                .as_str()
                .unwrap()
                .starts_with("Conv1x1·Conv·Conv1x1")),
            "{case}: {forms:?}"
        );
        pairs.push((
            case.to_string(),
            dir.join("model.onnx"),
            dir.join("restored.onnx"),
        ));
    }
    for m in compare(&pairs, 300) {
        let err = m["output_rel_l2"].as_f64().unwrap();
        assert!(
            err <= DEPLOYED_VS_RESTORED_REL_L2,
            "{}: {err}",
            m["candidate"]
        );
    }
}

/// Every bit width unpacks exactly (onnxruntime and tract against `restored.onnx`), and the
/// weights of one digit width share one packed initializer and one unpacking subgraph:
/// 3 and 6 bits as words of three bytes, 5 and 7 bits as single bits, 1, 2, 4 and 8 bits
/// as whole digits of a byte.
#[test]
fn every_bit_width_unpacks_exactly_and_each_width_shares_one_subgraph() {
    use prost::Message;
    let step = |method: &str, bits: u8, name: &str| {
        let mut s = match method {
            "kmeans" => json!({"method": "kmeans", "bits": bits}),
            "binary" => json!({"method": "binary", "granularity": "channel"}),
            _ => {
                json!({"method": "quantize", "bits": bits, "scheme": "symmetric", "granularity": "channel"})
            }
        };
        s["include"] = json!([name]);
        s["min_params"] = json!(1);
        s
    };
    let mnist = (
        "mnist8",
        "mnist8/mnist-8.onnx",
        ["Parameter193", "Parameter87", "Parameter5"],
    );
    let digits = (
        "digits_mlp_control",
        "digits_mlp_control/digits_mlp.onnx",
        ["coefficient", "coefficient1", "coefficient2"],
    );
    // (case, a step per weight, packed uint8 initializers expected)
    let runs = [
        (
            mnist,
            [("quantize", 3), ("quantize", 3), ("quantize", 3)],
            1,
        ),
        (mnist, [("quantize", 5), ("quantize", 7), ("binary", 1)], 1),
        (mnist, [("quantize", 4), ("kmeans", 4), ("quantize", 4)], 1),
        (digits, [("quantize", 6), ("quantize", 2), ("kmeans", 8)], 3),
        (digits, [("quantize", 3), ("kmeans", 3), ("quantize", 6)], 2),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (i, ((case, file, weights), steps, pools)) in runs.into_iter().enumerate() {
        let dir = tmp.path().join(format!("{case}-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pipeline: Vec<Value> = steps
            .iter()
            .zip(weights)
            .map(|((m, b), w)| step(m, *b, w))
            .collect();
        let report = compress_to(
            &cases().join(file),
            json!({"latency": false, "pipeline": pipeline}),
            &dir,
        );
        let forms = report["deployable"]["tensors"].as_array().unwrap();
        assert_eq!(forms.len(), 3, "{case} {steps:?}: {forms:?}");
        assert!(forms.iter().all(|f| f["form"] != "dense"), "{forms:?}");
        let model = dir.join("model.onnx");
        let proto =
            tract_onnx::pb::ModelProto::decode(std::fs::read(&model).unwrap().as_slice()).unwrap();
        let packed = proto
            .graph
            .unwrap()
            .initializer
            .iter()
            .filter(|t| t.data_type == tract_onnx::pb::tensor_proto::DataType::Uint8 as i32)
            .count();
        assert_eq!(packed, pools, "{case} {steps:?}: packed initializers");
        let got = tract_run(&model);
        let want = tract_run(&dir.join("restored.onnx"));
        assert!(got == want, "{case} {steps:?}: tract differs from restored");
        pairs.push((case.to_string(), model, dir.join("restored.onnx")));
    }
    assert_runs_as_restored(&pairs, 200);
}

/// `nf4`, the method added through its own file and one registry line: on every shared ONNX
/// case `model.onnx` (a `Gather` from the 16 levels and a `Mul` by the block scales) runs in
/// onnxruntime with restored.onnx's outputs, `model.mpz` rebuilds restored.onnx bit for bit,
/// and the docs' loader rebuilds `restored.safetensors` from `model.safetensors`.
#[test]
fn nf4_deploys_decodes_and_loads_as_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = json!({"pipeline": [{"method": "nf4", "group_size": 64}]});
    let mut pairs = Vec::new();
    for (case, file) in ONNX_CASES {
        let dir = tmp.path().join(case);
        std::fs::create_dir_all(&dir).unwrap();
        let report = compress_to(&cases().join(file), spec.clone(), &dir);
        let forms = report["deployable"]["tensors"].as_array().unwrap();
        assert!(
            forms
                .iter()
                .any(|f| f["form"].as_str().unwrap().contains("Gather(nf4)")),
            "{case}: {forms:?}"
        );
        let model = dir.join("model.onnx");
        let restored = dir.join("restored.onnx");
        assert!(
            std::fs::metadata(&model).unwrap().len() < std::fs::metadata(&restored).unwrap().len(),
            "{case}"
        );
        let archive = std::fs::read(dir.join("model.mpz")).unwrap();
        let rebuilt = modelpress::formats::write_bytes(
            &modelpress::compress::archive::read(&archive).unwrap(),
        )
        .unwrap();
        assert!(rebuilt == std::fs::read(&restored).unwrap(), "{case}");
        pairs.push((case.to_string(), model, restored));
    }
    assert_runs_as_restored(&pairs, 300);

    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMATS.md")).unwrap();
    let start = doc.find("```python\n").expect("a python block") + "```python\n".len();
    let loader = &doc[start..start + doc[start..].find("```").unwrap()];
    let driver = r#"
import sys
from safetensors.numpy import load_file
dense, want = load_dense(sys.argv[1]), load_file(sys.argv[2])
bad = [k for k in want if dense[k].shape != want[k].shape or dense[k].tobytes() != want[k].tobytes()]
print("ok" if sorted(dense) == sorted(want) and not bad else "differ: " + ", ".join(bad))
"#;
    let dir = tmp.path().join("safetensors");
    std::fs::create_dir_all(&dir).unwrap();
    let report = compress_to(
        &cases().join("digits_mlp_control/digits_mlp.safetensors"),
        spec,
        &dir,
    );
    assert!(
        report["report"]["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["details"]["nf4"]["group_size"] == 64),
        "{report}"
    );
    let out = python(
        &format!("{loader}\n{driver}"),
        &[
            dir.join("model.safetensors").to_str().unwrap(),
            dir.join("restored.safetensors").to_str().unwrap(),
        ],
    );
    assert_eq!(out.trim(), "ok");
}
