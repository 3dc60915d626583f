//! One contract for every [`BlobStore`]: the same tests run against the local directory and
//! S3 (a real S3-compatible HTTP server, moto's, started per test; `object_store` talks to it
//! exactly as to AWS). `contract_tests!` writes one `#[tokio::test]` per store and test.

use super::*;
use std::sync::Arc;

type Store = Arc<dyn BlobStore>;

async fn local() -> (Store, Box<dyn std::any::Any + Send>) {
    let dir = tempfile::tempdir().unwrap();
    let store = local::LocalBlobStore::open(dir.path()).unwrap();
    (Arc::new(store), Box::new(dir))
}

async fn s3() -> (Store, Box<dyn std::any::Any + Send>) {
    let server = s3::LocalS3::start().expect("moto[server] (see .ci/run)");
    server.create_bucket("contract").await.unwrap();
    let builder = s3::builder_with(&server.options()).unwrap();
    let store = s3::S3BlobStore::with_builder("s3://contract/some/prefix", builder).unwrap();
    (Arc::new(store), Box::new(server))
}

/// A file of `n` bytes in a fresh scratch directory (a pattern that shows misplaced bytes).
fn scratch_file(dir: &Path, name: &str, n: usize) -> (std::path::PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect();
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

async fn read_all(store: &Store, key: &str, range: std::ops::Range<u64>) -> Vec<u8> {
    use futures_util::TryStreamExt;
    let chunks: Vec<bytes::Bytes> = store
        .read_range(key, range)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

pub async fn a_stored_file_reads_back_whole_in_ranges_and_as_a_copy(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    // Larger than one part: S3 takes it as a multipart upload.
    let n = s3::PART_BYTES * 2 + 12_345;
    let (src, bytes) = scratch_file(dir.path(), "big", n);
    store.put_file("models/big", &src).await.unwrap();
    assert!(!src.exists(), "the scratch file is consumed");
    assert_eq!(store.size("models/big").await.unwrap(), n as u64);
    assert_eq!(read_all(&store, "models/big", 0..n as u64).await, bytes);
    assert_eq!(read_all(&store, "models/big", 10..20).await, &bytes[10..20]);
    let tail = (n - 7) as u64..n as u64;
    assert_eq!(read_all(&store, "models/big", tail).await, &bytes[n - 7..]);
    assert!(read_all(&store, "models/big", 5..5).await.is_empty());
    let copy = dir.path().join("copy");
    store.fetch_to("models/big", &copy).await.unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);

    let (small, sbytes) = scratch_file(dir.path(), "small", 1000);
    store
        .put_file("artifacts/j/report.json", &small)
        .await
        .unwrap();
    assert_eq!(
        store
            .read_small("artifacts/j/report.json", 1000)
            .await
            .unwrap(),
        sbytes
    );
    assert!(store
        .read_small("artifacts/j/report.json", 999)
        .await
        .is_err());
    // A key is replaced whole.
    let (again, abytes) = scratch_file(dir.path(), "again", 10);
    store
        .put_file("artifacts/j/report.json", &again)
        .await
        .unwrap();
    assert_eq!(
        read_all(&store, "artifacts/j/report.json", 0..10).await,
        abytes
    );
    assert!(store.ready().await);
}

pub async fn a_missing_blob_is_not_found(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        store.size("models/none").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.fetch_to("models/none", &dir.path().join("x")).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.read_range("models/none", 0..10).await,
        Err(StoreError::NotFound(_))
    ));
    store.delete("models/none").await.unwrap();
    store.delete_prefix("artifacts/none").await.unwrap();
    // Keys that would leave the store's root are never valid.
    for bad in ["", "../x", "a//b", "a/./b"] {
        assert!(
            matches!(store.size(bad).await, Err(StoreError::NotFound(_))),
            "{bad}"
        );
    }
}

pub async fn deletes_remove_a_key_or_everything_under_a_prefix(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "artifacts/a/1/x",
        "artifacts/a/2/y",
        "artifacts/ab/z",
        "models/m",
    ] {
        let (p, _) = scratch_file(dir.path(), "f", 100);
        store.put_file(key, &p).await.unwrap();
    }
    store.delete_prefix("artifacts/a").await.unwrap();
    assert!(matches!(
        store.size("artifacts/a/1/x").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.size("artifacts/a/2/y").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.size("artifacts/ab/z").await.unwrap(),
        100,
        "a sibling prefix stays"
    );
    store.delete("models/m").await.unwrap();
    assert!(matches!(
        store.size("models/m").await,
        Err(StoreError::NotFound(_))
    ));
}

/// One `#[tokio::test]` per store and contract test.
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod on_local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = super::local().await;
                    super::$name(store).await;
                }
            )*
        }
        mod on_s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = super::s3().await;
                    super::$name(store).await;
                }
            )*
        }
    };
}

contract_tests!(
    a_stored_file_reads_back_whole_in_ranges_and_as_a_copy,
    a_missing_blob_is_not_found,
    deletes_remove_a_key_or_everything_under_a_prefix,
);
