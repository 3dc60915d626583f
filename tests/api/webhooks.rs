//! Signed webhooks (durable outbox, HMAC, SSRF guard) and signed manifests, end to end: a
//! real receiver over HTTP, the signature checked by Python's `hmac` (as README tells users
//! to), manifests checked by `modelpress verify`.

use crate::helpers::*;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The requests a receiver got: headers and body of each.
type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A webhook receiver on 127.0.0.1: records every request and answers with the next status
/// of its script (then 200).
struct Receiver {
    url: String,
    got: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(script: Vec<u16>) -> Receiver {
        Receiver::start_on(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            script,
        )
    }

    fn start_on(listener: tokio::net::TcpListener, script: Vec<u16>) -> Receiver {
        let got: Received = Arc::default();
        let script = Arc::new(Mutex::new(script.into_iter()));
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let got = got.clone();
                move |headers: HeaderMap, body: axum::body::Bytes| {
                    let got = got.clone();
                    let script = script.clone();
                    async move {
                        got.lock().unwrap().push((headers, body.to_vec()));
                        let status = script.lock().unwrap().next().unwrap_or(200);
                        let mut resp = axum::response::Response::new(axum::body::Body::empty());
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        if status / 100 == 3 {
                            // A redirect to the metadata service must not be followed.
                            resp.headers_mut().insert(
                                "location",
                                "http://169.254.169.254/latest/meta-data/".parse().unwrap(),
                            );
                        }
                        resp
                    }
                }
            }),
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { url, got, task }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

/// Waits until the job's deliveries satisfy `done`; returns them.
async fn deliveries_when(app: &TestApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (s, v) = app.get_json(&format!("/v1/jobs/{id}/webhooks")).await;
        assert_eq!(s, 200, "{v}");
        if done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "deliveries never got there: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn quick_webhooks(c: &mut modelpress::config::ServeConfig) {
    c.webhook_allow = "127.0.0.1/32".into();
    c.webhook_retry_base_ms = 100;
    c.webhook_poll_ms = 50;
}

/// Python's hmac, as README's receiver snippet does it: prints "ok" when the header signs
/// the body with the secret.
const CHECK_SIGNATURE: &str = r#"
import hmac, hashlib, sys
secret, header, body = sys.argv[1], sys.argv[2], open(sys.argv[3], "rb").read()
parts = dict(p.split("=", 1) for p in header.split(","))
expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
print("ok" if hmac.compare_digest(expected, parts["v1"]) else "bad")
"#;

/// A job's terminal state is POSTed to its webhook, signed with the tenant's secret; a 500
/// and a redirect (never followed) are retried with backoff until the receiver takes it.
#[tokio::test]
async fn a_finished_job_is_posted_signed_and_retried_until_taken() {
    let rx = Receiver::start(vec![500, 302]).await;
    let app = spawn_app_with(quick_webhooks).await;
    let m = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let j = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8", "latency": false, "webhook": {"url": rx.url}}))
        .await;
    let id = j["id"].as_str().unwrap();
    app.drain().await;
    let v = deliveries_when(&app, id, |v| v["deliveries"][0]["state"] == "delivered").await;
    let d = &v["deliveries"][0];
    assert_eq!(d["event"], "job.succeeded", "{v}");
    assert_eq!(d["attempts"], 3, "500, then 302, then 200: {v}");
    assert_eq!(d["last_status"], 200, "{v}");
    assert_eq!(rx.count(), 3, "the redirect was not followed");
    let (status, secret) = app.get_json("/v1/webhook-secret").await;
    assert_eq!(status, 200, "{secret}");
    let secret = secret["secret"].as_str().unwrap();
    assert!(
        secret.starts_with("whsec_") && secret.len() == 70,
        "{secret}"
    );
    let got = rx.got.lock().unwrap().clone();
    let mut ids = Vec::new();
    for (headers, body) in &got {
        let path = app.dir.path().join("body.json");
        std::fs::write(&path, body).unwrap();
        let sig = headers["modelpress-signature"].to_str().unwrap();
        assert_eq!(
            python(CHECK_SIGNATURE, &[secret, sig, path.to_str().unwrap()]).trim(),
            "ok",
            "{sig}"
        );
        // A wrong secret does not verify.
        assert_eq!(
            python(CHECK_SIGNATURE, &["whsec_0", sig, path.to_str().unwrap()]).trim(),
            "bad"
        );
        assert_eq!(headers["modelpress-event"], "job.succeeded");
        ids.push(headers["modelpress-delivery"].to_str().unwrap().to_string());
        let doc: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(doc["event"], "job.succeeded");
        assert_eq!(doc["job"]["id"], id);
        assert_eq!(doc["job"]["state"], "succeeded");
        assert!(doc["job"]["artifacts"].as_array().unwrap().len() >= 4);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one delivery id across its retries: {ids:?}");
    // A cancelled job is delivered too, and a job without a webhook delivers nothing.
    let c = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8", "webhook": {"url": rx.url}}))
        .await;
    let cid = c["id"].as_str().unwrap();
    let r = app.cancel(cid).await;
    assert_eq!(r.status(), 200);
    let v = deliveries_when(&app, cid, |v| v["deliveries"][0]["state"] == "delivered").await;
    assert_eq!(v["deliveries"][0]["event"], "job.cancelled");
    let plain = app
        .submit_json(json!({"model_id": m["id"], "preset": "fp16"}))
        .await;
    app.drain().await;
    let (_, v) = app
        .get_json(&format!(
            "/v1/jobs/{}/webhooks",
            plain["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(v["deliveries"], json!([]), "{v}");
    app.stop().await;
    rx.task.abort();
}

/// The SSRF guard at submit: only http(s) to public addresses unless the allow-list names
/// the network; loopback, private and metadata addresses are refused with the reason.
#[tokio::test]
async fn webhook_urls_to_private_addresses_are_refused_at_submit() {
    let app = spawn_app().await;
    let m = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    for (url, says) in [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost:9/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://10.0.0.8/hook", "private"),
        ("http://[::ffff:192.168.0.1]/hook", "private"),
        ("http://[fd00:ec2::254]/", "unique local"),
        // IPv6 forms that carry or reach an IPv4 address (issue 30: 6to4 passed).
        ("http://[2002:7f00:1::]/", "6to4"),
        ("http://[2001:0:7f00:1::ffff:fffe]/", "Teredo"),
        ("http://[64:ff9b::a00:1]/", "NAT64"),
        ("gopher://example.com/", "not http or https"),
        ("file:///etc/passwd", "not http or https"),
    ] {
        let r = app
            .submit(json!({"model_id": m["id"], "preset": "int8", "webhook": {"url": url}}))
            .await;
        assert_eq!(r.status(), 422, "{url}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_code(&v), "invalid_spec", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("webhook.url: ") && msg.contains(says),
            "{url}: {msg}"
        );
    }
    let (_, jobs) = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["items"], json!([]), "nothing was queued");
    app.stop().await;
}

/// The outbox is durable: a delivery that could not be made before a shutdown is made by
/// the next process; one whose time runs out is recorded as given up, with the last error.
#[tokio::test]
async fn deliveries_survive_a_restart_and_give_up_after_the_bound() {
    // A port with nothing listening (yet).
    let hold = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hold.local_addr().unwrap();
    drop(hold);
    let url = format!("http://{addr}/hook");
    let app = spawn_app_with(quick_webhooks).await;
    let m = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let j = app
        .submit_json(json!({"model_id": m["id"], "preset": "fp16", "webhook": {"url": url}}))
        .await;
    let id = j["id"].as_str().unwrap().to_string();
    app.drain().await;
    let v = deliveries_when(&app, &id, |v| {
        v["deliveries"][0]["attempts"].as_i64() >= Some(2)
    })
    .await;
    assert_eq!(v["deliveries"][0]["state"], "pending", "{v}");
    let err = v["deliveries"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("POST failed"), "{err}");
    let dir = app.stop_keeping_data().await;
    // The receiver comes up; a new process on the same data delivers.
    let rx = Receiver::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), vec![]);
    let app = spawn_app_in(dir, quick_webhooks).await;
    let v = deliveries_when(&app, &id, |v| v["deliveries"][0]["state"] == "delivered").await;
    assert_eq!(rx.count(), 1, "{v}");
    let dir = app.stop_keeping_data().await;
    rx.task.abort();
    // With no time to retry, a failed delivery gives up at once and says why.
    let app = spawn_app_in(dir, |c| {
        quick_webhooks(c);
        c.webhook_give_up_secs = 0;
    })
    .await;
    let hold = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}/hook", hold.local_addr().unwrap());
    drop(hold);
    let j = app
        .submit_json(json!({"model_id": m["id"], "preset": "fp16", "webhook": {"url": gone}}))
        .await;
    app.drain().await;
    let id = j["id"].as_str().unwrap();
    let v = deliveries_when(&app, id, |v| v["deliveries"][0]["state"] == "gave_up").await;
    assert_eq!(v["deliveries"][0]["attempts"], 1, "{v}");
    assert!(v["deliveries"][0]["last_error"].is_string(), "{v}");
    app.stop().await;
}

fn verify(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .arg("verify")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every succeeded job carries manifest.json, signed by the key at /v1/signing-key (public),
/// naming the input's sha256 and every other artifact's; `modelpress verify` accepts the
/// download and refuses a changed file or another server's key.
// Multi-threaded: `verify --server` calls this server while the test waits on the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_has_a_signed_manifest_that_verify_checks() {
    let app = spawn_app().await;
    let m = app
        .upload(case_file("mnist8/mnist-8.onnx"), "mnist-8.onnx")
        .await;
    let j = app
        .submit_json(json!({"model_id": m["id"], "preset": "int8", "latency": false}))
        .await;
    app.drain().await;
    let job = app.job(j["id"].as_str().unwrap()).await;
    let out = app.dir.path().join("download");
    std::fs::create_dir_all(&out).unwrap();
    let names = artifact_names(&job);
    assert!(names.contains(&"manifest.json".to_string()), "{names:?}");
    for name in &names {
        std::fs::write(out.join(name), app.download(&job, name).await).unwrap();
    }
    let doc: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let payload: Value = serde_json::from_str(doc["payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload["job_id"], job["id"]);
    assert_eq!(payload["input"]["sha256"], m["sha256"]);
    assert_eq!(payload["pipeline"][0]["method"], "quantize", "{payload}");
    let listed: Vec<&str> = payload["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed.len(),
        names.len() - 1,
        "all but the manifest: {listed:?}"
    );
    // The key is public (no API key needed) and is the one that signed.
    let key: Value = reqwest::get(app.url("/v1/signing-key"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(key["public_key"], doc["signature"]["public_key"]);
    let (code, said) = verify(&out, &["--server", &app.base]);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains(&format!("{} artifacts match", listed.len())),
        "{said}"
    );
    // Without a trusted key, a manifest re-signed by anyone would pass: refused unless the
    // user says to trust the key the manifest names (issue 30: it passed with a warning).
    let (code, said) = verify(&out, &[]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("--trust-embedded-key"), "{said}");
    let (code, said) = verify(&out, &["--trust-embedded-key"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("trusted as asked"), "{said}");
    // Another server's key is refused.
    let other = spawn_app().await;
    let (code, said) = verify(&out, &["--server", &other.base]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("not by the trusted key"), "{said}");
    other.stop().await;
    // A changed artifact is caught; a missing one fails unless allowed.
    let onnx = out.join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&onnx, &bytes).unwrap();
    let (code, said) = verify(&out, &["--key", key["public_key"].as_str().unwrap()]);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("model.onnx") && said.contains("differs"),
        "{said}"
    );
    std::fs::remove_file(&onnx).unwrap();
    let (code, said) = verify(&out, &["--server", &app.base]);
    assert_eq!(code, 1, "{said}");
    let (code, said) = verify(&out, &["--server", &app.base, "--allow-missing"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("missing  model.onnx"), "{said}");
    app.stop().await;
}

/// The data directory never holds a tenant's webhook secret in plain text (issue 30 item 8):
/// the database keeps it sealed under a key derived from the signing key.
#[tokio::test]
async fn no_file_of_the_data_directory_holds_the_webhook_secret() {
    let app = spawn_app().await;
    let (status, first) = app.get_json("/v1/webhook-secret").await;
    assert_eq!(status, 200, "{first}");
    let secret = first["secret"].as_str().unwrap().to_string();
    let (_, again) = app.get_json("/v1/webhook-secret").await;
    assert_eq!(again["secret"], first["secret"], "made once, then kept");
    let digits = secret.trim_start_matches("whsec_").as_bytes().to_vec();
    assert_eq!(digits.len(), 64);
    let mut files = 0;
    let mut stack = vec![app.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            files += 1;
            assert!(
                !bytes.windows(digits.len()).any(|w| w == digits.as_slice()),
                "{} holds the secret",
                path.display()
            );
        }
    }
    assert!(files >= 2, "the database and the signing key were read");
    app.stop().await;
}
