//! Liveness, readiness, metrics and the OpenAPI document.

use crate::error::{ApiError, ErrorCode};
use crate::queue::JobState;
use crate::state::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let db = state.models.ping().await;
    let blobs = state.blobs.ready().await;
    let draining = state.stop_claiming.is_cancelled();
    let free = state.blobs.free_bytes().await;
    let disk_ok = free.is_none_or(|f| f >= state.config.min_free_bytes);
    // A process that runs workers needs room in its scratch directory too.
    let scratch = if state.config.worker_count() > 0 {
        crate::worker::scratch::refuse(&state.config, 0).await
    } else {
        None
    };
    let refused = state.disk_full_recently();
    if db && blobs && disk_ok && scratch.is_none() && !draining && refused.is_none() {
        Ok(Json(json!({"status": "ready", "free_bytes": free})))
    } else {
        Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "not ready: database {}, blob store {}, disk {}{}, scratch {}, draining {draining}",
                if db { "ok" } else { "down" },
                if blobs { "ok" } else { "down" },
                match free {
                    Some(f) if !disk_ok => format!(
                        "nearly full ({f} bytes free, below MODELPRESS_MIN_FREE_BYTES {})",
                        state.config.min_free_bytes
                    ),
                    _ => "ok".into(),
                },
                refused.map_or(String::new(), |ms| format!(
                    " (a write failed for lack of space {:.1} s ago)",
                    ms as f64 / 1000.0
                )),
                scratch.as_deref().unwrap_or("ok"),
            ),
        ))
    }
}

pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = state.queue.count_by_state().await?;
    for (st, n) in &counts {
        metrics::gauge!("modelpress_jobs", "state" => st.as_str()).set(*n as f64);
        if *st == JobState::Queued {
            metrics::gauge!("modelpress_queue_depth").set(*n as f64);
        }
    }
    metrics::gauge!("modelpress_workers").set(state.config.worker_count() as f64);
    metrics::gauge!("modelpress_event_streams").set(state.events.listeners() as f64);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    ))
}

pub const OPENAPI: &str = include_str!("../../openapi.yaml");

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}
