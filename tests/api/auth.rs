//! API keys and tenants: the authorization matrix over every route, secure-by-default
//! start-up, and the `keys` CLI against a running server.

use crate::helpers::{case_file, spawn_app, spawn_app_in};
use modelpress::auth::{create_key, Scope};
use modelpress::config::ServeConfig;
use modelpress::startup::Application;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Nobody,
    OtherTenant,
    Read,
    Write,
    Admin,
}
const EVERYONE: [Who; 5] = [
    Who::Nobody,
    Who::OtherTenant,
    Who::Read,
    Who::Write,
    Who::Admin,
];

enum Body {
    None,
    Json(Value),
    File(&'static str),
}

struct Client {
    base: String,
    http: reqwest::Client,
    keys: Vec<(Who, String)>,
}

impl Client {
    fn key(&self, who: Who) -> Option<&str> {
        self.keys
            .iter()
            .find(|(w, _)| *w == who)
            .map(|(_, k)| k.as_str())
    }

    /// The status and the body (not read for an event stream that never ends).
    async fn send(&self, who: Who, method: &str, path: &str, body: &Body) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.http.request(m, format!("{}{path}", self.base));
        if let Some(k) = self.key(who) {
            r = r.bearer_auth(k);
        }
        r = match body {
            Body::None => r,
            Body::Json(v) => r.json(v),
            Body::File(rel) => r.body(case_file(rel)),
        };
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        if path == "/v1/events" && status == 200 {
            return (status, Value::Null);
        }
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// Every route × {no key, another tenant's key, read, write, admin}: the status each gets.
/// Another tenant never sees acme's resources (404, empty lists); a read key cannot change
/// anything (403); without a key only the public routes answer.
#[tokio::test]
async fn the_authorization_matrix_over_every_route() {
    let app = spawn_app().await;
    let keys = app.state.keys.as_ref();
    let mut pairs = Vec::new();
    for (who, tenant, scope) in [
        (Who::OtherTenant, "other", Scope::Admin),
        (Who::Read, "acme", Scope::Read),
        (Who::Write, "acme", Scope::Write),
        (Who::Admin, "acme", Scope::Admin),
    ] {
        pairs.push((who, create_key(keys, tenant, scope).await.unwrap().0));
    }
    let c = Client {
        base: app.base.clone(),
        http: reqwest::Client::new(),
        keys: pairs,
    };
    // acme's model, dataset and finished job.
    let (s, model) = c
        .send(
            Who::Write,
            "POST",
            "/v1/models?name=m.onnx",
            &Body::File("mnist8/mnist-8.onnx"),
        )
        .await;
    assert_eq!(s, 201, "{model}");
    let (s, data) = c
        .send(
            Who::Write,
            "POST",
            "/v1/datasets?name=d.npz",
            &Body::File("mnist8/calib.npz"),
        )
        .await;
    assert_eq!(s, 201, "{data}");
    let spec = json!({"model_id": model["id"], "preset": "int8", "latency": false});
    let (s, job) = c
        .send(Who::Write, "POST", "/v1/jobs", &Body::Json(spec.clone()))
        .await;
    assert_eq!(s, 202, "{job}");
    app.drain().await;
    let (m, d, j) = (
        model["id"].as_str().unwrap().to_string(),
        data["id"].as_str().unwrap().to_string(),
        job["id"].as_str().unwrap().to_string(),
    );

    // (method, template, path, body, [Nobody, OtherTenant, Read, Write, Admin])
    let ok_read = [401, 404, 200, 200, 200];
    let list = [401, 200, 200, 200, 200];
    let public = [200, 200, 200, 200, 200];
    let cases: Vec<(&str, &str, String, Body, [u16; 5])> = vec![
        ("GET", "/", "/".into(), Body::None, public),
        (
            "GET",
            "/assets/app.js",
            "/assets/app.js".into(),
            Body::None,
            public,
        ),
        (
            "GET",
            "/assets/style.css",
            "/assets/style.css".into(),
            Body::None,
            public,
        ),
        ("GET", "/healthz", "/healthz".into(), Body::None, public),
        ("GET", "/readyz", "/readyz".into(), Body::None, public),
        (
            "GET",
            "/openapi.yaml",
            "/openapi.yaml".into(),
            Body::None,
            public,
        ),
        // Loopback: /metrics is open (an admin key is needed elsewhere).
        ("GET", "/metrics", "/metrics".into(), Body::None, public),
        ("GET", "/v1/models", "/v1/models".into(), Body::None, list),
        (
            "GET",
            "/v1/models/{id}",
            format!("/v1/models/{m}"),
            Body::None,
            ok_read,
        ),
        (
            "GET",
            "/v1/models/{id}/tensors",
            format!("/v1/models/{m}/tensors"),
            Body::None,
            ok_read,
        ),
        (
            "GET",
            "/v1/datasets",
            "/v1/datasets".into(),
            Body::None,
            list,
        ),
        (
            "GET",
            "/v1/datasets/{id}",
            format!("/v1/datasets/{d}"),
            Body::None,
            ok_read,
        ),
        ("GET", "/v1/jobs", "/v1/jobs".into(), Body::None, list),
        (
            "GET",
            "/v1/jobs/{id}",
            format!("/v1/jobs/{j}"),
            Body::None,
            ok_read,
        ),
        (
            "GET",
            "/v1/jobs/{id}/artifacts/{name}",
            format!("/v1/jobs/{j}/artifacts/report.json"),
            Body::None,
            ok_read,
        ),
        (
            "GET",
            "/v1/jobs/{id}/charts/{name}",
            format!("/v1/jobs/{j}/charts/layers"),
            Body::None,
            ok_read,
        ),
        (
            "GET",
            "/v1/jobs/{id}/events",
            format!("/v1/jobs/{j}/events"),
            Body::None,
            ok_read,
        ),
        ("GET", "/v1/events", "/v1/events".into(), Body::None, list),
        (
            "GET",
            "/v1/jobs/{id}/webhooks",
            format!("/v1/jobs/{j}/webhooks"),
            Body::None,
            ok_read,
        ),
        // Each tenant's admin reads its own webhook secret; nobody else can.
        (
            "GET",
            "/v1/webhook-secret",
            "/v1/webhook-secret".into(),
            Body::None,
            [401, 200, 403, 403, 200],
        ),
        (
            "GET",
            "/v1/signing-key",
            "/v1/signing-key".into(),
            Body::None,
            public,
        ),
        (
            "POST",
            "/v1/jobs/{id}/cancel",
            format!("/v1/jobs/{j}/cancel"),
            Body::None,
            [401, 404, 403, 409, 409],
        ),
        (
            "POST",
            "/v1/jobs",
            "/v1/jobs".into(),
            Body::Json(spec.clone()),
            [401, 404, 403, 202, 202],
        ),
        (
            "POST",
            "/v1/models",
            "/v1/models".into(),
            Body::File("mnist8/mnist-8.onnx"),
            [401, 201, 403, 201, 201],
        ),
        (
            "POST",
            "/v1/datasets",
            "/v1/datasets".into(),
            Body::File("mnist8/calib.npz"),
            [401, 201, 403, 201, 201],
        ),
    ];
    let mut covered = BTreeSet::new();
    for (method, template, path, body, expected) in &cases {
        covered.insert((method.to_string(), template.to_string()));
        for (who, want) in EVERYONE.iter().zip(expected) {
            let (s, v) = c.send(*who, method, path, body).await;
            assert_eq!(s, *want, "{method} {path} as {who:?}: {v}");
            if s == 401 {
                assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            }
            if s == 403 {
                assert_eq!(v["error"]["code"], "forbidden", "{v}");
            }
        }
    }
    // Lists show the caller's own only: the other tenant sees its own upload, never acme's.
    for path in ["/v1/models", "/v1/datasets", "/v1/jobs"] {
        let (_, theirs) = c.send(Who::OtherTenant, "GET", path, &Body::None).await;
        let ours: BTreeSet<String> = c.send(Who::Read, "GET", path, &Body::None).await.1["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        for item in theirs["items"].as_array().unwrap() {
            assert!(
                !ours.contains(item["id"].as_str().unwrap()),
                "{path}: {item}"
            );
        }
    }
    // The two tenants' webhook secrets differ.
    let ours = c
        .send(Who::Admin, "GET", "/v1/webhook-secret", &Body::None)
        .await
        .1;
    let theirs = c
        .send(Who::OtherTenant, "GET", "/v1/webhook-secret", &Body::None)
        .await
        .1;
    assert_eq!(ours["tenant"], "acme");
    assert_ne!(ours["secret"], theirs["secret"]);
    // The jobs the write and admin keys submitted run, so the model is free to delete.
    app.drain().await;
    // Deletes last: nobody, the other tenant and a read key cannot; a write key can.
    for (template, path) in [
        ("/v1/datasets/{id}", format!("/v1/datasets/{d}")),
        // Its finished job goes with it (without cascade: 409 model_has_jobs, issue 30).
        ("/v1/models/{id}", format!("/v1/models/{m}?cascade=true")),
    ] {
        covered.insert(("DELETE".to_string(), template.to_string()));
        for (who, want) in [
            (Who::Nobody, 401),
            (Who::OtherTenant, 404),
            (Who::Read, 403),
            (Who::Write, 204),
            (Who::Admin, 404),
        ] {
            let (s, v) = c.send(who, "DELETE", &path, &Body::None).await;
            assert_eq!(s, want, "DELETE {path} as {who:?}: {v}");
        }
    }
    let routes: BTreeSet<(String, String)> = modelpress::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(covered, routes, "the matrix covers every route");
    app.stop().await;
}

/// Idempotency keys and event streams are per tenant.
#[tokio::test]
async fn idempotency_keys_and_event_streams_are_per_tenant() {
    let app = spawn_app().await;
    let keys = app.state.keys.as_ref();
    let a = create_key(keys, "acme", Scope::Write).await.unwrap().0;
    let b = create_key(keys, "other", Scope::Write).await.unwrap().0;
    let http = reqwest::Client::new();
    let events = http
        .get(app.url("/v1/events"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(crate::events::read_events(
        events,
        Duration::from_secs(3),
        |_| false,
    ));
    let mut jobs = Vec::new();
    for key in [&a, &b] {
        let model: Value = http
            .post(app.url("/v1/models"))
            .bearer_auth(key)
            .body(case_file("mnist8/mnist-8.onnx"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let r = http
            .post(app.url("/v1/jobs"))
            .bearer_auth(key)
            .header("idempotency-key", "same-key")
            .json(&json!({"model_id": model["id"], "preset": "int8", "latency": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            202,
            "the same key in another tenant is a new job"
        );
        let v: Value = r.json().await.unwrap();
        jobs.push(v["id"].as_str().unwrap().to_string());
    }
    assert_ne!(jobs[0], jobs[1]);
    app.drain().await;
    let seen = reader.await.unwrap();
    assert!(
        seen.iter().any(|e| e.data["job_id"] == jobs[1]),
        "the other tenant sees its own job: {seen:?}"
    );
    assert!(
        !seen.iter().any(|e| e.data["job_id"] == jobs[0]),
        "and never acme's: {seen:?}"
    );
    app.stop().await;
}

/// Off loopback with no key the server refuses to start, unless --allow-anonymous or a key
/// exists; a keyed server answers 401 without a key, and /metrics needs an admin key there.
#[tokio::test]
async fn off_loopback_the_server_needs_a_key_or_allow_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let config = |allow: bool| {
        let mut c = ServeConfig::for_data_dir(dir.path().join("data"));
        c.addr = "0.0.0.0:0".into();
        c.workers = Some(0);
        c.allow_anonymous = allow;
        c
    };
    let err = Application::build(config(false))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("refusing to serve"), "{err}");
    let open = Application::build(config(true)).await.expect("allowed");
    drop(open);
    let store = modelpress::queue::sqlite::SqliteStore::open(&config(false).database_url())
        .await
        .unwrap();
    let (admin, _) = create_key(&store, "ops", Scope::Admin).await.unwrap();
    let (write, _) = create_key(&store, "ops", Scope::Write).await.unwrap();
    store.close().await;
    let app = Application::build(config(false))
        .await
        .expect("a key exists");
    let port = app.local_addr().port();
    let task = tokio::spawn(app.run(std::future::pending::<()>()));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let get = |path: &str, key: Option<&str>| {
        let mut r = http.get(format!("{base}{path}"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    assert_eq!(get("/v1/models", None).await.unwrap().status(), 401);
    assert_eq!(get("/metrics", None).await.unwrap().status(), 401);
    assert_eq!(get("/metrics", Some(&write)).await.unwrap().status(), 403);
    assert_eq!(get("/metrics", Some(&admin)).await.unwrap().status(), 200);
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    let r = get("/v1/models", Some("mp_0000")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    task.abort();
}

fn cli(data: &std::path::Path, db: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelpress"));
    cmd.arg("keys").args(args).arg("--data-dir").arg(data);
    if let Some(url) = db {
        cmd.arg("--database-url").arg(url);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `modelpress keys create` prints a key once; the server takes it; `keys revoke` ends it;
/// `keys list` never shows a key, only its first characters, and records its last use.
#[tokio::test]
async fn the_keys_cli_creates_lists_and_revokes() {
    keys_cli_round_trip(None).await;
}

/// The same against PostgreSQL (`--database-url`), where a fleet keeps its keys.
#[tokio::test]
async fn the_keys_cli_creates_lists_and_revokes_on_postgres() {
    let db = crate::helpers::PgDatabase::create().await;
    keys_cli_round_trip(Some(&db.url)).await;
    db.drop_now().await;
}

async fn keys_cli_round_trip(db: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cli = |args: &[&str]| cli(&data, db, args);
    let (code, key, err) = cli(&["create", "--tenant", "acme", "--scope", "write"]);
    assert_eq!(code, 0, "{err}");
    assert!(key.starts_with("mp_") && key.len() == 67, "{key}");
    let app = spawn_app_in(dir, |c| c.database_url = db.map(str::to_string)).await;
    let get = |k: &str| {
        app.client
            .get(app.url("/v1/models"))
            .bearer_auth(k.to_string())
            .send()
    };
    assert_eq!(get(&key).await.unwrap().status(), 200);
    assert_eq!(
        app.client
            .get(app.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let (code, listed, _) = cli(&["list", "--json"]);
    assert_eq!(code, 0);
    assert!(!listed.contains(&key), "the key itself is never listed");
    let list: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(list[0]["tenant"], "acme");
    assert_eq!(list[0]["prefix"], key[..11]);
    assert!(list[0]["last_used_at"].is_string(), "{list}");
    let id = list[0]["id"].as_str().unwrap();
    let (code, _, err) = cli(&["revoke", id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(get(&key).await.unwrap().status(), 401);
    // With every key revoked the loopback server is open again, as before the first key.
    assert_eq!(
        app.client
            .get(app.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (code, _, err) = cli(&["create", "--tenant", "no spaces"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&["revoke", "not-an-id"]);
    assert_eq!(code, 2, "{err}");
    app.stop().await;
}

/// Quotas per tenant: stored bytes (507 with the limit and the usage), jobs queued or running
/// and jobs per hour (429 with Retry-After). Another tenant is not affected.
#[tokio::test]
async fn quotas_refuse_with_the_limit_and_the_usage() {
    let app = crate::helpers::spawn_app_with(|c| {
        c.quota_stored_bytes = 30_000;
        c.quota_concurrent_jobs = 2;
        c.quota_jobs_per_hour = 3;
    })
    .await;
    let keys = app.state.keys.as_ref();
    let acme = create_key(keys, "acme", Scope::Write).await.unwrap().0;
    let other = create_key(keys, "other", Scope::Write).await.unwrap().0;
    let http = reqwest::Client::new();
    let upload = |key: String, path: &'static str, rel: &'static str| {
        let r = http
            .post(app.url(path))
            .bearer_auth(key)
            .body(case_file(rel));
        async move {
            let r = r.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let (s, model) = upload(acme.clone(), "/v1/models", "mnist8/mnist-8.onnx").await;
    assert_eq!(s, 201, "{model}");
    // 26,454 stored; another 26,454 would pass 30,000.
    let (s, v) = upload(acme.clone(), "/v1/models", "mnist8/mnist-8.onnx").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (507, Some("quota_exceeded")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("26454") && msg.contains("30000"), "{msg}");
    let (s, v) = upload(acme.clone(), "/v1/datasets", "mnist8/calib.npz").await;
    assert_eq!(s, 507, "{v}");
    // The other tenant has its own allowance.
    let (s, v) = upload(other.clone(), "/v1/models", "mnist8/mnist-8.onnx").await;
    assert_eq!(s, 201, "{v}");

    let submit = || {
        http.post(app.url("/v1/jobs"))
            .bearer_auth(acme.clone())
            .json(&json!({"model_id": model["id"], "preset": "int8", "latency": false}))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(submit().await.unwrap().status(), 202);
    }
    let r = submit().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 jobs queued or running"));
    app.drain().await;
    // Two finished: a third may run, a fourth is the hour's fourth.
    assert_eq!(submit().await.unwrap().status(), 202);
    let r = submit().await.unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3000..=3600).contains(&wait), "{wait}");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 jobs in the last hour"),
        "{v}"
    );
    app.stop().await;
}
