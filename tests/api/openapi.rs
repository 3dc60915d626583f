//! openapi.yaml and the router cannot drift apart (convention 12).

use crate::helpers::*;
use modelpress::api::ROUTES;
use modelpress::compress::method::METHODS;
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
        // An event stream does not end: its status and type are enough.
        let streams = r
            .headers()
            .get("content-type")
            .is_some_and(|t| t == "text/event-stream");
        let body = if streams {
            String::new()
        } else {
            r.text().await.unwrap_or_default()
        };
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
    let served_doc = app.get_text("/openapi.yaml").await;
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
s = doc["components"]["schemas"]
print(json.dumps([s["JobSpec"]["properties"]["preset"]["enum"], s["Step"]["properties"]["method"]["enum"]]))
"#,
        &[concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")],
    );
    let (presets, methods): (Vec<String>, Vec<String>) = serde_json::from_str(out.trim()).unwrap();
    let mut known = modelpress::compress::PRESET_NAMES.to_vec();
    known.push(modelpress::compress::AUTO_PRESET);
    assert_eq!(presets, known);
    let registered: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    assert_eq!(
        methods, registered,
        "openapi.yaml's Step.method and METHODS differ"
    );
}

/// README's step table names every registered method with the file that holds it, and its
/// preset table every preset.
#[test]
fn readme_tables_list_every_method_with_its_file_and_every_preset() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for m in METHODS {
        let rows: Vec<&str> = readme
            .lines()
            .filter(|l| {
                l.starts_with("| `")
                    && l.split(" | ")
                        .next()
                        .unwrap()
                        .contains(&format!("`{}`", m.name))
            })
            .collect();
        assert!(!rows.is_empty(), "README has no row for method {}", m.name);
        let row = rows.join("\n");
        for file in m.file.split(", ") {
            assert!(
                row.contains(&format!("({file})")),
                "README's row for {} does not link {file}: {row}",
                m.name
            );
            assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(file)
                .exists());
        }
    }
    let auto = [modelpress::compress::AUTO_PRESET];
    for p in modelpress::compress::PRESET_NAMES.iter().chain(&auto) {
        assert!(
            readme.lines().any(|l| l.starts_with("| `")
                && l.split(" | ").next().unwrap().contains(&format!("`{p}`"))),
            "README's preset table has no row for {p}"
        );
    }
}
