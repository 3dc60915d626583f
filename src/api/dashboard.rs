//! The web dashboard at `/`: one page, its script and its stylesheet, embedded in the
//! binary (no build step, no CDN). The page talks to the same public API as any client;
//! the preset list is written into it from the registry, so it never drifts.

use crate::charts::CHART_NAMES;
use crate::compress::spec::PRESET_NAMES;
use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

/// The page may load only its own script, style, images and API; nothing may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page, with the presets and chart names of this build.
pub fn index_html() -> String {
    let presets: String = PRESET_NAMES
        .iter()
        .map(|p| {
            let sel = if *p == "int8" { " selected" } else { "" };
            format!("<option value=\"{p}\"{sel}>{p}</option>")
        })
        .collect();
    INDEX
        .replace("{{PRESETS}}", &presets)
        .replace("{{CHARTS}}", &CHART_NAMES.join(","))
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"))
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", index_html())
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS.to_string())
}

pub async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS.to_string())
}
