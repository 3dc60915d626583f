//! The dashboard at `/`: served from the binary, and driven end to end in Debian's headless
//! Chromium by `tests/browser/dashboard.mjs` (playwright-core) against two real servers.

use crate::helpers::{cases, spawn_app, spawn_app_with};
use std::path::Path;
use std::process::Command;

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let app = spawn_app().await;
    let r = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"));
    let html = r.text().await.unwrap();
    // The presets come from the registry, the chart names from the chart module.
    for p in modelpress::compress::spec::PRESET_NAMES {
        assert!(html.contains(&format!("<option value=\"{p}\"")), "{p}");
    }
    assert!(html.contains("data-charts=\"layers,error,frontier,training\""));
    assert!(!html.contains("{{"), "every placeholder is filled");
    // No outside resource: the machines have no network.
    assert!(!html.contains("http://") && !html.contains("https://"));
    for (path, ty) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(ty));
    }
    app.stop().await;
}

#[tokio::test]
async fn charts_are_svg_drawn_from_the_artifacts_and_missing_ones_are_404() {
    let app = spawn_app().await;
    let model = app
        .upload(
            crate::helpers::case_file("mnist8/mnist-8.onnx"),
            "mnist-8.onnx",
        )
        .await;
    let job = app
        .submit_json(
            serde_json::json!({"model_id": model["id"], "preset": "int8", "latency": false}),
        )
        .await;
    app.drain().await;
    let id = job["id"].as_str().unwrap();
    for name in ["layers", "error", "layers.svg"] {
        let r = app
            .client
            .get(app.url(&format!("/v1/jobs/{id}/charts/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.headers()["content-type"], "image/svg+xml");
        let svg = r.text().await.unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        // mnist-8's two weights are drawn, by name.
        assert!(
            svg.contains(">Parameter87<") && svg.contains(">Parameter193<"),
            "{svg}"
        );
    }
    for (name, code) in [
        ("frontier", "chart_not_found"),
        ("training", "chart_not_found"),
        ("pie", "chart_not_found"),
    ] {
        let (s, v) = app.get_json(&format!("/v1/jobs/{id}/charts/{name}")).await;
        assert_eq!((s, crate::helpers::error_code(&v)), (404, code), "{name}");
    }
    app.stop().await;
}

/// Runs `tests/browser/dashboard.mjs`. It needs Node.js, `npm ci --prefix tests/browser`
/// and Debian's chromium (`.ci/run` installs both); without them the test fails and says so.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_end_to_end_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/dashboard.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is missing: run `npm ci --prefix tests/browser` (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: `apt-get install chromium` (.ci/run does)"
    );
    // Jobs run in the servers' own worker pools. A short lease makes the heartbeat, and so
    // the progress events, frequent; the failpoint slows each tensor so progress is visible
    // (BASE) or a job stays running long enough to be cancelled from the page (SLOW_BASE).
    let app = spawn_app_with(|c| {
        c.workers = Some(1);
        c.lease_ms = 600;
        c.failpoint = Some("tensor-delay-ms=400".into());
    })
    .await;
    let slow = spawn_app_with(|c| {
        c.workers = Some(1);
        c.lease_ms = 600;
        c.failpoint = Some("tensor-delay-ms=2000".into());
    })
    .await;
    // A server with an API key: the page asks for it and sends it.
    let keyed = spawn_app_with(|c| {
        c.workers = Some(1);
    })
    .await;
    let (key, _) = modelpress::auth::create_key(
        keyed.state.keys.as_ref(),
        "acme",
        modelpress::auth::Scope::Write,
    )
    .await
    .unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let (base, slow_base, keyed_base) = (app.base.clone(), slow.base.clone(), keyed.base.clone());
    let out2 = out.clone();
    let result = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("BASE", base)
            .env("SLOW_BASE", slow_base)
            .env("KEYED_BASE", keyed_base)
            .env("KEY", key)
            .env("CASES", cases())
            .env("OUT", &out2)
            .env("CHROMIUM", chromium)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs (Node.js is needed for the browser test)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    println!("{text}");
    assert!(result.status.success(), "the browser test failed:\n{text}");
    for shot in [
        "jobs-1280x800.png",
        "detail-1280x800.png",
        "jobs-390x844.png",
        "detail-390x844.png",
    ] {
        let len = std::fs::metadata(out.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "screenshot {shot} was saved");
    }
    app.stop().await;
    slow.stop().await;
    keyed.stop().await;
}
