use crate::helpers::*;
use modelpress::worker::Outcome;
use serde_json::{json, Value};

async fn run_preset(app: &TestApp, model: &Value, spec: Value) -> Value {
    let mut body = spec;
    body["model_id"] = model["id"].clone();
    let r = app.submit(body).await;
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let job: Value = r.json().await.unwrap();
    assert_eq!(loc, format!("/v1/jobs/{}", job["id"].as_str().unwrap()));
    assert_eq!(job["state"], "queued");
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let job = app.job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["progress"], 1.0);
    assert_eq!(job["attempts"], 1);
    job
}

#[tokio::test]
async fn mnist8_int8_restored_runs_in_onnxruntime_within_0_3_points() {
    let app = spawn_app().await;
    let m = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let job = run_preset(&app, &m, json!({"preset": "int8"})).await;
    let names = artifact_names(&job);
    assert_eq!(
        names,
        vec![
            "manifest.json",
            "model.mpz",
            "model.onnx",
            "report.json",
            "restored.onnx"
        ]
    );
    let restored = app.download(&job, "restored.onnx").await;
    let path = app.dir.path().join("restored.onnx");
    std::fs::write(&path, &restored).unwrap();
    let score = evaluate("mnist8", &path);
    let top1 = score["top1_accuracy"].as_f64().unwrap();
    assert!((score["top1_accuracy_original"].as_f64().unwrap() - 0.984).abs() < 1e-9);
    assert!(
        top1 >= 0.984 - 0.003,
        "int8 top-1 {top1} is more than 0.3 points below 0.984"
    );

    let report: Value = serde_json::from_slice(&app.download(&job, "report.json").await).unwrap();
    let t = |n: &str| {
        report["report"]["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .unwrap()
            .clone()
    };
    // The 4-D FC weight feeds a MatMul through a Reshape: its output axis is the last one.
    assert_eq!(t("Parameter193")["quantization_axis"], 3);
    assert_eq!(t("Parameter87")["quantization_axis"], 0);
    assert_eq!(
        t("Parameter87")["methods"],
        json!(["quantize(int8,symmetric,channel)"])
    );
    // Below min_params and biases: untouched.
    assert_eq!(t("Parameter5")["methods"], json!([]));
    assert_eq!(t("Parameter6")["methods"], json!([]));
    assert!(t("Parameter87")["sqnr_db"].as_f64().unwrap() > 30.0);
    assert_eq!(job["summary"]["parameters"], 5998);
    // model.onnx is the deployable form: int8 codes rebuilt by Cast+Mul (opset 8 has no
    // per-axis DequantizeLinear), smaller than onnxruntime's own int8 file (17,687 B).
    let forms = report["deployable"]["tensors"].as_array().unwrap();
    assert_eq!(forms.len(), 2, "{forms:?}");
    assert!(forms.iter().all(|f| f["form"] == "Cast+Mul"), "{forms:?}");
    let deployable = job["summary"]["deployable_bytes"].as_u64().unwrap();
    assert!(deployable < 17_687, "{deployable}");
    assert_eq!(
        job["summary"]["compressed_bytes"].as_u64(),
        Some(deployable)
    );
    app.stop().await;
}

#[tokio::test]
async fn silero_safetensors_int8_loads_in_python_and_matches_the_report() {
    let app = spawn_app().await;
    let m = app
        .upload(
            case_file("silero_vad/silero_vad_16k.safetensors"),
            "silero.safetensors",
        )
        .await;
    let job = run_preset(&app, &m, json!({"preset": "int8"})).await;
    let dir = app.dir.path();
    for name in ["restored.safetensors", "model.safetensors", "report.json"] {
        app.download_to(&job, name).await;
    }
    let summary = &job["summary"];
    assert!(summary["ratio"].as_f64().unwrap() > 3.5, "{summary}");
    // The deployable file is model.safetensors; the archive has a ratio of its own.
    let model_len = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(summary["deployable_bytes"].as_u64().unwrap(), model_len);
    assert_eq!(summary["compressed_bytes"].as_u64().unwrap(), model_len);
    let archive = summary["archive_bytes"].as_u64().unwrap() as f64;
    let original = summary["original_bytes"].as_u64().unwrap() as f64;
    assert!((summary["archive_ratio"].as_f64().unwrap() - original / archive).abs() < 1e-9);
    let script = r#"
import json, sys, numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open
orig = load_file(sys.argv[1]); rest = load_file(sys.argv[2]); model = load_file(sys.argv[3])
report = json.load(open(sys.argv[4]))
meta = safe_open(sys.argv[3], "np").metadata()
desc = json.loads(meta["modelpress"])["tensors"]
checked = untouched = 0
for t in report["report"]["tensors"]:
    n = t["name"]; a = orig[n].astype(np.float64); b = rest[n].astype(np.float64)
    assert rest[n].dtype == orig[n].dtype and rest[n].shape == orig[n].shape, n
    if not t["methods"]:
        assert orig[n].tobytes() == rest[n].tobytes(), n + " changed"
        assert model[n].tobytes() == orig[n].tobytes(), n
        untouched += 1
        continue
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert abs(rel - t["relative_l2_error"]) <= 1e-6 + 1e-4 * rel, (n, rel, t["relative_l2_error"])
    assert abs(np.abs(a - b).max() - t["max_abs_error"]) <= 1e-6, n
    d = desc[n]; q = model[n]; s = model[d["scale"]]
    assert q.dtype == np.int8 and d["scheme"] == "symmetric"
    shape = [1] * q.ndim; shape[d["axis"]] = -1
    deq = (q.astype(np.float32) * s.reshape(shape)).astype(np.float32)
    assert np.array_equal(deq, rest[n]), n + ": model.safetensors does not decode to restored"
    checked += 1
print(checked, untouched)
"#;
    let out = python(
        script,
        &[
            cases()
                .join("silero_vad/silero_vad_16k.safetensors")
                .to_str()
                .unwrap(),
            dir.join("restored.safetensors").to_str().unwrap(),
            dir.join("model.safetensors").to_str().unwrap(),
            dir.join("report.json").to_str().unwrap(),
        ],
    );
    let counts: Vec<u32> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert!(counts[0] >= 6 && counts[1] >= 5, "checked/untouched: {out}");
    app.stop().await;
}

#[tokio::test]
async fn digits_npz_prune50_int8_in_one_multipart_request() {
    let app = spawn_app().await;
    let spec = json!({"preset": "prune50-int8"}).to_string();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(case_file("digits_mlp_control/digits_mlp_weights.npz"))
                .file_name("digits.npz"),
        )
        .text("spec", spec);
    let r = app
        .client
        .post(app.url("/v1/jobs"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let job = app.job(job["id"].as_str().unwrap()).await;
    let (_, model) = app
        .get_json(&format!("/v1/models/{}", job["model_id"].as_str().unwrap()))
        .await;
    assert_eq!(model["name"], "digits.npz");
    let report: Value = serde_json::from_slice(&app.download(&job, "report.json").await).unwrap();
    for t in report["report"]["tensors"].as_array().unwrap() {
        if t["methods"].as_array().unwrap().is_empty() {
            continue;
        }
        let n = t["parameters"].as_u64().unwrap();
        let zeros = n - t["nonzero"].as_u64().unwrap();
        assert_eq!(zeros, (n as f64 * 0.5).round() as u64, "{}", t["name"]);
    }
    let dir = app.dir.path();
    app.download_to(&job, "restored.npz").await;
    app.download_to(&job, "model.npz").await;
    // numpy reads both; the digits MLP still classifies from the restored weights.
    let out = python(
        r#"
import sys, json, zipfile, numpy as np
o = np.load(sys.argv[1]); r = np.load(sys.argv[2]); m = np.load(sys.argv[3])
ev = np.load(sys.argv[4])
for k in o.files:
    if k.endswith("bias"):
        assert o[k].tobytes() == r[k].tobytes(), k
desc = json.loads(zipfile.ZipFile(sys.argv[3]).comment)
assert desc["tensors"], desc
def fwd(w, X):
    h = X
    for i in (1, 2, 3):
        h = h @ w[f"fc{i}.weight"] + w[f"fc{i}.bias"]
        if i < 3: h = np.maximum(h, 0)
    return h.argmax(1)
acc_o = (fwd(o, ev["X"]) == ev["labels"]).mean(); acc_r = (fwd(r, ev["X"]) == ev["labels"]).mean()
print(acc_o, acc_r)
"#,
        &[
            cases()
                .join("digits_mlp_control/digits_mlp_weights.npz")
                .to_str()
                .unwrap(),
            dir.join("restored.npz").to_str().unwrap(),
            dir.join("model.npz").to_str().unwrap(),
            cases()
                .join("digits_mlp_control/eval.npz")
                .to_str()
                .unwrap(),
        ],
    );
    let acc: Vec<f64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert!(acc[0] > 0.97, "original forward pass: {out}");
    assert!(
        acc[1] > acc[0] - 0.03,
        "prune50-int8 accuracy {} vs {}",
        acc[1],
        acc[0]
    );
    app.stop().await;
}

#[tokio::test]
async fn artifacts_support_range_etag_and_disposition() {
    let app = spawn_app().await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let job = run_preset(
        &app,
        &m,
        json!({"preset": "fp16", "outputs": ["restored", "report"]}),
    )
    .await;
    let a = job["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "restored.onnx")
        .unwrap()
        .clone();
    // The two asked for, and the signed manifest every job carries.
    assert_eq!(job["artifacts"].as_array().unwrap().len(), 3);
    let url = app.url(a["url"].as_str().unwrap());
    let full = app.client.get(&url).send().await.unwrap();
    assert_eq!(
        full.headers()["etag"],
        format!("\"{}\"", a["sha256"].as_str().unwrap()).as_str()
    );
    assert_eq!(
        full.headers()["content-length"],
        a["size_bytes"].to_string().as_str()
    );
    assert!(full.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("restored.onnx"));
    let body = full.bytes().await.unwrap();
    assert_eq!(
        modelpress::util::sha256_hex(&body),
        a["sha256"].as_str().unwrap()
    );
    let part = app
        .client
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap(), body.slice(10..20));
    let bad = app
        .client
        .get(&url)
        .header("range", "bytes=99999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 416);
    assert_eq!(
        error_code(&bad.json::<Value>().await.unwrap()),
        "range_not_satisfiable"
    );
    let cached = app
        .client
        .get(&url)
        .header(
            "if-none-match",
            format!("\"{}\"", a["sha256"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    let (s, v) = app
        .get_json(&format!(
            "/v1/jobs/{}/artifacts/model.onnx",
            job["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!((s, error_code(&v)), (404, "artifact_not_found"));
    app.stop().await;
}

#[tokio::test]
async fn idempotency_key_replays_or_conflicts() {
    let app = spawn_app().await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let body = json!({"model_id": m["id"], "preset": "int8"});
    let send = |b: Value| {
        app.client
            .post(app.url("/v1/jobs"))
            .header("idempotency-key", "abc-1")
            .json(&b)
            .send()
    };
    let r1 = send(body.clone()).await.unwrap();
    assert_eq!(r1.status(), 202);
    let j1: Value = r1.json().await.unwrap();
    let r2 = send(body.clone()).await.unwrap();
    assert_eq!(r2.status(), 202);
    assert_eq!(r2.headers()["idempotent-replayed"], "true");
    let j2: Value = r2.json().await.unwrap();
    assert_eq!(j1["id"], j2["id"]);
    let r3 = send(json!({"model_id": m["id"], "preset": "fp16"}))
        .await
        .unwrap();
    assert_eq!(r3.status(), 409);
    assert_eq!(
        error_code(&r3.json::<Value>().await.unwrap()),
        "idempotency_conflict"
    );
    // Upload+submit in one request: a retry neither stores the model twice nor adds a job.
    let form = || {
        reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(case_file("mnist8/mnist-8.onnx"))
                    .file_name("m.onnx"),
            )
            .text("spec", r#"{"preset":"int8"}"#)
    };
    let post = || {
        app.client
            .post(app.url("/v1/jobs"))
            .header("idempotency-key", "abc-2")
            .multipart(form())
            .send()
    };
    let a: Value = post().await.unwrap().json().await.unwrap();
    let b: Value = post().await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    let (_, models) = app.get_json("/v1/models").await;
    assert_eq!(models["items"].as_array().unwrap().len(), 2);
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn cancel_a_queued_job_and_filter_the_list() {
    let app = spawn_app().await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let j: Value = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    let k: Value = app
        .submit_json(json!({"model_id": m["id"], "preset": "fp16"}))
        .await;
    let id = j["id"].as_str().unwrap();
    let r = app.cancel(id).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "cancelled");
    assert_eq!(
        app.drain().await,
        vec![Outcome::Succeeded],
        "the cancelled job never runs"
    );
    let r = app.cancel(id).await;
    assert_eq!(r.status(), 409);
    assert_eq!(
        error_code(&r.json::<Value>().await.unwrap()),
        "job_not_cancellable"
    );
    let (_, done) = app.get_json("/v1/jobs?state=succeeded").await;
    let items = done["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], k["id"]);
    let (_, by_model) = app
        .get_json(&format!(
            "/v1/jobs?model_id={}&limit=1",
            m["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(by_model["items"][0]["id"], k["id"], "newest first");
    assert!(by_model["next_cursor"].is_string());
    app.stop().await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_running_job_at_a_tensor_boundary() {
    let app = spawn_app_with(|c| {
        c.failpoint = Some("tensor-delay-ms=400".into());
        c.lease_ms = 600;
    })
    .await;
    let m = app
        .upload(
            case_file("silero_vad/silero_vad_16k.safetensors"),
            "s.safetensors",
        )
        .await;
    let j: Value = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    let id = j["id"].as_str().unwrap().to_string();
    assert_eq!(
        cancel_when(&app, &id, |j| j["state"] == "running").await,
        Outcome::Cancelled
    );
    let job = app.job(&id).await;
    assert_eq!(job["state"], "cancelled");
    assert!(job["artifacts"].as_array().unwrap().is_empty());
    app.stop().await;
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_panic_inside_a_job_fails_it_with_internal_and_the_worker_lives_on() {
    let app = spawn_app_with(|c| c.failpoint = Some("panic".into())).await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let j: Value = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    // A pipeline that selects nothing never reaches the failpoint: it must still succeed.
    let k: Value = app.submit_json(json!({"model_id": m["id"], "pipeline": [{"method": "quantize", "include": "nothing*"}]})).await;
    assert_eq!(app.drain().await, vec![Outcome::Failed, Outcome::Succeeded]);
    let job = app.job(j["id"].as_str().unwrap()).await;
    assert_eq!(job["error"]["code"], "internal");
    assert!(
        !job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("failpoint"),
        "internal details leak"
    );
    assert_eq!(
        app.job(k["id"].as_str().unwrap()).await["state"],
        "succeeded"
    );
    app.stop().await;
}

#[tokio::test]
async fn background_workers_pick_up_jobs_and_metrics_count_them() {
    let app = spawn_app_with(|c| c.workers = Some(2)).await;
    let m = app
        .upload(
            case_file("digits_mlp_control/digits_mlp.safetensors"),
            "d.safetensors",
        )
        .await;
    let j: Value = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    let id = j["id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let job = app.job(id).await;
        if job["state"] == "succeeded" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job did not finish: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let text = app.get_text("/metrics").await;
    for needle in [
        "modelpress_jobs{state=\"succeeded\"}",
        "modelpress_queue_depth",
        "modelpress_job_duration_seconds_bucket",
        "modelpress_upload_bytes_total",
        "modelpress_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"202\"}",
        "route=\"/v1/jobs/{id}\"",
        "modelpress_busy_workers",
        "modelpress_event_streams ",
        // Every family has help text (promtool check metrics).
        "# HELP modelpress_jobs Jobs in the database, by state",
        "# HELP modelpress_http_requests_total HTTP requests answered",
        "# HELP modelpress_job_duration_seconds Wall time of a job attempt",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for f in &families {
        assert!(
            text.contains(&format!("# HELP {f} ")),
            "{f} has no help text"
        );
    }
    assert!(
        !text.contains(&format!("route=\"/v1/jobs/{id}\"")),
        "raw URIs must not be labels"
    );
    let (s, _) = app.get_json("/readyz").await;
    assert_eq!(s, 200);
    app.stop().await;
}

#[tokio::test]
async fn expired_leases_are_requeued_then_exhausted() {
    let app = spawn_app_with(|c| c.max_attempts = 2).await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let j: Value = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    let id = j["id"].as_str().unwrap();
    let q = &app.state.queue;
    // A worker that claims the job and dies: its 1 ms lease runs out.
    for attempt in 1..=2 {
        let claimed = q.claim("ghost", 1).await.unwrap().expect("claimable");
        assert_eq!(claimed.attempts, attempt);
        std::thread::sleep(std::time::Duration::from_millis(5));
        // A late heartbeat from the dead worker changes nothing once the sweeper has run.
        assert_eq!(q.sweep_expired().await.unwrap().len(), 1);
        assert!(matches!(
            q.heartbeat(claimed.id, "ghost", 1000, 0.5, "x")
                .await
                .unwrap(),
            modelpress::queue::Heartbeat::Lost
        ));
    }
    let job = app.job(id).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["error"]["code"], "attempts_exhausted");
    assert_eq!(job["attempts"], 2);
    assert_eq!(
        app.drain().await,
        Vec::<Outcome>::new(),
        "an exhausted job is terminal"
    );
    app.stop().await;
}

#[tokio::test]
async fn npy_upload_is_compressed_into_an_npz_model() {
    let app = spawn_app().await;
    let values: Vec<f32> = (0..64 * 48)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) / 10.0)
        .collect();
    let t = modelpress::formats::Tensor::new(
        "array".into(),
        modelpress::formats::DType::F32,
        vec![64, 48],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap();
    let m = app
        .upload(modelpress::formats::npz::write_npy(&t).unwrap(), "w.npy")
        .await;
    assert_eq!(
        (m["format"].as_str(), m["parameter_count"].as_u64()),
        (Some("npy"), Some(3072))
    );
    let job = run_preset(&app, &m, json!({"preset": "int8"})).await;
    let dir = app.dir.path();
    app.download_to(&job, "restored.npy").await;
    app.download_to(&job, "model.npz").await;
    let out = python(
        "import sys, numpy as np\nr = np.load(sys.argv[1]); m = np.load(sys.argv[2])\n\
         d = m['array'].astype(np.float32) * m['array.__scale'].reshape(-1, 1)\n\
         assert r.dtype == np.float32 and r.shape == (64, 48)\nprint(np.array_equal(d, r))",
        &[
            dir.join("restored.npy").to_str().unwrap(),
            dir.join("model.npz").to_str().unwrap(),
        ],
    );
    assert_eq!(out.trim(), "True");
    app.stop().await;
}

#[tokio::test]
async fn a_dead_attempts_stored_artifacts_are_removed_when_a_later_attempt_succeeds() {
    let app = spawn_app().await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let j = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    let id = j["id"].as_str().unwrap();
    // Attempt 1 stores an artifact, then its process dies before committing.
    app.state
        .queue
        .claim("ghost", 1)
        .await
        .unwrap()
        .expect("claimable");
    let staged = app.state.config.scratch_dir().join("leftover");
    std::fs::write(&staged, b"partial").unwrap();
    app.state
        .blobs
        .put_file(&format!("artifacts/{id}/1/report.json"), &staged)
        .await
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    app.state.queue.sweep_expired().await.unwrap();
    assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
    let job = app.job(id).await;
    assert_eq!(job["attempts"], 2);
    let blobs = app.dir.path().join(format!("data/blobs/artifacts/{id}"));
    let attempts: Vec<String> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        attempts,
        vec!["2".to_string()],
        "attempt 1's files must be gone"
    );
    app.stop().await;
}

/// Without a dataset the weights still tell when a model is likely broken: one int8 scale per
/// tensor zeroes whole output channels of silero_vad's `encoder.3.weight` (the model then
/// agrees with the original on 23 % of decisions), per-channel int8 does not.
#[tokio::test]
async fn weights_that_collapse_warn_weight_error_high() {
    let app = spawn_app().await;
    let m = app
        .upload(
            case_file("silero_vad/silero_vad_16k_sequence.onnx"),
            "vad.onnx",
        )
        .await;
    let id = m["id"].as_str().unwrap();
    let mut codes = Vec::new();
    for preset in ["int8-tensor", "int8"] {
        let job = app
            .submit_json(json!({"model_id": id, "preset": preset, "latency": false}))
            .await;
        assert_eq!(app.drain().await, vec![Outcome::Succeeded]);
        let job = app.job(job["id"].as_str().unwrap()).await;
        let warnings = job["warnings"].as_array().unwrap().clone();
        let report: Value =
            serde_json::from_slice(&app.download(&job, "report.json").await).unwrap();
        let in_report = report["report"]["warnings"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(in_report, warnings, "{preset}");
        codes.push(
            warnings
                .iter()
                .filter(|w| w["code"] == "weight_error_high")
                .map(|w| w["message"].as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(codes[0].len(), 1, "{codes:?}");
    assert!(
        codes[0][0].contains("encoder.3.weight")
            && codes[0][0].contains("output channels became all zeros")
    );
    assert!(codes[1].is_empty(), "{codes:?}");
    app.stop().await;
}

async fn wait_for_state(app: &TestApp, id: &str, state: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let job = app.job(id).await;
        if job["state"] == state {
            return job;
        }
        assert!(std::time::Instant::now() < deadline, "never {state}: {job}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// MODELPRESS_SCRATCH_MAX_BYTES bounds what a worker holds in its scratch directory. At its
/// cap it claims nothing and `/readyz` says why; once room comes back the job runs. A model
/// that alone would pass the cap sends its job back to the queue with a backoff
/// (`insufficient_storage`), and fails once its attempts are spent, leaving nothing behind.
#[tokio::test]
async fn a_bounded_scratch_directory_holds_jobs_back_and_refuses_inputs_past_its_cap() {
    let app = spawn_app_with(|c| {
        c.workers = Some(1);
        c.scratch_max_bytes = 100_000;
        c.max_attempts = 2;
        c.retry_backoff_ms = 50;
    })
    .await;
    let scratch = app.state.config.scratch_dir();
    let filler = scratch.join("filler");
    std::fs::write(&filler, vec![0u8; 100_000]).unwrap();
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MODELPRESS_SCRATCH_MAX_BYTES"),
        "{body}"
    );
    let id = mnist_int8_job(&app).await;
    // The worker polls twice a second; over three polls it claims nothing.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let job = app.job(&id).await;
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
    // Room again: the same worker runs it.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(app.get_json("/readyz").await.0, 200);
    wait_for_state(&app, &id, "succeeded").await;
    // digits_mlp.onnx (204,592 B) alone passes the 100,000 B cap.
    let m = app
        .upload(
            case_file("digits_mlp_control/digits_mlp.onnx"),
            "digits.onnx",
        )
        .await;
    let j = app
        .submit_json(json!({"model_id": m["id"], "preset": "fp16", "latency": false}))
        .await;
    let job = wait_for_state(&app, j["id"].as_str().unwrap(), "failed").await;
    assert_eq!(error_code(&job), "insufficient_storage", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MODELPRESS_SCRATCH_MAX_BYTES"),
        "{job}"
    );
    assert_eq!(job["attempts"], 2, "{job}");
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
    app.stop().await;
}
