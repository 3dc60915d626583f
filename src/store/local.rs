//! Blobs as files under a directory: `blobs/<key>`, staged in `tmp/` and renamed in
//! (write to temp → fsync → rename → fsync the directory; convention 9).

use super::{BlobStore, StoreError};
use async_trait::async_trait;
use std::path::{Path, PathBuf};

pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    /// Opens the store and removes staging files left by a crashed process.
    pub fn open(data_dir: &Path) -> std::io::Result<LocalBlobStore> {
        let store = LocalBlobStore {
            root: data_dir.to_path_buf(),
        };
        std::fs::create_dir_all(store.root.join("blobs"))?;
        let tmp = store.staging_dir();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(store)
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        // Keys are built by this program, but never let one escape the root.
        if key.is_empty()
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(StoreError::NotFound(key.to_string()));
        }
        Ok(self.root.join("blobs").join(key))
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
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
            std::fs::rename(&src, &dst)?;
            fsync_dir(parent)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    async fn local_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let p = self.path(key)?;
        if tokio::fs::try_exists(&p).await? {
            Ok(p)
        } else {
            Err(StoreError::NotFound(key.to_string()))
        }
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

    fn staging_dir(&self) -> PathBuf {
        self.root.join("tmp")
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
        tokio::fs::metadata(self.staging_dir())
            .await
            .is_ok_and(|m| m.is_dir())
    }
}
