//! `/v1/datasets`: upload, list, inspect, delete evaluation and calibration data (.npz in the
//! shared cases' convention: arrays named after a model's graph inputs, samples on axis 0,
//! optional int64 `labels`).

use super::extract;
use super::{page_params, parse_id};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::eval::run::{ArrayInfo, Dataset};
use crate::queue::{DatasetRecord, QueueError};
use crate::state::AppState;
use crate::util::rfc3339;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use uuid::Uuid;

pub fn dataset_view(d: &DatasetRecord) -> Value {
    let arrays: Value = serde_json::from_str(&d.arrays_json).unwrap_or(Value::Null);
    json!({
        "id": d.id,
        "name": d.name,
        "size_bytes": d.size_bytes,
        "sha256": d.sha256,
        "rows": d.rows,
        "has_labels": d.has_labels,
        "arrays": arrays,
        "created_at": rfc3339(d.created_at),
    })
}

fn invalid(msg: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidDataset, msg.to_string())
}

pub async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (file, file_name) = extract::receive_file(&state, &caller.tenant, req).await?;
    if file.size == 0 {
        return Err(invalid("the upload is empty"));
    }
    super::quota::check_storage(&state, &caller.tenant, file.size).await?;
    // Parsed whole before anything is stored: a bad file leaves no trace.
    let path = file.temp.to_path_buf();
    let inflation = state.config.inflation();
    let described = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let bytes = std::fs::read(&path).map_err(ApiError::internal)?;
        let data = Dataset::from_npz_with(&bytes, &inflation).map_err(|e| match e {
            crate::formats::FormatError::TooLarge(m) => ApiError::new(ErrorCode::InflationLimit, m),
            e => invalid(e.to_string()),
        })?;
        let (arrays, rows) = data.describe().map_err(invalid)?;
        Ok((arrays, rows, data.labels.is_some()))
    })
    .await
    .map_err(ApiError::internal)?;
    let (arrays, rows, has_labels): (Vec<ArrayInfo>, Option<u64>, bool) = described?;
    let id = Uuid::now_v7();
    let name = extract::display_name(q.get("name").cloned().or(file_name), || {
        "dataset.npz".into()
    });
    let record = DatasetRecord {
        id,
        tenant_id: caller.tenant.clone(),
        name,
        size_bytes: file.size,
        sha256: file.sha256.clone(),
        rows,
        has_labels,
        arrays_json: serde_json::to_string(&arrays).map_err(ApiError::internal)?,
        blob_key: format!("datasets/{id}"),
        created_at: crate::util::now_ms(),
    };
    state.blobs.put_file(&record.blob_key, &file.temp).await?;
    let _ = file.temp.keep();
    if let Err(e) = state.models.insert_dataset(&record).await {
        let _ = state.blobs.delete(&record.blob_key).await;
        return Err(e.into());
    }
    tracing::info!(dataset_id = %id, bytes = record.size_bytes, "dataset stored");
    Ok((StatusCode::CREATED, Json(dataset_view(&record))))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, cursor) = page_params(&q)?;
    let items = state
        .models
        .list_datasets(&caller.tenant, limit, cursor)
        .await?;
    Ok(Json(super::page(&items, limit, |d| d.id, dataset_view)))
}

pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, ErrorCode::DatasetNotFound, "dataset")?;
    let d = state
        .models
        .get_dataset(&caller.tenant, id)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::DatasetNotFound,
                format!("no dataset with id {id}"),
            )
        })?;
    Ok(Json(dataset_view(&d)))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, ErrorCode::DatasetNotFound, "dataset")?;
    let key = match state.models.delete_dataset(&caller.tenant, id).await {
        Ok(k) => k,
        Err(QueueError::NotFound) => {
            return Err(ApiError::new(
                ErrorCode::DatasetNotFound,
                format!("no dataset with id {id}"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if let Err(e) = state.blobs.delete(&key).await {
        tracing::warn!(key, error = %e, "could not delete a deleted dataset's file");
    }
    Ok(StatusCode::NO_CONTENT)
}
