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
//!
//! When processes share a database (PostgreSQL), events do not go straight to this
//! process's streams; they come back through [`Hub::deliver_remote`], from every process:
//! - state changes are announced by the database itself (a trigger on `jobs`), so they arrive
//!   in commit order: a job's `queued` before the `running` of the worker that claimed it,
//!   whichever processes they ran in. [`Hub::job_changed`] then publishes nothing;
//! - progress is relayed by the process that runs the job (`NOTIFY`).
//!
//! So a stream on API process A sees the state and progress of a job that worker process B
//! runs, each event once.

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
    /// Not a job's event: events from other processes may have been lost (see
    /// [`Hub::gap`]); every stream catches up from the database. Never relayed.
    Gap,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::State, Kind::Progress, Kind::Done]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::State => "state",
            Kind::Progress => "progress",
            Kind::Done => "done",
            Kind::Gap => "gap",
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

/// The most a relayed event's JSON text may hold (PostgreSQL's NOTIFY takes under 8000
/// bytes). A larger progress event travels without its detail.
pub const MAX_RELAYED_BYTES: usize = 7900;

pub struct Hub {
    tx: broadcast::Sender<Arc<JobEvent>>,
    seq: AtomicU64,
    /// Set when processes share the database: events leave through it.
    relay: std::sync::OnceLock<tokio::sync::mpsc::Sender<String>>,
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
            relay: std::sync::OnceLock::new(),
        }
    }

    /// From now on events leave through `relay` (to the shared database) and reach this
    /// process's streams only when they come back through [`Hub::deliver_remote`].
    pub fn relay_through(&self, relay: tokio::sync::mpsc::Sender<String>) {
        let _ = self.relay.set(relay);
    }

    /// An event relayed by any process sharing the database (this one included), as the JSON
    /// text [`Hub::send`] wrote. Text that is not such an event is ignored.
    pub fn deliver_remote(&self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            tracing::warn!("ignored a relayed event that is not JSON");
            return;
        };
        if v.get("kind").and_then(Value::as_str) == Some("job") {
            match job_from_notice(&v) {
                Some(j) => self.broadcast_job(&j),
                None => tracing::warn!("ignored a job state notice that lacks a field"),
            }
            return;
        }
        let parsed = (|| {
            let tenant = v.get("tenant")?.as_str()?.to_string();
            let job = Uuid::parse_str(v.get("job")?.as_str()?).ok()?;
            let kind = Kind::parse(v.get("kind")?.as_str()?)?;
            Some((tenant, job, kind, v.get("data")?.clone()))
        })();
        match parsed {
            Some((tenant, job, kind, data)) => self.broadcast(&tenant, job, kind, data),
            None => tracing::warn!("ignored a relayed event without tenant, job, kind and data"),
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
        if let Some(relay) = self.relay.get() {
            match relay_text(tenant, job, kind, &data) {
                Some(text) => match relay.try_send(text) {
                    Ok(()) => return,
                    // The relay is behind or gone: this process's streams still see it.
                    Err(e) => tracing::warn!(error = %e, "job event not relayed"),
                },
                None => tracing::warn!(%job, "job event too large to relay"),
            }
        }
        self.broadcast(tenant, job, kind, data);
    }

    fn broadcast(&self, tenant: &str, job: Uuid, kind: Kind, data: Value) {
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
    /// With a shared database the database announces it instead (see the module doc).
    pub fn job_changed(&self, j: &JobRecord) {
        if self.relay.get().is_none() {
            self.broadcast_job(j);
        }
    }

    fn broadcast_job(&self, j: &JobRecord) {
        self.broadcast(&j.tenant_id, j.id, Kind::State, crate::views::state_data(j));
        if j.state.is_terminal() {
            self.broadcast(&j.tenant_id, j.id, Kind::Done, crate::views::done_data(j));
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

    /// The connection that brings other processes' events was lost and reopened: what they
    /// announced meanwhile is gone. Every stream of this process catches up (a job's stream
    /// reads its job again; `/v1/events` gets `resync`).
    pub fn gap(&self) {
        self.broadcast(
            "",
            Uuid::nil(),
            Kind::Gap,
            json!({"reason": "notifications between processes were interrupted"}),
        );
    }
}

/// The job a database trigger announced (`migrations/postgres`): the fields the events
/// carry; of the summary only the ratio and the quality verdict.
fn job_from_notice(v: &Value) -> Option<JobRecord> {
    let uuid = |k: &str| v.get(k)?.as_str().and_then(|s| Uuid::parse_str(s).ok());
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let int = |k: &str| v.get(k).and_then(Value::as_i64);
    let summary = match (v.get("ratio"), v.get("quality")) {
        (None | Some(Value::Null), None | Some(Value::Null)) => None,
        (r, q) => Some(
            json!({"ratio": r.cloned().unwrap_or(Value::Null), "quality": q.cloned().unwrap_or(Value::Null)}),
        ),
    };
    Some(JobRecord {
        id: uuid("id")?,
        tenant_id: text("tenant_id")?,
        model_id: uuid("model_id")?,
        state: crate::queue::JobState::parse(v.get("state")?.as_str()?)?,
        spec: Value::Null,
        progress: v.get("progress")?.as_f64()?,
        stage: text("stage"),
        attempts: int("attempts")?,
        max_attempts: int("max_attempts")?,
        cancel_requested: v.get("cancel_requested")?.as_bool()?,
        error_code: text("error_code"),
        error_message: text("error_message"),
        summary,
        created_at: int("created_at")?,
        started_at: int("started_at"),
        finished_at: int("finished_at"),
    })
}

/// An event as relayed between processes: `{tenant, job, kind, data}`, at most
/// [`MAX_RELAYED_BYTES`] (a progress detail that does not fit is left out).
fn relay_text(tenant: &str, job: Uuid, kind: Kind, data: &Value) -> Option<String> {
    let mut wire = json!({"tenant": tenant, "job": job, "kind": kind.as_str(), "data": data});
    let mut text = wire.to_string();
    if text.len() > MAX_RELAYED_BYTES {
        if let Some(d) = wire["data"].as_object_mut() {
            d.insert("detail".into(), Value::Null);
        }
        text = wire.to_string();
    }
    (text.len() <= MAX_RELAYED_BYTES).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relayed event comes back through `deliver_remote` as the same event; a progress
    /// detail too large for NOTIFY is left out, and the event still travels.
    #[tokio::test]
    async fn events_relayed_between_processes_arrive_once_and_whole() {
        let hub = Hub::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        hub.relay_through(tx);
        let mut local = hub.subscribe();
        let job = Uuid::now_v7();
        hub.progress("acme", job, 0.5, "quantize", &json!({"trial": 3}));
        let text = rx.recv().await.unwrap();
        assert!(
            local.try_recv().is_err(),
            "nothing reaches the streams before the relay"
        );
        hub.deliver_remote(&text);
        let ev = local.try_recv().unwrap();
        assert_eq!(
            (ev.tenant.as_str(), ev.job, ev.kind),
            ("acme", job, Kind::Progress)
        );
        assert_eq!(ev.data["detail"], json!({"trial": 3}));
        assert_eq!(ev.data["progress"], json!(0.5));

        let big = json!({"table": "x".repeat(MAX_RELAYED_BYTES)});
        hub.progress("acme", job, 0.6, "search", &big);
        let text = rx.recv().await.unwrap();
        assert!(text.len() <= MAX_RELAYED_BYTES);
        hub.deliver_remote(&text);
        let ev = local.try_recv().unwrap();
        assert_eq!(
            (ev.data["detail"].clone(), ev.data["stage"].clone()),
            (Value::Null, json!("search"))
        );

        hub.deliver_remote("not json");
        hub.deliver_remote("{\"tenant\":\"a\"}");
        assert!(local.try_recv().is_err(), "what is not an event is ignored");
    }

    /// With a shared database, state changes come from the database's notice, never from
    /// `job_changed` (which would race the other processes' notices).
    #[tokio::test]
    async fn with_a_shared_database_state_events_come_from_its_notices() {
        let hub = Hub::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        hub.relay_through(tx);
        let mut local = hub.subscribe();
        let id = Uuid::now_v7();
        let notice = json!({
            "kind": "job", "id": id, "tenant_id": "acme", "model_id": Uuid::now_v7(),
            "state": "succeeded", "progress": 1.0, "stage": "done", "cancel_requested": false,
            "attempts": 1, "max_attempts": 3, "error_code": null, "error_message": null,
            "created_at": 1_700_000_000_000i64, "started_at": null,
            "finished_at": 1_700_000_001_000i64, "ratio": 3.5, "quality": null
        });
        let j = job_from_notice(&notice).unwrap();
        hub.job_changed(&j);
        assert!(
            rx.try_recv().is_err() && local.try_recv().is_err(),
            "nothing relayed"
        );
        hub.deliver_remote(&notice.to_string());
        let state = local.try_recv().unwrap();
        assert_eq!((state.kind, state.job), (Kind::State, id));
        assert_eq!(state.data["state"], json!("succeeded"));
        assert_eq!(state.data["ratio"], json!(3.5));
        let done = local.try_recv().unwrap();
        assert_eq!(
            (done.kind, done.data["ratio"].clone()),
            (Kind::Done, json!(3.5))
        );
        let mut partial = notice.clone();
        partial.as_object_mut().unwrap().remove("state");
        hub.deliver_remote(&partial.to_string());
        assert!(
            local.try_recv().is_err(),
            "a notice without a state is ignored"
        );
    }

    /// Without a relay (one process, SQLite) events go straight to the streams.
    #[test]
    fn without_a_relay_events_go_straight_to_the_streams() {
        let hub = Hub::new();
        let mut local = hub.subscribe();
        hub.progress("t", Uuid::now_v7(), 0.1, "s", &Value::Null);
        assert_eq!(local.try_recv().unwrap().kind, Kind::Progress);
    }
}
