//! What the outside test of issue 30 broke, each a named test that failed before its fix:
//! headers that never finish (item 1), and the contract's smaller gaps (item 10).

use crate::helpers::*;
use modelpress::auth::{create_key, Scope};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// One client that sends a request's headers a byte every 200 ms and never ends them;
/// returns when the server has closed the connection (a write fails), or after `give_up`.
async fn trickle(addr: String, give_up: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .ok()?;
    while start.elapsed() < give_up {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.write_all(b"a").await.is_err() {
            return Some(start.elapsed());
        }
    }
    None
}

#[tokio::test]
async fn headers_sent_a_byte_at_a_time_are_cut_off_and_health_is_answered_at_the_cap() {
    let app = spawn_app_with(|c| {
        c.header_read_timeout_secs = 2;
        c.max_connections = 4;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // Every main slot and some of the reserve held by clients that keep sending.
    let give_up = Duration::from_secs(60);
    let slow: Vec<_> = (0..12)
        .map(|_| tokio::spawn(trickle(addr.clone(), give_up)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A probe on a new connection is answered while they trickle.
    let health = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("/healthz answers at the connection cap");
    assert_eq!(health.status(), 200);
    // Each trickling client is cut off, although it never stopped sending.
    for s in slow {
        let closed = s.await.unwrap();
        assert!(
            closed.is_some(),
            "a client sending its headers a byte at a time held its connection for {give_up:?}"
        );
    }
}

/// Item 10: `Authorization: bearer …` (the scheme is case-insensitive, RFC 9110 11.1).
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = spawn_app().await;
    let (key, _) = create_key(app.state.keys.as_ref(), "acme", Scope::Read)
        .await
        .unwrap();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = app
            .client
            .get(app.url("/v1/models"))
            .header("authorization", format!("{scheme} {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = app
        .client
        .get(app.url("/v1/models"))
        .header("authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Item 10: an Idempotency-Key with a space or a tab is refused, as `^[!-~]+$` documents.
#[tokio::test]
async fn an_idempotency_key_with_a_space_or_tab_is_refused() {
    let app = spawn_app().await;
    let model = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let spec = serde_json::json!({"model_id": model["id"], "preset": "int8"});
    for key in ["a b", "a\tb"] {
        let r = app
            .client
            .post(app.url("/v1/jobs"))
            .header("idempotency-key", key)
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{key:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(error_code(&body), "invalid_request", "{body}");
    }
    let r = app
        .client
        .post(app.url("/v1/jobs"))
        .header("idempotency-key", "job-1")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

/// Item 10: every answer carries `X-Content-Type-Options: nosniff` (artifacts, charts,
/// errors), and report.json's type is one openapi.yaml documents.
#[tokio::test]
async fn answers_say_nosniff_and_json_artifacts_are_documented_as_json() {
    let app = spawn_app().await;
    let id = mnist_int8_job(&app).await;
    app.drain().await;
    for path in [
        format!("/v1/jobs/{id}/artifacts/report.json"),
        format!("/v1/jobs/{id}/artifacts/model.onnx"),
        "/v1/jobs/00000000-0000-0000-0000-000000000000".to_string(),
        "/healthz".to_string(),
    ] {
        let r = app.client.get(app.url(&path)).send().await.unwrap();
        assert_eq!(
            r.headers()
                .get("x-content-type-options")
                .map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{path}"
        );
    }
    let r = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/artifacts/report.json")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/json");
    let documented = python(
        r#"
import json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
ok = doc["paths"]["/v1/jobs/{id}/artifacts/{name}"]["get"]["responses"]["200"]["content"]
print(json.dumps(sorted(ok)))
"#,
        &[concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")],
    );
    assert!(documented.contains("application/json"), "{documented}");
}

/// Item 8: the data directory is the owner's alone: the directory 0700, the database (with
/// every tenant's webhook secret), the signing key and every stored model 0600, also where
/// an earlier release left the database world-readable.
#[tokio::test]
async fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Process::start(
        &["serve", "--workers", "0"],
        &[("MODELPRESS_DATA_DIR", data.display().to_string())],
    );
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/models?name=m.onnx", server.base))
        .body(case_file("mnist8/mnist-8.onnx"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    let mut files = Vec::new();
    let mut dirs = vec![data.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            if e.file_type().unwrap().is_dir() {
                assert_eq!(mode(&e.path()), 0o700, "{}", e.path().display());
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(files.iter().any(|f| f.ends_with("modelpress.db")));
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    server.terminate();
}

/// Item 5: mnist-8 with its graph output renamed (a one-byte change) made tract panic while
/// building the model: the job failed `internal` and the CLI crashed (exit 101). It is
/// refused at upload with `invalid_model` and the reason, and the CLI says so.
#[tokio::test]
async fn a_model_whose_output_nothing_produces_is_refused_at_upload_and_by_the_cli() {
    use prost::Message;
    let mut m =
        tract_onnx::pb::ModelProto::decode(case_file("mnist8/mnist-8.onnx").as_slice()).unwrap();
    let out = &mut m.graph.as_mut().unwrap().output[0].name;
    let last = out.pop().unwrap();
    out.push(if last == '0' { '1' } else { '0' });
    let bytes = m.encode_to_vec();
    let app = spawn_app().await;
    let (status, body) = app
        .post_bytes("/v1/models?name=m.onnx", bytes.clone())
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(error_code(&body), "invalid_model", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not produced"),
        "{body}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.onnx");
    std::fs::write(&file, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .args(["compress", file.to_str().unwrap(), "--preset", "int8", "-o"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "the CLI panicked: {stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("is not produced"), "{stderr}");
}

/// Item 10: an error axum answers before a handler runs (a path that is not UTF-8) has the
/// JSON error shape too.
#[tokio::test]
async fn a_path_that_is_not_utf8_gets_the_json_error_shape() {
    let app = spawn_app().await;
    for path in ["/v1/models/%FF%FE", "/v1/jobs/%C3%28/artifacts/x"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        assert!((400..500).contains(&status), "{path}: {status}");
        assert_eq!(r.headers()["content-type"], "application/json", "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(!error_code(&body).is_empty(), "{path}: {body}");
    }
}
