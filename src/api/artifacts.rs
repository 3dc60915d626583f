//! `GET /v1/jobs/{id}/artifacts/{name}`: streamed with Content-Length, ETag (sha256), Range
//! (206/416) and Content-Disposition. The byte-range logic is tower-http's `ServeFile`.

use super::jobs::find;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;

pub async fn download(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller.tenant, &id).await?;
    let artifact = state
        .queue
        .artifacts(job.id)
        .await?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::ArtifactNotFound,
                format!("job {} has no artifact {name:?}", job.id),
            )
        })?;
    let etag = format!("\"{}\"", artifact.sha256);
    let matches_etag = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches_etag {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&etag).map_err(ApiError::internal)?,
        );
        return Ok(resp);
    }
    let path = state.blobs.local_path(&artifact.blob_key).await?;
    let resp = tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
        .map_err(ApiError::internal)?;
    let mut resp = resp.map(Body::new);
    if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
        let content_range = resp.headers().get(header::CONTENT_RANGE).cloned();
        let mut err = ApiError::new(
            ErrorCode::RangeNotSatisfiable,
            format!("the artifact has {} bytes", artifact.size_bytes),
        )
        .into_response();
        if let Some(cr) = content_range {
            err.headers_mut().insert(header::CONTENT_RANGE, cr);
        }
        return Ok(err);
    }
    let h = resp.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).map_err(ApiError::internal)?,
    );
    let disposition = format!(
        "attachment; filename=\"{}\"",
        artifact.name.replace('"', "")
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).map_err(ApiError::internal)?,
    );
    if artifact.name.ends_with(".json") {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    } else {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    if resp.status().is_success() {
        metrics::counter!("modelpress_download_bytes_total").increment(
            resp.headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        );
    }
    Ok(resp)
}
