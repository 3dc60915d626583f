//! `/v1/models`: upload, list, inspect, delete.

use super::extract::{self, Received};
use super::{page_params, parse_id};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::formats;
use crate::queue::{ModelRecord, QueueError};
use crate::state::AppState;
use crate::util::rfc3339;
use axum::extract::{Extension, Path, Query, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use uuid::Uuid;

pub fn model_view(m: &ModelRecord) -> Value {
    json!({
        "id": m.id,
        "name": m.name,
        "format": m.format,
        "size_bytes": m.size_bytes,
        "sha256": m.sha256,
        "tensor_count": m.tensor_count,
        "parameter_count": m.parameter_count,
        "created_at": rfc3339(m.created_at),
    })
}

/// Validates a received file and stores it as a model. The file is parsed before anything is
/// stored, so a bad file leaves no trace.
pub async fn store_model(
    state: &AppState,
    tenant: &str,
    file: Received,
    name: Option<String>,
) -> Result<ModelRecord, ApiError> {
    if file.size == 0 {
        return Err(ApiError::new(
            ErrorCode::InvalidModel,
            "the upload is empty",
        ));
    }
    super::quota::check_storage(state, tenant, file.size).await?;
    let path = file.temp.to_path_buf();
    let inflation = state.config.inflation();
    let parsed = tokio::task::spawn_blocking(move || formats::inspect_path(&path, &inflation))
        .await
        .map_err(ApiError::internal)?;
    let formats::Inspection {
        format,
        inventory,
        parameters,
        inputs,
    } = match parsed {
        Ok(v) => v,
        Err(formats::FormatError::TooLarge(m)) => {
            return Err(ApiError::new(ErrorCode::InflationLimit, m))
        }
        Err(e) if e.is_user_error() => {
            return Err(ApiError::new(ErrorCode::InvalidModel, e.to_string()))
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let id = Uuid::now_v7();
    let name = extract::display_name(name, || format!("model.{}", format.extension()));
    let record = ModelRecord {
        id,
        tenant_id: tenant.into(),
        name,
        format: format.as_str().into(),
        size_bytes: file.size,
        sha256: file.sha256.clone(),
        tensor_count: inventory.len() as u64,
        parameter_count: parameters,
        blob_key: format!("models/{id}"),
        tensors_json: serde_json::to_string(&inventory).map_err(ApiError::internal)?,
        inputs_json: inputs
            .map(|i| serde_json::to_string(&i))
            .transpose()
            .map_err(ApiError::internal)?,
        created_at: crate::util::now_ms(),
    };
    state.blobs.put_file(&record.blob_key, &file.temp).await?;
    // The file now lives under its key; the temp path no longer exists.
    let _ = file.temp.keep();
    if let Err(e) = state.models.insert_model(&record).await {
        let _ = state.blobs.delete(&record.blob_key).await;
        return Err(e.into());
    }
    tracing::info!(model_id = %id, format = record.format, bytes = record.size_bytes, "model stored");
    Ok(record)
}

pub async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (file, file_name) = extract::receive_file(&state, &caller.tenant, req).await?;
    let name = q.get("name").cloned().or(file_name);
    let record = store_model(&state, &caller.tenant, file, name).await?;
    Ok((StatusCode::CREATED, Json(model_view(&record))))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, cursor) = page_params(&q)?;
    let items = state
        .models
        .list_models(&caller.tenant, limit, cursor)
        .await?;
    Ok(Json(super::page(&items, limit, |m| m.id, model_view)))
}

async fn find(state: &AppState, tenant: &str, raw: &str) -> Result<ModelRecord, ApiError> {
    let id = parse_id(raw, ErrorCode::ModelNotFound, "model")?;
    state
        .models
        .get_model(tenant, id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::ModelNotFound, format!("no model with id {id}")))
}

pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(model_view(&find(&state, &caller.tenant, &id).await?)))
}

/// Most inventory entries one page holds, and how many a page holds unless `limit` says.
const TENSOR_PAGE_MAX: usize = 10_000;
const TENSOR_PAGE_DEFAULT: usize = 1_000;

/// A page of the model's tensors in file order: `limit` entries from `cursor` (the
/// `next_cursor` of the page before), with `total` and the next page's cursor.
pub async fn tensors(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let bad = |m: &str| ApiError::new(ErrorCode::InvalidRequest, m);
    let limit = match q.get("limit") {
        None => TENSOR_PAGE_DEFAULT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=TENSOR_PAGE_MAX).contains(l))
            .ok_or_else(|| bad("limit must be an integer from 1 to 10000"))?,
    };
    let start = match q.get("cursor") {
        None => 0,
        // Digits only; a number past any model's end is an empty last page.
        Some(c) if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) => {
            c.parse::<usize>().unwrap_or(usize::MAX)
        }
        Some(_) => return Err(bad("cursor is not a value this API returned")),
    };
    let m = find(&state, &caller.tenant, &id).await?;
    let mut items: Vec<Value> =
        serde_json::from_str(&m.tensors_json).map_err(ApiError::internal)?;
    let total = items.len();
    let end = start.saturating_add(limit).min(total);
    let page: Vec<Value> = items.drain(start.min(total)..end).collect();
    let next = (end < total).then(|| end.to_string());
    Ok(Json(
        json!({"model_id": m.id, "items": page, "total": total, "next_cursor": next}),
    ))
}

/// `?cascade=true` (or `1`): the model's finished jobs and their artifacts go with it.
fn cascade(query: Option<&str>) -> Result<bool, ApiError> {
    let mut cascade = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        cascade = match pair.split_once('=') {
            Some(("cascade", "true" | "1")) => true,
            Some(("cascade", "false" | "0")) => false,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "the only query parameter is cascade=true|false",
                ))
            }
        };
    }
    Ok(cascade)
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, ErrorCode::ModelNotFound, "model")?;
    let cascade = cascade(query.as_deref())?;
    let deleted = match state.models.delete_model(&caller.tenant, id, cascade).await {
        Ok(d) => d,
        Err(QueueError::NotFound) => {
            return Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!("no model with id {id}"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    // The rows are gone; a blob that fails to go is only logged (it is unreachable now).
    if let Err(e) = state.blobs.delete(&deleted.blob_key).await {
        tracing::warn!(key = deleted.blob_key, error = %e, "could not delete a deleted model's file");
    }
    for job in deleted.job_ids {
        let prefix = format!("artifacts/{job}");
        if let Err(e) = state.blobs.delete_prefix(&prefix).await {
            tracing::warn!(prefix, error = %e, "could not delete a deleted job's artifacts");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}
