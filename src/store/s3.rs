//! Blobs in S3-compatible object storage (AWS S3, MinIO, moto…), through the `object_store`
//! crate: `MODELPRESS_BLOB_URL=s3://bucket/prefix`, with the endpoint, region and credentials
//! from the usual AWS variables (`AWS_ENDPOINT`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`…).
//!
//! Files go up in parts ([`PART_BYTES`] each, at most [`PARTS_IN_FLIGHT`] at once), so an
//! upload of any size holds a bounded amount in memory; reads stream, ranges included.

use super::{BlobStore, ByteStream, StoreError};
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The size of each uploaded part (S3 wants at least 5 MiB but the last).
pub const PART_BYTES: usize = 8 << 20;
/// Parts uploading at once.
pub const PARTS_IN_FLIGHT: usize = 4;

pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    prefix: String,
}

fn remote(key: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_string()),
        other => StoreError::Io(std::io::Error::other(other)),
    }
}

/// `s3://bucket/prefix` → (bucket, prefix without slashes at either end).
pub fn parse_url(url: &str) -> Result<(String, String), StoreError> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| StoreError::Io(std::io::Error::other("a blob URL is s3://bucket/prefix")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(StoreError::Io(std::io::Error::other(
            "the blob URL names no bucket",
        )));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// A client configured from the environment's AWS variables, then `KEY=VALUE` options.
pub fn builder_with(options: &[String]) -> Result<AmazonS3Builder, StoreError> {
    let mut builder = AmazonS3Builder::from_env();
    for option in options.iter().filter(|o| !o.trim().is_empty()) {
        let bad = |why: &str| StoreError::Io(std::io::Error::other(format!("blob option: {why}")));
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key: object_store::aws::AmazonS3ConfigKey = key
            .trim()
            .parse()
            .map_err(|_| bad(&format!("unknown key {:?}", key.trim())))?;
        builder = builder.with_config(key, value.trim());
    }
    Ok(builder)
}

impl S3BlobStore {
    /// The store `url` names, with an explicit client configuration (tests point it at a
    /// local S3-compatible server).
    pub fn with_builder(url: &str, builder: AmazonS3Builder) -> Result<S3BlobStore, StoreError> {
        let (bucket, prefix) = parse_url(url)?;
        let store = builder
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        Ok(S3BlobStore {
            store: Arc::new(store),
            prefix,
        })
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        super::check_key(key)?;
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjectPath::parse(full).map_err(|_| StoreError::NotFound(key.to_string()))
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let mut file = tokio::fs::File::open(src).await?;
        let size = file.metadata().await?.len();
        if size <= PART_BYTES as u64 {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf).await?;
            self.store
                .put(&path, PutPayload::from(buf))
                .await
                .map_err(|e| remote(key, e))?;
        } else {
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|e| remote(key, e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| remote(key, e))?;
                writer.write(&buf[..n]);
            }
            // On an error the upload is aborted (WriteMultipart drops its parts).
            writer.finish().await.map_err(|e| remote(key, e))?;
        }
        drop(file);
        tokio::fs::remove_file(src).await?;
        Ok(())
    }

    async fn fetch_to(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let got = self.store.get(&path).await.map_err(|e| remote(key, e))?;
        let mut stream = got.into_stream();
        let mut out =
            tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::create(dest).await?);
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk.map_err(|e| remote(key, e))?).await?;
        }
        out.flush().await?;
        Ok(())
    }

    async fn size(&self, key: &str) -> Result<u64, StoreError> {
        let path = self.path(key)?;
        Ok(self
            .store
            .head(&path)
            .await
            .map_err(|e| remote(key, e))?
            .size)
    }

    async fn read_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError> {
        let path = self.path(key)?;
        if range.start >= range.end {
            // S3 refuses an empty range; an empty answer is what was asked for.
            self.size(key).await?;
            return Ok(futures_util::stream::empty().boxed());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(&path, options)
            .await
            .map_err(|e| remote(key, e))?;
        let key = key.to_string();
        Ok(got.into_stream().map_err(move |e| remote(&key, e)).boxed())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote(key, e)),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let path = self.path(prefix)?;
        let listed = self
            .store
            .list(Some(&path))
            .map_ok(|meta| meta.location)
            .boxed();
        let mut deleted = self.store.delete_stream(listed);
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(remote(prefix, e)),
            }
        }
        Ok(())
    }

    async fn ready(&self) -> bool {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        self.store
            .list_with_delimiter(prefix.as_ref())
            .await
            .is_ok()
    }
}

/// A local S3-compatible server for tests and benchmarks: moto's (`pip install
/// 'moto[server]'`), on a free port of 127.0.0.1, stopped when dropped.
pub struct LocalS3 {
    child: std::process::Child,
    pub endpoint: String,
}

impl LocalS3 {
    pub fn start() -> std::io::Result<LocalS3> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut s3 = LocalS3 {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = s3.child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "the moto S3 server exited ({status}); is moto[server] installed?"
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::other("the moto S3 server did not start"));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(s3)
    }

    /// The `--blob-option` settings that reach this server (path-style requests over plain
    /// HTTP; see [`builder_with`]).
    pub fn options(&self) -> Vec<String> {
        vec![
            format!("aws_endpoint={}", self.endpoint),
            "aws_allow_http=true".into(),
            "aws_region=us-east-1".into(),
            "aws_access_key_id=test".into(),
            "aws_secret_access_key=test".into(),
        ]
    }

    /// Creates a bucket (an S3 `CreateBucket`, which moto takes unsigned).
    pub async fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        let r = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .map_err(std::io::Error::other)?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "CreateBucket {name}: {}",
                r.status()
            )))
        }
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
