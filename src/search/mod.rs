//! Sensitivity analysis and accuracy-constrained search (`"constraints"` or preset `auto` in
//! a job spec, with an `eval` block). Each candidate is a real `model.onnx`, built by the
//! compression core and the deploy writer and scored on the dataset in tract, like a job's
//! own evaluation:
//! 1. baselines: every layer at int8 per channel, int8 per tensor, int4 and int3 per channel;
//! 2. sensitivity: each layer alone at each setting of [`LADDER`] (int8, int4 per channel,
//!    int4 in groups of 32 and 128, int3 per channel): bytes saved in `model.onnx` and
//!    metric drop;
//! 3. [`choose`]: per-layer settings from the profile, assuming drops add up; each choice is
//!    verified end to end, and the budget halves after a miss or grows after a pass;
//! 4. the smallest mixed choice that met the goal, with each lone packed width moved to one
//!    another layer uses ([`choose::share`]): layers of one width share one unpacking
//!    subgraph in `model.onnx`.
//!
//! The best candidate that meets the goal is the job's result; when none does, the closest
//! one, with `verdict: "not_met"`. Every candidate is in `search.json` with the Pareto
//! frontier of bytes against metric.

pub mod choose;

use crate::compress::{self, Control};
use crate::deploy;
use crate::eval::run::Dataset;
use crate::eval::{EvalFailure, EvalSpec, Reference};
use crate::formats::onnx::OnnxContainer;
use crate::model::{Role, Tensor};
use choose::{Aim, Measured, Profile};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// What the search aims at (`constraints` in the spec).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The smallest `model.onnx` whose metric drop is at most this.
    Smallest { max_metric_drop: f64 },
    /// The best metric among candidates at least this much smaller than the original.
    BestMetric { min_ratio: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchSpec {
    pub goal: Goal,
    /// Wall-clock bound; the best candidate so far is returned when it runs out.
    pub max_seconds: f64,
    /// Layers smaller than this stay as they are.
    pub min_params: usize,
}

pub const DEFAULT_MAX_SECONDS: f64 = 600.0;
/// Preset `auto`: the smallest model within this drop of the original's metric.
pub const AUTO_MAX_METRIC_DROP: f64 = 0.01;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Constraints {
    max_metric_drop: Option<f64>,
    min_ratio: Option<f64>,
    objective: Option<String>,
    min_params: Option<usize>,
}

impl SearchSpec {
    /// `constraints` and `max_seconds` of a spec; `auto` is preset `auto` (a default goal).
    pub fn parse(
        constraints: Option<&Value>,
        max_seconds: Option<&Value>,
        auto: bool,
    ) -> Result<Option<SearchSpec>, (String, String)> {
        let max_seconds = match max_seconds {
            None => DEFAULT_MAX_SECONDS,
            Some(v) => v
                .as_f64()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
                .ok_or_else(|| {
                    (
                        "max_seconds".to_string(),
                        "must be a number of seconds in (0, 86400]".to_string(),
                    )
                })?,
        };
        let Some(c) = constraints else {
            return Ok(auto.then_some(SearchSpec {
                goal: Goal::Smallest {
                    max_metric_drop: AUTO_MAX_METRIC_DROP,
                },
                max_seconds,
                min_params: DEFAULT_MIN_PARAMS,
            }));
        };
        let c: Constraints = serde_path_to_error::deserialize(c.clone()).map_err(|e| {
            (
                format!("constraints.{}", e.path()),
                e.into_inner().to_string(),
            )
        })?;
        let err = |f: &str, m: &str| (format!("constraints.{f}"), m.to_string());
        let goal = match (c.max_metric_drop, c.min_ratio, c.objective.as_deref()) {
            (Some(d), None, None | Some("smallest")) => {
                if !d.is_finite() || d < 0.0 {
                    return Err(err("max_metric_drop", "must be a number ≥ 0"));
                }
                Goal::Smallest { max_metric_drop: d }
            }
            (None, Some(r), None | Some("best_metric")) => {
                if !r.is_finite() || r <= 1.0 {
                    return Err(err("min_ratio", "must be a number > 1"));
                }
                Goal::BestMetric { min_ratio: r }
            }
            (Some(_), Some(_), _) => {
                return Err(err(
                    "min_ratio",
                    "give max_metric_drop (objective smallest) or min_ratio (objective best_metric), not both",
                ))
            }
            (None, None, _) => {
                return Err(err(
                    "max_metric_drop",
                    "a goal is required: max_metric_drop or min_ratio",
                ))
            }
            (Some(_), None, _) => {
                return Err(err(
                    "objective",
                    "with max_metric_drop the objective is \"smallest\"",
                ))
            }
            (None, Some(_), _) => {
                return Err(err(
                    "objective",
                    "with min_ratio the objective is \"best_metric\"",
                ))
            }
        };
        Ok(Some(SearchSpec {
            goal,
            max_seconds,
            min_params: c.min_params.unwrap_or(DEFAULT_MIN_PARAMS),
        }))
    }
}

const INT8: &str =
    r#"{"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "channel"}"#;
const INT8_TENSOR: &str =
    r#"{"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "tensor"}"#;
const INT4: &str =
    r#"{"method": "quantize", "bits": 4, "scheme": "symmetric", "granularity": "channel"}"#;
const INT3: &str =
    r#"{"method": "quantize", "bits": 3, "scheme": "symmetric", "granularity": "channel"}"#;
const INT4_G32: &str = r#"{"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 32}"#;
const INT4_G128: &str = r#"{"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 128}"#;

/// Settings a layer can take in the search, as pipeline steps (without their selection).
pub const LADDER: &[(&str, &str)] = &[
    ("int8", INT8),
    ("int4", INT4),
    ("int4-g32", INT4_G32),
    ("int4-g128", INT4_G128),
    ("int3", INT3),
];

/// The strengths `"analyze": true` measures each layer at (NNI's SensitivityAnalysis and
/// Distiller's, as a job): bits, unstructured sparsity, low-rank energy.
pub const ANALYSIS: &[(&str, &str)] = &[
    ("int8", INT8),
    (
        "int6",
        r#"{"method": "quantize", "bits": 6, "scheme": "symmetric", "granularity": "channel"}"#,
    ),
    ("int4", INT4),
    ("int4-g32", INT4_G32),
    ("int3", INT3),
    (
        "int2",
        r#"{"method": "quantize", "bits": 2, "scheme": "symmetric", "granularity": "channel"}"#,
    ),
    (
        "sparsity-0.3",
        r#"{"method": "prune", "sparsity": 0.3, "scope": "tensor"}"#,
    ),
    (
        "sparsity-0.5",
        r#"{"method": "prune", "sparsity": 0.5, "scope": "tensor"}"#,
    ),
    (
        "sparsity-0.7",
        r#"{"method": "prune", "sparsity": 0.7, "scope": "tensor"}"#,
    ),
    (
        "sparsity-0.9",
        r#"{"method": "prune", "sparsity": 0.9, "scope": "tensor"}"#,
    ),
    ("energy-0.99", r#"{"method": "lowrank", "energy": 0.99}"#),
    ("energy-0.95", r#"{"method": "lowrank", "energy": 0.95}"#),
    ("energy-0.9", r#"{"method": "lowrank", "energy": 0.9}"#),
];

/// The uniform candidates verified first. Besides the int8 references, int4 and int3 on
/// every layer: weights of one bit width share one unpacking subgraph in `model.onnx`, a
/// saving the per-layer profile (each layer alone pays for its own) cannot predict.
const BASELINES: &[(&str, &str)] = &[
    ("int8 per channel, every layer", INT8),
    ("int8 per tensor, every layer", INT8_TENSOR),
    ("int4 per channel, every layer", INT4),
    ("int3 per channel, every layer", INT3),
];

/// Layers smaller than this stay as they are in a search or an analysis. Lower than a
/// plain job's floor ([`compress::DEFAULT_MIN_PARAMS`]): the search measures what each
/// small layer costs in metric and saves in bytes instead of sparing it on principle, and
/// in a small model the small layers are a large share (mnist-8's first convolution, 200
/// weights, is 800 of the 4,409 bytes a 6× smaller file may take).
pub const DEFAULT_MIN_PARAMS: usize = 128;

/// The width a setting's codes are packed at in `model.onnx` (None: stored as bytes).
fn packed_width(text: &str) -> Option<u8> {
    let step = step_json(text);
    let bits = step.get("bits").and_then(Value::as_u64)?;
    (step.get("method") == Some(&json!("quantize")) && bits < 8).then_some(bits as u8)
}

fn step_json(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// One end-to-end candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub name: String,
    /// Layer → setting label, for the layers it compresses.
    pub settings: Vec<(String, String)>,
    pub bytes: u64,
    pub ratio: f64,
    pub metric: Option<f64>,
    pub drop: Option<f64>,
    pub meets: bool,
    /// On the Pareto frontier of bytes (smaller) against metric drop (smaller).
    pub frontier: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    #[serde(skip)]
    pipeline: Vec<Value>,
}

/// A layer's row in the sensitivity table.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSensitivity {
    pub name: String,
    pub parameters: u64,
    pub role: &'static str,
    /// One per [`LADDER`] setting measured: label, bytes saved, metric drop.
    pub settings: Vec<Value>,
}

pub struct SearchOutcome {
    /// The chosen candidate's pipeline; the job runs it as if the user had sent it.
    pub pipeline: Vec<Value>,
    /// `search.json`.
    pub doc: Value,
    /// `sensitivity.json`.
    pub sensitivity: Value,
    /// The short form for the job's summary.
    pub summary: Value,
    /// The table was measured by this search, on every layer: worth keeping for the next.
    pub cacheable: bool,
}

/// Why a search ended without a result.
#[derive(Debug)]
pub enum SearchError {
    Cancelled,
    /// The original could not be run on the dataset.
    Unrunnable(String),
}

/// The pipeline that gives each named layer its setting (one step per setting, the layers
/// named exactly in `include`).
fn pipeline_of(settings: &[(String, String)], steps: &[(&str, &str)]) -> Vec<Value> {
    let mut out = Vec::new();
    for (label, text) in steps {
        let names: Vec<Value> = settings
            .iter()
            .filter(|(_, l)| l == label)
            .map(|(n, _)| Value::String(glob::Pattern::escape(n)))
            .collect();
        if names.is_empty() {
            continue;
        }
        let mut step = step_json(text);
        step.insert("include".into(), Value::Array(names));
        step.insert("min_params".into(), json!(1));
        out.push(Value::Object(step));
    }
    out
}

struct Ctx<'a> {
    tensors: &'a [Tensor],
    container: &'a OnnxContainer,
    original_bytes: u64,
    data: &'a Dataset,
    eval: &'a EvalSpec,
    reference: Reference,
    ctl: &'a dyn Control,
    calibration: Option<&'a Calibrated<'a>>,
}

/// A search with calibration data: every quantize setting is GPTQ on it.
pub struct Calibrated<'a> {
    /// The statistics measured for every layer the search varies.
    pub core: &'a compress::Calibration,
    /// The spec's `calibration` block, which the chosen pipeline needs when resubmitted.
    pub block: Value,
}

/// A control for the trials' compression runs: cancellation passes through, progress does
/// not (the search reports its own).
struct Quiet<'a>(&'a dyn Control);
impl Control for Quiet<'_> {
    fn progress(&self, _: f64, _: &str) {}
    fn cancelled(&self) -> bool {
        self.0.cancelled()
    }
}

/// The indices of the layers a search varies (what its calibration measures).
pub fn layer_indices(tensors: &[Tensor], min_params: usize) -> Vec<usize> {
    let layers = layers_of(tensors, min_params);
    (0..tensors.len())
        .filter(|&i| layers.iter().any(|t| std::ptr::eq(*t, &tensors[i])))
        .collect()
}

/// The layers a search or an analysis varies: float weights and embeddings of rank ≥ 2 with
/// at least `min_params` values.
fn layers_of(tensors: &[Tensor], min_params: usize) -> Vec<&Tensor> {
    tensors
        .iter()
        .filter(|t| {
            t.dtype.is_float()
                && t.shape.len() >= 2
                && matches!(t.role, Role::Weight | Role::Embedding)
                && t.len() >= min_params.max(1)
        })
        .collect()
}

impl<'a> Ctx<'a> {
    /// Runs the original on the dataset once, for every trial to be scored against.
    fn new(
        tensors: &'a [Tensor],
        container: &'a OnnxContainer,
        original: &[u8],
        data: &'a Dataset,
        eval: &'a EvalSpec,
        ctl: &'a dyn Control,
        at: f64,
    ) -> Result<Ctx<'a>, SearchError> {
        let reference =
            Reference::compute(original, data, eval, ctl, (at, at)).map_err(|e| match e {
                EvalFailure::Cancelled => SearchError::Cancelled,
                EvalFailure::Skipped(m) => SearchError::Unrunnable(m),
            })?;
        Ok(Ctx {
            tensors,
            container,
            original_bytes: original.len() as u64,
            data,
            eval,
            reference,
            ctl,
            calibration: None,
        })
    }

    /// [`pipeline_of`], with GPTQ in every quantize step when the search has calibration data.
    fn pipeline(&self, settings: &[(String, String)], steps: &[(&str, &str)]) -> Vec<Value> {
        let mut pipeline = pipeline_of(settings, steps);
        if self.calibration.is_some() {
            for step in &mut pipeline {
                if step["method"] == "quantize" {
                    step["calibrated"] = Value::Bool(true);
                }
            }
        }
        pipeline
    }

    /// Each layer alone at each setting: bytes saved in `model.onnx` and metric drop, until
    /// `out_of_time` (then the rest stay unmeasured and the profile is incomplete).
    fn profile(
        &self,
        layers: &[&Tensor],
        settings: &[(&str, &str)],
        out_of_time: &dyn Fn() -> bool,
        done: &mut dyn FnMut(),
    ) -> Result<(Profile, Vec<LayerSensitivity>, bool), SearchError> {
        let mut profile: Profile = Vec::with_capacity(layers.len());
        let mut table = Vec::with_capacity(layers.len());
        let mut complete = true;
        for t in layers {
            let mut row = Vec::with_capacity(settings.len());
            let mut cells = Vec::new();
            for (label, _) in settings {
                if out_of_time() {
                    complete = false;
                    row.push(None);
                    continue;
                }
                let pipeline = self.pipeline(&[(t.name.clone(), label.to_string())], settings);
                let m = match self.trial(&pipeline) {
                    Ok((bytes, metric, Some(drop))) => {
                        let saved = self.original_bytes as i64 - bytes as i64;
                        cells.push(json!({"setting": label, "bytes_saved": saved, "metric": metric, "drop": drop}));
                        Some(Measured { saved, drop })
                    }
                    Ok((_, _, None)) => None,
                    Err(TrialError::Cancelled) => return Err(SearchError::Cancelled),
                    Err(TrialError::Failed(why)) => {
                        cells.push(json!({"setting": label, "failed": why}));
                        None
                    }
                };
                row.push(m);
                done();
            }
            profile.push(row);
            table.push(LayerSensitivity {
                name: t.name.clone(),
                parameters: t.len() as u64,
                role: t.role.name(),
                settings: cells,
            });
        }
        Ok((profile, table, complete))
    }

    /// Builds `model.onnx` for the pipeline and scores it: (bytes, metric, drop).
    fn trial(&self, pipeline: &[Value]) -> Result<(u64, Option<f64>, Option<f64>), TrialError> {
        let mut spec = json!({"pipeline": pipeline, "outputs": ["model"], "latency": false});
        let none = compress::Calibration::default();
        let core = match self.calibration {
            Some(c) => {
                spec["calibration"] = c.block.clone();
                c.core
            }
            None => &none,
        };
        let plan =
            compress::parse_plan(&spec, false).map_err(|e| TrialError::Failed(e.to_string()))?;
        let quiet = Quiet(self.ctl);
        let outcome =
            compress::run_calibrated(self.tensors, &plan, &quiet, core).map_err(|e| match e {
                compress::CompressError::Cancelled => TrialError::Cancelled,
                e => TrialError::Failed(e.to_string()),
            })?;
        let bytes = deploy::onnx::write(
            self.container,
            &outcome.restored,
            &outcome.encodings,
            plan.deploy,
            &deploy::onnx::Statics::default(),
        )
        .map_err(|e| TrialError::Failed(e.to_string()))?
        .bytes;
        drop(outcome);
        let e = self
            .reference
            .score(&bytes, self.data, self.eval, &quiet, (0.0, 0.0))
            .map_err(|e| match e {
                EvalFailure::Cancelled => TrialError::Cancelled,
                EvalFailure::Skipped(m) => TrialError::Failed(m),
            })?;
        Ok((bytes.len() as u64, e.compressed, e.drop))
    }
}

enum TrialError {
    Cancelled,
    Failed(String),
}

fn meets(goal: Goal, ratio: f64, drop: Option<f64>) -> bool {
    match goal {
        Goal::Smallest { max_metric_drop } => drop.is_some_and(|d| d <= max_metric_drop),
        Goal::BestMetric { min_ratio } => ratio >= min_ratio && drop.is_some(),
    }
}

/// Marks the candidates no other beats on both bytes and drop.
fn mark_frontier(cands: &mut [Candidate]) {
    let points: Vec<Option<(u64, f64)>> =
        cands.iter().map(|c| c.drop.map(|d| (c.bytes, d))).collect();
    for (i, c) in cands.iter_mut().enumerate() {
        c.frontier = match points[i] {
            None => false,
            Some((b, d)) => !points.iter().enumerate().any(|(j, p)| {
                j != i && p.is_some_and(|(b2, d2)| b2 <= b && d2 <= d && (b2 < b || d2 < d))
            }),
        };
    }
}

/// The index of the result: the best candidate that meets the goal, else the closest.
fn pick(goal: Goal, cands: &[Candidate]) -> Option<usize> {
    let scored: Vec<(usize, &Candidate)> = cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.drop.is_some())
        .collect();
    let met = scored.iter().filter(|(_, c)| c.meets);
    let best_met = match goal {
        Goal::Smallest { .. } => met.min_by_key(|(_, c)| c.bytes).map(|(i, _)| *i),
        Goal::BestMetric { .. } => met
            .min_by(|a, b| {
                a.1.drop
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.1.drop.unwrap_or(f64::MAX))
            })
            .map(|(i, _)| *i),
    };
    best_met.or_else(|| match goal {
        Goal::Smallest { .. } => scored
            .iter()
            .min_by(|a, b| {
                a.1.drop
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.1.drop.unwrap_or(f64::MAX))
            })
            .map(|(i, _)| *i),
        Goal::BestMetric { .. } => scored.iter().min_by_key(|(_, c)| c.bytes).map(|(i, _)| *i),
    })
}

fn sensitivity_doc(
    ctx: &Ctx,
    settings: &[(&str, &str)],
    table: &[LayerSensitivity],
    complete: bool,
    seconds: f64,
) -> Value {
    json!({
        "metric": ctx.eval.metric,
        "dataset_id": ctx.eval.dataset_id,
        "original_bytes": ctx.original_bytes,
        "complete": complete,
        "seconds": seconds,
        "settings": settings.iter().map(|(l, s)| json!({"label": l, "step": step_json(s)})).collect::<Vec<_>>(),
        "layers": table,
    })
}

/// `"analyze": true`: every layer of at least `min_params` values alone at each strength of
/// [`ANALYSIS`], scored on the dataset, within `max_seconds`. Returns `sensitivity.json`.
#[allow(clippy::too_many_arguments)]
pub fn analyze(
    tensors: &[Tensor],
    container: &OnnxContainer,
    original: &[u8],
    data: &Dataset,
    eval: &EvalSpec,
    min_params: usize,
    max_seconds: f64,
    ctl: &dyn Control,
    span: (f64, f64),
) -> Result<Value, SearchError> {
    let started = Instant::now();
    ctl.progress(span.0, "sensitivity: running the original on the dataset");
    let ctx = Ctx::new(tensors, container, original, data, eval, ctl, span.0)?;
    let layers = layers_of(tensors, min_params);
    let planned = (layers.len() * ANALYSIS.len()).max(1);
    let mut trials = 0usize;
    let out_of_time = || started.elapsed().as_secs_f64() >= max_seconds;
    let (_, table, complete) = ctx.profile(&layers, ANALYSIS, &out_of_time, &mut || {
        trials += 1;
        ctl.progress(
            span.0 + (span.1 - span.0) * (trials as f64 / planned as f64).min(1.0),
            &format!("sensitivity: trial {trials} of {planned}"),
        );
    })?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(sensitivity_doc(&ctx, ANALYSIS, &table, complete, seconds))
}

/// What a search's sensitivity table depends on besides the model and the dataset: the key
/// it is cached under.
pub fn cache_key(eval: &EvalSpec, min_params: usize, calibration: Option<uuid::Uuid>) -> String {
    let mut what = json!({
        "metric": eval.metric,
        "output": eval.output,
        "threshold": eval.threshold,
        "feed": eval.feed.map(|f| format!("{f:?}")),
        "min_params": min_params,
        "settings": LADDER,
    });
    // GPTQ settings measure differently; keys of searches without calibration stay as they
    // were.
    if let Some(id) = calibration {
        what["calibration"] = json!(id);
    }
    crate::util::sha256_hex(what.to_string().as_bytes())
}

/// A cached table's profile, when it was measured on these layers with [`LADDER`].
fn profile_from(doc: &Value, layers: &[&Tensor]) -> Option<(Profile, Vec<LayerSensitivity>)> {
    let labels: Vec<&str> = doc["settings"]
        .as_array()?
        .iter()
        .filter_map(|s| s["label"].as_str())
        .collect();
    let rows = doc["layers"].as_array()?;
    if doc["complete"] != true
        || labels != LADDER.iter().map(|(l, _)| *l).collect::<Vec<_>>()
        || rows.len() != layers.len()
    {
        return None;
    }
    let mut profile = Vec::with_capacity(rows.len());
    let mut table = Vec::with_capacity(rows.len());
    for (row, t) in rows.iter().zip(layers) {
        if row["name"].as_str() != Some(t.name.as_str()) {
            return None;
        }
        let cells = row["settings"].as_array()?;
        profile.push(
            LADDER
                .iter()
                .map(|(label, _)| {
                    let c = cells.iter().find(|c| c["setting"] == *label)?;
                    Some(Measured {
                        saved: c["bytes_saved"].as_i64()?,
                        drop: c["drop"].as_f64()?,
                    })
                })
                .collect(),
        );
        table.push(LayerSensitivity {
            name: t.name.clone(),
            parameters: t.len() as u64,
            role: t.role.name(),
            settings: cells.clone(),
        });
    }
    Some((profile, table))
}

/// Runs the search. `span` is the part of the job's progress it may use; `cached` is a
/// `sensitivity.json` an earlier search measured on the same model, dataset and key.
#[allow(clippy::too_many_arguments)]
pub fn search(
    tensors: &[Tensor],
    container: &OnnxContainer,
    original: &[u8],
    data: &Dataset,
    eval: &EvalSpec,
    spec: &SearchSpec,
    cached: Option<&Value>,
    calibration: Option<&Calibrated>,
    ctl: &dyn Control,
    span: (f64, f64),
) -> Result<SearchOutcome, SearchError> {
    let started = Instant::now();
    let out_of_time = || started.elapsed().as_secs_f64() >= spec.max_seconds;
    ctl.progress(span.0, "search: running the original on the dataset");
    let mut ctx = Ctx::new(tensors, container, original, data, eval, ctl, span.0)?;
    ctx.calibration = calibration;
    let layers = layers_of(tensors, spec.min_params);
    let reused = cached.and_then(|doc| profile_from(doc, &layers));
    let from_cache = reused.is_some();
    let measured = if from_cache {
        0
    } else {
        layers.len() * LADDER.len()
    };
    let planned = BASELINES.len() + measured + 7;
    let mut trials = 0usize;
    let mut cands: Vec<Candidate> = Vec::new();
    let report = |trials: usize, cands: &[Candidate]| {
        let best = pick(spec.goal, cands).map(|i| &cands[i]);
        let f = span.0 + (span.1 - span.0) * (trials as f64 / planned as f64).min(1.0);
        let stage = match best {
            Some(b) => format!(
                "search: trial {trials} of {planned}; best so far {:.2}x at drop {:.4}",
                b.ratio,
                b.drop.unwrap_or(f64::NAN)
            ),
            None => format!("search: trial {trials} of {planned}"),
        };
        ctl.progress(f, &stage);
        ctl.detail(serde_json::json!({
            "phase": "search",
            "trial": trials,
            "trials": planned,
            "best_ratio": best.map(|b| b.ratio),
            "best_drop": best.and_then(|b| b.drop),
        }));
    };
    let ratio_of = |b: u64| ctx.original_bytes as f64 / b.max(1) as f64;
    let verify = |name: String,
                  settings: Vec<(String, String)>,
                  steps: &[(&str, &str)],
                  cands: &mut Vec<Candidate>|
     -> Result<(), SearchError> {
        let pipeline = ctx.pipeline(&settings, steps);
        let (bytes, metric, drop, failed) = match ctx.trial(&pipeline) {
            Ok((b, m, d)) => (b, m, d, None),
            Err(TrialError::Cancelled) => return Err(SearchError::Cancelled),
            Err(TrialError::Failed(m)) => (0, None, None, Some(m)),
        };
        let ratio = ratio_of(bytes);
        cands.push(Candidate {
            name,
            meets: failed.is_none() && meets(spec.goal, ratio, drop),
            settings,
            bytes,
            ratio,
            metric,
            drop,
            frontier: false,
            failed,
            pipeline,
        });
        Ok(())
    };
    // 1. Baselines.
    for (label, _) in BASELINES {
        let settings = layers
            .iter()
            .map(|t| (t.name.clone(), label.to_string()))
            .collect();
        verify(label.to_string(), settings, BASELINES, &mut cands)?;
        trials += 1;
        report(trials, &cands);
    }
    // 2. Sensitivity, each layer alone (or as an earlier search measured it).
    let (profile, table, complete) = match reused {
        Some((profile, table)) => (profile, table, true),
        None => ctx.profile(&layers, LADDER, &out_of_time, &mut || {
            trials += 1;
            report(trials, &cands);
        })?,
    };
    let table_complete = complete;
    let mut complete = complete;
    // 3. Choose from the profile and verify; adjust the budget on the outcome.
    let mut scale = 1.0f64;
    // (index in cands, choice) of each mixed round.
    let mut mixed: Vec<(usize, Vec<Option<usize>>)> = Vec::new();
    let seen = |mixed: &[(usize, Vec<Option<usize>>)], choice: &[Option<usize>]| {
        mixed.iter().any(|(_, c)| c == choice)
    };
    let settings_of = |choice: &[Option<usize>]| -> Vec<(String, String)> {
        choice
            .iter()
            .zip(&layers)
            .filter_map(|(c, t)| c.map(|o| (t.name.clone(), LADDER[o].0.to_string())))
            .collect()
    };
    for round in 0..6 {
        if out_of_time() {
            complete = false;
            break;
        }
        let aim = match spec.goal {
            Goal::Smallest { max_metric_drop } => Aim::MostSaved {
                budget: max_metric_drop * scale,
            },
            Goal::BestMetric { min_ratio } => Aim::LeastDrop {
                bytes: (ctx.original_bytes as f64 * (1.0 - 1.0 / min_ratio) * scale).ceil() as i64,
            },
        };
        let choice = choose::choose(&profile, aim);
        if choice.iter().all(Option::is_none) || seen(&mixed, &choice) {
            // Nothing new to try at this budget: grow it once more, or stop.
            if scale > 1.0 && matches!(spec.goal, Goal::Smallest { .. }) {
                break;
            }
            scale *= 2.0;
            continue;
        }
        let settings = settings_of(&choice);
        mixed.push((cands.len(), choice));
        verify(
            format!("mixed, round {}", round + 1),
            settings,
            LADDER,
            &mut cands,
        )?;
        trials += 1;
        report(trials, &cands);
        let last = cands.last().map(|c| c.meets).unwrap_or(false);
        scale = match (spec.goal, last) {
            // Smallest: a pass lets more drop in, a miss takes it out.
            (Goal::Smallest { .. }, true) => scale * 1.5,
            (Goal::Smallest { .. }, false) => scale * 0.5,
            // Best metric: a pass is done; a miss (not small enough) asks for more bytes.
            (Goal::BestMetric { .. }, true) => break,
            (Goal::BestMetric { .. }, false) => scale * 1.1,
        };
    }
    // 4. Widths shared: the smallest mixed candidate that met the goal, with each lone
    //    packed width moved to one another layer uses (see `choose::share`).
    if let (Goal::Smallest { max_metric_drop }, false) = (spec.goal, out_of_time()) {
        let best = mixed
            .iter()
            .filter(|(i, _)| cands[*i].meets)
            .min_by_key(|(i, _)| cands[*i].bytes);
        if let Some((_, choice)) = best {
            let widths: Vec<Option<u8>> =
                LADDER.iter().map(|(_, text)| packed_width(text)).collect();
            let shared = choose::share(&profile, choice, &widths, max_metric_drop);
            if !seen(&mixed, &shared) {
                let settings = settings_of(&shared);
                verify("mixed, widths shared".into(), settings, LADDER, &mut cands)?;
                trials += 1;
                report(trials, &cands);
            }
        }
    }
    mark_frontier(&mut cands);
    let chosen = pick(spec.goal, &cands);
    let verdict = match chosen.map(|i| cands[i].meets) {
        Some(true) => "met",
        _ => "not_met",
    };
    let seconds = started.elapsed().as_secs_f64();
    let goal = match spec.goal {
        Goal::Smallest { max_metric_drop } => {
            json!({"objective": "smallest", "max_metric_drop": max_metric_drop})
        }
        Goal::BestMetric { min_ratio } => {
            json!({"objective": "best_metric", "min_ratio": min_ratio})
        }
    };
    let pipeline = chosen
        .map(|i| cands[i].pipeline.clone())
        .unwrap_or_default();
    let chosen_view = chosen.map(|i| {
        let c = &cands[i];
        json!({"name": c.name, "bytes": c.bytes, "ratio": c.ratio, "metric": c.metric, "drop": c.drop})
    });
    let summary = json!({
        "verdict": verdict,
        "goal": goal,
        "metric": eval.metric,
        "trials": trials,
        "candidates": cands.len(),
        "complete": complete,
        "seconds": seconds,
        "sensitivity_cached": from_cache,
        "calibrated": calibration.is_some(),
        "chosen": chosen_view,
    });
    let sensitivity = sensitivity_doc(&ctx, LADDER, &table, table_complete, seconds);
    let doc = json!({
        "verdict": verdict,
        "goal": goal,
        "metric": eval.metric,
        "dataset_id": eval.dataset_id,
        "calibration": calibration.map(|c| c.block.clone()),
        "original_bytes": ctx.original_bytes,
        "seconds": seconds,
        "complete": complete,
        "chosen": chosen,
        "pipeline": pipeline,
        "candidates": cands,
    });
    Ok(SearchOutcome {
        pipeline,
        doc,
        sensitivity,
        summary,
        cacheable: table_complete && !from_cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_to_a_goal_or_name_the_field() {
        let p = |c: Value| SearchSpec::parse(Some(&c), None, false);
        assert_eq!(
            p(json!({"max_metric_drop": 0.02})).unwrap().unwrap().goal,
            Goal::Smallest {
                max_metric_drop: 0.02
            }
        );
        assert_eq!(
            p(json!({"min_ratio": 8, "objective": "best_metric"}))
                .unwrap()
                .unwrap()
                .goal,
            Goal::BestMetric { min_ratio: 8.0 }
        );
        for (bad, field) in [
            (json!({}), "constraints.max_metric_drop"),
            (json!({"min_ratio": 0.5}), "constraints.min_ratio"),
            (
                json!({"max_metric_drop": 0.01, "objective": "best_metric"}),
                "constraints.objective",
            ),
            (
                json!({"max_metric_drop": 0.01, "bits": 4}),
                "constraints.bits",
            ),
        ] {
            let (f, _) = p(bad.clone()).unwrap_err();
            assert!(f.starts_with(field), "{bad}: {f}");
        }
        let auto = SearchSpec::parse(None, Some(&json!(30)), true)
            .unwrap()
            .unwrap();
        assert_eq!(auto.max_seconds, 30.0);
        assert_eq!(
            auto.goal,
            Goal::Smallest {
                max_metric_drop: AUTO_MAX_METRIC_DROP
            }
        );
        assert!(SearchSpec::parse(None, None, false).unwrap().is_none());
    }

    fn cand(bytes: u64, drop: f64, meets: bool) -> Candidate {
        Candidate {
            name: String::new(),
            settings: Vec::new(),
            bytes,
            ratio: 100.0 / bytes as f64,
            metric: None,
            drop: Some(drop),
            meets,
            frontier: false,
            failed: None,
            pipeline: Vec::new(),
        }
    }

    #[test]
    fn the_frontier_and_the_pick() {
        let mut c = vec![
            cand(10, 0.05, false),
            cand(20, 0.01, true),
            cand(25, 0.02, false), // beaten by the one before on both
            cand(30, 0.0, true),
        ];
        mark_frontier(&mut c);
        let f: Vec<bool> = c.iter().map(|c| c.frontier).collect();
        assert_eq!(f, [true, true, false, true]);
        let smallest = Goal::Smallest {
            max_metric_drop: 0.01,
        };
        assert_eq!(pick(smallest, &c), Some(1));
        // None meets: the closest to the goal.
        for x in c.iter_mut() {
            x.meets = false;
        }
        assert_eq!(pick(smallest, &c), Some(3));
        assert_eq!(pick(Goal::BestMetric { min_ratio: 9.0 }, &c), Some(0));
    }

    #[test]
    fn pipelines_name_layers_exactly() {
        let p = pipeline_of(
            &[
                ("a[0]".into(), "int8".into()),
                ("b".into(), "int4-g32".into()),
                ("c".into(), "int8".into()),
            ],
            LADDER,
        );
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["include"], json!(["a[[]0[]]", "c"]));
        assert_eq!(p[1]["group_size"], 32);
        assert_eq!(p[1]["include"], json!(["b"]));
        let plan = compress::parse_plan(&json!({ "pipeline": p }), false).unwrap();
        assert!(plan.steps[0].select.include[0].matches("a[0]"));
    }
}
