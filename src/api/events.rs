//! Server-Sent Events: `/v1/jobs/{id}/events` follows one job to its end, `/v1/events`
//! every job of the tenant (for the job list). See `crate::events` for where events come
//! from and why a stream never holds a database connection.

use super::parse_id;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::events::{JobEvent, Kind};
use crate::state::AppState;
use crate::views::{done_data, state_data};
use axum::extract::{Extension, Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use uuid::Uuid;

/// A comment line this often keeps proxies from closing an idle stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// What a browser waits before reconnecting (the `retry` field of the first event).
const RETRY: Duration = Duration::from_secs(2);

fn sse(id: u64, kind: &str, data: &serde_json::Value) -> Event {
    Event::default()
        .id(id.to_string())
        .event(kind)
        .data(data.to_string())
}

fn from_hub(ev: &JobEvent) -> Event {
    sse(ev.id, ev.kind.as_str(), &ev.data)
}

struct Follow {
    state: AppState,
    rx: Receiver<Arc<JobEvent>>,
    tenant: String,
    /// The one job a per-job stream follows; None for `/v1/events`.
    job: Option<Uuid>,
    pending: VecDeque<Event>,
    /// A per-job stream ends after its `done` event.
    finished: bool,
}

impl Follow {
    /// The job as stored, as the events a client needs to catch up: `state`, and `done`
    /// when it is terminal (which ends a per-job stream).
    fn snapshot(&mut self, j: &crate::queue::JobRecord) {
        let hub = &self.state.events;
        self.pending
            .push_back(sse(hub.next_id(), "state", &state_data(j)).retry(RETRY));
        if j.state.is_terminal() {
            self.pending
                .push_back(sse(hub.next_id(), "done", &done_data(j)));
            self.finished = self.job.is_some();
        }
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.finished {
                return None;
            }
            let stop = self.state.stop_claiming.clone();
            let got = tokio::select! {
                got = self.rx.recv() => got,
                // Shutdown closes the streams so the server can drain; clients reconnect.
                _ = stop.cancelled() => return None,
            };
            // What this stream may have missed, when it did.
            let missed = match got {
                Ok(ev) if ev.kind == Kind::Gap => ev.data.clone(),
                Ok(ev) => {
                    if ev.tenant != self.tenant || self.job.is_some_and(|j| j != ev.job) {
                        continue;
                    }
                    if self.job.is_some() && ev.kind == Kind::Done {
                        self.finished = true;
                    }
                    return Some(from_hub(&ev));
                }
                // This stream fell behind.
                Err(RecvError::Lagged(skipped)) => serde_json::json!({"skipped": skipped}),
                Err(RecvError::Closed) => return None,
            };
            match self.job {
                // Read the job again and carry on from there.
                Some(id) => match self.state.queue.get_job(&self.tenant, id).await {
                    Ok(Some(j)) => self.snapshot(&j),
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream could not re-read its job");
                        return None;
                    }
                },
                None => {
                    let id = self.state.events.next_id();
                    return Some(sse(id, "resync", &missed));
                }
            }
        }
    }
}

fn stream(f: Follow) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(f, |mut f| async move { f.next().await.map(|e| (Ok(e), f)) })
}

/// `GET /v1/jobs/{id}/events`: the job's current state first (from the database, so a
/// reconnect, with or without `Last-Event-ID` and also after a restart, gets the state it
/// missed and the terminal event), then its live events until `done`.
pub async fn job_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = parse_id(&id, ErrorCode::JobNotFound, "job")?;
    // Subscribe before reading, so nothing between the read and the first receive is lost.
    let rx = state.events.subscribe();
    let job = state
        .queue
        .get_job(&caller.tenant, id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::JobNotFound, format!("no job with id {id}")))?;
    let mut f = Follow {
        state: state.clone(),
        rx,
        tenant: caller.tenant.clone(),
        job: Some(id),
        pending: VecDeque::new(),
        finished: false,
    };
    f.snapshot(&job);
    metrics::counter!("modelpress_event_streams_opened_total", "stream" => "job").increment(1);
    Ok(Sse::new(stream(f)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// `GET /v1/events`: every job's state changes and progress, for the job list. A stream
/// that falls too far behind gets a `resync` event (list the jobs again).
pub async fn all_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = state.events.subscribe();
    let mut f = Follow {
        state: state.clone(),
        rx,
        tenant: caller.tenant.clone(),
        job: None,
        pending: VecDeque::new(),
        finished: false,
    };
    // The first event sets the reconnect delay; it says how to catch up (list the jobs).
    let data = serde_json::json!({"listening": true});
    f.pending
        .push_back(sse(state.events.next_id(), "hello", &data).retry(RETRY));
    metrics::counter!("modelpress_event_streams_opened_total", "stream" => "all").increment(1);
    Sse::new(stream(f)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
