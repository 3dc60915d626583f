//! The one error type at the HTTP edge. Clients switch on `code`; the table below is the
//! only place a code is spelled.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Stable error codes, with their HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: the request is malformed (bad JSON, bad query parameter, missing field).
    InvalidRequest,
    /// 422: the model file is corrupt, truncated, hostile or of an unsupported kind.
    InvalidModel,
    /// 422: the compression spec is wrong; the message names the field.
    InvalidSpec,
    /// 422: the dataset is not an .npz in the convention (arrays, int64 `labels` [N]).
    InvalidDataset,
    /// 422: the job's dataset does not fit the model's graph inputs (names, dtypes, shapes).
    DatasetMismatch,
    /// 413: the upload is larger than `MODELPRESS_MAX_UPLOAD_BYTES`.
    PayloadTooLarge,
    /// 415: the request body has a content type this route does not take.
    UnsupportedMediaType,
    /// 413: a compressed upload (.npz) would inflate beyond `MODELPRESS_MAX_INFLATED_BYTES` or
    /// `MODELPRESS_MAX_INFLATION_RATIO` times its size.
    InflationLimit,
    /// 401: no API key, or an unknown or revoked one, where the server requires one.
    Unauthorized,
    /// 403: the key's scope does not allow this (a read key writing, /metrics without admin).
    Forbidden,
    /// 429: the tenant has too many jobs running or submitted this hour (Retry-After says
    /// when to try again).
    RateLimited,
    /// 507: the upload would take the tenant past its stored-bytes quota.
    QuotaExceeded,
    /// 507: the server's disk is full (or below MODELPRESS_MIN_FREE_BYTES); nothing was stored.
    InsufficientStorage,
    /// 408: the body stopped arriving (`MODELPRESS_BODY_IDLE_SECS`) or came too slowly.
    RequestTimeout,
    /// 404
    ModelNotFound,
    /// 404
    JobNotFound,
    /// 404
    DatasetNotFound,
    /// 404
    ArtifactNotFound,
    /// 404: no chart of that name, or the job has not the artifact it is drawn from.
    ChartNotFound,
    /// 404: no such route.
    NotFound,
    /// 405
    MethodNotAllowed,
    /// 409: a queued or running job uses the model.
    ModelInUse,
    /// 409: finished jobs were made from the model; `?cascade=true` deletes them with it.
    ModelHasJobs,
    /// 409: a queued or running job evaluates on the dataset.
    DatasetInUse,
    /// 409: the Idempotency-Key was used with a different request.
    IdempotencyConflict,
    /// 409: the job already finished.
    JobNotCancellable,
    /// 416
    RangeNotSatisfiable,
    /// 503: the database or blob store is not reachable.
    Unavailable,
    /// A job's failure code, never an HTTP answer (500 if it were one): the job's worker
    /// stopped responding on each of its attempts.
    AttemptsExhausted,
    /// 500: our bug; details are logged, not returned.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidModel => "invalid_model",
            ErrorCode::InvalidSpec => "invalid_spec",
            ErrorCode::InvalidDataset => "invalid_dataset",
            ErrorCode::DatasetMismatch => "dataset_mismatch",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InflationLimit => "inflation_limit",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::JobNotFound => "job_not_found",
            ErrorCode::DatasetNotFound => "dataset_not_found",
            ErrorCode::ArtifactNotFound => "artifact_not_found",
            ErrorCode::ChartNotFound => "chart_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ModelInUse => "model_in_use",
            ErrorCode::ModelHasJobs => "model_has_jobs",
            ErrorCode::DatasetInUse => "dataset_in_use",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::JobNotCancellable => "job_not_cancellable",
            ErrorCode::RangeNotSatisfiable => "range_not_satisfiable",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::AttemptsExhausted => "attempts_exhausted",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidModel
            | ErrorCode::InvalidSpec
            | ErrorCode::InvalidDataset
            | ErrorCode::DatasetMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::QuotaExceeded | ErrorCode::InsufficientStorage => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::InflationLimit => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ModelNotFound
            | ErrorCode::JobNotFound
            | ErrorCode::DatasetNotFound
            | ErrorCode::ArtifactNotFound
            | ErrorCode::ChartNotFound
            | ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::ModelInUse
            | ErrorCode::ModelHasJobs
            | ErrorCode::DatasetInUse
            | ErrorCode::IdempotencyConflict
            | ErrorCode::JobNotCancellable => StatusCode::CONFLICT,
            ErrorCode::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal | ErrorCode::AttemptsExhausted => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answered as `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
    /// A write failed for lack of space (not a quota or floor refusal): the response carries
    /// [`DiskFull`], so `/readyz` can say so.
    pub disk_full: bool,
}

/// The mark of a response to a write that the file system or database refused for lack of
/// space.
#[derive(Debug, Clone, Copy)]
pub struct DiskFull;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
            disk_full: false,
        }
    }

    /// Logs the cause with its chain and returns a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(ErrorCode::Internal, "internal error; see the server log")
    }

    /// A full disk is the client's to know (507, nothing was stored); any other i/o error
    /// is internal.
    pub fn io(e: std::io::Error) -> ApiError {
        if is_disk_full(&e) {
            tracing::warn!(error = %e, "disk full: a write was refused");
            return ApiError::disk_full();
        }
        ApiError::internal(e)
    }

    pub fn disk_full() -> ApiError {
        ApiError {
            disk_full: true,
            ..ApiError::new(
                ErrorCode::InsufficientStorage,
                "the server's disk is full; nothing was stored (delete models, datasets or jobs, or free space on the server)",
            )
        }
    }
}

/// ENOSPC (or EDQUOT): no room left on the data directory's filesystem.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl ApiError {
    /// Adds a `Retry-After` of `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}});
        let mut r = (self.code.status(), Json(body)).into_response();
        if self.disk_full {
            r.extensions_mut().insert(DiskFull);
        }
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
}
