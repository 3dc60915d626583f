//! Runs one compression from a model file to artifact files in a directory. The worker and
//! the CLI both call [`execute`], so a job and `modelpress compress` write the same bytes.

use crate::compress::{self, report::Warning, CompressError, Control, Plan};
use crate::deploy::{self, TensorForm};
use crate::formats::{self, FormatError};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    pub original_bytes: u64,
    /// The deployable file's size (as `deployable_bytes`), kept under its first name.
    pub compressed_bytes: u64,
    /// Size of `model.<ext>`, the file a runtime loads; the restored model when no step
    /// encoded anything.
    #[serde(default)]
    pub deployable_bytes: u64,
    /// original_bytes / deployable_bytes.
    pub ratio: f64,
    pub parameters: u64,
    pub nonzero_parameters: u64,
    pub mean_bits_per_weight: f64,
    /// Size of `model.mpz`, when the job wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_bytes: Option<u64>,
    /// original_bytes / archive_bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
    /// The original and model.onnx timed in-process (ONNX jobs with a compact model.onnx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<deploy::latency::Latency>,
    /// The original and model.onnx scored on the job's dataset (`eval` in the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<crate::eval::Evaluation>,
    /// The gate's verdict when the spec has one: passed_gate, failed_gate or not_evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<crate::eval::Quality>,
    /// The search's verdict, goal, trials and chosen candidate (`constraints` / preset auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<serde_json::Value>,
    /// `"analyze": true`: how many layers and strengths `sensitivity.json` measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<serde_json::Value>,
    /// What calibration measured on the `calibration` dataset: rows, feed, seconds, and the
    /// tensors GPTQ and static int8 served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<serde_json::Value>,
    /// Fine-tuning: the validation metric before and after, epochs, why it stopped
    /// (`training.json` has every epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<serde_json::Value>,
    /// Distillation: the student's layers and parameters against the teacher's, and the
    /// training's figures as under `finetune`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<serde_json::Value>,
}

/// A job's `calibration` block with the dataset file it names.
pub struct CalibrationInput<'a> {
    pub spec: &'a crate::calibrate::CalibrationSpec,
    pub dataset: &'a Path,
}

/// The datasets a job's blocks name (`eval`, `calibration`, `finetune`), with their files.
#[derive(Default)]
pub struct Data<'a> {
    pub eval: Option<EvalInput<'a>>,
    pub calibration: Option<CalibrationInput<'a>>,
    pub finetune: Option<FinetuneInput<'a>>,
    pub distill: Option<DistillInput<'a>>,
}

/// A job's `distill` block with the dataset files it names.
pub struct DistillInput<'a> {
    pub spec: &'a crate::train::DistillSpec,
    pub dataset: &'a Path,
    pub validation: Option<&'a Path>,
}

/// A job's `finetune` block with the dataset files it names.
pub struct FinetuneInput<'a> {
    pub spec: &'a crate::train::FinetuneSpec,
    pub dataset: &'a Path,
    pub validation: Option<&'a Path>,
}

/// A job's `eval` block with the dataset file it names.
pub struct EvalInput<'a> {
    pub spec: &'a crate::eval::EvalSpec,
    pub dataset: &'a Path,
    /// A search's `sensitivity.json` from an earlier job on the same model and dataset.
    pub cached_sensitivity: Option<&'a serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct ArtifactFile {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub sha256: String,
}

pub struct RunOutput {
    pub summary: Summary,
    pub artifacts: Vec<ArtifactFile>,
    /// A sensitivity table this job's search measured in full (`sensitivity.json`), for the
    /// next search on the same model and dataset.
    pub measured_sensitivity: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    InvalidModel(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Internal(String),
    /// The disk under the data directory is full (ENOSPC/EDQUOT): the attempt is retried
    /// with a backoff, and fails with `insufficient_storage` when none is left.
    #[error("{0}")]
    Storage(String),
}

impl From<FormatError> for RunError {
    fn from(e: FormatError) -> Self {
        if e.is_user_error() {
            RunError::InvalidModel(e.to_string())
        } else {
            RunError::Internal(e.to_string())
        }
    }
}

impl From<CompressError> for RunError {
    fn from(e: CompressError) -> Self {
        match e {
            CompressError::InvalidSpec(m) => RunError::InvalidSpec(m),
            CompressError::InvalidModel(m) => RunError::InvalidModel(m),
            CompressError::Cancelled => RunError::Cancelled,
        }
    }
}

fn write_artifact(dir: &Path, name: String, bytes: &[u8]) -> Result<ArtifactFile, RunError> {
    let path = dir.join(&name);
    std::fs::write(&path, bytes).map_err(|e| {
        if crate::error::is_disk_full(&e) {
            RunError::Storage(format!("write {name}: {e}"))
        } else {
            RunError::Internal(format!("write {name}: {e}"))
        }
    })?;
    Ok(ArtifactFile {
        name,
        path,
        size_bytes: bytes.len() as u64,
        sha256: crate::util::sha256_hex(bytes),
    })
}

/// The share of a searching job's progress the search takes; the chosen pipeline's run the
/// rest.
const SEARCH_SHARE: f64 = 0.8;

/// Progress of an inner stage mapped onto `[lo, hi]` of the job.
struct Span<'a> {
    inner: &'a dyn Control,
    lo: f64,
    hi: f64,
}

impl<'a> Span<'a> {
    fn new(inner: &'a dyn Control, lo: f64, hi: f64) -> Self {
        Span { inner, lo, hi }
    }
}

impl Control for Span<'_> {
    fn progress(&self, fraction: f64, stage: &str) {
        self.inner
            .progress(self.lo + (self.hi - self.lo) * fraction, stage);
    }
    fn detail(&self, detail: serde_json::Value) {
        self.inner.detail(detail)
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled()
    }
    fn tensor_done(&self) {
        self.inner.tensor_done()
    }
}

/// What running the model needs: an eval block with its dataset, and an ONNX model.
fn model_and_data<'a, 'e>(
    input: &Path,
    set: &'a formats::TensorSet,
    eval: Option<&'e EvalInput<'e>>,
    what: &str,
) -> Result<
    (
        &'a formats::onnx::OnnxContainer,
        Vec<u8>,
        crate::eval::run::Dataset,
        &'e crate::eval::EvalSpec,
    ),
    RunError,
> {
    let eval = eval.ok_or_else(|| {
        RunError::InvalidSpec(format!("{what} needs an `eval` block (dataset and metric)"))
    })?;
    let formats::Container::Onnx(container) = &set.container else {
        return Err(RunError::InvalidSpec(format!(
            "{what} runs the model, so it needs an ONNX model"
        )));
    };
    let original = std::fs::read(input).map_err(|e| RunError::Internal(e.to_string()))?;
    let data = std::fs::read(eval.dataset)
        .map_err(|e| RunError::Internal(e.to_string()))
        .and_then(|d| crate::eval::run::Dataset::from_npz(&d).map_err(RunError::InvalidSpec))?;
    Ok((container, original, data, eval.spec))
}

fn search_error(e: crate::search::SearchError) -> RunError {
    match e {
        crate::search::SearchError::Cancelled => RunError::Cancelled,
        crate::search::SearchError::Unrunnable(m) => {
            RunError::InvalidModel(format!("cannot run the original on the dataset: {m}"))
        }
    }
}

/// `"analyze": true`: the sensitivity table (`sensitivity.json`).
fn analyze(
    input: &Path,
    set: &formats::TensorSet,
    max_seconds: f64,
    eval: Option<&EvalInput>,
    ctl: &dyn Control,
) -> Result<serde_json::Value, RunError> {
    let (container, original, data, spec) =
        model_and_data(input, set, eval, "analyze: the sensitivity analysis")?;
    crate::search::analyze(
        &set.tensors,
        container,
        &original,
        &data,
        spec,
        crate::search::DEFAULT_MIN_PARAMS,
        max_seconds,
        ctl,
        (0.0, SEARCH_SHARE),
    )
    .map_err(search_error)
}

/// Runs the job's search and returns the plan it chose (the job's outputs and options kept),
/// with the calibration it measured when the job has a `calibration` block (every quantize
/// setting is then GPTQ, and the chosen plan reuses the statistics).
fn search(
    input: &Path,
    set: &formats::TensorSet,
    plan: &Plan,
    spec: &crate::search::SearchSpec,
    eval: Option<&EvalInput>,
    calibration: Option<&CalibrationInput>,
    ctl: &dyn Control,
) -> Result<
    (
        Plan,
        crate::search::SearchOutcome,
        Option<crate::calibrate::Measured>,
    ),
    RunError,
> {
    let (container, original, data, eval_spec) =
        model_and_data(input, set, eval, "constraints: a search")?;
    let measured = match calibration {
        None => None,
        Some(_) => {
            let needs = compress::method::Needs {
                hessian: true,
                activations: None,
            };
            let targets: Vec<(usize, compress::method::Needs)> =
                crate::search::layer_indices(&set.tensors, spec.min_params)
                    .into_iter()
                    .map(|i| (i, needs))
                    .collect();
            Some(calibrate_targets(input, set, &targets, calibration, ctl)?)
        }
    };
    let block = calibration.map(|c| serde_json::json!({"dataset_id": c.spec.dataset_id}));
    let calibrated =
        measured
            .as_ref()
            .zip(block.clone())
            .map(|(m, block)| crate::search::Calibrated {
                core: &m.core,
                block,
            });
    let found = crate::search::search(
        &set.tensors,
        container,
        &original,
        &data,
        eval_spec,
        spec,
        eval.and_then(|e| e.cached_sensitivity),
        calibrated.as_ref(),
        ctl,
        (0.0, SEARCH_SHARE),
    )
    .map_err(search_error)?;
    if found.pipeline.is_empty() {
        return Err(RunError::InvalidModel(format!(
            "the search found no candidate to return: no layer of at least {} parameters could be compressed and scored",
            spec.min_params
        )));
    }
    let mut chosen_spec = serde_json::json!({"pipeline": found.pipeline});
    if let Some(b) = block {
        chosen_spec["calibration"] = b;
    }
    let mut chosen = compress::parse_plan(&chosen_spec, false)?;
    chosen.outputs = plan.outputs.clone();
    chosen.outputs_explicit = plan.outputs_explicit;
    chosen.latency = plan.latency;
    chosen.deploy = plan.deploy;
    Ok((chosen, found, measured))
}

/// Where a fine-tuning job's training ends in its progress (the compression of the trained
/// weights follows).
const TRAINING_END: f64 = 0.85;

/// For each tensor a pruning step selects, the weights pruning zeroes: the plan up to its last
/// pruning step, run on `tensors` (zeros that a later quantization rounds to are not pruned:
/// they go on training).
fn pruning_masks(
    tensors: &[formats::Tensor],
    plan: &Plan,
) -> Result<Vec<Option<Vec<bool>>>, RunError> {
    let is_prune = |m: &dyn compress::Method| m.kind() == compress::Kind::Prune;
    let Some(prefix) = compress::through_last(plan, is_prune) else {
        return Ok(vec![None; tensors.len()]);
    };
    let pruned = compress::run(tensors, &prefix, &compress::NoControl)?;
    Ok(tensors
        .iter()
        .zip(&pruned.restored)
        .map(|(t, r)| {
            prefix
                .steps
                .iter()
                .any(|s| is_prune(s.method.as_ref()) && s.select.selects(t))
                .then(|| {
                    r.to_f32()
                        .unwrap_or_default()
                        .iter()
                        .map(|v| *v == 0.0)
                        .collect()
                })
        })
        .collect())
}

fn read_dataset(p: &Path) -> Result<crate::eval::run::Dataset, RunError> {
    std::fs::read(p)
        .map_err(|e| RunError::Internal(e.to_string()))
        .and_then(|d| crate::eval::run::Dataset::from_npz(&d).map_err(RunError::InvalidSpec))
}

/// One thread pool of fixed size for training: the same seed gives the same weights.
fn training_pool() -> Result<rayon::ThreadPool, RunError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(TRAINING_THREADS)
        .build()
        .map_err(|e| RunError::Internal(e.to_string()))
}

fn train_error(block: &str) -> impl Fn(crate::train::TrainError) -> RunError + '_ {
    move |e| match e {
        crate::train::TrainError::Cancelled => RunError::Cancelled,
        crate::train::TrainError::Unsupported(m) => RunError::InvalidModel(format!("{block}: {m}")),
        crate::train::TrainError::Failed(m) => RunError::Internal(format!("{block}: {m}")),
    }
}

/// Distillation: cuts a narrower student from the model (each narrowable layer keeps the
/// `width` share of its most important channels, measured on the training rows), trains it
/// on the teacher's outputs, and returns it as the model the job's steps then compress, with
/// `training.json`.
fn distill(
    set: &formats::TensorSet,
    d: &DistillInput,
    ctl: &dyn Control,
) -> Result<(formats::TensorSet, serde_json::Value), RunError> {
    use crate::train::narrow;
    let formats::Container::Onnx(container) = &set.container else {
        return Err(RunError::InvalidSpec(
            "distill runs the model, so it needs an ONNX model".into(),
        ));
    };
    let spec = &d.spec.train;
    let data = read_dataset(d.dataset)?;
    let validation = d.validation.map(read_dataset).transpose()?;
    let mut narrowing = narrow::find(&container.model, &set.tensors);
    if narrowing.cuts.is_empty() {
        return Err(RunError::InvalidModel(format!(
            "distill: no layer of this model can be narrowed yet ({})",
            narrowing.skipped.join("; ")
        )));
    }
    ctl.progress(0.0, "distill: measuring each channel's importance");
    let pool = training_pool()?;
    let features: Vec<(String, usize)> = narrowing
        .cuts
        .iter()
        .map(|c| (c.feature.clone(), c.feature_axis))
        .collect();
    let rms = pool
        .install(|| {
            // Importance is measured on the rows training learns from, never the held-out ones.
            crate::train::channel_rms(
                &container.model,
                &set.tensors,
                &data,
                spec,
                validation.is_some(),
                &features,
                ctl,
            )
        })
        .map_err(train_error("distill"))?;
    narrow::choose(&mut narrowing, &set.tensors, &rms, d.spec.width);
    let mut tensors = narrow::apply(&narrowing, &set.tensors);
    let student = crate::train::Student {
        model: &container.model,
        weights: &tensors,
        params: tensors
            .iter()
            .map(|_| crate::train::Param::default())
            .collect(),
        teacher: (&container.model, &set.tensors),
    };
    let trained = pool
        .install(|| {
            crate::train::finetune(
                student,
                &data,
                validation.as_ref(),
                spec,
                ctl,
                (0.02, TRAINING_END),
            )
        })
        .map_err(train_error("distill"))?;
    for (i, values) in &trained.values {
        tensors[*i].set_f32(values);
    }
    let count = |ts: &[formats::Tensor]| {
        ts.iter()
            .filter(|t| t.dtype.is_float())
            .map(|t| t.len() as u64)
            .sum::<u64>()
    };
    let mut log = trained.log;
    log["student"] = serde_json::json!({
        "width": d.spec.width,
        "layers": narrowing.cuts.iter().map(|c| serde_json::json!({
            "layer": c.layer,
            "into": c.into,
            "channels": c.channels,
            "kept": c.keep.len(),
        })).collect::<Vec<_>>(),
        "not_narrowed": narrowing.skipped,
        "float_parameters": count(&tensors),
        "teacher_float_parameters": count(&set.tensors),
    });
    let container = formats::onnx::resized(container, &tensors)?;
    Ok((
        formats::TensorSet {
            format: set.format,
            tensors,
            container: formats::Container::Onnx(std::sync::Arc::new(container)),
        },
        log,
    ))
}

/// Fine-tunes the model on the job's dataset as the pipeline will store it (pruned under the
/// pipeline's masks, encoded forms by fake quantization), then compresses the trained weights
/// with the pipeline; returns that outcome and `training.json`.
fn retrain(
    set: &formats::TensorSet,
    plan: &Plan,
    f: &FinetuneInput,
    ctl: &dyn Control,
) -> Result<(compress::Outcome, serde_json::Value), RunError> {
    let formats::Container::Onnx(container) = &set.container else {
        return Err(RunError::InvalidSpec(
            "finetune runs the model, so it needs an ONNX model".into(),
        ));
    };
    if let Some(why) = set
        .tensors
        .iter()
        .find_map(|t| compress::untrainable(&t.facts(), plan))
    {
        return Err(RunError::InvalidSpec(format!("finetune: {why}")));
    }
    let data = read_dataset(f.dataset)?;
    let validation = f.validation.map(read_dataset).transpose()?;
    let masks = pruning_masks(&set.tensors, plan)?;
    // Low-rank factors train as factors; the pipeline then factorizes their product again
    // at the same ranks.
    let factors = compress::trained_factors(&set.tensors, plan)?;
    let factored = factors.iter().any(Option::is_some);
    if let Some(t) = set
        .tensors
        .iter()
        .zip(&masks)
        .zip(&factors)
        .find_map(|((t, m), f)| (m.is_some() && f.is_some()).then_some(t))
    {
        return Err(RunError::InvalidSpec(format!(
            "finetune: {:?} is pruned then factorized; the factors of a pruned matrix are not trained yet",
            t.name
        )));
    }
    let sharing = plan.steps.iter().any(|s| s.method.shares_values());
    if factored && sharing {
        return Err(RunError::InvalidSpec(
            "finetune: a pipeline with both value sharing (kmeans) and low-rank factors is not trained yet".into(),
        ));
    }
    let train = |weights: &[formats::Tensor],
                 params: Vec<crate::train::Param>,
                 span: (f64, f64)|
     -> Result<(Vec<formats::Tensor>, serde_json::Value), RunError> {
        let student = crate::train::Student {
            model: &container.model,
            weights,
            params,
            teacher: (&container.model, &set.tensors),
        };
        let trained = training_pool()?
            .install(|| {
                crate::train::finetune(student, &data, validation.as_ref(), f.spec, ctl, span)
            })
            .map_err(train_error("finetune"))?;
        let mut tensors = weights.to_vec();
        for (i, values) in &trained.values {
            tensors[*i].set_f32(values);
        }
        Ok((tensors, trained.log))
    };
    let (tensors, mut log) = if !sharing {
        train(
            &set.tensors,
            trainable(&set.tensors, &masks, plan, None, &factors),
            (0.0, TRAINING_END),
        )?
    } else {
        // Deep Compression's order: the weights retrain under the pruning masks first (the
        // value-sharing steps left out), then the codebooks are built from the retrained
        // weights and their shared values train with the indices fixed.
        let before = compress::without_sharing(plan);
        let half = TRAINING_END / 2.0;
        let (weights, first) = train(
            &set.tensors,
            trainable(&set.tensors, &masks, &before, None, &factors),
            (0.0, half),
        )?;
        let shared = compress::shared_values(&weights, plan)?;
        let (tensors, second) = train(
            &weights,
            trainable(&weights, &masks, plan, Some(&shared), &factors),
            (half, TRAINING_END),
        )?;
        let mut log = second.clone();
        log["validation_before"] = first["validation_before"].clone();
        log["validation_loss_before"] = first["validation_loss_before"].clone();
        log["seconds"] = serde_json::json!(
            first["seconds"].as_f64().unwrap_or(0.0) + second["seconds"].as_f64().unwrap_or(0.0)
        );
        log["phases"] = serde_json::json!([
            {"phase": "weights", "trains": "the weights under the pruning masks, the value-sharing steps left out", "log": first},
            {"phase": "shared_values", "trains": "each codebook's values (a centroid's gradient is the sum over its weights), indices fixed", "log": second},
        ]);
        (tensors, log)
    };
    let before_loss = log["validation_loss_before"].as_f64().unwrap_or(f64::NAN);
    let span = Span::new(ctl, TRAINING_END, 0.9);
    let retrained = if factored {
        compress::run(
            &tensors,
            &compress::pin_ranks(plan, &set.tensors, &factors),
            &span,
        )?
    } else {
        compress::run(&tensors, plan, &span)?
    };
    // Pruning again on the trained weights (whose pruned ones are exact zeros) finds the same
    // masks; say so, or how many weights moved.
    let moved: usize = masks
        .iter()
        .zip(pruning_masks(&tensors, plan)?)
        .filter_map(|(before, after)| Some((before.as_ref()?, after?)))
        .map(|(b, a)| b.iter().zip(&a).filter(|(b, a)| b != a).count())
        .sum();
    log["zeros_moved"] = serde_json::json!(moved);
    // How far any stored weight of the tensors `is` picks is from its trained value.
    let moved_from = |is: &dyn Fn(&formats::Tensor) -> bool| {
        tensors
            .iter()
            .zip(&retrained.restored)
            .filter(|(t, _)| is(t))
            .flat_map(|(t, r)| {
                let (a, b) = (
                    t.to_f32().unwrap_or_default(),
                    r.to_f32().unwrap_or_default(),
                );
                a.into_iter()
                    .zip(b)
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .collect::<Vec<_>>()
            })
            .fold(0.0, f64::max)
    };
    if factored {
        // The product of trained factors has their rank exactly: factorized again at that
        // rank it comes back to float precision.
        let names: std::collections::HashSet<&str> = set
            .tensors
            .iter()
            .zip(&factors)
            .filter(|(_, f)| f.is_some())
            .map(|(t, _)| t.name.as_str())
            .collect();
        log["factors_moved"] = serde_json::json!(moved_from(&|t| names.contains(t.name.as_str())));
    }
    if sharing {
        // k-means again on trained shared values (at most k distinct values per codebook)
        // finds them again.
        log["shared_values_moved"] = serde_json::json!(moved_from(&|t| {
            plan.steps
                .iter()
                .any(|s| s.method.shares_values() && s.select.selects(t))
        }));
    }
    let mut retrained = retrained;
    // No epoch beat the untrained weights on the validation rows (in any phase): the job
    // stores those.
    let gained = |l: &serde_json::Value| l["best_epoch"] != 0;
    let any_gain = gained(&log)
        || log["phases"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| gained(&p["log"])));
    if !any_gain {
        retrained.report.warnings.push(compress::report::Warning::new(
            "finetune_no_gain",
            format!(
                "fine-tuning kept the untrained weights: no epoch lowered the validation loss ({:.6} before training; training stopped on {})",
                before_loss, log["stopped"]
            ),
        ));
    }
    // The trained weights are judged by the validation metric, not by how far they moved
    // from the original (they are meant to).
    let r = &mut retrained.report;
    if r.warnings.iter().any(|w| w.code == "weight_error_high") {
        r.warnings.retain(|w| w.code != "weight_error_high");
        r.notes.push(
            "after fine-tuning, the weights' error figures compare the stored weights with the trained ones; the model is judged by the validation metric (training.json) and the evaluation".into(),
        );
    }
    Ok((retrained, log))
}

/// How each tensor trains: under its pruning mask, through fake quantization where `plan`
/// encodes it, or as shared values (a codebook from `shared`).
fn trainable(
    tensors: &[formats::Tensor],
    masks: &[Option<Vec<bool>>],
    plan: &Plan,
    shared: Option<&[Option<compress::SharedValues>]>,
    factors: &[Option<compress::lowrank::Factors>],
) -> Vec<crate::train::Param> {
    tensors
        .iter()
        .zip(masks)
        .enumerate()
        .map(|(i, (t, mask))| {
            let shared = shared.and_then(|s| s[i].clone());
            let encodes = plan
                .steps
                .iter()
                .any(|s| s.select.selects(t) && s.method.kind() == compress::Kind::Encode);
            type Project = Box<dyn Fn(&[f32]) -> Result<Vec<f32>, String> + Send + Sync>;
            let project = (encodes && shared.is_none()).then(|| {
                let (t, plan) = (t.clone(), plan.clone());
                Box::new(move |v: &[f32]| {
                    compress::project(&t, &plan, v.to_vec()).map_err(|e| e.to_string())
                }) as Project
            });
            crate::train::Param {
                mask: mask.clone(),
                project,
                shared,
                factors: factors[i].clone(),
            }
        })
        .collect()
}

/// A training run's figures for the job summary (`training.json` has every epoch).
fn training_summary(t: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "metric": t["metric"],
        "validation_before": t["validation_before"],
        "validation_after": t["best_validation"],
        "best_epoch": t["best_epoch"],
        "epochs": t["epochs"].as_array().map_or(0, Vec::len),
        "stopped": t["stopped"],
        "seconds": t["seconds"],
        "rows": t["rows"],
    })
}

/// Threads a training run uses (candle's kernels run on this pool).
const TRAINING_THREADS: usize = 2;

/// The share of a calibrating job's progress that calibration takes.
const CALIBRATION_SHARE: f64 = 0.3;

/// Runs the original on the calibration dataset for the steps that need it.
fn calibrate(
    input: &Path,
    set: &formats::TensorSet,
    plan: &Plan,
    calibration: Option<&CalibrationInput>,
    ctl: &dyn Control,
) -> Result<crate::calibrate::Measured, RunError> {
    let targets = compress::calibration_targets(&set.tensors, plan);
    calibrate_targets(input, set, &targets, calibration, ctl)
}

/// Runs the original on the calibration dataset and measures what `targets` need.
fn calibrate_targets(
    input: &Path,
    set: &formats::TensorSet,
    targets: &[(usize, compress::method::Needs)],
    calibration: Option<&CalibrationInput>,
    ctl: &dyn Control,
) -> Result<crate::calibrate::Measured, RunError> {
    let formats::Container::Onnx(container) = &set.container else {
        return Err(RunError::InvalidSpec(
            "calibration runs the model, so it needs an ONNX model".into(),
        ));
    };
    let c = calibration.ok_or_else(|| {
        RunError::InvalidSpec(
            "a calibrated or static quantize step needs a `calibration` block (the dataset to calibrate on)".into(),
        )
    })?;
    let original = std::fs::read(input).map_err(|e| RunError::Internal(e.to_string()))?;
    let data = std::fs::read(c.dataset)
        .map_err(|e| RunError::Internal(e.to_string()))
        .and_then(|d| crate::eval::run::Dataset::from_npz(&d).map_err(RunError::InvalidSpec))?;
    crate::calibrate::measure(
        &original,
        &container.model,
        &set.tensors,
        targets,
        &data,
        c.spec,
        ctl,
        (0.0, CALIBRATION_SHARE),
    )
    .map_err(|e| match e {
        crate::calibrate::CalibrationFailure::Cancelled => RunError::Cancelled,
        crate::calibrate::CalibrationFailure::Unrunnable(m) => RunError::InvalidModel(format!(
            "cannot run the original on the calibration dataset: {m}"
        )),
    })
}

/// Static int8: the weights whose consumers calibration found, the uint8 parameters of the
/// activations around those consumers, and why the other static weights have none.
fn static_plan(
    asked: &[Option<compress::activations::ActivationSpec>],
    m: &crate::calibrate::Measured,
) -> (deploy::onnx::Statics, Vec<String>) {
    use compress::activations::{range, uint8_params};
    let mut statics = deploy::onnx::Statics::default();
    let mut unserved = Vec::new();
    for (i, spec) in asked.iter().enumerate() {
        let Some(spec) = spec else { continue };
        let Some(consumers) = m.consumers.get(&i) else {
            if let Some(why) = m.unquantized.get(&i) {
                unserved.push(why.clone());
            }
            continue;
        };
        statics.weights.insert(i);
        for c in consumers {
            for v in c.quantized_values() {
                if statics.values.iter().any(|(name, _, _)| name == v) {
                    continue;
                }
                if let Some(seen) = m.observed.get(v) {
                    let (lo, hi) = range(seen, spec);
                    let (scale, zero) = uint8_params(lo, hi);
                    statics.values.push((v.clone(), scale, zero));
                }
            }
        }
    }
    (statics, unserved)
}

/// Compresses `input` by `plan` and writes the requested artifacts into `out_dir`.
pub fn execute(
    input: &Path,
    job: &crate::job::JobPlan,
    out_dir: &Path,
    ctl: &dyn Control,
    data: Data,
) -> Result<RunOutput, RunError> {
    let Data {
        eval,
        calibration,
        finetune,
        distill: distill_input,
    } = data;
    ctl.progress(0.0, "reading model");
    let original_bytes = std::fs::metadata(input)
        .map_err(|e| RunError::Internal(e.to_string()))?
        .len();
    let set = formats::read_path(input)?;
    // Distillation replaces the model by a trained student; the job's steps compress that,
    // and the original stays the reference the evaluation and the ratios compare with.
    let (set, distilled) = match &distill_input {
        None => (set, None),
        Some(d) => {
            let (student, log) = distill(&set, d, ctl)?;
            (student, Some(log))
        }
    };
    let distill_span = Span::new(ctl, TRAINING_END, 1.0);
    let ctl: &dyn Control = if distilled.is_some() {
        &distill_span
    } else {
        ctl
    };
    // A search chooses the pipeline first; the job then runs it as if it had been sent.
    let mut search_measured = None;
    let plan = &job.compress;
    let searched = match &job.search {
        None => None,
        Some(s) => {
            let (chosen, found, measured) = search(
                input,
                &set,
                plan,
                s,
                eval.as_ref(),
                calibration.as_ref(),
                ctl,
            )?;
            search_measured = measured;
            Some((chosen, found))
        }
    };
    // An analysis (with a search, the search's own table stands in for it).
    let analysis = match (job.analyze, &searched) {
        (Some(max_seconds), None) => Some(analyze(input, &set, max_seconds, eval.as_ref(), ctl)?),
        _ => None,
    };
    let span;
    let (plan, ctl): (&Plan, &dyn Control) = match &searched {
        None if analysis.is_none() => (plan, ctl),
        None => {
            span = Span::new(ctl, SEARCH_SHARE, 1.0);
            (plan, &span)
        }
        Some((p, _)) => {
            span = Span::new(ctl, SEARCH_SHARE, 1.0);
            (p, &span)
        }
    };
    // A search with calibration measured every layer it varies: its chosen plan reuses that.
    let measured = match (
        plan.needs() == compress::method::Needs::default(),
        search_measured,
    ) {
        (true, _) => None,
        (false, Some(m)) => Some(m),
        (false, None) => Some(calibrate(input, &set, plan, calibration.as_ref(), ctl)?),
    };
    let calibrated_span;
    let (mut outcome, training) = match (&finetune, &measured) {
        // A fine-tuning job trains first, then compresses the trained weights.
        (Some(f), _) => {
            let (retrained, log) = retrain(&set, plan, f, ctl)?;
            (retrained, Some(log))
        }
        (None, None) => (compress::run(&set.tensors, plan, ctl)?, None),
        (None, Some(m)) => {
            calibrated_span = Span::new(ctl, CALIBRATION_SHARE, 1.0);
            let o = compress::run_calibrated(&set.tensors, plan, &calibrated_span, &m.core)?;
            (o, None)
        }
    };
    outcome.report.format = set.format.as_str().into();
    let restored = set.with_tensors(std::mem::take(&mut outcome.restored));
    ctl.progress(0.92, "writing artifacts");
    let ext = set.format.extension();
    let restored_bytes = formats::write_bytes(&restored)?;
    let mut notes = outcome.report.notes.clone();
    let mut warnings = outcome.report.warnings.clone();
    if distilled.is_some() && warnings.iter().any(|w| w.code == "nothing_compressed") {
        // The student is the compression: no step after it is needed.
        warnings.retain(|w| w.code != "nothing_compressed");
        notes.push(
            "no step followed the distillation: model.onnx is the distilled student in float"
                .into(),
        );
    }
    if let Some(t) = distilled.as_ref().filter(|t| t["best_epoch"] == 0) {
        warnings.push(Warning::new(
            "distill_no_gain",
            format!(
                "no epoch of training lowered the student's validation loss ({} before training; training stopped on {}): model.onnx is the narrowed student as cut from the teacher, untrained",
                t["validation_loss_before"], t["stopped"]
            ),
        ));
    }
    if let (Some(c), Some(e)) = (&calibration, &eval) {
        if measured.is_some() && c.spec.dataset_id == e.spec.dataset_id {
            warnings.push(Warning::new(
                "calibrated_on_eval_data",
                format!(
                    "calibration and evaluation use the same dataset ({}): the evaluation scores rows the calibration learned from, so it flatters the model; upload a separate calibration set",
                    c.spec.dataset_id
                ),
            ));
        }
    }
    // Training that learned from (or stopped early on) the rows the evaluation scores.
    let trained_on = finetune
        .as_ref()
        .map(|f| ("finetune", f.spec))
        .or(distill_input.as_ref().map(|d| ("distill", &d.spec.train)));
    if let (Some((block, t)), Some(e)) = (trained_on, &eval) {
        let id = e.spec.dataset_id;
        if t.dataset_id == id || t.validation_dataset_id == Some(id) {
            warnings.push(Warning::new(
                "trained_on_eval_data",
                format!(
                    "{block} and evaluation use the same dataset ({id}): the evaluation scores rows the training learned from or stopped on, so it flatters the model; upload a separate evaluation set"
                ),
            ));
        }
    }
    // Static int8: the ranges of the activations around each static weight's consumers.
    let (statics, unserved) = match &measured {
        Some(m) => static_plan(&outcome.activations, m),
        None => Default::default(),
    };
    let mut statics_written = None;
    // The deployable file: bytes (None: the same bytes as restored) and extension.
    let mut forms: Vec<TensorForm> = Vec::new();
    let mut deploy_doc = serde_json::Value::Null;
    let model = match (&outcome.encoded, &set.container) {
        // A distilled student with no step after it: the student is the deployable model.
        (None, _) if distilled.is_some() => Some((Some(restored_bytes.clone()), ext)),
        (None, _) => None,
        (Some(_), formats::Container::Onnx(c)) => {
            let deployed = deploy::onnx::write(
                c,
                &restored.tensors,
                &outcome.encodings,
                plan.deploy,
                &statics,
            )?;
            forms = deployed.tensors;
            deploy_doc = serde_json::json!({
                "file": "model.onnx",
                "opset": deployed.opset,
                "tensors": forms,
            });
            statics_written = Some(deployed.statics);
            Some((Some(deployed.bytes), "onnx"))
        }
        (Some(enc), _) => {
            let (bytes, mext) = formats::write_encoded(&set, &enc.tensors, &enc.description)?;
            Some((Some(bytes), mext))
        }
    };
    let mut not_static: Vec<String> = unserved;
    if let Some(why) = statics_written.as_ref().and_then(|w| w.refused.clone()) {
        not_static.insert(0, why);
    }
    if !not_static.is_empty() {
        let shown = not_static.len().min(6);
        warnings.push(Warning::new(
            "static_not_applied",
            format!(
                "activations were not quantized where a step asked for static int8 (those weights stay weight-only int8): {}{}",
                not_static[..shown].join("; "),
                if not_static.len() > shown { "; …" } else { "" }
            ),
        ));
    }
    let dense: Vec<&TensorForm> = forms.iter().filter(|f| f.form == "dense").collect();
    if !dense.is_empty() {
        warnings.push(Warning::new(
            "dense_fallback",
            format!(
                "{} encoded tensor(s) stay dense in the deployable file ({}); model.mpz holds them compactly",
                dense.len(),
                dense
                    .iter()
                    .take(5)
                    .map(|f| format!("{}: {}", f.name, f.note.as_deref().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ));
    }
    // Tensors a step changed but that no encoding holds (pruning alone): their zeros are
    // stored densely in every format but the archive.
    let dense_changed = outcome
        .report
        .tensors
        .iter()
        .zip(&outcome.encodings)
        .filter(|(t, e)| e.is_none() && !t.methods.is_empty())
        .count();
    if dense_changed > 0 {
        notes.push(format!(
            "{dense_changed} tensor(s) were changed without an encoding (e.g. unstructured pruning): \
             their zeros are stored densely in model.{ext} and restored.{ext}, which are no smaller \
             for it; model.mpz codes them sparsely"
        ));
    }
    let wants = |o: &str| plan.outputs.iter().any(|x| x == o);
    let archive = if wants("archive") {
        Some(compress::archive::write(
            &set,
            &restored.tensors,
            &outcome.archive,
        )?)
    } else {
        None
    };
    let input_format = set.format;
    // The original tensors are no longer needed: free them before writing artifacts.
    drop(set);
    if input_format == formats::Format::Npy && model.is_some() {
        notes.push("an .npy holds one array, so model.npz carries the codes and scales".into());
    }
    let deployable_bytes = model
        .as_ref()
        .and_then(|(b, _)| b.as_ref().map(|b| b.len()))
        .unwrap_or(restored_bytes.len()) as u64;
    let ratio_of = |bytes: u64| {
        if bytes > 0 {
            original_bytes as f64 / bytes as f64
        } else {
            0.0
        }
    };
    let timed = plan.latency && matches!(&model, Some((Some(_), "onnx")));
    let evaluated = eval.is_some() && input_format == formats::Format::Onnx;
    // The original ONNX bytes, for timing and evaluation: read again rather than kept from
    // parsing, since holding the file through the whole compression would add its size to
    // the peak for every job; read once for both.
    let original = if timed || evaluated {
        Some(std::fs::read(input).map_err(|e| RunError::Internal(e.to_string()))?)
    } else {
        None
    };
    let latency = match (&model, &original) {
        (Some((Some(bytes), "onnx")), Some(original)) if timed => {
            ctl.progress(0.95, "timing the original and model.onnx");
            Some(deploy::latency::compare(original, bytes))
        }
        _ => None,
    };
    // Sub-millisecond differences are noise on a busy machine: warn only beyond both bounds.
    if let Some(l) = latency.as_ref().filter(|l| {
        l.ratio.is_some_and(|r| r > 1.5)
            && l.deployable_ms.unwrap_or(0.0) - l.original_ms.unwrap_or(0.0) > 1.0
    }) {
        warnings.push(Warning::new(
            "slower_than_original",
            format!(
                "model.onnx ran {:.1}x slower than the original in tract ({:.3} ms vs {:.3} ms): \
                 its weights are rebuilt at run time by a runtime that does not fold them",
                l.ratio.unwrap_or(0.0),
                l.deployable_ms.unwrap_or(0.0),
                l.original_ms.unwrap_or(0.0)
            ),
        ));
    }
    let evaluation = match eval {
        None => None,
        Some(e) => Some(match original.as_deref().filter(|_| evaluated) {
            None => crate::eval::Evaluation::skipped(
                e.spec,
                "a weight-only file cannot be run; the report gives weight-space figures only",
            ),
            Some(original) => {
                ctl.progress(
                    0.96,
                    "evaluating the original and model.onnx on the dataset",
                );
                let data = std::fs::read(e.dataset)
                    .map_err(|e| e.to_string())
                    .and_then(|d| crate::eval::run::Dataset::from_npz(&d));
                let candidate = model
                    .as_ref()
                    .and_then(|(b, _)| b.as_deref())
                    .unwrap_or(&restored_bytes[..]);
                match data.map(|data| {
                    crate::eval::evaluate(original, candidate, &data, e.spec, ctl, (0.96, 0.99))
                }) {
                    Err(why) => crate::eval::Evaluation::skipped(e.spec, why),
                    Ok(Ok(ev)) => ev,
                    Ok(Err(crate::eval::EvalFailure::Cancelled)) => {
                        return Err(RunError::Cancelled)
                    }
                    Ok(Err(crate::eval::EvalFailure::Skipped(why))) => {
                        crate::eval::Evaluation::skipped(e.spec, why)
                    }
                }
            }
        }),
    };
    if let Some(why) = evaluation.as_ref().and_then(|e| e.skipped.as_ref()) {
        warnings.push(Warning::new(
            "evaluation_skipped",
            format!("the job asked for an evaluation that could not run: {why}"),
        ));
    }
    let quality = evaluation
        .as_ref()
        .and_then(|e| e.gate.as_ref())
        .map(|g| g.quality);
    if let (Some(crate::eval::Quality::FailedGate), Some(e)) = (quality, &evaluation) {
        warnings.push(Warning::new(
            "failed_gate",
            format!(
                "{} dropped by {:.6} ({:.6} -> {:.6}), beyond the gate's max_metric_drop {}",
                e.metric.name(),
                e.drop.unwrap_or(f64::NAN),
                e.original.unwrap_or(f64::NAN),
                e.compressed.unwrap_or(f64::NAN),
                e.gate.as_ref().map_or(0.0, |g| g.max_metric_drop)
            ),
        ));
    }
    let totals = &outcome.report.totals;
    let summary = Summary {
        original_bytes,
        compressed_bytes: deployable_bytes,
        deployable_bytes,
        ratio: ratio_of(deployable_bytes),
        parameters: totals.parameters,
        nonzero_parameters: totals.nonzero_parameters,
        mean_bits_per_weight: totals.mean_bits_per_weight,
        archive_bytes: archive.as_ref().map(|a| a.len() as u64),
        archive_ratio: archive.as_ref().map(|a| ratio_of(a.len() as u64)),
        warnings: warnings.clone(),
        latency,
        evaluation,
        quality,
        search: searched.as_ref().map(|(_, f)| f.summary.clone()),
        calibration: measured.as_ref().map(|m| {
            let gptq = outcome
                .report
                .tensors
                .iter()
                .filter(|t| {
                    t.details
                        .get("calibration")
                        .is_some_and(|c| c.get("method").is_some())
                })
                .count();
            serde_json::json!({
                "dataset_id": calibration.as_ref().map(|c| c.spec.dataset_id),
                "rows": m.rows,
                "feed": m.feed.map(crate::calibrate::feed_name),
                "seconds": m.seconds,
                "gptq_tensors": gptq,
                "static_tensors": statics.weights.len(),
                "static_activations": statics_written.as_ref().map_or(0, |w| w.activations),
            })
        }),
        distill: distilled.as_ref().map(|t| {
            let mut s = training_summary(t);
            s["student"] = t["student"].clone();
            s
        }),
        finetune: training.as_ref().map(training_summary),
        sensitivity: analysis.as_ref().map(|a| {
            serde_json::json!({
                "layers": a["layers"].as_array().map_or(0, Vec::len),
                "settings": a["settings"].as_array().map_or(0, Vec::len),
                "complete": a["complete"],
                "seconds": a["seconds"],
            })
        }),
    };
    let mut artifacts = Vec::new();
    if wants("model") {
        if let Some((bytes, mext)) = &model {
            let bytes = bytes.as_deref().unwrap_or(&restored_bytes);
            artifacts.push(write_artifact(out_dir, format!("model.{mext}"), bytes)?);
        }
    }
    if let Some(bytes) = &archive {
        artifacts.push(write_artifact(out_dir, "model.mpz".into(), bytes)?);
    }
    let docs: Vec<(&str, &serde_json::Value)> = match (&searched, &analysis) {
        (Some((_, found)), _) => vec![
            ("search.json", &found.doc),
            ("sensitivity.json", &found.sensitivity),
        ],
        (None, Some(a)) => vec![("sensitivity.json", a)],
        (None, None) => Vec::new(),
    };
    let docs: Vec<(&str, &serde_json::Value)> = docs
        .into_iter()
        .chain(
            training
                .as_ref()
                .or(distilled.as_ref())
                .map(|t| ("training.json", t)),
        )
        .collect();
    {
        for (name, doc) in docs {
            let bytes =
                serde_json::to_vec_pretty(doc).map_err(|e| RunError::Internal(e.to_string()))?;
            artifacts.push(write_artifact(out_dir, name.into(), &bytes)?);
        }
    }
    if wants("restored") {
        artifacts.push(write_artifact(
            out_dir,
            format!("restored.{ext}"),
            &restored_bytes,
        )?);
    }
    if wants("report") {
        let mut report = outcome.report;
        report.notes = notes;
        report.warnings = warnings;
        let doc = serde_json::json!({
            "summary": summary,
            "deployable": deploy_doc,
            "artifacts": artifacts.iter().map(|a| serde_json::json!({"name": a.name, "size_bytes": a.size_bytes, "sha256": a.sha256})).collect::<Vec<_>>(),
            "report": report,
        });
        let bytes =
            serde_json::to_vec_pretty(&doc).map_err(|e| RunError::Internal(e.to_string()))?;
        artifacts.push(write_artifact(out_dir, "report.json".into(), &bytes)?);
    }
    ctl.progress(1.0, "done");
    let measured_sensitivity = searched
        .filter(|(_, f)| f.cacheable)
        .map(|(_, f)| f.sensitivity);
    Ok(RunOutput {
        summary,
        artifacts,
        measured_sensitivity,
    })
}
