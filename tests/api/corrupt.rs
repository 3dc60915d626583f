//! Corrupt and hostile files: each is refused with 422 invalid_model, the server stays
//! healthy, and nothing already stored is lost.

use crate::helpers::*;
use prost::Message;
use serde_json::{json, Value};
use tract_onnx::pb;

fn npy_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

fn safetensors_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

pub fn onnx_with_initializer(init: pb::TensorProto) -> Vec<u8> {
    onnx_with_initializers(vec![init])
}

pub fn onnx_with_initializers(initializer: Vec<pb::TensorProto>) -> Vec<u8> {
    onnx_with_graph(pb::GraphProto {
        name: "g".into(),
        initializer,
        ..Default::default()
    })
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn hostile_files() -> Vec<(&'static str, Vec<u8>)> {
    let mnist = case_file("mnist8/mnist-8.onnx");
    let npz = case_file("digits_mlp_control/digits_mlp_weights.npz");
    let mut zip_garbage = b"PK\x03\x04".to_vec();
    zip_garbage.extend(pseudo_random(500));
    vec![
        ("empty", Vec::new()),
        ("truncated onnx", mnist[..mnist.len() / 2].to_vec()),
        ("random bytes", pseudo_random(4096)),
        ("wrong npy magic", npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", &[0; 8]).iter().enumerate().map(|(i, b)| if i == 5 { b'X' } else { *b }).collect()),
        ("zip magic then garbage", zip_garbage),
        ("truncated npz", npz[..npz.len() - 100].to_vec()),
        (
            "safetensors overlapping offsets",
            safetensors_raw(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
        ),
        ("safetensors huge header", {
            let mut v = (1u64 << 40).to_le_bytes().to_vec();
            v.extend_from_slice(b"{\"a\":1}");
            v
        }),
        ("safetensors shape beyond data", safetensors_raw(r#"{"a":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,8]}}"#, &[0; 8])),
        ("npy object dtype", npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (3,), }", &[0; 24])),
        ("npy shape overflow", npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", &[0; 16])),
        ("npy short data", npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (100,), }", &[0; 16])),
        ("npy huge header length", {
            let mut v = b"\x93NUMPY\x02\x00".to_vec();
            v.extend_from_slice(&u32::MAX.to_le_bytes());
            v.extend_from_slice(b"{'descr'");
            v
        }),
        (
            "onnx external data",
            onnx_with_initializer(pb::TensorProto {
                name: "w".into(),
                dims: vec![4, 4],
                data_type: 1,
                data_location: Some(1),
                external_data: vec![pb::StringStringEntryProto { key: "location".into(), value: "/etc/passwd".into() }],
                ..Default::default()
            }),
        ),
        (
            "onnx raw data shorter than dims",
            onnx_with_initializer(pb::TensorProto { name: "w".into(), dims: vec![1 << 20, 1 << 20], data_type: 1, raw_data: vec![0; 16], ..Default::default() }),
        ),
        (
            "onnx negative dim",
            onnx_with_initializer(pb::TensorProto { name: "w".into(), dims: vec![-4], data_type: 1, raw_data: vec![0; 16], ..Default::default() }),
        ),
    ]
}

#[tokio::test]
async fn corrupt_files_get_invalid_model_and_nothing_is_lost() {
    let app = spawn_app().await;
    let good = app
        .upload(case_file("mnist8/mnist-8.onnx"), "good.onnx")
        .await;
    for (what, bytes) in hostile_files() {
        let r = app
            .client
            .post(app.url("/v1/models"))
            .body(bytes)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
        assert_eq!(
            (status, error_code(&v)),
            (422, "invalid_model"),
            "{what}: {v}"
        );
        assert!(
            !v["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{what}"
        );
        let (s, _) = app.get_json("/healthz").await;
        assert_eq!(s, 200, "{what}: server unhealthy");
    }
    let (_, list) = app.get_json("/v1/models").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "only the good model is stored"
    );
    let (s, t) = app
        .get_json(&format!(
            "/v1/models/{}/tensors",
            good["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!((s, t["items"].as_array().unwrap().len()), (200, 8));
    // The good model still compresses.
    let r = app
        .submit(json!({"model_id": good["id"], "preset": "int8"}))
        .await;
    assert_eq!(r.status(), 202);
    app.drain().await;
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["items"][0]["state"], "succeeded");
    let staged: Vec<_> = std::fs::read_dir(app.dir.path().join("data/tmp"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "rejected uploads left files: {staged:?}");
    app.stop().await;
}

/// NaN weights are counted at upload; a job that would compress them is refused at submit
/// with invalid_model naming the tensor (it would fail the same way when it ran).
#[tokio::test]
async fn nan_weights_fail_the_job_with_invalid_model() {
    let app = spawn_app().await;
    let mut w = vec![0.5f32; 64 * 32];
    w[77] = f32::NAN;
    let data: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, vec![64, 32], &data)
            .unwrap();
    let bytes = safetensors::serialize([("fc.weight", view)], None).unwrap();
    let m = app.upload(bytes, "nan.safetensors").await;
    let r = app
        .submit(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "invalid_model", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("fc.weight"));
    app.stop().await;
}

#[tokio::test]
async fn bad_requests_get_stable_codes() {
    let app = spawn_app().await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let id = m["id"].as_str().unwrap();
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"model_id": id, "preset": "nope"}),
            422,
            "invalid_spec",
            "preset",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "shrink"}]}),
            422,
            "invalid_spec",
            "pipeline[0].method",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "prune", "sparsity": 1.5}]}),
            422,
            "invalid_spec",
            "pipeline[0].sparsity",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "quantize", "bits": 9}]}),
            422,
            "invalid_spec",
            "pipeline[0].bits",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "quantize", "colour": "red"}]}),
            422,
            "invalid_spec",
            "pipeline[0].colour",
        ),
        (
            json!({"model_id": id, "preset": "int8", "outputs": ["everything"]}),
            422,
            "invalid_spec",
            "outputs[0]",
        ),
        (
            json!({"model_id": id, "preset": "int8", "extra": 1}),
            422,
            "invalid_spec",
            "extra",
        ),
        (json!({"preset": "int8"}), 422, "invalid_spec", "model_id"),
        (
            json!({"model_id": id, "pipeline": [{"method": "kmeans", "bits": 9}]}),
            422,
            "invalid_spec",
            "pipeline[0].bits",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "lowrank", "rank": 4, "energy": 0.9}]}),
            422,
            "invalid_spec",
            "pipeline[0].rank",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "prune", "pattern": "4:2"}]}),
            422,
            "invalid_spec",
            "pipeline[0].pattern",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "prune", "structure": "output"}]}),
            422,
            "invalid_spec",
            "pipeline[0].ratio",
        ),
        (
            json!({"model_id": id, "preset": "deep-compression", "options": {"fc_bits": 0}}),
            422,
            "invalid_spec",
            "options.fc_bits",
        ),
        (
            json!({"model_id": id, "preset": "int8", "options": {"sparsity": 0.5}}),
            422,
            "invalid_spec",
            "options.sparsity",
        ),
        (
            json!({"model_id": "0190c0de-0000-7000-8000-000000000000", "preset": "int8"}),
            404,
            "model_not_found",
            "",
        ),
    ];
    for (body, status, code, field) in cases {
        let r = app.submit(body.clone()).await;
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!((s, error_code(&v)), (status, code), "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{body}: {v}"
        );
    }
    let r = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        error_code(&r.json::<Value>().await.unwrap()),
        "invalid_request"
    );
    for (path, code) in [
        (
            "/v1/jobs/0190c0de-0000-7000-8000-000000000000",
            "job_not_found",
        ),
        ("/v1/jobs/garbage", "job_not_found"),
        ("/v1/nothing", "not_found"),
        ("/v1/jobs?state=sleeping", "invalid_request"),
        ("/v1/jobs?limit=0", "invalid_request"),
        ("/v1/models?cursor=xyz", "invalid_request"),
    ] {
        let (s, v) = app.get_json(path).await;
        assert_eq!(error_code(&v), code, "{path}: {s} {v}");
    }
    let r = app.client.put(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        error_code(&r.json::<Value>().await.unwrap()),
        "method_not_allowed"
    );
    app.stop().await;
}

/// A pipeline that no tensor can run (quantizing float32 factors, pruning binary weights) is a
/// 422 at submit time that names the step, not a job that fails later; a parameter of the
/// wrong type names its field. Both for JSON bodies and for an upload with its spec.
#[tokio::test]
async fn impossible_orderings_and_mistyped_parameters_are_refused_at_submit() {
    let app = spawn_app().await;
    let m = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let id = m["id"].as_str().unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"model_id": id, "pipeline": [{"method": "lowrank", "rank": 2}, {"method": "quantize", "bits": 8}]}),
            "pipeline[1]: quantize(int8,symmetric,channel) cannot follow pipeline[0] lowrank(rank=2)",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "binary"}, {"method": "prune", "sparsity": 0.5}]}),
            "pipeline[1]: prune(0.5,tensor) cannot follow pipeline[0] binary(channel) (it has no zero)",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "tucker2", "rank": 2}, {"method": "prune", "structure": "output", "ratio": 0.25}]}),
            "prune first",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "quantize", "bits": "eight"}]}),
            "pipeline[0].bits: invalid type",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "quantize", "scheme": "skewed"}]}),
            "pipeline[0].scheme: unknown variant",
        ),
        (
            json!({"model_id": id, "pipeline": [{"method": "huffman", "bits": 3}]}),
            "pipeline[0].bits: unknown field for method \"huffman\"",
        ),
    ];
    for (body, message) in cases {
        let r = app.submit(body.clone()).await;
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!((s, error_code(&v)), (422, "invalid_spec"), "{body}: {v}");
        let got = v["error"]["message"].as_str().unwrap();
        assert!(got.contains(message), "{body}: {got}");
    }
    // The same orderings are fine where the selections do not overlap.
    let r = app
        .submit(json!({"model_id": id, "pipeline": [
            {"method": "lowrank", "rank": 2, "include": "Parameter193"},
            {"method": "quantize", "bits": 8, "exclude": "Parameter193"}]}))
        .await;
    assert_eq!(r.status(), 202);
    // An upload with its spec: refused after the file is stored, and the message says where.
    let spec = json!({"pipeline": [{"method": "binary"}, {"method": "prune", "sparsity": 0.5}]});
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(case_file("mnist8/mnist-8.onnx")).file_name("m.onnx"),
        )
        .text("spec", spec.to_string());
    let r = app
        .client
        .post(app.url("/v1/jobs"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    let got = v["error"]["message"].as_str().unwrap();
    assert!(
        got.contains("cannot follow") && got.contains("the model was stored as"),
        "{got}"
    );
    app.stop().await;
}

/// Sends raw bytes on a fresh connection and returns the status line and body the server
/// answers with (None: it did not answer within `wait`).
async fn raw_request(
    base: &str,
    head: &str,
    chunks: &[&[u8]],
    gap: std::time::Duration,
    wait: std::time::Duration,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    for c in chunks {
        if s.write_all(c).await.is_err() {
            break;
        }
        tokio::time::sleep(gap).await;
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    read.ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A client that sends headers and a few bytes then goes silent, or trickles its body, gets
/// 408 request_timeout and leaves no staging file; a non-JSON spec body is 415; a 20 kB id
/// does not come back whole in the 404.
#[tokio::test]
async fn stalled_and_trickled_uploads_time_out_and_odd_requests_get_clear_errors() {
    let app = spawn_app_with(|c| {
        c.body_idle_secs = 1;
        c.min_upload_bytes_per_sec = 1024;
    })
    .await;
    let staging = app.state.config.scratch_dir();
    let head = "POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
    let stalled = raw_request(
        &app.base,
        head,
        &[b"abc"],
        std::time::Duration::ZERO,
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("the server answers a stalled upload");
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(stalled.contains("\"request_timeout\""), "{stalled}");
    // 10 bytes every 200 ms: alive, but far below 1 KiB/s.
    let drip: Vec<&[u8]> = vec![b"0123456789"; 20];
    let trickled = raw_request(
        &app.base,
        head,
        &drip,
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("the server answers a trickled upload");
    assert!(trickled.starts_with("HTTP/1.1 408"), "{trickled}");
    assert!(trickled.contains("slower than 1024 B/s"), "{trickled}");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging files left: {left:?}");

    let r = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "text/plain")
        .body("{\"preset\": \"int8\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(
        error_code(&r.json::<Value>().await.unwrap()),
        "unsupported_media_type"
    );

    let long = "x".repeat(20_000);
    let (status, v) = app.get_json(&format!("/v1/models/{long}")).await;
    assert_eq!(status, 404);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.len() < 200 && msg.contains("20000 bytes"), "{msg}");
    app.stop().await;
}

fn npz_of(members: &[(&str, Vec<u8>)], method: zip::CompressionMethod) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in members {
        w.start_file(*name, opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A decompression bomb (.npz whose member inflates 1000x) is refused as a model and as a
/// dataset with 413 inflation_limit before its members are read, and so is an .npz larger
/// than MODELPRESS_MAX_INFLATED_BYTES once inflated; nothing is stored.
#[tokio::test]
async fn decompression_bombs_are_refused_by_ratio_and_by_size() {
    let app = spawn_app_with(|c| c.max_inflated_bytes = 1 << 20).await;
    let zeros = vec![0u8; 16 << 20];
    let bomb = npz_of(
        &[(
            "w.npy",
            npy_with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4194304,), }",
                &zeros,
            ),
        )],
        zip::CompressionMethod::Deflated,
    );
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    for route in ["/v1/models", "/v1/datasets"] {
        let r = app
            .client
            .post(app.url(route))
            .body(bomb.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "{route}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_code(&v), "inflation_limit", "{route}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("inflates"),
            "{v}"
        );
    }
    // Stored, not compressed, but over the configured 1 MiB once read.
    let big = npz_of(
        &[(
            "w.npy",
            npy_with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (524288,), }",
                &vec![0u8; 2 << 20],
            ),
        )],
        zip::CompressionMethod::Stored,
    );
    let r = app
        .client
        .post(app.url("/v1/models"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MODELPRESS_MAX_INFLATED_BYTES"),
        "{v}"
    );
    // A small legitimate .npz still goes in.
    let ok = npz_of(
        &[(
            "w.npy",
            npy_with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }",
                &[1u8; 64],
            ),
        )],
        zip::CompressionMethod::Deflated,
    );
    let m = app.upload(ok, "ok.npz").await;
    assert_eq!(m["parameter_count"], 16, "{m}");
    let (_, list) = app.get_json("/v1/models").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    app.stop().await;
}

/// What can be checked at upload is: an .npy of rank 40 is refused there; NaN weights are
/// counted in the inventory and a job that would compress them is refused at submit (422
/// invalid_model naming the tensor), not when it runs. A job whose model file vanished
/// fails at once with model_not_found instead of waiting out a lease per attempt.
#[tokio::test]
async fn upload_time_checks_and_a_missing_model_file() {
    let app = spawn_app().await;
    let shape = vec!["1"; 40].join(", ");
    let deep = npy_with_header(
        &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape},), }}"),
        &[0u8; 4],
    );
    let r = app
        .client
        .post(app.url("/v1/models"))
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("rank 40"),
        "{v}"
    );

    let mut values = vec![0.5f32; 64 * 64];
    values[7] = f32::NAN;
    values[9] = f32::INFINITY;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let nan = npy_with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (64, 64), }",
        &bytes,
    );
    let m = app.upload(nan, "nan.npy").await;
    let (_, inv) = app
        .get_json(&format!("/v1/models/{}/tensors", m["id"].as_str().unwrap()))
        .await;
    assert_eq!(inv["items"][0]["non_finite"], 2, "{inv}");
    let r = app
        .submit(json!({"model_id": m["id"], "preset": "int8"}))
        .await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "invalid_model", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("holds 2 NaN or infinite"),
        "{v}"
    );

    let good = app.upload(case_file("mnist8/mnist-8.onnx"), "m.onnx").await;
    let job = app
        .submit_json(json!({"model_id": good["id"], "preset": "int8"}))
        .await;
    let key = format!("models/{}", good["id"].as_str().unwrap());
    app.state.blobs.delete(&key).await.unwrap();
    assert_eq!(app.drain().await, vec![modelpress::worker::Outcome::Failed]);
    let job = app.job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["error"]["code"], "model_not_found", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    app.stop().await;
}

/// Two tensors with one name: the second npz member, the last safetensors header key or the
/// second ONNX initializer would win silently. Each is refused, naming the tensor, for models
/// and for datasets.
#[tokio::test]
async fn duplicate_names_are_refused_with_the_name() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("dup.npz");
    python(
        "import io, sys, warnings, zipfile, numpy as np\n\
         warnings.simplefilter('ignore')\n\
         def npy(a):\n    b = io.BytesIO(); np.save(b, a); return b.getvalue()\n\
         with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
         \x20   z.writestr('Input3.npy', npy(np.zeros((2, 1, 28, 28), np.float32)))\n\
         \x20   z.writestr('Input3.npy', npy(np.ones((2, 1, 28, 28), np.float32)))\n",
        &[npz.to_str().unwrap()],
    );
    let npz = std::fs::read(&npz).unwrap();
    let init = |raw: f32| pb::TensorProto {
        name: "w".into(),
        dims: vec![2],
        data_type: 1,
        raw_data: [raw, raw].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    };
    let onnx = onnx_with_initializers(vec![init(1.0), init(2.0)]);
    let safetensors = safetensors_raw(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    for (what, bytes, name) in [
        ("npz", npz.clone(), "\"Input3\""),
        ("onnx", onnx, "\"w\""),
        ("safetensors", safetensors, "\"w\""),
    ] {
        let (status, v) = app.post_bytes("/v1/models", bytes).await;
        assert_eq!(
            (status, error_code(&v)),
            (422, "invalid_model"),
            "{what}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("named") && msg.contains(name), "{what}: {msg}");
    }
    let r = app
        .client
        .post(app.url("/v1/datasets"))
        .body(npz)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"Input3\""),
        "{v}"
    );
    let (_, list) = app.get_json("/v1/models").await;
    assert!(list["items"].as_array().unwrap().is_empty());
    app.stop().await;
}

/// Unmounts the test's tmpfs when dropped.
struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A 4 MiB tmpfs under `dir` (the test machines run as root).
fn small_tmpfs(dir: &std::path::Path) -> (std::path::PathBuf, Unmount) {
    let mnt = dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount runs");
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (the test machines have it)"
    );
    (mnt.clone(), Unmount(mnt))
}

/// Uploads mnist-8's eval.npz as datasets until one is refused; returns the ids stored and
/// the refusal, which must be 507 insufficient_storage (never a 500).
async fn fill_with_datasets(app: &crate::helpers::TestApp) -> (Vec<String>, Value) {
    let eval = case_file("mnist8/eval.npz");
    let mut stored = Vec::new();
    for i in 0..12 {
        let r = app
            .client
            .post(app.url(&format!("/v1/datasets?name=d{i}")))
            .body(eval.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        match status {
            201 => stored.push(v["id"].as_str().unwrap().to_string()),
            507 => {
                assert_eq!(error_code(&v), "insufficient_storage", "{v}");
                let (_, list) = app.get_json("/v1/datasets").await;
                assert_eq!(
                    list["items"].as_array().unwrap().len(),
                    stored.len(),
                    "only whole uploads are listed"
                );
                assert!(!stored.is_empty());
                return (stored, v);
            }
            other => panic!("upload {i}: {other} {v}"),
        }
    }
    panic!("the disk never filled");
}

/// Deletes the datasets through the API (which works on a full disk), then uploads again:
/// the server recovers without a restart and leaves no staging files.
async fn free_and_upload_again(
    app: &crate::helpers::TestApp,
    stored: &[String],
    data: &std::path::Path,
) {
    for id in stored {
        let r = app
            .client
            .delete(app.url(&format!("/v1/datasets/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let r = app
        .client
        .post(app.url("/v1/datasets?name=again"))
        .body(case_file("mnist8/eval.npz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the server recovered without a restart");
    let staged: Vec<_> = std::fs::read_dir(data.join("tmp")).unwrap().collect();
    assert!(staged.is_empty(), "refused uploads left files: {staged:?}");
}

/// A server on a small tmpfs under `dir` with no free-space floor, so that writes really hit
/// ENOSPC; its data directory, and the guard that unmounts the tmpfs.
async fn app_without_a_floor(
    dir: &std::path::Path,
) -> (crate::helpers::TestApp, std::path::PathBuf, Unmount) {
    let (mnt, guard) = small_tmpfs(dir);
    let data = mnt.join("data");
    let app = crate::helpers::spawn_app_with(|c| {
        c.data_dir = data.clone();
        c.min_free_bytes = 0;
    })
    .await;
    (app, data, guard)
}

/// With no free-space floor the disk really fills: the write that hits ENOSPC (or the
/// database's SQLITE_FULL) answers 507, never 500, and deleting through the API recovers.
#[tokio::test]
async fn writes_that_hit_enospc_get_507_and_deletes_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let (app, data, _guard) = app_without_a_floor(dir.path()).await;
    let (stored, refused) = fill_with_datasets(&app).await;
    let msg = refused["error"]["message"].as_str().unwrap();
    assert!(msg.contains("disk is full"), "{msg}");
    free_and_upload_again(&app, &stored, &data).await;
    app.stop().await;
}

/// With no free-space floor, a write that hits ENOSPC makes `/readyz` answer 503 (a load
/// balancer turns away from a server whose disk refuses writes, though the floor check sees
/// nothing wrong) until a write succeeds again.
#[tokio::test]
async fn after_a_write_fails_for_space_readyz_says_so_until_a_write_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (app, data, _guard) = app_without_a_floor(dir.path()).await;
    let (s, v) = app.get_json("/readyz").await;
    assert_eq!(s, 200, "{v}");
    let (stored, _) = fill_with_datasets(&app).await;
    let (s, v) = app.get_json("/readyz").await;
    assert_eq!(s, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("a write failed for lack of space"), "{msg}");
    // Liveness is not readiness: the process itself is fine.
    let (s, _) = app.get_json("/healthz").await;
    assert_eq!(s, 200);
    free_and_upload_again(&app, &stored, &data).await;
    let (s, v) = app.get_json("/readyz").await;
    assert_eq!(s, 200, "{v}");
    app.stop().await;
}

/// A full disk: uploads get 507 insufficient_storage (never a 500), nothing half-stored is
/// listed, /readyz says the disk is nearly full, and deleting frees room again without a
/// restart. The data directory is a 4 MiB tmpfs (the test machines run as root).
#[tokio::test]
async fn a_full_disk_gets_507_and_recovers_when_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let (mnt, _guard) = small_tmpfs(dir.path());
    let app = crate::helpers::spawn_app_with(|c| {
        c.data_dir = mnt.join("data");
        c.min_free_bytes = 1 << 20;
    })
    .await;
    let (stored, _) = fill_with_datasets(&app).await;
    // Something else fills the disk below the floor: /readyz says so, and even a small
    // upload is refused.
    let (_, ready) = app.get_json("/readyz").await;
    let free = ready["free_bytes"].as_u64().expect("free bytes reported");
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; (free - (512 << 10)) as usize]).unwrap();
    let (s, v) = app.get_json("/readyz").await;
    assert_eq!(s, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("nearly full"), "{msg}");
    let r = app
        .client
        .post(app.url("/v1/datasets?name=small"))
        .body(case_file("digits_mlp_control/eval.npz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 507);
    std::fs::remove_file(&filler).unwrap();
    free_and_upload_again(&app, &stored, &mnt.join("data")).await;
    let (s, v) = app.get_json("/readyz").await;
    assert_eq!(s, 200, "{v}");
    app.stop().await;
}

/// A job whose attempts hit a full disk: each attempt counts, the job waits out a doubling
/// backoff between them (queued, the reason in its stage) instead of looping or waiting a
/// whole lease, and fails with `insufficient_storage` once its attempts are spent. No
/// artifact of a failed attempt is listed; once space is freed the same job runs.
#[tokio::test]
async fn a_job_that_hits_a_full_disk_is_retried_with_backoff_then_fails_insufficient_storage() {
    use modelpress::worker::{try_execute_one, Outcome};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (mnt, _guard) = small_tmpfs(dir.path());
    let backoff = 300u64;
    let app = crate::helpers::spawn_app_with(|c| {
        c.data_dir = mnt.join("data");
        c.min_free_bytes = 0;
        c.retry_backoff_ms = backoff;
        c.max_attempts = 3;
    })
    .await;
    let m = app
        .upload(
            case_file("digits_mlp_control/digits_mlp.onnx"),
            "digits.onnx",
        )
        .await;
    let spec = json!({"model_id": m["id"], "preset": "fp16", "latency": false});
    let j = app.submit_json(spec.clone()).await;
    let id = j["id"].as_str().unwrap();
    // Leave 160 KiB: the database's few writes fit, the job's outputs (restored.onnx alone
    // is 200 KB) do not.
    let (_, ready) = app.get_json("/readyz").await;
    let free = ready["free_bytes"].as_u64().expect("free bytes reported");
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; (free - (160 << 10)) as usize]).unwrap();
    let start = Instant::now();
    let mut runs: Vec<(Outcome, Duration)> = Vec::new();
    let mut saw_waiting = false;
    let job = loop {
        match try_execute_one(&app.state).await {
            Ok(Outcome::Empty) => {}
            Ok(o) => runs.push((o, start.elapsed())),
            Err(e) => panic!("the queue itself failed: {e:#}"),
        }
        let job = app.job(id).await;
        if job["state"] == "failed" {
            break job;
        }
        if job["state"] == "queued" && !runs.is_empty() {
            let stage = job["stage"].as_str().unwrap_or_default();
            assert!(stage.contains("insufficient_storage"), "{job}");
            saw_waiting = true;
        }
        assert!(runs.len() <= 3, "more attempts than allowed: {runs:?}");
        assert!(start.elapsed() < Duration::from_secs(60), "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outcomes: Vec<Outcome> = runs.iter().map(|r| r.0).collect();
    assert_eq!(
        outcomes,
        [Outcome::Retrying, Outcome::Retrying, Outcome::Failed],
        "{job}"
    );
    assert!(saw_waiting, "between attempts the job waited, queued");
    // The backoff doubles: at least 300 ms, then 600 ms, between attempts (with slack for
    // the time each attempt takes to be recorded).
    let gaps = [runs[1].1 - runs[0].1, runs[2].1 - runs[1].1];
    assert!(
        gaps[0] >= Duration::from_millis(backoff * 8 / 10),
        "{gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(backoff * 2 * 8 / 10),
        "{gaps:?}"
    );
    assert_eq!(job["attempts"], 3, "{job}");
    assert_eq!(error_code(&job), "insufficient_storage", "{job}");
    assert_eq!(job["artifacts"], json!([]), "{job}");
    // Space comes back: the same job, submitted again, succeeds without a restart.
    std::fs::remove_file(&filler).unwrap();
    let j = app.submit_json(spec).await;
    app.drain().await;
    let job = app.job(j["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let staged: Vec<_> = std::fs::read_dir(mnt.join("data/tmp")).unwrap().collect();
    assert!(staged.is_empty(), "failed attempts left files: {staged:?}");
    app.stop().await;
}

/// A tensor that points at external data (here `/etc/passwd`).
fn external_tensor(name: &str) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![2],
        data_type: 1,
        data_location: Some(1),
        external_data: vec![pb::StringStringEntryProto {
            key: "location".into(),
            value: "/etc/passwd".into(),
        }],
        ..Default::default()
    }
}

fn constant_node(attr: pb::AttributeProto) -> pb::NodeProto {
    pb::NodeProto {
        op_type: "Constant".into(),
        output: vec!["c".into()],
        attribute: vec![attr],
        ..Default::default()
    }
}

fn onnx_with_graph(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// ONNX external data is refused wherever a tensor can sit, not only in initializers: a
/// `Constant`'s `value` and `sparse_value`, a sparse initializer, and a `Constant` inside an
/// `If` branch. Nothing is stored, so no artifact can carry the reference on.
#[tokio::test]
async fn onnx_external_data_is_refused_in_attributes_sparse_tensors_and_subgraphs() {
    let value = pb::AttributeProto {
        name: "value".into(),
        r#type: 4,
        t: Some(external_tensor("c")),
        ..Default::default()
    };
    let sparse = pb::SparseTensorProto {
        values: Some(external_tensor("v")),
        indices: Some(pb::TensorProto {
            name: "i".into(),
            dims: vec![1],
            data_type: 7,
            int64_data: vec![0],
            ..Default::default()
        }),
        dims: vec![2],
    };
    let sparse_value = pb::AttributeProto {
        name: "sparse_value".into(),
        r#type: 11,
        sparse_tensor: Some(sparse.clone()),
        ..Default::default()
    };
    let branch = pb::GraphProto {
        name: "then".into(),
        node: vec![constant_node(value.clone())],
        ..Default::default()
    };
    let if_node = pb::NodeProto {
        op_type: "If".into(),
        input: vec!["cond".into()],
        output: vec!["y".into()],
        attribute: vec![
            pb::AttributeProto {
                name: "then_branch".into(),
                r#type: 5,
                g: Some(branch.clone()),
                ..Default::default()
            },
            pb::AttributeProto {
                name: "else_branch".into(),
                r#type: 5,
                g: Some(branch),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let cases = [
        (
            "Constant value",
            pb::GraphProto {
                node: vec![constant_node(value)],
                ..Default::default()
            },
        ),
        (
            "Constant sparse_value",
            pb::GraphProto {
                node: vec![constant_node(sparse_value)],
                ..Default::default()
            },
        ),
        (
            "sparse initializer",
            pb::GraphProto {
                sparse_initializer: vec![sparse],
                ..Default::default()
            },
        ),
        (
            "Constant in an If branch",
            pb::GraphProto {
                node: vec![if_node],
                ..Default::default()
            },
        ),
    ];
    let app = spawn_app().await;
    for (what, graph) in cases {
        let (status, v) = app
            .post_bytes("/v1/models?name=ext.onnx", onnx_with_graph(graph))
            .await;
        assert_eq!(
            (status, error_code(&v)),
            (422, "invalid_model"),
            "{what}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("external data"), "{what}: {msg}");
        assert!(
            !msg.contains("/etc/passwd"),
            "{what}: the path is not echoed: {msg}"
        );
    }
    let (_, list) = app.get_json("/v1/models").await;
    assert_eq!(list["items"], json!([]), "nothing was stored");
    app.stop().await;
}

/// A model-local function whose body's `Constant` points at external data is refused like
/// any other such tensor (issue 30: it was accepted), over HTTP, with nothing stored.
#[tokio::test]
async fn onnx_external_data_in_a_local_functions_body_is_refused() {
    let value = pb::AttributeProto {
        name: "value".into(),
        r#type: 4,
        t: Some(external_tensor("c")),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![
            pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            },
            pb::OperatorSetIdProto {
                domain: "local".into(),
                version: 1,
            },
        ],
        graph: Some(pb::GraphProto {
            node: vec![pb::NodeProto {
                op_type: "Leak".into(),
                domain: "local".into(),
                output: vec!["y".into()],
                ..Default::default()
            }],
            output: vec![pb::ValueInfoProto {
                name: "y".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        functions: vec![pb::FunctionProto {
            name: Some("Leak".into()),
            domain: Some("local".into()),
            output: vec!["c".into()],
            node: vec![constant_node(value)],
            ..Default::default()
        }],
        ..Default::default()
    };
    let app = spawn_app().await;
    let (status, v) = app
        .post_bytes("/v1/models?name=fn.onnx", model.encode_to_vec())
        .await;
    assert_eq!((status, error_code(&v)), (422, "invalid_model"), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("external data"), "{msg}");
    assert!(
        !msg.contains("/etc/passwd"),
        "the path is not echoed: {msg}"
    );
    let (_, list) = app.get_json("/v1/models").await;
    assert_eq!(list["items"], json!([]), "nothing was stored");
    app.stop().await;
}

/// A file of many empty tensors costs memory per tensor, not per byte (the outside test's
/// 999,000-tensor safetensors took 1.6 GB per inventory read): the count and the header are
/// capped at upload, and the inventory is read a page at a time.
#[tokio::test]
async fn tensor_counts_are_capped_at_upload_and_the_inventory_comes_in_pages() {
    let app = spawn_app().await;
    let empty = |n: usize| {
        let entries: Vec<String> = (0..n)
            .map(|i| format!(r#""t{i:06}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#))
            .collect();
        safetensors_raw(&format!("{{{}}}", entries.join(",")), &[])
    };
    let r = app
        .client
        .post(app.url("/v1/models"))
        .body(empty(100_001))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!((status, error_code(&v)), (422, "invalid_model"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many tensors"),
        "{v}"
    );

    let m = app.upload(empty(2_500), "many.safetensors").await;
    let base = format!("/v1/models/{}/tensors", m["id"].as_str().unwrap());
    let (s, first) = app.get_json(&base).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["total"], 2_500);
    assert_eq!(
        first["items"].as_array().unwrap().len(),
        1_000,
        "default page"
    );
    assert_eq!(first["items"][0]["name"], "t000000");
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            None => format!("{base}?limit=700"),
            Some(c) => format!("{base}?limit=700&cursor={c}"),
        };
        let (s, page) = app.get_json(&url).await;
        assert_eq!(s, 200, "{page}");
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..2_500).map(|i| format!("t{i:06}")).collect();
    assert_eq!(names, expected, "every tensor once, in file order");
    for bad in ["limit=0", "limit=10001", "limit=x", "cursor=-1"] {
        let (s, v) = app.get_json(&format!("{base}?{bad}")).await;
        assert_eq!((s, error_code(&v)), (400, "invalid_request"), "{bad}: {v}");
    }
    let (s, past) = app.get_json(&format!("{base}?cursor=9999")).await;
    assert_eq!(s, 200);
    assert_eq!(past["items"].as_array().unwrap().len(), 0);
    assert!(past["next_cursor"].is_null());
    app.stop().await;
}
