//! The compression core. Methods are pure functions over tensors; this module parses a job's
//! spec into a validated [`Plan`], and [`run`] applies it to a [`TensorSet`]. No HTTP, SQL
//! or file paths here.

pub mod cast;
pub mod prune;
pub mod quantize;
pub mod report;
#[cfg(test)]
pub mod testing;

use crate::formats::{DType, Role, Tensor, TensorSet};
use cast::CastType;
use quantize::{Granularity, Quantized, Scheme};
use report::{Report, TensorReport, Totals};
use serde_json::{Map, Value};

/// Errors of the core: bad specs, bad values in a model, or a cancelled run.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The spec is wrong; the message names the field.
    #[error("{0}")]
    InvalidSpec(String),
    /// The model holds values no method can work with (NaN, infinity).
    #[error("{0}")]
    InvalidModel(String),
    #[error("cancelled")]
    Cancelled,
}

fn spec_err(field: &str, msg: impl std::fmt::Display) -> CompressError {
    CompressError::InvalidSpec(format!("{field}: {msg}"))
}

/// Which tensors a step touches.
#[derive(Debug, Clone)]
pub struct Selector {
    pub include: Vec<glob::Pattern>,
    pub exclude: Vec<glob::Pattern>,
    pub min_params: usize,
}

/// Default floor under which a tensor is left alone: tiny tensors cost nothing to store and
/// are often the most sensitive (first conv, classifier rows).
pub const DEFAULT_MIN_PARAMS: usize = 1024;

impl Selector {
    pub fn selects(&self, t: &Tensor) -> bool {
        if !t.dtype.is_float() || t.len() < self.min_params || t.is_empty() {
            return false;
        }
        if self.exclude.iter().any(|p| p.matches(&t.name)) {
            return false;
        }
        if self.include.is_empty() {
            t.shape.len() >= 2 && matches!(t.role, Role::Weight | Role::Embedding)
        } else {
            self.include.iter().any(|p| p.matches(&t.name))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneScope {
    Tensor,
    Global,
}

#[derive(Debug, Clone)]
pub enum Op {
    Prune {
        sparsity: f32,
        scope: PruneScope,
    },
    Quantize {
        bits: u8,
        scheme: Scheme,
        granularity: Granularity,
    },
    Cast {
        dtype: CastType,
    },
}

impl Op {
    fn label(&self) -> String {
        match self {
            Op::Prune { sparsity, scope } => format!(
                "prune({sparsity},{})",
                if *scope == PruneScope::Global {
                    "global"
                } else {
                    "tensor"
                }
            ),
            Op::Quantize {
                bits,
                scheme,
                granularity,
            } => format!(
                "quantize(int{bits},{},{})",
                if *scheme == Scheme::Affine {
                    "affine"
                } else {
                    "symmetric"
                },
                if *granularity == Granularity::Channel {
                    "channel"
                } else {
                    "tensor"
                }
            ),
            Op::Cast { dtype } => format!(
                "cast({})",
                if *dtype == CastType::Float16 {
                    "float16"
                } else {
                    "bfloat16"
                }
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub op: Op,
    pub select: Selector,
}

/// The artifacts a job can produce.
pub const OUTPUT_NAMES: &[&str] = &["model", "restored", "report"];

/// A validated job spec: steps plus the artifacts asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// The pipeline as JSON (a preset expanded), recorded in the report.
    pub steps_json: Vec<Value>,
    pub outputs: Vec<String>,
    /// True when the caller named the outputs; false means "every artifact that applies".
    pub outputs_explicit: bool,
}

/// Built-in presets, as pipelines.
pub fn preset(name: &str) -> Option<Vec<Value>> {
    let int8 = serde_json::json!({"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "channel"});
    Some(match name {
        "int8" => vec![int8],
        "int8-tensor" => vec![
            serde_json::json!({"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "tensor"}),
        ],
        "prune50" => {
            vec![serde_json::json!({"method": "prune", "sparsity": 0.5, "scope": "tensor"})]
        }
        "prune50-int8" => vec![
            serde_json::json!({"method": "prune", "sparsity": 0.5, "scope": "tensor"}),
            int8,
        ],
        "fp16" => vec![serde_json::json!({"method": "cast", "dtype": "float16"})],
        "bf16" => vec![serde_json::json!({"method": "cast", "dtype": "bfloat16"})],
        _ => return None,
    })
}

pub const PRESET_NAMES: &[&str] = &[
    "int8",
    "int8-tensor",
    "prune50",
    "prune50-int8",
    "fp16",
    "bf16",
];

fn take_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<&'a str>, CompressError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(spec_err(field, "must be a string")),
    }
}

fn take_globs(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Vec<glob::Pattern>, CompressError> {
    let list = match obj.get(key) {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| spec_err(field, "must be a list of glob strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(spec_err(field, "must be a glob string or a list of them")),
    };
    list.iter()
        .map(|g| glob::Pattern::new(g).map_err(|e| spec_err(field, format!("bad glob {g:?}: {e}"))))
        .collect()
}

fn parse_step(index: usize, v: &Value) -> Result<Step, CompressError> {
    let at = |k: &str| format!("pipeline[{index}].{k}");
    let obj = v
        .as_object()
        .ok_or_else(|| spec_err(&format!("pipeline[{index}]"), "must be an object"))?;
    let method = take_str(obj, "method", &at("method"))?
        .ok_or_else(|| spec_err(&at("method"), "is required (prune, quantize or cast)"))?;
    let allowed: &[&str] = match method {
        "prune" => &["sparsity", "scope"],
        "quantize" => &["bits", "scheme", "granularity"],
        "cast" => &["dtype"],
        other => {
            return Err(spec_err(
                &at("method"),
                format!("unknown method {other:?} (prune, quantize or cast)"),
            ))
        }
    };
    for key in obj.keys() {
        let common = ["method", "include", "exclude", "min_params"];
        if !common.contains(&key.as_str()) && !allowed.contains(&key.as_str()) {
            return Err(spec_err(
                &at(key),
                format!("unknown field for method {method:?}"),
            ));
        }
    }
    let min_params = match obj.get("min_params") {
        None => DEFAULT_MIN_PARAMS,
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| spec_err(&at("min_params"), "must be a non-negative integer"))?,
    };
    let select = Selector {
        include: take_globs(obj, "include", &at("include"))?,
        exclude: take_globs(obj, "exclude", &at("exclude"))?,
        min_params,
    };
    let op = match method {
        "prune" => {
            let sparsity = obj
                .get("sparsity")
                .ok_or_else(|| spec_err(&at("sparsity"), "is required"))?
                .as_f64()
                .filter(|s| (0.0..1.0).contains(s))
                .ok_or_else(|| spec_err(&at("sparsity"), "must be a number in [0, 1)"))?;
            let scope = match take_str(obj, "scope", &at("scope"))?.unwrap_or("tensor") {
                "tensor" => PruneScope::Tensor,
                "global" => PruneScope::Global,
                _ => return Err(spec_err(&at("scope"), "must be \"tensor\" or \"global\"")),
            };
            Op::Prune {
                sparsity: sparsity as f32,
                scope,
            }
        }
        "quantize" => {
            let bits = match obj.get("bits") {
                None => 8,
                Some(b) => b
                    .as_u64()
                    .filter(|b| (2..=8).contains(b))
                    .ok_or_else(|| spec_err(&at("bits"), "must be an integer from 2 to 8"))?
                    as u8,
            };
            let scheme = match take_str(obj, "scheme", &at("scheme"))?.unwrap_or("symmetric") {
                "symmetric" => Scheme::Symmetric,
                "affine" => Scheme::Affine,
                _ => {
                    return Err(spec_err(
                        &at("scheme"),
                        "must be \"symmetric\" or \"affine\"",
                    ))
                }
            };
            let granularity =
                match take_str(obj, "granularity", &at("granularity"))?.unwrap_or("channel") {
                    "tensor" => Granularity::Tensor,
                    "channel" => Granularity::Channel,
                    _ => {
                        return Err(spec_err(
                            &at("granularity"),
                            "must be \"tensor\" or \"channel\"",
                        ))
                    }
                };
            Op::Quantize {
                bits,
                scheme,
                granularity,
            }
        }
        _ => {
            let dtype = match take_str(obj, "dtype", &at("dtype"))? {
                Some("float16") => CastType::Float16,
                Some("bfloat16") => CastType::Bfloat16,
                _ => {
                    return Err(spec_err(
                        &at("dtype"),
                        "must be \"float16\" or \"bfloat16\"",
                    ))
                }
            };
            Op::Cast { dtype }
        }
    };
    Ok(Step { op, select })
}

/// Validates a job spec (`preset` or `pipeline`, optional `outputs`). `model_id` is allowed
/// and ignored here; any other key is refused by name.
pub fn parse_spec(spec: &Value) -> Result<Plan, CompressError> {
    let obj = spec
        .as_object()
        .ok_or_else(|| spec_err("spec", "must be a JSON object"))?;
    for key in obj.keys() {
        if !["model_id", "preset", "pipeline", "outputs"].contains(&key.as_str()) {
            return Err(spec_err(
                key,
                "unknown field (expected preset, pipeline, outputs)",
            ));
        }
    }
    let steps_json = match (obj.get("preset"), obj.get("pipeline")) {
        (Some(_), Some(_)) => {
            return Err(spec_err(
                "preset",
                "give either preset or pipeline, not both",
            ))
        }
        (None, None) => return Err(spec_err("pipeline", "a preset or a pipeline is required")),
        (Some(p), None) => {
            let name = p
                .as_str()
                .ok_or_else(|| spec_err("preset", "must be a string"))?;
            preset(name).ok_or_else(|| {
                spec_err(
                    "preset",
                    format!(
                        "unknown preset {name:?} (known: {})",
                        PRESET_NAMES.join(", ")
                    ),
                )
            })?
        }
        (None, Some(Value::Array(steps))) => {
            if steps.is_empty() {
                return Err(spec_err("pipeline", "must hold at least one step"));
            }
            if steps.len() > 64 {
                return Err(spec_err("pipeline", "at most 64 steps"));
            }
            steps.clone()
        }
        (None, Some(_)) => return Err(spec_err("pipeline", "must be a list of steps")),
    };
    let steps = steps_json
        .iter()
        .enumerate()
        .map(|(i, s)| parse_step(i, s))
        .collect::<Result<Vec<_>, _>>()?;
    let (outputs, outputs_explicit) = match obj.get("outputs") {
        None => (OUTPUT_NAMES.iter().map(|s| s.to_string()).collect(), false),
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for (i, v) in a.iter().enumerate() {
                let name = v
                    .as_str()
                    .filter(|n| OUTPUT_NAMES.contains(n))
                    .ok_or_else(|| {
                        spec_err(
                            &format!("outputs[{i}]"),
                            format!("must be one of {}", OUTPUT_NAMES.join(", ")),
                        )
                    })?;
                if !out.iter().any(|o| o == name) {
                    out.push(name.to_string());
                }
            }
            if out.is_empty() {
                return Err(spec_err("outputs", "must name at least one artifact"));
            }
            (out, true)
        }
        Some(_) => return Err(spec_err("outputs", "must be a list")),
    };
    Ok(Plan {
        steps,
        steps_json,
        outputs,
        outputs_explicit,
    })
}

/// How a compressed tensor is stored in `model.<ext>`.
#[derive(Debug, Clone)]
pub enum Encoding {
    Quantized(Quantized),
    Cast { dtype: CastType, bits: Vec<u16> },
}

/// Working state of one selected tensor. Invariant: `encoding`, when present, decodes to
/// exactly `values`.
struct Working {
    values: Vec<f32>,
    encoding: Option<Encoding>,
    methods: Vec<String>,
}

/// Progress reporting and cancellation, checked at every tensor boundary.
pub trait Control {
    fn progress(&self, fraction: f64, stage: &str);
    fn cancelled(&self) -> bool;
    /// A hook for crash tests; does nothing in production.
    fn tensor_done(&self) {}
}

/// A no-op control for callers that need neither.
pub struct NoControl;
impl Control for NoControl {
    fn progress(&self, _: f64, _: &str) {}
    fn cancelled(&self) -> bool {
        false
    }
}

/// What a run produces: the dense restored model, the encoded tensors and the report.
pub struct Outcome {
    pub restored: TensorSet,
    /// Every tensor as stored in `model.<ext>`; None when no step encoded anything.
    pub encoded: Option<EncodedModel>,
    pub report: Report,
}

/// The compact form: tensors plus a JSON description of how to decode them.
pub struct EncodedModel {
    pub tensors: Vec<Tensor>,
    pub description: Value,
}

fn check_finite(t: &Tensor, values: &[f32]) -> Result<(), CompressError> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(CompressError::InvalidModel(format!(
            "tensor {:?} holds a non-finite value ({}) at flat index {i}; fix the weights before compressing",
            t.name, values[i]
        )));
    }
    Ok(())
}

fn decode(enc: &Encoding, shape: &[usize]) -> Vec<f32> {
    match enc {
        Encoding::Quantized(q) => quantize::dequantize(q, shape),
        Encoding::Cast { dtype, bits } => cast::widen(bits, *dtype),
    }
}

/// For each step, the indices of the tensors it touches.
fn select(set: &TensorSet, plan: &Plan) -> Vec<Vec<usize>> {
    plan.steps
        .iter()
        .map(|s| {
            (0..set.tensors.len())
                .filter(|&i| s.select.selects(&set.tensors[i]))
                .collect()
        })
        .collect()
}

/// What a run would do to one tensor, known before any arithmetic.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedTensor {
    pub name: String,
    pub steps: Vec<String>,
    pub parameters: u64,
    pub bytes_before: u64,
    /// Bytes of the tensor's stored form in `model.<ext>` after the run.
    pub estimated_bytes_after: u64,
}

/// The cheap half of a run (tract's `output_facts` before `eval`): which tensors each step
/// touches and the bytes they will take. `run` selects with the same function.
pub fn plan(set: &TensorSet, plan: &Plan) -> Vec<PlannedTensor> {
    let selections = select(set, plan);
    set.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let steps: Vec<&Step> = plan
                .steps
                .iter()
                .zip(&selections)
                .filter(|(_, sel)| sel.contains(&i))
                .map(|(s, _)| s)
                .collect();
            let n = t.len() as u64;
            let encoding = steps
                .iter()
                .rev()
                .find(|s| !matches!(s.op, Op::Prune { .. }));
            let estimated = match encoding.map(|s| &s.op) {
                Some(Op::Quantize {
                    scheme,
                    granularity,
                    ..
                }) => {
                    let channels = match granularity {
                        Granularity::Channel => {
                            t.shape.get(t.channel_axis()).copied().unwrap_or(1) as u64
                        }
                        Granularity::Tensor => 1,
                    };
                    n + channels * if *scheme == Scheme::Affine { 5 } else { 4 }
                }
                Some(Op::Cast { .. }) => n * 2,
                _ => t.data.len() as u64,
            };
            PlannedTensor {
                name: t.name.clone(),
                steps: steps.iter().map(|s| s.op.label()).collect(),
                parameters: n,
                bytes_before: t.data.len() as u64,
                estimated_bytes_after: estimated,
            }
        })
        .collect()
}

/// Applies the plan. Tensors no step selects pass through bit for bit.
pub fn run(set: &TensorSet, plan: &Plan, ctl: &dyn Control) -> Result<Outcome, CompressError> {
    let n = set.tensors.len();
    let mut work: Vec<Option<Working>> = (0..n).map(|_| None).collect();
    let selections = select(set, plan);
    let total_units: usize = selections.iter().map(Vec::len).sum::<usize>().max(1);
    let mut done_units = 0usize;
    for (si, step) in plan.steps.iter().enumerate() {
        let stage = format!("step {}/{}: {}", si + 1, plan.steps.len(), step.op.label());
        for &i in &selections[si] {
            if work[i].is_none() {
                let t = &set.tensors[i];
                let values = t.to_f32().unwrap_or_default();
                check_finite(t, &values)?;
                work[i] = Some(Working {
                    values,
                    encoding: None,
                    methods: Vec::new(),
                });
            }
        }
        if let Op::Prune {
            sparsity,
            scope: PruneScope::Global,
        } = step.op
        {
            if ctl.cancelled() {
                return Err(CompressError::Cancelled);
            }
            let mut slices: Vec<&mut [f32]> = Vec::new();
            for (i, w) in work.iter_mut().enumerate() {
                if let (true, Some(w)) = (selections[si].contains(&i), w.as_mut()) {
                    slices.push(w.values.as_mut_slice());
                }
            }
            let total: usize = slices.iter().map(|s| s.len()).sum();
            prune::prune_smallest(&mut slices, prune::prune_count(total, sparsity));
        }
        for &i in &selections[si] {
            if ctl.cancelled() {
                return Err(CompressError::Cancelled);
            }
            let t = &set.tensors[i];
            let Some(w) = work[i].as_mut() else { continue };
            match &step.op {
                Op::Prune { sparsity, scope } => {
                    if *scope == PruneScope::Tensor {
                        let k = prune::prune_count(w.values.len(), *sparsity);
                        prune::prune_smallest(&mut [w.values.as_mut_slice()], k);
                    }
                    // Keep the encoding consistent: a pruned weight is an exact zero code.
                    match &mut w.encoding {
                        Some(Encoding::Quantized(q)) => {
                            let layout = quantize::ChannelLayout::new(&t.shape, q.axis);
                            for (j, v) in w.values.iter().enumerate() {
                                if *v == 0.0 {
                                    q.codes[j] = q
                                        .zero_points
                                        .get(layout.channel_of(j))
                                        .copied()
                                        .unwrap_or(0);
                                }
                            }
                        }
                        Some(Encoding::Cast { dtype, .. }) => {
                            let d = *dtype;
                            w.encoding = Some(Encoding::Cast {
                                dtype: d,
                                bits: cast::cast_bits(&w.values, d),
                            });
                        }
                        None => {}
                    }
                }
                Op::Quantize {
                    bits,
                    scheme,
                    granularity,
                } => {
                    let axis = (*granularity == Granularity::Channel).then(|| t.channel_axis());
                    let q = quantize::quantize(&w.values, &t.shape, *bits, *scheme, axis);
                    w.values = quantize::dequantize(&q, &t.shape);
                    w.encoding = Some(Encoding::Quantized(q));
                }
                Op::Cast { dtype } => {
                    let bits = cast::cast_bits(&w.values, *dtype);
                    w.values = cast::widen(&bits, *dtype);
                    w.encoding = Some(Encoding::Cast {
                        dtype: *dtype,
                        bits,
                    });
                }
            }
            w.methods.push(step.op.label());
            debug_assert!(w
                .encoding
                .as_ref()
                .is_none_or(|e| decode(e, &t.shape) == w.values));
            done_units += 1;
            ctl.progress(0.9 * done_units as f64 / total_units as f64, &stage);
            ctl.tensor_done();
        }
    }
    ctl.progress(0.9, "writing report");
    Ok(assemble(set, plan, work))
}

fn assemble(set: &TensorSet, plan: &Plan, work: Vec<Option<Working>>) -> Outcome {
    let mut restored = set.clone();
    let mut encoded_tensors = Vec::with_capacity(set.tensors.len());
    let mut description = Map::new();
    let mut reports = Vec::with_capacity(set.tensors.len());
    let mut totals = Totals::default();
    let (mut float_bits, mut float_params) = (0f64, 0u64);
    for (i, (t, w)) in set.tensors.iter().zip(work).enumerate() {
        let params = t.len() as u64;
        let bytes_before = t.data.len() as u64;
        let (bytes_after, nonzero, stats, methods, axis) = match &w {
            None => {
                encoded_tensors.push(t.clone());
                let nonzero = count_nonzero(t);
                (
                    bytes_before,
                    nonzero,
                    report::error_stats(&[], &[]),
                    Vec::new(),
                    None,
                )
            }
            Some(w) => {
                let original = t.to_f32().unwrap_or_default();
                let stats = report::error_stats(&original, &w.values);
                restored.tensors[i].set_f32(&w.values);
                let nonzero = w.values.iter().filter(|v| **v != 0.0).count() as u64;
                let (bytes_after, axis) = match &w.encoding {
                    None => {
                        encoded_tensors.push(restored.tensors[i].clone());
                        (bytes_before, None)
                    }
                    Some(enc) => encode(t, enc, &mut encoded_tensors, &mut description),
                };
                (bytes_after, nonzero, stats, w.methods.clone(), axis)
            }
        };
        if t.dtype.is_float() {
            float_bits += bytes_after as f64 * 8.0;
            float_params += params;
        }
        totals.tensors += 1;
        totals.tensors_compressed += u64::from(!methods.is_empty());
        totals.parameters += params;
        totals.nonzero_parameters += nonzero;
        totals.bytes_before += bytes_before;
        totals.bytes_after += bytes_after;
        reports.push(TensorReport {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype.name().into(),
            role: crate::formats::inventory_role(t.role),
            methods,
            quantization_axis: axis,
            parameters: params,
            nonzero,
            sparsity: if params > 0 {
                1.0 - nonzero as f64 / params as f64
            } else {
                0.0
            },
            bits_per_weight: if params > 0 {
                bytes_after as f64 * 8.0 / params as f64
            } else {
                0.0
            },
            bytes_before,
            bytes_after,
            relative_l2_error: stats.relative_l2_error,
            sqnr_db: stats.sqnr_db,
            max_abs_error: stats.max_abs_error,
        });
    }
    totals.mean_bits_per_weight = if float_params > 0 {
        float_bits / float_params as f64
    } else {
        0.0
    };
    let any_encoded = !description.is_empty();
    let mut notes = Vec::new();
    if plan
        .steps
        .iter()
        .all(|s| set.tensors.iter().all(|t| !s.select.selects(t)))
    {
        notes.push("no tensor matched the pipeline's selection: the model is unchanged".into());
    }
    let report = Report {
        format: set.format.as_str().into(),
        steps: plan.steps_json.clone(),
        tensors: reports,
        totals,
        notes,
    };
    Outcome {
        restored,
        encoded: any_encoded.then(|| EncodedModel {
            tensors: encoded_tensors,
            description: serde_json::json!({"format_version": 1, "tensors": Value::Object(description)}),
        }),
        report,
    }
}

fn count_nonzero(t: &Tensor) -> u64 {
    match t.to_f32() {
        Some(v) => v.iter().filter(|x| **x != 0.0).count() as u64,
        None => {
            let s = t.dtype.size();
            t.data
                .chunks_exact(s)
                .filter(|c| c.iter().any(|b| *b != 0))
                .count() as u64
        }
    }
}

/// Appends the stored form of one encoded tensor; returns its bytes and quantization axis.
fn encode(
    t: &Tensor,
    enc: &Encoding,
    out: &mut Vec<Tensor>,
    desc: &mut Map<String, Value>,
) -> (u64, Option<usize>) {
    let mk = |name: String, dtype: DType, shape: Vec<usize>, data: Vec<u8>| Tensor {
        name,
        dtype,
        shape,
        data,
        role: Role::Other,
        output_axis: None,
    };
    match enc {
        Encoding::Quantized(q) => {
            let codes: Vec<u8> = q.codes.iter().map(|c| *c as u8).collect();
            let scale_name = format!("{}.__scale", t.name);
            let zp_name = format!("{}.__zero_point", t.name);
            let nscales = q.scales.len();
            let scales = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            let mut bytes = (codes.len() + 4 * nscales) as u64;
            out.push(mk(t.name.clone(), DType::I8, t.shape.clone(), codes));
            out.push(mk(scale_name.clone(), DType::F32, vec![nscales], scales));
            if !q.zero_points.is_empty() {
                bytes += q.zero_points.len() as u64;
                out.push(mk(
                    zp_name.clone(),
                    DType::I8,
                    vec![nscales],
                    q.zero_points.iter().map(|z| *z as u8).collect(),
                ));
            }
            desc.insert(
                t.name.clone(),
                serde_json::json!({
                    "encoding": "linear_quantized",
                    "bits": q.bits,
                    "storage": "int8",
                    "scheme": q.scheme,
                    "granularity": if q.axis.is_some() { "channel" } else { "tensor" },
                    "axis": q.axis,
                    "scale": scale_name,
                    "zero_point": if q.zero_points.is_empty() { Value::Null } else { Value::String(zp_name) },
                    "original_dtype": t.dtype.name(),
                    "decode": "w = (q - zero_point) * scale, scale broadcast along axis",
                }),
            );
            (bytes, q.axis)
        }
        Encoding::Cast { dtype, bits } => {
            let (dt, name) = match dtype {
                CastType::Float16 => (DType::F16, "float16"),
                CastType::Bfloat16 => (DType::BF16, "bfloat16"),
            };
            let data: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let bytes = data.len() as u64;
            out.push(mk(t.name.clone(), dt, t.shape.clone(), data));
            desc.insert(
                t.name.clone(),
                serde_json::json!({"encoding": "cast", "dtype": name, "original_dtype": t.dtype.name()}),
            );
            (bytes, None)
        }
    }
}
