//! What every handler and worker shares: configuration, the catalog, queue and blob store
//! behind their traits, and this process's running jobs. `startup` builds it; `api` and
//! `worker` only read it.

use crate::config::ServeConfig;
use crate::queue::{JobQueue, KeyStore, ModelCatalog, WebhookOutbox};
use crate::store::BlobStore;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use crate::queue::DEFAULT_TENANT;

pub struct Inner {
    pub config: ServeConfig,
    pub models: Arc<dyn ModelCatalog>,
    pub queue: Arc<dyn JobQueue>,
    pub blobs: Arc<dyn BlobStore>,
    /// API keys (`crate::auth`).
    pub keys: Arc<dyn KeyStore>,
    /// The webhook outbox and tenant secrets (`crate::webhook`).
    pub webhooks: Arc<dyn WebhookOutbox>,
    /// Whether the server listens on a loopback address only (then it may run without keys,
    /// and `/metrics` is open).
    pub loopback: bool,
    pub metrics: PrometheusHandle,
    /// Wakes idle workers when a job is queued.
    pub job_queued: Notify,
    /// Whether the database wakes idle workers when another process queues a job
    /// (PostgreSQL's NOTIFY); without it they also look every 500 ms.
    pub wakeups: bool,
    /// Cancel flags of the jobs running in this process.
    pub running: Mutex<HashMap<Uuid, Arc<AtomicBool>>>,
    /// Set when shutdown stops claiming new jobs.
    pub stop_claiming: CancellationToken,
    /// Set when the grace period ends: running jobs stop and are requeued.
    pub hard_stop: CancellationToken,
    /// Job state changes and progress, for the event streams.
    pub events: crate::events::Hub,
    /// Signs every job's `manifest.json` (`crate::manifest`).
    pub signer: Arc<crate::manifest::Signer>,
    /// Distinguishes this process's leases from another's.
    pub instance_id: String,
    /// When (Unix ms; 0: never) a write last failed for lack of space, with no write done
    /// since: `/readyz` answers 503 for a while after ([`Inner::disk_full_recently`]).
    pub disk_full_at: std::sync::atomic::AtomicI64,
}

/// How long `/readyz` says "not ready" after a write failed for lack of space (unless a write
/// succeeds first): long enough for a load balancer to turn away, short enough that a
/// server nothing is sent to can be tried again.
pub const DISK_FULL_HOLD_MS: i64 = 30_000;

impl Inner {
    /// Records a write that failed for lack of space.
    pub fn note_disk_full(&self) {
        let now = crate::util::now_ms();
        self.disk_full_at
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a write that succeeded: there is room again.
    pub fn note_write_done(&self) {
        self.disk_full_at
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many ms ago a write failed for lack of space, if within [`DISK_FULL_HOLD_MS`] and
    /// no write succeeded since.
    pub fn disk_full_recently(&self) -> Option<i64> {
        let at = self.disk_full_at.load(std::sync::atomic::Ordering::Relaxed);
        let ago = crate::util::now_ms() - at;
        (at != 0 && ago < DISK_FULL_HOLD_MS).then_some(ago)
    }
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
