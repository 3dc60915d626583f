//! The JSON views of jobs, job events and webhook deliveries: what the API answers, what the
//! event streams carry and what a webhook posts are built here, once, so the three agree.

use crate::queue::{ArtifactRecord, DeliveryRecord, JobRecord};
use crate::util::rfc3339;
use serde_json::{json, Value};

/// A failed job's `{code, message}`; null for any other.
fn job_error(j: &JobRecord) -> Value {
    match (&j.error_code, &j.error_message) {
        (Some(code), msg) => json!({"code": code, "message": msg.clone().unwrap_or_default()}),
        _ => Value::Null,
    }
}

/// A job as `GET /v1/jobs/{id}` shows it (and a webhook posts it).
pub fn job_view(j: &JobRecord, artifacts: &[ArtifactRecord]) -> Value {
    json!({
        "id": j.id,
        "model_id": j.model_id,
        "state": j.state,
        "progress": j.progress,
        "stage": j.stage,
        "attempts": j.attempts,
        "cancel_requested": j.cancel_requested,
        "spec": j.spec,
        "created_at": rfc3339(j.created_at),
        "started_at": j.started_at.map(rfc3339),
        "finished_at": j.finished_at.map(rfc3339),
        "error": job_error(j),
        "summary": j.summary,
        "quality": j.summary.as_ref().and_then(|s| s.get("quality")).cloned().unwrap_or(Value::Null),
        "warnings": j.summary.as_ref().and_then(|s| s.get("warnings")).cloned().unwrap_or_else(|| json!([])),
        "artifacts": artifacts.iter().map(|a| json!({
            "name": a.name,
            "size_bytes": a.size_bytes,
            "sha256": a.sha256,
            "url": format!("/v1/jobs/{}/artifacts/{}", j.id, a.name),
        })).collect::<Vec<_>>(),
    })
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
        "created_at": rfc3339(j.created_at),
        "finished_at": j.finished_at.map(rfc3339),
        "ratio": s.and_then(|s| s.get("ratio")).cloned(),
        "quality": s.and_then(|s| s.get("quality")).cloned(),
    })
}

/// What a `done` event carries: the terminal state, the error of a failed job, the ratio of
/// a succeeded one.
pub fn done_data(j: &JobRecord) -> Value {
    json!({
        "job_id": j.id,
        "state": j.state,
        "error": job_error(j),
        "ratio": j.summary.as_ref().and_then(|s| s.get("ratio")).cloned(),
    })
}

/// A delivery as `GET /v1/jobs/{id}/webhooks` shows it.
pub fn delivery_view(d: &DeliveryRecord) -> Value {
    json!({
        "id": d.id,
        "url": d.url,
        "event": d.event,
        "state": d.state,
        "attempts": d.attempts,
        "next_attempt_at": (d.state == "pending").then(|| rfc3339(d.next_attempt_at)),
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": rfc3339(d.created_at),
        "delivered_at": d.delivered_at.map(rfc3339),
    })
}
