//! `GET /v1/jobs/{id}/artifacts/{name}`: streamed from the blob store with Content-Length,
//! ETag (sha256), one byte range (206/416, RFC 9110 §14) and Content-Disposition.

use super::jobs::find;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::ops::Range;

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// No range, or one this server does not serve partially (several ranges, another
    /// unit, a malformed header): the whole blob, 200.
    Whole,
    /// One satisfiable range, 206.
    Part(Range<u64>),
    /// A range that starts past the end, 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n` (one range) against `size`.
pub fn wanted(header: Option<&str>, size: u64) -> Wanted {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Wanted::Whole;
    };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Wanted::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // The last n bytes.
        return match num(last) {
            None => Wanted::Whole,
            Some(0) => Wanted::Unsatisfiable,
            Some(_) if size == 0 => Wanted::Unsatisfiable,
            Some(n) => Wanted::Part(size - n.min(size)..size),
        };
    }
    let Some(start) = num(first) else {
        return Wanted::Whole;
    };
    let end = if last.is_empty() {
        size
    } else {
        match num(last) {
            Some(b) if b >= start => b.saturating_add(1).min(size),
            _ => return Wanted::Whole,
        }
    };
    if start >= size {
        return Wanted::Unsatisfiable;
    }
    Wanted::Part(start..end)
}

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
    let size = state.blobs.size(&artifact.blob_key).await?;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (status, part) = match wanted(range, size) {
        Wanted::Whole => (StatusCode::OK, 0..size),
        Wanted::Part(r) => (StatusCode::PARTIAL_CONTENT, r),
        Wanted::Unsatisfiable => {
            let mut err = ApiError::new(
                ErrorCode::RangeNotSatisfiable,
                format!("the artifact has {size} bytes"),
            )
            .into_response();
            err.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(ApiError::internal)?,
            );
            return Ok(err);
        }
    };
    let stream = state
        .blobs
        .read_range(&artifact.blob_key, part.clone())
        .await?;
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(part.end - part.start),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {}-{}/{size}", part.start, part.end - 1))
                .map_err(ApiError::internal)?,
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_as_rfc_9110_reads_them() {
        let w = |h: &str| wanted(Some(h), 100);
        assert_eq!(wanted(None, 100), Wanted::Whole);
        assert_eq!(w("bytes=10-19"), Wanted::Part(10..20));
        assert_eq!(w("bytes=10-"), Wanted::Part(10..100));
        assert_eq!(w("bytes=90-1000"), Wanted::Part(90..100));
        assert_eq!(w("bytes=-5"), Wanted::Part(95..100));
        assert_eq!(w("bytes=-500"), Wanted::Part(0..100));
        assert_eq!(w("bytes=100-"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=-0"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=0-0"), Wanted::Part(0..1));
        // Served whole: several ranges, a backwards range, another unit, garbage.
        for h in [
            "bytes=0-1,5-6",
            "bytes=20-10",
            "items=0-1",
            "bytes=a-b",
            "bytes=",
            "bytes=-",
        ] {
            assert_eq!(w(h), Wanted::Whole, "{h}");
        }
        assert_eq!(wanted(Some("bytes=0-"), 0), Wanted::Unsatisfiable);
    }
}
