//! Where model files and artifacts live. Handlers and workers see only [`BlobStore`], so an
//! object store can replace the local directory later.

pub mod local;

use async_trait::async_trait;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} not found")]
    NotFound(String),
    #[error("blob store i/o: {0}")]
    Io(#[from] std::io::Error),
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Moves a finished file (written under [`BlobStore::staging_dir`]) to `key`, durably.
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StoreError>;
    /// A local path holding the blob: the blob itself for a local store, a downloaded copy
    /// for a remote one.
    async fn local_path(&self, key: &str) -> Result<PathBuf, StoreError>;
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Deletes every blob whose key starts with `prefix/` (a crashed attempt's leftovers).
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError>;
    /// A directory on the same filesystem as the blobs, for uploads in flight.
    fn staging_dir(&self) -> PathBuf;
    /// True when the store can be written to.
    async fn ready(&self) -> bool;
    /// Bytes free for the store's files, when the store can tell.
    async fn free_bytes(&self) -> Option<u64> {
        None
    }
}
