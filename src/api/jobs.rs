//! `/v1/jobs`: submit (JSON or multipart with the model), list, status, cancel.

use super::extract;
use super::models::store_model;
use super::{page_params, parse_id};
use crate::auth::Caller;
use crate::calibrate::CalibrationSpec;
use crate::compress;
use crate::error::{ApiError, ErrorCode};
use crate::eval::run::ArrayInfo;
use crate::eval::EvalSpec;
use crate::formats::{GraphInput, TensorInfo};
use crate::job::JobPlan;
use crate::model::{DType, Role, TensorFacts};
use crate::queue::{
    DatasetRecord, Enqueued, JobFilter, JobRecord, JobState, ModelRecord, NewJob, QueueError,
};
use crate::state::AppState;
use crate::train::FinetuneSpec;
use crate::views::job_view;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use std::collections::HashMap;
use uuid::Uuid;

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        // An empty field is no key (HTTP allows empty field values; a client that sends one
        // has nothing to replay).
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .ok()
                .filter(|s| {
                    // `^[!-~]+$`, as openapi.yaml documents it: no space, no tab.
                    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (b'!'..=b'~').contains(&b))
                })
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidRequest,
                        "Idempotency-Key must be 1 to 255 visible ASCII characters",
                    )
                })?;
            Ok(Some(s.to_string()))
        }
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// A refused spec is invalid_spec; a model the spec cannot run on (NaN weights it would
/// compress) invalid_model.
fn invalid_spec(e: compress::CompressError) -> ApiError {
    let code = match e {
        compress::CompressError::InvalidModel(_) => ErrorCode::InvalidModel,
        _ => ErrorCode::InvalidSpec,
    };
    ApiError::new(code, e.to_string())
}

/// The dataset a spec's `block` names (404 dataset_not_found naming the field).
async fn stored_dataset(
    state: &AppState,
    tenant: &str,
    id: Uuid,
    block: &str,
) -> Result<DatasetRecord, ApiError> {
    state.models.get_dataset(tenant, id).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::DatasetNotFound,
            format!("{block}.dataset_id: no dataset with id {id}"),
        )
    })
}

/// The spec's `eval` block: well formed, its dataset stored, labels there for top1.
async fn check_eval(
    state: &AppState,
    tenant: &str,
    plan: &JobPlan,
) -> Result<Option<(EvalSpec, DatasetRecord)>, ApiError> {
    let Some(e) = plan.eval.clone() else {
        return Ok(None);
    };
    let d = stored_dataset(state, tenant, e.dataset_id, "eval").await?;
    if e.metric == crate::eval::metrics::Metric::Top1 && !d.has_labels {
        return Err(ApiError::new(
            ErrorCode::InvalidSpec,
            format!(
                "eval.metric: top1 needs `labels` in the dataset; {} has none (agreement compares with the original instead)",
                d.id
            ),
        ));
    }
    Ok(Some((e, d)))
}

/// The spec's `webhook` URL resolves to addresses the SSRF guard lets through (checked
/// again, and pinned, at each delivery).
async fn check_webhook(state: &AppState, plan: &JobPlan) -> Result<(), ApiError> {
    let Some(url) = &plan.webhook else {
        return Ok(());
    };
    crate::webhook::resolve(url, &state.config.webhook_allow_list())
        .await
        .map(|_| ())
        .map_err(|m| ApiError::new(ErrorCode::InvalidSpec, format!("webhook.url: {m}")))
}

/// The spec's `calibration` block: well formed and its dataset stored.
async fn check_calibration(
    state: &AppState,
    tenant: &str,
    plan: &JobPlan,
) -> Result<Option<(CalibrationSpec, DatasetRecord)>, ApiError> {
    let Some(c) = plan.calibration.clone() else {
        return Ok(None);
    };
    let d = stored_dataset(state, tenant, c.dataset_id, "calibration").await?;
    Ok(Some((c, d)))
}

/// A block that trains (`finetune` or `distill`): its name, its training fields and the
/// datasets it names.
type Training = Option<(&'static str, FinetuneSpec, Vec<DatasetRecord>)>;

/// The spec's `finetune` or `distill` block: well formed and its datasets stored.
async fn check_finetune(
    state: &AppState,
    tenant: &str,
    plan: &JobPlan,
) -> Result<Training, ApiError> {
    let (name, f) = match (&plan.finetune, &plan.distill) {
        (Some(f), _) => ("finetune", f.clone()),
        (None, Some(d)) => ("distill", d.train.clone()),
        (None, None) => return Ok(None),
    };
    let mut sets = vec![stored_dataset(state, tenant, f.dataset_id, name).await?];
    if let Some(v) = f.validation_dataset_id {
        sets.push(stored_dataset(state, tenant, v, &format!("{name}.validation")).await?);
    }
    Ok(Some((name, f, sets)))
}

/// A block that runs the model needs an ONNX model (422 invalid_spec saying why).
fn runnable(model: &ModelRecord, why: &str) -> Result<(), ApiError> {
    if model.format == "onnx" {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InvalidSpec,
        format!(
            "{why}; model {} is {}, which cannot be run (ONNX can)",
            model.id, model.format
        ),
    ))
}

/// The fine-tuning datasets against the model: training runs the model on rows of the data
/// (or windows of a sequence fed whole), so it must be an ONNX model whose graph inputs each
/// dataset fits.
fn check_finetune_fits(model: &ModelRecord, finetune: &Training) -> Result<(), ApiError> {
    let Some((name, _, sets)) = finetune else {
        return Ok(());
    };
    runnable(model, &format!("{name} trains the model"))?;
    let inputs: Vec<GraphInput> = match model.inputs_json.as_deref() {
        Some(i) => stored(i, "a model's graph inputs")?,
        None => Vec::new(),
    };
    for d in sets {
        let arrays: Vec<ArrayInfo> = stored(&d.arrays_json, "a dataset's arrays")?;
        // A dataset whose arrays do not share axis 0 is one sequence fed whole (a stateful
        // model's): training cuts it into windows of consecutive steps.
        let feed = match d.rows {
            Some(_) => crate::eval::run::Feed::PerSample,
            None => crate::eval::run::Feed::Whole,
        };
        crate::eval::check::fits(&inputs, &arrays, d.rows, Some(feed)).map_err(|diffs| {
            ApiError::new(
                ErrorCode::DatasetMismatch,
                format!(
                    "{name}.dataset_id: dataset {} does not fit model {}: {}",
                    d.id,
                    model.id,
                    diffs.join("; ")
                ),
            )
        })?;
    }
    Ok(())
}

/// The calibration dataset against the model: calibration runs the model, so it must be an
/// ONNX model whose graph inputs the dataset fits.
fn check_calibration_fits(
    model: &ModelRecord,
    calibration: &Option<(CalibrationSpec, DatasetRecord)>,
) -> Result<(), ApiError> {
    let Some((c, d)) = calibration else {
        return Ok(());
    };
    runnable(model, "calibration runs the model")?;
    let Some(inputs) = model.inputs_json.as_deref() else {
        return Ok(());
    };
    let inputs: Vec<GraphInput> = stored(inputs, "a model's graph inputs")?;
    let arrays: Vec<ArrayInfo> = stored(&d.arrays_json, "a dataset's arrays")?;
    crate::eval::check::fits(&inputs, &arrays, d.rows, c.feed).map_err(|diffs| {
        ApiError::new(
            ErrorCode::DatasetMismatch,
            format!(
                "calibration.dataset_id: dataset {} does not fit model {}: {}",
                d.id,
                model.id,
                diffs.join("; ")
            ),
        )
    })
}

/// The eval dataset against the model's graph inputs (recorded at upload; a weight-only model
/// is not run, so any dataset goes: its report says so).
fn check_fits(
    model: &ModelRecord,
    eval: &Option<(EvalSpec, DatasetRecord)>,
) -> Result<(), ApiError> {
    let (Some((e, d)), Some(inputs)) = (eval, model.inputs_json.as_deref()) else {
        return Ok(());
    };
    let inputs: Vec<GraphInput> = stored(inputs, "a model's graph inputs")?;
    let arrays: Vec<ArrayInfo> = stored(&d.arrays_json, "a dataset's arrays")?;
    crate::eval::check::fits(&inputs, &arrays, d.rows, e.feed).map_err(|diffs| {
        ApiError::new(
            ErrorCode::DatasetMismatch,
            format!(
                "eval.dataset_id: dataset {} does not fit model {}: {}",
                d.id,
                model.id,
                diffs.join("; ")
            ),
        )
    })
}

/// JSON this server stored: a row that does not parse is corrupt, our fault, and never read
/// as empty (a check on nothing passes).
fn stored<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T, ApiError> {
    serde_json::from_str(json)
        .map_err(|e| ApiError::internal(format!("{what} as stored do not parse: {e}")))
}

/// A search or an analysis runs the model on the dataset: it needs both.
fn check_search(
    model: &ModelRecord,
    plan: &JobPlan,
    eval: &Option<(EvalSpec, DatasetRecord)>,
) -> Result<(), ApiError> {
    let what = if plan.search.is_some() {
        "constraints: a search"
    } else if plan.analyze.is_some() {
        "analyze: a sensitivity analysis"
    } else {
        return Ok(());
    };
    if eval.is_none() {
        return Err(ApiError::new(
            ErrorCode::InvalidSpec,
            format!("{what} needs an `eval` block (the dataset and metric it is judged on)"),
        ));
    }
    if model.format != "onnx" {
        return Err(ApiError::new(
            ErrorCode::InvalidSpec,
            format!(
                "{what} runs the model; model {} is {}, which cannot be run (ONNX can)",
                model.id, model.format
            ),
        ));
    }
    Ok(())
}

/// Everything a spec needs of the stored model: orderings its tensors can take, finite
/// weights where steps touch them, a dataset that fits its inputs, and a runnable model for
/// a search or an analysis.
fn check_against_model(
    model: &ModelRecord,
    plan: &JobPlan,
    eval: &Option<(EvalSpec, DatasetRecord)>,
    calibration: &Option<(CalibrationSpec, DatasetRecord)>,
    finetune: &Training,
) -> Result<(), ApiError> {
    let inventory: Vec<TensorInfo> = stored(&model.tensors_json, "a model's tensors")?;
    check_orderings(&inventory, &plan.compress).map_err(invalid_spec)?;
    check_fits(model, eval)?;
    check_calibration_fits(model, calibration)?;
    check_finetune_fits(model, finetune)?;
    check_search(model, plan, eval)
}

/// Refuses, at submit time, an ordering that some tensor of the model cannot take (e.g.
/// quantizing float32 factors, pruning binary weights): checked on the stored inventory.
fn check_orderings(
    inventory: &[TensorInfo],
    plan: &compress::Plan,
) -> Result<(), compress::CompressError> {
    let facts: Vec<(TensorFacts, u64)> = inventory
        .iter()
        .filter_map(|t| {
            let facts = TensorFacts {
                name: &t.name,
                dtype: DType::parse(&t.dtype)?,
                shape: &t.shape,
                role: Role::parse(&t.role)?,
            };
            Some((facts, t.non_finite))
        })
        .collect();
    compress::check(facts.iter().map(|(f, _)| *f), plan)?;
    if plan.finetune {
        if let Some(why) = facts
            .iter()
            .find_map(|(f, _)| compress::untrainable(f, plan))
        {
            return Err(compress::CompressError::InvalidSpec(format!(
                "finetune: {why}"
            )));
        }
    }
    // NaN/Inf weights fail the job when a step touches them: say so now.
    for (t, non_finite) in facts.iter().filter(|(_, n)| *n > 0) {
        if let Some(i) = plan.steps.iter().position(|s| s.select.selects_facts(t)) {
            return Err(compress::CompressError::InvalidModel(format!(
                "tensor {:?} holds {non_finite} NaN or infinite value(s) and pipeline[{i}] would compress it; fix the weights or exclude the tensor",
                t.name
            )));
        }
    }
    Ok(())
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let (model_id, spec, fingerprint) = if extract::is_multipart(&req) {
        // Over a quota, the upload is refused before its body is read (a retry with an
        // idempotency key is let through: it may be a replay).
        if key.is_none() {
            super::quota::check_jobs(&state, &caller.tenant).await?;
        }
        super::quota::check_storage(&state, &caller.tenant, 0).await?;
        let up = extract::receive(&state, req).await?;
        let spec_bytes = up.spec.ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRequest, "the form has no `spec` field")
        })?;
        // The form itself was well formed; what its `spec` part says is the spec's problem.
        let spec: Value = serde_json::from_slice(&spec_bytes).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidSpec,
                format!("spec: the form's spec field is not valid JSON: {e}"),
            )
        })?;
        if spec.get("model_id").is_some() {
            return Err(ApiError::new(
                ErrorCode::InvalidSpec,
                "model_id: not allowed when the form carries the model file",
            ));
        }
        let plan = crate::job::parse_spec(&spec).map_err(invalid_spec)?;
        check_webhook(&state, &plan).await?;
        let eval = check_eval(&state, &caller.tenant, &plan).await?;
        let calibration = check_calibration(&state, &caller.tenant, &plan).await?;
        let finetune = check_finetune(&state, &caller.tenant, &plan).await?;
        let file = up.file.ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRequest, "the form has no `file` field")
        })?;
        let fingerprint =
            crate::util::sha256_hex(format!("upload:{}:{}", file.sha256, spec).as_bytes());
        // A retried upload+submit with the same key must not store the model twice.
        if let Some(k) = &key {
            if let Some(resp) = replay(&state, &caller.tenant, k, &fingerprint).await? {
                return Ok(resp);
            }
        }
        let model = store_model(&state, &caller.tenant, file, up.file_name).await?;
        check_against_model(&model, &plan, &eval, &calibration, &finetune).map_err(|e| {
            ApiError::new(
                e.code,
                format!("{} (the model was stored as {})", e.message, model.id),
            )
        })?;
        (model.id, spec, fingerprint)
    } else {
        // A JSON spec; a body in another type (a form, a file) is refused before it is read.
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or("").trim();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(ApiError::new(
                    ErrorCode::UnsupportedMediaType,
                    format!(
                        "POST /v1/jobs takes application/json (a spec) or multipart/form-data (file and spec), not {}",
                        crate::util::clip(essence)
                    ),
                ));
            }
        }
        let body = extract::small_body(&state, req.into_body(), extract::MAX_SPEC_BYTES).await?;
        let spec = parse_json(&body)?;
        let raw_id = spec
            .get("model_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidSpec, "model_id: is required (a string)")
            })?;
        let model_id = Uuid::parse_str(raw_id).map_err(|_| {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("no model with id {}", crate::util::clip(raw_id)),
            )
        })?;
        let plan = crate::job::parse_spec(&spec).map_err(invalid_spec)?;
        check_webhook(&state, &plan).await?;
        let eval = check_eval(&state, &caller.tenant, &plan).await?;
        let calibration = check_calibration(&state, &caller.tenant, &plan).await?;
        let finetune = check_finetune(&state, &caller.tenant, &plan).await?;
        let model = state
            .models
            .get_model(&caller.tenant, model_id)
            .await?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ModelNotFound,
                    format!("no model with id {model_id}"),
                )
            })?;
        check_against_model(&model, &plan, &eval, &calibration, &finetune)?;
        let mut spec = spec;
        if let Some(o) = spec.as_object_mut() {
            o.remove("model_id");
        }
        let fingerprint = crate::util::sha256_hex(format!("model:{model_id}:{spec}").as_bytes());
        (model_id, spec, fingerprint)
    };
    // A replay answers with the earlier job; anything else counts against the quotas.
    if let Some(k) = &key {
        if let Some(resp) = replay(&state, &caller.tenant, k, &fingerprint).await? {
            return Ok(resp);
        }
    }
    super::quota::check_jobs(&state, &caller.tenant).await?;
    let new = NewJob {
        id: Uuid::now_v7(),
        tenant_id: caller.tenant.clone(),
        model_id,
        spec,
        max_attempts: i64::from(state.config.max_attempts),
        idempotency_key: key,
        fingerprint,
    };
    let (job, replayed) = match state.queue.enqueue(new).await {
        Ok(Enqueued::Created(j)) => (j, false),
        Ok(Enqueued::Existing(j)) => (j, true),
        Err(QueueError::NotFound) => {
            return Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!("no model with id {model_id}"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if !replayed {
        state.events.job_changed(&job);
        state.job_queued.notify_waiters();
        metrics::counter!("modelpress_jobs_submitted_total").increment(1);
    }
    accepted(&state, job, replayed).await
}

async fn replay(
    state: &AppState,
    tenant: &str,
    key: &str,
    fingerprint: &str,
) -> Result<Option<Response>, ApiError> {
    // The queue decides for JSON bodies; for uploads we must know before storing the file.
    match state.queue.find_idempotent(tenant, key).await? {
        None => Ok(None),
        Some((job, fp)) if fp == fingerprint => Ok(Some(accepted(state, job, true).await?)),
        Some(_) => Err(QueueError::IdempotencyConflict.into()),
    }
}

async fn accepted(state: &AppState, job: JobRecord, replayed: bool) -> Result<Response, ApiError> {
    let artifacts = state.queue.artifacts(job.id).await?;
    let mut resp = (StatusCode::ACCEPTED, Json(job_view(&job, &artifacts))).into_response();
    let loc = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)).map_err(ApiError::internal)?;
    resp.headers_mut().insert(header::LOCATION, loc);
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, cursor) = page_params(&q)?;
    // An empty value is refused like any other that is not one (it is not "absent").
    let st = match q.get("state") {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "state must be queued, running, succeeded, failed or cancelled",
            )
        })?),
    };
    let model_id =
        match q.get("model_id") {
            None => None,
            Some(m) => Some(Uuid::parse_str(m).map_err(|_| {
                ApiError::new(ErrorCode::InvalidRequest, "model_id is not a valid id")
            })?),
        };
    let filter = JobFilter {
        state: st,
        model_id,
        limit,
        before: cursor,
    };
    let jobs = state.queue.list_jobs(&caller.tenant, &filter).await?;
    let mut views = Vec::with_capacity(jobs.len());
    for j in &jobs {
        views.push((j.id, job_view(j, &state.queue.artifacts(j.id).await?)));
    }
    Ok(Json(super::page(&views, limit, |v| v.0, |v| v.1.clone())))
}

pub async fn find(state: &AppState, tenant: &str, raw: &str) -> Result<JobRecord, ApiError> {
    let id = parse_id(raw, ErrorCode::JobNotFound, "job")?;
    state
        .queue
        .get_job(tenant, id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::JobNotFound, format!("no job with id {id}")))
}

pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &caller.tenant, &id).await?;
    let artifacts = state.queue.artifacts(job.id).await?;
    Ok(Json(job_view(&job, &artifacts)))
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id, ErrorCode::JobNotFound, "job")?;
    let job = match state.queue.request_cancel(&caller.tenant, id).await {
        Ok(j) => j,
        Err(QueueError::NotFound) => {
            return Err(ApiError::new(
                ErrorCode::JobNotFound,
                format!("no job with id {id}"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    // A job running in this process stops at its next tensor boundary.
    if let Some(flag) = state.running.lock().expect("running map").get(&id) {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    state.events.job_changed(&job);
    let status = if job.state == JobState::Cancelled {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(job_view(&job, &[]))))
}
