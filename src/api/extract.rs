//! Streaming request bodies to disk: raw bodies and multipart fields alike go to a temp file
//! next to the blobs, hashed as they arrive, never held whole in memory.

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// A received file in the staging directory; dropped means deleted.
pub struct Received {
    pub temp: tempfile::TempPath,
    pub size: u64,
    pub sha256: String,
}

/// A whole request: the file (if any) and, for multipart forms, the `spec` field.
pub struct Upload {
    pub file: Option<Received>,
    pub file_name: Option<String>,
    pub spec: Option<Bytes>,
}

/// Largest JSON spec accepted.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// A display name for an upload: control characters dropped, at most 255 characters, or
/// `default` when nothing is left.
pub fn display_name(name: Option<String>, default: impl FnOnce() -> String) -> String {
    name.map(|n| {
        n.chars()
            .filter(|c| !c.is_control())
            .take(255)
            .collect::<String>()
    })
    .filter(|n| !n.is_empty())
    .unwrap_or_else(default)
}

pub fn is_multipart(req: &Request) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"))
}

fn idle(state: &AppState) -> std::time::Duration {
    std::time::Duration::from_secs(state.config.body_idle_secs.max(1))
}

fn timed_out(state: &AppState) -> ApiError {
    ApiError::new(
        ErrorCode::RequestTimeout,
        format!(
            "no data for {} s; the upload was abandoned (MODELPRESS_BODY_IDLE_SECS)",
            state.config.body_idle_secs.max(1)
        ),
    )
}

/// The next item of a body, or 408 when none comes within the idle limit.
async fn next_within<S: Stream + Unpin>(
    state: &AppState,
    stream: &mut S,
) -> Result<Option<S::Item>, ApiError> {
    tokio::time::timeout(idle(state), stream.next())
        .await
        .map_err(|_| timed_out(state))
}

async fn to_temp<S, E>(state: &AppState, mut stream: S) -> Result<Received, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let started = std::time::Instant::now();
    let min_rate = state.config.min_upload_bytes_per_sec;
    let limit = state.config.max_upload_bytes;
    let temp = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(state.config.scratch_dir())
        .map_err(ApiError::io)?;
    let (file, temp) = temp.into_parts();
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = next_within(state, &mut stream).await? {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("upload interrupted: {e}"),
            )
        })?;
        size += chunk.len() as u64;
        if size > limit {
            // `temp` is dropped here, which removes the partial file.
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("upload exceeds the limit of {limit} bytes (MODELPRESS_MAX_UPLOAD_BYTES)"),
            ));
        }
        let elapsed = started.elapsed();
        if elapsed > idle(state) && (size as f64) < min_rate as f64 * elapsed.as_secs_f64() {
            return Err(ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "{size} bytes in {:.0} s is slower than {min_rate} B/s; the upload was abandoned (MODELPRESS_MIN_UPLOAD_BYTES_PER_SEC)",
                    elapsed.as_secs_f64()
                ),
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(ApiError::io)?;
    }
    file.flush().await.map_err(ApiError::io)?;
    metrics::counter!("modelpress_upload_bytes_total").increment(size);
    Ok(Received {
        temp,
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Reads a raw body or a multipart form (`file`, optional `spec`).
pub async fn receive(state: &AppState, req: Request) -> Result<Upload, ApiError> {
    if !is_multipart(&req) {
        let stream = req.into_body().into_data_stream();
        let file = to_temp(state, stream).await?;
        return Ok(Upload {
            file: Some(file),
            file_name: None,
            spec: None,
        });
    }
    let mut form = Multipart::from_request(req, state).await.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("bad multipart form: {e}"),
        )
    })?;
    let mut upload = Upload {
        file: None,
        file_name: None,
        spec: None,
    };
    loop {
        let field = tokio::time::timeout(idle(state), form.next_field())
            .await
            .map_err(|_| timed_out(state))?;
        let field = field.map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("bad multipart form: {e}"),
            )
        })?;
        let Some(field) = field else { break };
        match field.name() {
            Some("file") => {
                if upload.file.is_some() {
                    return Err(ApiError::new(
                        ErrorCode::InvalidRequest,
                        "the form has more than one `file` field",
                    ));
                }
                upload.file_name = field.file_name().map(str::to_string);
                upload.file = Some(to_temp(state, field).await?);
            }
            Some("spec") => {
                let mut buf = Vec::new();
                let mut field = field;
                while let Some(chunk) = tokio::time::timeout(idle(state), field.chunk())
                    .await
                    .map_err(|_| timed_out(state))?
                    .map_err(|e| {
                        ApiError::new(
                            ErrorCode::InvalidRequest,
                            format!("bad multipart form: {e}"),
                        )
                    })?
                {
                    if buf.len() + chunk.len() > MAX_SPEC_BYTES {
                        return Err(ApiError::new(
                            ErrorCode::PayloadTooLarge,
                            "the spec field is larger than 1 MiB",
                        ));
                    }
                    buf.extend_from_slice(&chunk);
                }
                upload.spec = Some(Bytes::from(buf));
            }
            other => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "unexpected form field {:?} (expected `file` and, for jobs, `spec`)",
                        other.unwrap_or("")
                    ),
                ))
            }
        }
    }
    Ok(upload)
}

/// Reads a small body whole (JSON specs), refusing anything over `limit` or slower than the
/// idle limit.
pub async fn small_body(state: &AppState, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    tokio::time::timeout(idle(state), axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| timed_out(state))?
        .map_err(|_| {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than {limit} bytes"),
            )
        })
}

/// The one file of a model or dataset upload (raw body or multipart `file`), with the
/// multipart file name: the tenant's storage quota is checked before the body is read, and a
/// form's `spec` field is refused (it belongs to `POST /v1/jobs`).
pub async fn receive_file(
    state: &AppState,
    tenant: &str,
    req: Request,
) -> Result<(Received, Option<String>), ApiError> {
    super::quota::check_storage(state, tenant, 0).await?;
    let up = receive(state, req).await?;
    if up.spec.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "a `spec` field belongs to POST /v1/jobs",
        ));
    }
    let file = up
        .file
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "the form has no `file` field"))?;
    Ok((file, up.file_name))
}
