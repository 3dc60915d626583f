//! Where model files and artifacts live. Handlers and workers see only [`BlobStore`]: keys,
//! files they hand over or ask for, and byte streams. Nothing in the trait says where the
//! blobs are, so an object store can replace the local directory.
//!
//! Files in flight (uploads being received, a job's copies of its inputs and its outputs)
//! live in the process's scratch directory ([`crate::config::ServeConfig::scratch_dir`]),
//! never in the store.

#[cfg(test)]
mod contract;
pub mod local;
pub mod s3;

use crate::error::ApiError;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use std::ops::Range;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} not found")]
    NotFound(String),
    #[error("blob store i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Refuses a key that could escape the store's root (keys are built by this program, but
/// never let one): empty, or with an empty, `.` or `..` segment. Such a key is NotFound.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty()
        || key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(StoreError::NotFound(key.to_string()));
    }
    Ok(())
}

/// The store a process uses: `s3://bucket/prefix` (S3-compatible object storage), or
/// without a URL the `blobs/` directory under the data directory.
pub fn open(
    blob_url: Option<&str>,
    options: &[String],
    data_dir: &Path,
) -> Result<std::sync::Arc<dyn BlobStore>, StoreError> {
    match blob_url {
        None => Ok(std::sync::Arc::new(local::LocalBlobStore::open(data_dir)?)),
        Some(url) if url.starts_with("s3://") => Ok(std::sync::Arc::new(
            s3::S3BlobStore::with_builder(url, s3::builder_with(options)?)?,
        )),
        Some(url) => Err(StoreError::Io(std::io::Error::other(format!(
            "unsupported blob URL scheme {:?}: use s3://bucket/prefix, or none for the data directory",
            url.split(':').next().unwrap_or_default()
        )))),
    }
}

/// A blob's bytes, as they arrive.
pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores the finished local file `src` under `key`, durably; `src` is consumed.
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StoreError>;
    /// Writes the blob to the new local file `dest` (a job's copy of its model or dataset).
    async fn fetch_to(&self, key: &str, dest: &Path) -> Result<(), StoreError>;
    /// The blob's size in bytes.
    async fn size(&self, key: &str) -> Result<u64, StoreError>;
    /// Bytes `range` of the blob (the caller keeps the range within its size).
    async fn read_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError>;
    /// The whole blob in memory, refused when it holds more than `limit` bytes (a chart's
    /// source document).
    async fn read_small(&self, key: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        use futures_util::TryStreamExt;
        let size = self.size(key).await?;
        if size > limit {
            return Err(StoreError::Io(std::io::Error::other(format!(
                "blob {key} has {size} bytes, more than {limit}"
            ))));
        }
        let chunks: Vec<Bytes> = self.read_range(key, 0..size).await?.try_collect().await?;
        Ok(chunks.concat())
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Deletes every blob whose key starts with `prefix/` (a crashed attempt's leftovers).
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError>;
    /// True when the store can be written to.
    async fn ready(&self) -> bool;
    /// Bytes free for the store's files, when the store can tell.
    async fn free_bytes(&self) -> Option<u64> {
        None
    }
}

/// What a client is told of a blob store error.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io(e) => ApiError::io(e),
            other => ApiError::internal(other),
        }
    }
}
