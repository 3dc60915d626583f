//! Webhook deliveries of a job, the tenant's webhook secret, and the manifest signing key.

use super::jobs::find;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Extension, Path, State};
use axum::Json;
use serde_json::{json, Value};

/// `GET /v1/jobs/{id}/webhooks`: the job's deliveries, with their attempts and last answer.
pub async fn deliveries(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &caller.tenant, &id).await?;
    let list = state.webhooks.deliveries(&caller.tenant, job.id).await?;
    Ok(Json(json!({
        "job_id": job.id,
        "webhook": job.spec.get("webhook").cloned().unwrap_or(Value::Null),
        "deliveries": list.iter().map(crate::views::delivery_view).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/webhook-secret` (admin): the tenant's secret, made on first use, and how the
/// signature is formed.
pub async fn secret(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let seal = crate::webhook::SecretSeal::of(&state.signer);
    let secret =
        crate::webhook::tenant_secret(state.webhooks.as_ref(), &seal, &caller.tenant).await?;
    Ok(Json(json!({
        "tenant": caller.tenant,
        "secret": secret,
        "header": "Modelpress-Signature",
        "scheme": "t=UNIX_SECONDS,v1=hex(HMAC-SHA256(secret, t + \".\" + body))",
    })))
}

/// `GET /v1/signing-key` (public): the ed25519 key that signs every job's manifest.json.
pub async fn signing_key(State(state): State<AppState>) -> Json<Value> {
    Json(state.signer.public_doc())
}
