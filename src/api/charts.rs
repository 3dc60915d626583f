//! `GET /v1/jobs/{id}/charts/{name}`: a job's charts as SVG, drawn from its artifacts
//! (see `crate::charts`).

use super::jobs::find;
use crate::auth::Caller;
use crate::charts::{chart_source, CHART_NAMES};
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use axum::extract::{Extension, Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

/// An artifact larger than this is not drawn (report.json of a model with very many
/// tensors); the chart answers 404 saying so.
pub const MAX_SOURCE_BYTES: u64 = 64 << 20;

pub async fn chart(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller.tenant, &id).await?;
    let stem = name.strip_suffix(".svg").unwrap_or(&name);
    let (source, draw) = chart_source(stem).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ChartNotFound,
            format!(
                "no chart named {:?}; the charts are {}",
                crate::util::clip(&name),
                CHART_NAMES.join(", ")
            ),
        )
    })?;
    let artifact = state
        .queue
        .artifacts(job.id)
        .await?
        .into_iter()
        .find(|a| a.name == source)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::ChartNotFound,
                format!(
                    "job {} has no {source}, which the {stem} chart is drawn from",
                    job.id
                ),
            )
        })?;
    if artifact.size_bytes > MAX_SOURCE_BYTES {
        return Err(ApiError::new(
            ErrorCode::ChartNotFound,
            format!(
                "{source} has {} bytes, more than the {MAX_SOURCE_BYTES} a chart is drawn from",
                artifact.size_bytes
            ),
        ));
    }
    let bytes = state
        .blobs
        .read_small(&artifact.blob_key, MAX_SOURCE_BYTES)
        .await?;
    let svg = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
        Ok(draw(&doc))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok((
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-cache"),
            // The SVG is an image: no script, no outside resource, even opened on its own.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        svg,
    )
        .into_response())
}
