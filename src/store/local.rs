//! Blobs as files under a directory: `blobs/<key>`, moved in from the scratch directory
//! (fsync the file → rename → fsync the directory; convention 9).

use super::{BlobStore, ByteStream, StoreError};
use async_trait::async_trait;
use futures_util::StreamExt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    pub fn open(data_dir: &Path) -> std::io::Result<LocalBlobStore> {
        let store = LocalBlobStore {
            root: data_dir.to_path_buf(),
        };
        std::fs::create_dir_all(store.root.join("blobs"))?;
        Ok(store)
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        super::check_key(key)?;
        Ok(self.root.join("blobs").join(key))
    }

    /// The blob's file, or NotFound.
    async fn existing(&self, key: &str) -> Result<PathBuf, StoreError> {
        let p = self.path(key)?;
        if tokio::fs::try_exists(&p).await? {
            Ok(p)
        } else {
            Err(StoreError::NotFound(key.to_string()))
        }
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn not_found(key: &str, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound(key.to_string())
    } else {
        StoreError::Io(e)
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StoreError> {
        let dst = self.path(key)?;
        let src = src.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let parent = dst.parent().expect("blob paths have a parent");
            std::fs::create_dir_all(parent)?;
            std::fs::File::open(&src)?.sync_all()?;
            if let Err(e) = std::fs::rename(&src, &dst) {
                // A scratch directory on another file system: copy, then drop the source.
                if e.kind() != std::io::ErrorKind::CrossesDevices {
                    return Err(e);
                }
                let tmp = dst.with_extension("partial");
                std::fs::copy(&src, &tmp)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &dst)?;
                std::fs::remove_file(&src)?;
            }
            fsync_dir(parent)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    async fn fetch_to(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        let src = self.existing(key).await?;
        // Blobs never change once stored, so a hard link is a safe copy (and keeps the file
        // for the job if the blob is deleted meanwhile); another file system gets a copy.
        if tokio::fs::hard_link(&src, dest).await.is_err() {
            tokio::fs::copy(&src, dest)
                .await
                .map_err(|e| not_found(key, e))?;
        }
        Ok(())
    }

    async fn size(&self, key: &str) -> Result<u64, StoreError> {
        let p = self.path(key)?;
        Ok(tokio::fs::metadata(&p)
            .await
            .map_err(|e| not_found(key, e))?
            .len())
    }

    async fn read_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError> {
        let p = self.path(key)?;
        let mut file = tokio::fs::File::open(&p)
            .await
            .map_err(|e| not_found(key, e))?;
        file.seek(std::io::SeekFrom::Start(range.start)).await?;
        let limited = file.take(range.end.saturating_sub(range.start));
        Ok(
            tokio_util::io::ReaderStream::with_capacity(limited, 1 << 16)
                .map(|r| r.map_err(StoreError::Io))
                .boxed(),
        )
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let p = self.path(prefix)?;
        match tokio::fs::remove_dir_all(&p).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn free_bytes(&self) -> Option<u64> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            rustix::fs::statvfs(&root)
                .ok()
                .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
        })
        .await
        .ok()
        .flatten()
    }

    async fn ready(&self) -> bool {
        tokio::fs::metadata(self.root.join("blobs"))
            .await
            .is_ok_and(|m| m.is_dir())
    }
}
