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
    if db && blobs && !draining {
        Ok(Json(json!({"status": "ready"})))
    } else {
        Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "not ready: database {}, blob store {}, draining {draining}",
                if db { "ok" } else { "down" },
                if blobs { "ok" } else { "down" }
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
