//! openapi.yaml and the router cannot drift apart (convention 12).

use crate::helpers::*;
use modelpress::api::ROUTES;
use std::collections::BTreeSet;

/// (METHOD, path) pairs under `paths:` in openapi.yaml.
fn documented() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut current = None;
    for line in text.lines() {
        if line.starts_with("paths:") {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  /") {
            current = Some(format!("/{}", p.trim_end_matches(':')));
        } else if let (Some(p), Some(m)) = (&current, line.strip_prefix("    ")) {
            let m = m.trim_end_matches(':');
            if ["get", "post", "put", "patch", "delete"].contains(&m) {
                out.insert((m.to_uppercase(), p.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn openapi_matches_the_router() {
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let doc = documented();
    assert_eq!(served, doc, "ROUTES and openapi.yaml differ");
    let app = spawn_app().await;
    let id = "0190c0de-0000-7000-8000-000000000000";
    for (method, path) in ROUTES {
        let url = app.url(&path.replace("{id}", id).replace("{name}", "report.json"));
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = app.client.request(m, &url).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        let code = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default();
        assert!(
            code != "not_found" && code != "method_not_allowed",
            "{method} {path} is documented but not served: {status} {body}"
        );
        // Every other method on a documented path is refused.
        for other in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if doc.contains(&(other.to_string(), path.to_string())) {
                continue;
            }
            let r = app
                .client
                .request(reqwest::Method::from_bytes(other.as_bytes()).unwrap(), &url)
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status().as_u16(),
                405,
                "{other} {path} is served but not documented"
            );
        }
    }
    let served_doc = app
        .client
        .get(app.url("/openapi.yaml"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served_doc, modelpress::api::health::OPENAPI);
    app.stop().await;
}

/// The document parses as YAML (PyYAML's safe loader), and its preset enum is the server's.
#[test]
fn openapi_parses_and_lists_every_preset() {
    let out = python(
        r#"
import json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
print(json.dumps(doc["components"]["schemas"]["JobSpec"]["properties"]["preset"]["enum"]))
"#,
        &[concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")],
    );
    let presets: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(presets, modelpress::compress::PRESET_NAMES);
}
