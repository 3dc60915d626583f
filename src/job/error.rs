//! Why a run stopped, and the code a job records for it.

use crate::compress::CompressError;
use crate::error::ErrorCode;
use crate::formats::FormatError;

/// Why a run stopped. The user's mistakes carry the message the job records; the rest are
/// ours, and keep their cause for the log.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `invalid_model`: the model cannot be compressed as asked (the message says why).
    #[error("{0}")]
    InvalidModel(String),
    /// `invalid_spec`: the spec asks for what this model or data cannot give.
    #[error("{0}")]
    InvalidSpec(String),
    #[error("cancelled")]
    Cancelled,
    /// `internal`: a file of the run could not be read or written (not for want of space).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// `internal`: a model this run built could not be written or read back.
    #[error("a model file of the run")]
    Format(#[source] FormatError),
    /// `internal`: a JSON document of the run could not be written.
    #[error("{what}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// `internal`: training failed for a reason that is not the model's.
    #[error("{block}: {message}")]
    Training {
        block: &'static str,
        message: String,
    },
    /// `internal`: the training threads could not start.
    #[error("the training thread pool")]
    ThreadPool(#[source] rayon::ThreadPoolBuildError),
    /// The disk under the data directory is full (ENOSPC/EDQUOT): the attempt is retried
    /// with a backoff, and fails with `insufficient_storage` when none is left.
    #[error("{what}: {source}")]
    Storage {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    /// The code a job that stopped with this error records.
    pub fn code(&self) -> ErrorCode {
        match self {
            RunError::InvalidModel(_) => ErrorCode::InvalidModel,
            RunError::InvalidSpec(_) => ErrorCode::InvalidSpec,
            RunError::Storage { .. } => ErrorCode::InsufficientStorage,
            RunError::Cancelled
            | RunError::Io { .. }
            | RunError::Format(_)
            | RunError::Json { .. }
            | RunError::Training { .. }
            | RunError::ThreadPool(_) => ErrorCode::Internal,
        }
    }

    /// Reading or writing `what` failed: a full disk is [`RunError::Storage`].
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
        move |source| {
            let what = what.into();
            if crate::error::is_disk_full(&source) {
                RunError::Storage { what, source }
            } else {
                RunError::Io { what, source }
            }
        }
    }

    pub(super) fn json(what: &'static str) -> impl FnOnce(serde_json::Error) -> RunError {
        move |source| RunError::Json { what, source }
    }
}

impl From<FormatError> for RunError {
    fn from(e: FormatError) -> Self {
        if e.is_user_error() {
            RunError::InvalidModel(e.to_string())
        } else {
            RunError::Format(e)
        }
    }
}

impl From<CompressError> for RunError {
    fn from(e: CompressError) -> Self {
        match e {
            CompressError::InvalidSpec(m) => RunError::InvalidSpec(m),
            CompressError::InvalidModel(m) => RunError::InvalidModel(m),
            CompressError::Cancelled => RunError::Cancelled,
        }
    }
}
