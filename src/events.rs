//! Job events for the Server-Sent Event streams (`/v1/jobs/{id}/events`, `/v1/events`).
//!
//! One in-process broadcast channel carries every job's state changes and progress. The
//! places that change a job publish to it: submit and cancel (API), claim, heartbeat and the
//! end of a run (worker), and the sweeper. A stream holds a receiver, never a database
//! connection: it reads the job once when it connects (so a reconnect, also after a restart,
//! starts from the stored state and never misses the terminal event) and then only listens.
//!
//! Event ids grow across restarts: the counter starts at the process's start time in
//! microseconds, and each event takes the next value.

use crate::queue::JobRecord;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;
use uuid::Uuid;

/// How many events a slow stream may fall behind before it skips ahead (it then reads the
/// job again and sends its current state).
pub const CHANNEL_CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The job's state changed (queued, running, succeeded, failed, cancelled, or a cancel
    /// was requested).
    State,
    /// A running job moved: fraction, stage and the structured detail of its current phase.
    Progress,
    /// The job reached a terminal state; the stream ends after it.
    Done,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::State => "state",
            Kind::Progress => "progress",
            Kind::Done => "done",
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobEvent {
    pub id: u64,
    pub tenant: String,
    pub job: Uuid,
    pub kind: Kind,
    pub data: Value,
}

pub struct Hub {
    tx: broadcast::Sender<Arc<JobEvent>>,
    seq: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Hub {
            tx,
            seq: AtomicU64::new(start),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.tx.subscribe()
    }

    /// The next event id (also used for the snapshot a stream sends when it connects).
    pub fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// How many streams listen now.
    pub fn listeners(&self) -> usize {
        self.tx.receiver_count()
    }

    fn send(&self, tenant: &str, job: Uuid, kind: Kind, data: Value) {
        let ev = JobEvent {
            id: self.next_id(),
            tenant: tenant.to_string(),
            job,
            kind,
            data,
        };
        // No listener is not an error.
        let _ = self.tx.send(Arc::new(ev));
    }

    /// A job's state as stored: a `state` event, and a `done` event when it is terminal.
    pub fn job_changed(&self, j: &JobRecord) {
        self.send(&j.tenant_id, j.id, Kind::State, state_data(j));
        if j.state.is_terminal() {
            self.send(&j.tenant_id, j.id, Kind::Done, done_data(j));
        }
    }

    /// A running job's progress.
    pub fn progress(&self, tenant: &str, job: Uuid, fraction: f64, stage: &str, detail: &Value) {
        let data = json!({
            "job_id": job,
            "progress": fraction,
            "stage": stage,
            "detail": detail,
        });
        self.send(tenant, job, Kind::Progress, data);
    }
}

/// What a `state` event carries: enough for a row of the job list.
pub fn state_data(j: &JobRecord) -> Value {
    let s = j.summary.as_ref();
    json!({
        "job_id": j.id,
        "model_id": j.model_id,
        "state": j.state,
        "progress": j.progress,
        "stage": j.stage,
        "cancel_requested": j.cancel_requested,
        "created_at": crate::api::rfc3339(j.created_at),
        "finished_at": j.finished_at.map(crate::api::rfc3339),
        "ratio": s.and_then(|s| s.get("ratio")).cloned(),
        "quality": s.and_then(|s| s.get("quality")).cloned(),
    })
}

/// What a `done` event carries: the terminal state, the error of a failed job, the ratio of
/// a succeeded one.
pub fn done_data(j: &JobRecord) -> Value {
    let error = match (&j.error_code, &j.error_message) {
        (Some(code), msg) => json!({"code": code, "message": msg.clone().unwrap_or_default()}),
        _ => Value::Null,
    };
    json!({
        "job_id": j.id,
        "state": j.state,
        "error": error,
        "ratio": j.summary.as_ref().and_then(|s| s.get("ratio")).cloned(),
    })
}
