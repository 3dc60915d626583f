//! HTTP routes, one module per resource.

pub mod artifacts;
pub mod auth;
pub mod charts;
pub mod dashboard;
pub mod datasets;
pub mod events;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod models;
pub mod quota;
pub mod serve;
pub mod webhooks;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::time::Instant;

/// Every served (method, path). The OpenAPI drift test checks this list against
/// `openapi.yaml` and against the router itself.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/assets/app.js"),
    ("GET", "/assets/style.css"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.yaml"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("DELETE", "/v1/models/{id}"),
    ("GET", "/v1/models/{id}/tensors"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets"),
    ("GET", "/v1/datasets/{id}"),
    ("DELETE", "/v1/datasets/{id}"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/charts/{name}"),
    ("GET", "/v1/events"),
    ("GET", "/v1/jobs/{id}/artifacts/{name}"),
    ("GET", "/v1/jobs/{id}/webhooks"),
    ("GET", "/v1/webhook-secret"),
    ("GET", "/v1/signing-key"),
];

/// Liveness, readiness and metrics: served by every process, API or worker.
fn health_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
}

/// Request metrics by route, authorization, and JSON answers for unknown routes and methods:
/// every listener has them.
fn guarded(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    routes
        .route_layer(middleware::from_fn(track_metrics))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

pub fn router(state: AppState) -> Router {
    let routes = health_routes()
        .route("/", get(dashboard::index))
        .route("/assets/app.js", get(dashboard::app_js))
        .route("/assets/style.css", get(dashboard::style_css))
        .route("/openapi.yaml", get(health::openapi))
        .route("/v1/models", post(models::upload).get(models::list))
        .route(
            "/v1/models/{id}",
            get(models::get_one).delete(models::delete),
        )
        .route("/v1/models/{id}/tensors", get(models::tensors))
        .route("/v1/datasets", post(datasets::upload).get(datasets::list))
        .route(
            "/v1/datasets/{id}",
            get(datasets::get_one).delete(datasets::delete),
        )
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get_one))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/v1/jobs/{id}/charts/{name}", get(charts::chart))
        .route("/v1/events", get(events::all_events))
        .route("/v1/jobs/{id}/artifacts/{name}", get(artifacts::download))
        .route("/v1/jobs/{id}/webhooks", get(webhooks::deliveries))
        .route("/v1/webhook-secret", get(webhooks::secret))
        .route("/v1/signing-key", get(webhooks::signing_key));
    guarded(routes, &state)
        // Uploads are streamed to disk with their own limit; nothing is buffered whole.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            watch_space,
        ))
        .layer(axum::middleware::map_response(nosniff))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Every error is `{"error": {"code", "message"}}`, also the ones axum's extractors answer
/// in plain text before a handler runs (a path that is not UTF-8, a malformed query).
async fn json_errors(resp: axum::response::Response) -> axum::response::Response {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    let status = resp.status();
    let plain = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return resp;
    }
    let code = match status.as_u16() {
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        413 => ErrorCode::PayloadTooLarge,
        415 => ErrorCode::UnsupportedMediaType,
        400..=499 => ErrorCode::InvalidRequest,
        _ => ErrorCode::Internal,
    };
    let message = match axum::body::to_bytes(resp.into_body(), 4096).await {
        Ok(b) if code != ErrorCode::Internal => String::from_utf8_lossy(&b).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut out = ApiError::new(code, message).into_response();
    *out.status_mut() = status;
    out
}

/// A write refused for lack of space makes `/readyz` say so for a while; a write that
/// succeeds (any 2xx to a POST, PUT or DELETE) shows there is room again.
async fn watch_space(
    axum::extract::State(state): axum::extract::State<AppState>,
    method: axum::http::Method,
    resp: axum::response::Response,
) -> axum::response::Response {
    if resp.extensions().get::<crate::error::DiskFull>().is_some() {
        state.note_disk_full();
    } else if resp.status().is_success() && method != axum::http::Method::GET {
        state.note_write_done();
    }
    resp
}

/// Every answer says what it is: browsers must not guess a type from the content (an
/// artifact or a chart a user uploaded the inputs of could otherwise be run as a page).
async fn nosniff(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    resp
}

/// A worker process's listener: liveness, readiness and metrics, nothing else.
pub fn health_router(state: AppState) -> Router {
    guarded(health_routes(), &state).with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route; see /openapi.yaml")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route; see /openapi.yaml",
    )
}

/// Counts requests by matched route (never the raw URI) and status.
async fn track_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("modelpress_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("modelpress_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// Parses an id from the path; a malformed id is simply not found.
pub fn parse_id(raw: &str, code: ErrorCode, what: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| {
        ApiError::new(
            code,
            format!("no {what} with id {}", crate::util::clip(raw)),
        )
    })
}

/// A list route's page: the items as viewed, and the cursor of the next page when this one
/// is full (the last item's id).
pub fn page<T>(
    items: &[T],
    limit: u32,
    id: impl Fn(&T) -> uuid::Uuid,
    view: impl Fn(&T) -> serde_json::Value,
) -> serde_json::Value {
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(&id))
        .flatten();
    serde_json::json!({"items": items.iter().map(view).collect::<Vec<_>>(), "next_cursor": next})
}

/// `limit` and `cursor` query parameters shared by the list routes.
pub fn page_params(
    q: &std::collections::HashMap<String, String>,
) -> Result<(u32, Option<uuid::Uuid>), ApiError> {
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    "limit must be an integer from 1 to 500",
                )
            })?,
    };
    let cursor = match q.get("cursor") {
        None => None,
        Some(c) => Some(uuid::Uuid::parse_str(c).map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "cursor is not a value this API returned",
            )
        })?),
    };
    Ok((limit, cursor))
}
