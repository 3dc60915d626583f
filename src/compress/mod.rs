//! The compression core. Methods are pure functions over tensors, one module each; `spec`
//! parses a job's spec into a validated [`Plan`], and [`run`] applies it to a model's tensors.
//! No HTTP, SQL or file paths here.

pub mod cast;
pub mod coding;
pub mod huffman;
pub mod kmeans;
pub mod lowrank;
pub mod pack;
pub mod prune;
pub mod quantize;
pub mod report;
pub mod separable;
pub mod spec;
pub mod structured;
pub mod ternary;
#[cfg(test)]
pub mod testing;

use crate::model::{DType, Role, Tensor};
use cast::CastType;
use coding::{CodingStats, Payload, StageBytes};
use kmeans::Clustered;
use lowrank::{Factors, RankRule, SvdAlgorithm};
use quantize::{Granularity, Quantized, Scheme};
use report::{Report, StageTotals, TensorReport, Totals};
use separable::{Separable, Tucker2};
use serde_json::{Map, Value};
pub use spec::{parse_spec, preset, OUTPUT_NAMES, PRESET_NAMES};
use structured::{Dim, Norm};

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

/// Which tensors a step touches.
#[derive(Debug, Clone)]
pub struct Selector {
    pub include: Vec<glob::Pattern>,
    pub exclude: Vec<glob::Pattern>,
    pub min_params: usize,
    /// Only tensors with one of these roles (empty: any role).
    pub roles: Vec<Role>,
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
        if !self.roles.is_empty() {
            if !self.roles.contains(&t.role) {
                return false;
            }
            if self.include.is_empty() {
                return true;
            }
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
    /// Global target, per-layer sparsities from a weight-error sensitivity pass.
    Sensitivity,
}

#[derive(Debug, Clone)]
pub enum Op {
    Prune {
        sparsity: f32,
        scope: PruneScope,
        /// Fraction of each tensor always kept (global and sensitivity scopes).
        min_keep: f32,
    },
    PruneStructured {
        ratio: f32,
        dim: Dim,
        norm: Norm,
    },
    PruneNM {
        n: usize,
        m: usize,
    },
    Quantize {
        bits: u8,
        scheme: Scheme,
        granularity: Granularity,
        /// Group-wise: inputs per scale within each output channel.
        group_size: Option<usize>,
    },
    Kmeans {
        bits: u8,
        /// Bits for convolution kernels, when they differ (Deep Compression: 8 conv / 5 fc).
        conv_bits: Option<u8>,
        granularity: Granularity,
        zero_cluster: bool,
        algorithm: kmeans::Algorithm,
    },
    Binary {
        granularity: Granularity,
    },
    Ternary {
        granularity: Granularity,
        threshold: f32,
    },
    Cast {
        dtype: CastType,
    },
    LowRank {
        rule: RankRule,
        algorithm: SvdAlgorithm,
    },
    Separable {
        rule: RankRule,
    },
    Tucker2 {
        rule: RankRule,
    },
    Huffman,
}

fn gran(g: Granularity) -> &'static str {
    if g == Granularity::Channel {
        "channel"
    } else {
        "tensor"
    }
}

fn rule_label(r: &RankRule) -> String {
    match r {
        RankRule::Rank(k) => format!("rank={k}"),
        RankRule::Energy(e) => format!("energy={e}"),
        RankRule::Ratio(f) => format!("ratio={f}"),
    }
}

impl Op {
    fn label(&self) -> String {
        match self {
            Op::Prune {
                sparsity,
                scope,
                min_keep,
            } => match scope {
                PruneScope::Tensor => format!("prune({sparsity},tensor)"),
                PruneScope::Global => format!("prune({sparsity},global,min_keep={min_keep})"),
                PruneScope::Sensitivity => {
                    format!("prune({sparsity},sensitivity,min_keep={min_keep})")
                }
            },
            Op::PruneStructured { ratio, dim, norm } => format!(
                "prune({},{ratio},{})",
                if *dim == Dim::Output {
                    "output"
                } else {
                    "input"
                },
                if *norm == Norm::L1 { "l1" } else { "l2" }
            ),
            Op::PruneNM { n, m } => format!("prune({n}:{m})"),
            Op::Quantize {
                bits,
                scheme,
                granularity,
                group_size,
            } => format!(
                "quantize(int{bits},{},{})",
                if *scheme == Scheme::Affine {
                    "affine"
                } else {
                    "symmetric"
                },
                match group_size {
                    Some(g) => format!("group {g}"),
                    None => gran(*granularity).to_string(),
                }
            ),
            Op::Kmeans {
                bits,
                conv_bits,
                granularity,
                ..
            } => match conv_bits {
                Some(c) => format!("kmeans({bits} bits,conv {c} bits,{})", gran(*granularity)),
                None => format!("kmeans({bits} bits,{})", gran(*granularity)),
            },
            Op::Binary { granularity } => format!("binary({})", gran(*granularity)),
            Op::Ternary {
                granularity,
                threshold,
            } => format!("ternary({threshold},{})", gran(*granularity)),
            Op::Cast { dtype } => format!("cast({})", dtype.name()),
            Op::LowRank { rule, .. } => format!("lowrank({})", rule_label(rule)),
            Op::Separable { rule } => format!("separable({})", rule_label(rule)),
            Op::Tucker2 { rule } => format!("tucker2({})", rule_label(rule)),
            Op::Huffman => "huffman".into(),
        }
    }
    fn prunes(&self) -> bool {
        matches!(
            self,
            Op::Prune { .. } | Op::PruneStructured { .. } | Op::PruneNM { .. }
        )
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub op: Op,
    pub select: Selector,
}

/// A validated job spec: steps plus the artifacts asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// The pipeline as JSON (a preset expanded), recorded in the report.
    pub steps_json: Vec<Value>,
    pub outputs: Vec<String>,
    /// True when the caller named the outputs; false means "every artifact that applies".
    pub outputs_explicit: bool,
    /// Time the original and the deployable ONNX model in-process (tract) for the summary.
    pub latency: bool,
    /// Which ONNX forms `model.onnx` uses where there is a choice.
    pub deploy: DeployStyle,
}

/// ONNX forms where there is a choice: weights rebuilt by plain ops that a runtime folds once
/// at load (then it runs at the original's speed), or quantized operators that keep integer
/// weights at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployStyle {
    /// int8 folded (`Cast`+`Mul`: paraphrase-MiniLM-L3 runs in 509 ms in onnxruntime against
    /// 673 ms with `DequantizeLinear`, original 520 ms); group-wise int4 MatMul weights as
    /// `MatMulNBits`.
    Auto,
    /// Every weight rebuilt by standard ops (no contrib operators).
    Folded,
    /// `DequantizeLinear` for int8 (opset ≥ 10, per axis ≥ 13) and `MatMulNBits` for
    /// group-wise int4 MatMul weights.
    Operators,
}

/// A convolution kernel: rank ≥ 3 with its output channels on axis 0 (ONNX Conv, PyTorch).
pub fn is_conv(t: &Tensor) -> bool {
    t.shape.len() >= 3 && t.channel_axis() == 0 && t.role == Role::Weight
}
/// How a compressed tensor is stored. Invariant: decoding gives exactly the working values.
#[derive(Debug, Clone)]
pub enum Encoding {
    Quantized(Quantized),
    Cast { dtype: CastType, bits: Vec<u16> },
    Clustered(Clustered),
    LowRank(Factors),
    Separable(Separable),
    Tucker(Tucker2),
}

impl Encoding {
    fn factorized(&self) -> bool {
        matches!(
            self,
            Encoding::LowRank(_) | Encoding::Separable(_) | Encoding::Tucker(_)
        )
    }
}

/// Working state of one selected tensor. Invariant: `encoding`, when present, decodes to
/// exactly `values`.
struct Working {
    values: Vec<f32>,
    encoding: Option<Encoding>,
    methods: Vec<String>,
    huffman: bool,
    /// A pruning step ran on this tensor (Deep Compression's "P" column applies).
    pruned: bool,
    skipped: Vec<String>,
    details: Map<String, Value>,
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

/// What a run produces: the dense restored model, the encoded tensors, the archive payloads
/// and the report.
pub struct Outcome {
    /// The model's tensors with their working values, in order.
    pub restored: Vec<Tensor>,
    /// Every tensor as stored in `model.<ext>`; None when no step encoded anything.
    pub encoded: Option<EncodedModel>,
    /// One payload per tensor, in order, for `model.mpz`. A `Raw` payload without sections
    /// stands for the restored tensor's own bytes.
    pub archive: Vec<Payload>,
    /// Each tensor's encoding, in order (None: stored as its restored values), for the
    /// deployable forms.
    pub encodings: Vec<Option<Encoding>>,
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
        Encoding::Clustered(c) => c.decode(shape),
        Encoding::LowRank(f) => f.reconstruct(),
        Encoding::Separable(s) => s.reconstruct(),
        Encoding::Tucker(t) => t.reconstruct(),
    }
}

/// For each step, the indices of the tensors it touches.
fn select(tensors: &[Tensor], plan: &Plan) -> Vec<Vec<usize>> {
    plan.steps
        .iter()
        .map(|s| {
            (0..tensors.len())
                .filter(|&i| s.select.selects(&tensors[i]))
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
    /// Bytes of the tensor's stored form in `model.<ext>` after the run; for a factorization
    /// whose rank depends on the spectrum (`energy`), the bytes before (an upper bound).
    pub estimated_bytes_after: u64,
}

fn channels_of(t: &Tensor, g: Granularity) -> u64 {
    match g {
        Granularity::Channel => t.shape.get(t.channel_axis()).copied().unwrap_or(1) as u64,
        Granularity::Tensor => 1,
    }
}

/// The cheap half of a run (tract's `output_facts` before `eval`): which tensors each step
/// touches and the bytes they will take. `run` selects with the same function.
pub fn plan(tensors: &[Tensor], plan: &Plan) -> Vec<PlannedTensor> {
    let selections = select(tensors, plan);
    tensors
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
            let before = t.data.len() as u64;
            let encoding = steps
                .iter()
                .rev()
                .find(|s| !s.op.prunes() && !matches!(s.op, Op::Huffman));
            let packed = |bits: u64| (n * bits).div_ceil(8);
            let estimated = match encoding.map(|s| &s.op) {
                Some(Op::Quantize {
                    bits,
                    scheme,
                    granularity,
                    group_size,
                }) => {
                    let ch = match group_size {
                        Some(g) => {
                            quantize::GroupLayout::new(&t.shape, axis_for(t, *granularity), *g)
                                .groups() as u64
                        }
                        None => channels_of(t, *granularity),
                    };
                    packed(u64::from(*bits)) + ch * if *scheme == Scheme::Affine { 5 } else { 4 }
                }
                Some(Op::Binary { granularity }) => packed(1) + 4 * channels_of(t, *granularity),
                Some(Op::Ternary { granularity, .. }) => {
                    packed(2) + 4 * channels_of(t, *granularity)
                }
                Some(Op::Kmeans {
                    bits,
                    conv_bits,
                    granularity,
                    zero_cluster,
                    ..
                }) => {
                    let b = if is_conv(t) {
                        conv_bits.unwrap_or(*bits)
                    } else {
                        *bits
                    };
                    let k = 1u64 << b;
                    // A kept zero needs one more symbol, known only once pruning has run;
                    // assume it when the pipeline prunes this tensor first.
                    let zero = !zero_cluster && steps.iter().any(|s| s.op.prunes());
                    let width = u64::from(pack::width_for((k + u64::from(zero)) as usize));
                    packed(width) + 4 * k * channels_of(t, *granularity)
                }
                Some(Op::Cast { .. }) => n * 2,
                Some(Op::LowRank { rule, .. }) => {
                    let (r, c) = lowrank::matrix_view(&t.shape, t.channel_axis());
                    match rule {
                        RankRule::Energy(_) => before,
                        rule => lowrank::choose_rank(&[], 0.0, *rule, r, c)
                            .map(|k| (k * (r + c)) as u64 * 4)
                            .filter(|b| *b < (r * c) as u64 * 4)
                            .unwrap_or(before),
                    }
                }
                _ => before,
            };
            PlannedTensor {
                name: t.name.clone(),
                steps: steps.iter().map(|s| s.op.label()).collect(),
                parameters: n,
                bytes_before: before,
                estimated_bytes_after: estimated,
            }
        })
        .collect()
}

fn spec_in_run(t: &Tensor, label: &str, why: &str) -> CompressError {
    CompressError::InvalidSpec(format!("tensor {:?}: {label} cannot follow {why}", t.name))
}

/// After a pruning step: make the encoding agree with the new zeros.
fn rezero(w: &mut Working, t: &Tensor, label: &str) -> Result<(), CompressError> {
    match &mut w.encoding {
        None => {}
        Some(Encoding::Quantized(q)) => {
            if q.bits == 1 {
                return Err(spec_in_run(t, label, "binary (it has no zero)"));
            }
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
        Some(Encoding::Clustered(c)) => {
            for (j, v) in w.values.iter().enumerate() {
                if *v == 0.0 {
                    c.indices[j] = c.k as u16;
                    c.zeros_fixed = true;
                }
            }
        }
        Some(_) => return Err(spec_in_run(t, label, "a factorization; prune first")),
    }
    Ok(())
}

fn axis_for(t: &Tensor, g: Granularity) -> Option<usize> {
    (g == Granularity::Channel).then(|| t.channel_axis())
}

/// Applies one non-global step to one tensor.
fn apply(step: &Step, t: &Tensor, w: &mut Working) -> Result<(), CompressError> {
    let label = step.op.label();
    let shape = &t.shape;
    if !step.op.prunes() && !matches!(step.op, Op::Huffman) {
        if let Some(e) = &w.encoding {
            if e.factorized()
                && !matches!(
                    step.op,
                    Op::LowRank { .. } | Op::Separable { .. } | Op::Tucker2 { .. }
                )
            {
                return Err(spec_in_run(
                    t,
                    &label,
                    "a factorization (factors stay float32)",
                ));
            }
        }
    }
    match &step.op {
        Op::Prune {
            sparsity,
            scope: PruneScope::Tensor,
            ..
        } => {
            let k = prune::prune_count(w.values.len(), *sparsity);
            prune::prune_smallest(&mut [w.values.as_mut_slice()], k);
            rezero(w, t, &label)?;
        }
        // Global scopes pruned every tensor before this loop.
        Op::Prune { .. } => rezero(w, t, &label)?,
        Op::PruneStructured { ratio, dim, norm } => {
            let kept = structured::prune_units(
                &mut w.values,
                shape,
                t.channel_axis(),
                *dim,
                *norm,
                *ratio,
            );
            w.details.insert(
                "structure".into(),
                serde_json::json!({
                    "kind": if *dim == Dim::Output { "output_channels" } else { "input_channels" },
                    "units": kept.units,
                    "kept": kept.kept,
                }),
            );
            rezero(w, t, &label)?;
        }
        Op::PruneNM { n, m } => {
            structured::prune_n_m(&mut w.values, shape, t.channel_axis(), *n, *m);
            let view = structured::InputView::new(shape, t.channel_axis());
            w.details.insert(
                "structure".into(),
                serde_json::json!({
                    "kind": format!("{n}:{m}"),
                    "along": "input",
                    "groups_per_line": view.len.div_ceil(*m),
                }),
            );
            rezero(w, t, &label)?;
        }
        Op::Quantize {
            bits,
            scheme,
            granularity,
            group_size,
        } => {
            let axis = axis_for(t, *granularity);
            let q = match group_size {
                Some(g) => quantize::quantize_grouped(&w.values, shape, *bits, *scheme, axis, *g),
                None => quantize::quantize(&w.values, shape, *bits, *scheme, axis),
            };
            w.values = quantize::dequantize(&q, shape);
            w.encoding = Some(Encoding::Quantized(q));
        }
        Op::Binary { granularity } => {
            let q = ternary::binarize(&w.values, shape, axis_for(t, *granularity));
            w.values = quantize::dequantize(&q, shape);
            w.encoding = Some(Encoding::Quantized(q));
        }
        Op::Ternary {
            granularity,
            threshold,
        } => {
            let q = ternary::ternarize(&w.values, shape, axis_for(t, *granularity), *threshold);
            w.values = quantize::dequantize(&q, shape);
            w.encoding = Some(Encoding::Quantized(q));
        }
        Op::Kmeans {
            bits,
            conv_bits,
            granularity,
            zero_cluster,
            algorithm,
        } => {
            let b = if is_conv(t) {
                conv_bits.unwrap_or(*bits)
            } else {
                *bits
            };
            let c = kmeans::cluster(
                &w.values,
                shape,
                b,
                axis_for(t, *granularity),
                !zero_cluster,
                *algorithm,
            );
            let decoded = c.decode(shape);
            // Against the values this step clustered (after any pruning), as k-means defines it.
            let inertia: f64 = w
                .values
                .iter()
                .zip(&decoded)
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum();
            w.values = decoded;
            w.details.insert(
                "kmeans".into(),
                serde_json::json!({
                    "bits": b,
                    "k": c.k,
                    "algorithm": c.algorithm,
                    "zeros_fixed": c.zeros_fixed,
                    "inertia": inertia,
                }),
            );
            w.encoding = Some(Encoding::Clustered(c));
        }
        Op::Cast { dtype } => {
            let bits = cast::cast_bits(&w.values, *dtype);
            w.values = cast::widen(&bits, *dtype);
            w.encoding = Some(Encoding::Cast {
                dtype: *dtype,
                bits,
            });
        }
        Op::LowRank { rule, algorithm } => {
            let (rows, cols) = lowrank::matrix_view(shape, t.channel_axis());
            match lowrank::factorize(&w.values, rows, cols, *rule, *algorithm) {
                Ok((f, info)) => {
                    w.values = f.reconstruct();
                    w.details.insert(
                        "low_rank".into(),
                        serde_json::to_value(&info).unwrap_or_default(),
                    );
                    w.encoding = Some(Encoding::LowRank(f));
                }
                Err(why) => {
                    w.skipped.push(format!("{label}: {why}"));
                    return Ok(());
                }
            }
        }
        Op::Separable { rule } => {
            let outcome = if is_conv(t) {
                separable::separate(&w.values, shape, *rule)
            } else {
                Err("not a convolution kernel".to_string())
            };
            match outcome {
                Ok(s) => {
                    w.values = s.reconstruct();
                    w.details.insert(
                        "separable".into(),
                        serde_json::json!({"rank": s.rank, "cost": s.cost()}),
                    );
                    w.encoding = Some(Encoding::Separable(s));
                }
                Err(why) => {
                    w.skipped.push(format!("{label}: {why}"));
                    return Ok(());
                }
            }
        }
        Op::Tucker2 { rule } => {
            let outcome = if is_conv(t) {
                separable::tucker2(&w.values, shape, *rule)
            } else {
                Err("not a convolution kernel".to_string())
            };
            match outcome {
                Ok(k) => {
                    w.values = k.reconstruct();
                    w.details.insert(
                        "tucker2".into(),
                        serde_json::json!({"rank_out": k.rank_out, "rank_in": k.rank_in, "cost": k.cost()}),
                    );
                    w.encoding = Some(Encoding::Tucker(k));
                }
                Err(why) => {
                    w.skipped.push(format!("{label}: {why}"));
                    return Ok(());
                }
            }
        }
        Op::Huffman => w.huffman = true,
    }
    w.pruned |= step.op.prunes();
    w.methods.push(label);
    Ok(())
}

/// Applies the plan. Tensors no step selects pass through bit for bit.
pub fn run(tensors: &[Tensor], plan: &Plan, ctl: &dyn Control) -> Result<Outcome, CompressError> {
    let n = tensors.len();
    let mut work: Vec<Option<Working>> = (0..n).map(|_| None).collect();
    let selections = select(tensors, plan);
    let total_units: usize = selections.iter().map(Vec::len).sum::<usize>().max(1);
    let mut done_units = 0usize;
    for (si, step) in plan.steps.iter().enumerate() {
        let stage = format!("step {}/{}: {}", si + 1, plan.steps.len(), step.op.label());
        for &i in &selections[si] {
            if work[i].is_none() {
                let t = &tensors[i];
                let values = t.to_f32().unwrap_or_default();
                check_finite(t, &values)?;
                work[i] = Some(Working {
                    values,
                    encoding: None,
                    methods: Vec::new(),
                    huffman: false,
                    pruned: false,
                    skipped: Vec::new(),
                    details: Map::new(),
                });
            }
        }
        if let Op::Prune {
            sparsity,
            scope: scope @ (PruneScope::Global | PruneScope::Sensitivity),
            min_keep,
        } = step.op
        {
            if ctl.cancelled() {
                return Err(CompressError::Cancelled);
            }
            let chosen: Vec<usize> = selections[si].clone();
            for &i in &chosen {
                if let Some(e) = work[i].as_ref().and_then(|w| w.encoding.as_ref()) {
                    if e.factorized() {
                        return Err(spec_in_run(
                            &tensors[i],
                            &step.op.label(),
                            "a factorization; prune first",
                        ));
                    }
                }
            }
            let mut sensitivity: Vec<(usize, f64)> = Vec::new();
            let mut slices: Vec<&mut Vec<f32>> = Vec::new();
            for (i, w) in work.iter_mut().enumerate() {
                if let (true, Some(w)) = (chosen.contains(&i), w.as_mut()) {
                    slices.push(&mut w.values);
                }
            }
            match scope {
                PruneScope::Global => {
                    let total: usize = slices.iter().map(|s| s.len()).sum();
                    let mut views: Vec<&mut [f32]> =
                        slices.into_iter().map(|v| v.as_mut_slice()).collect();
                    prune::prune_global_floor(
                        &mut views,
                        prune::prune_count(total, sparsity),
                        min_keep,
                    );
                }
                _ => {
                    // The sensitivity pass works per output channel: a channel of small
                    // weights (silero's encoder.3 spans 0.09 to 54.9) carries little of its
                    // tensor's energy, and a per-tensor error budget would wipe it out.
                    let layouts: Vec<quantize::ChannelLayout> = chosen
                        .iter()
                        .map(|&i| {
                            let t = &tensors[i];
                            quantize::ChannelLayout::new(&t.shape, Some(t.channel_axis()))
                        })
                        .collect();
                    let channels: Vec<Vec<Vec<f32>>> = slices
                        .iter()
                        .zip(&layouts)
                        .map(|(v, l)| prune::gather_channels(v, l))
                        .collect();
                    let counts = {
                        let views: Vec<&[f32]> = channels
                            .iter()
                            .flat_map(|c| c.iter().map(Vec::as_slice))
                            .collect();
                        prune::sensitivity_counts(&views, sparsity, min_keep)
                    };
                    drop(channels);
                    let mut next = counts.iter();
                    for ((v, l), &i) in slices.into_iter().zip(&layouts).zip(&chosen) {
                        let per_channel: Vec<usize> =
                            next.by_ref().take(l.channels.max(1)).copied().collect();
                        prune::prune_channels(v, l, &per_channel);
                        let removed: usize = per_channel.iter().sum();
                        let len = v.len().max(1);
                        sensitivity.push((i, removed as f64 / len as f64));
                    }
                }
            }
            for (i, fraction) in sensitivity {
                if let Some(w) = work[i].as_mut() {
                    w.details
                        .insert("sensitivity_sparsity".into(), serde_json::json!(fraction));
                }
            }
        }
        for &i in &selections[si] {
            if ctl.cancelled() {
                return Err(CompressError::Cancelled);
            }
            let t = &tensors[i];
            let Some(w) = work[i].as_mut() else { continue };
            apply(step, t, w)?;
            debug_assert!(w
                .encoding
                .as_ref()
                .is_none_or(|e| decode(e, &t.shape) == w.values));
            done_units += 1;
            ctl.progress(0.85 * done_units as f64 / total_units as f64, &stage);
            ctl.tensor_done();
        }
    }
    ctl.progress(0.85, "coding tensors");
    Ok(assemble(tensors, plan, work))
}

fn assemble(tensors: &[Tensor], plan: &Plan, work: Vec<Option<Working>>) -> Outcome {
    let mut restored = tensors.to_vec();
    let mut encoded_tensors = Vec::with_capacity(tensors.len());
    let mut description = Map::new();
    let mut reports = Vec::with_capacity(tensors.len());
    let mut archive = Vec::with_capacity(tensors.len());
    let mut encodings = Vec::with_capacity(tensors.len());
    let mut totals = Totals::default();
    let mut stages = StageTotals::default();
    let (mut float_bits, mut float_params) = (0f64, 0u64);
    for (i, (t, w)) in tensors.iter().zip(work).enumerate() {
        let params = t.len() as u64;
        let bytes_before = t.data.len() as u64;
        let raw = || Payload {
            repr: coding::Repr::Raw,
            sections: Vec::new(),
        };
        let (bytes_after, nonzero, stats, axis, payload, coding_stats, stage): (
            u64,
            u64,
            report::ErrorStats,
            Option<usize>,
            Payload,
            Option<CodingStats>,
            StageBytes,
        ) = match &w {
            None => {
                encoded_tensors.push(t.clone());
                let same = StageBytes {
                    pruned: bytes_before,
                    quantized: bytes_before,
                    huffman: bytes_before,
                };
                (
                    bytes_before,
                    count_nonzero(t),
                    report::error_stats(&[], &[]),
                    None,
                    raw(),
                    None,
                    same,
                )
            }
            Some(w) => {
                let original = t.to_f32().unwrap_or_default();
                let stats = report::error_stats(&original, &w.values);
                restored[i].set_f32(&w.values);
                let nonzero = w.values.iter().filter(|v| **v != 0.0).count() as u64;
                let (bytes_after, axis) = match &w.encoding {
                    None => {
                        encoded_tensors.push(restored[i].clone());
                        (bytes_before, None)
                    }
                    Some(enc) => encode(t, enc, &mut encoded_tensors, &mut description),
                };
                let (mut payload, cstats, stage) = coding::encode(
                    w.encoding.as_ref(),
                    &w.values,
                    &restored[i].data,
                    w.huffman,
                    w.pruned,
                );
                if payload.repr == coding::Repr::Raw {
                    // The archive writer takes the restored bytes: no second copy here.
                    payload.sections.clear();
                }
                (bytes_after, nonzero, stats, axis, payload, cstats, stage)
            }
        };
        let archive_bytes = if payload.repr == coding::Repr::Raw {
            bytes_before
        } else {
            payload.bytes()
        };
        if t.dtype.is_float() {
            float_bits += bytes_after as f64 * 8.0;
            float_params += params;
        }
        totals.tensors += 1;
        totals.parameters += params;
        totals.nonzero_parameters += nonzero;
        totals.bytes_before += bytes_before;
        totals.bytes_after += bytes_after;
        totals.archive_tensor_bytes += archive_bytes;
        stages.add(bytes_before, &stage);
        let (methods, skipped, details) = match w {
            Some(w) => {
                encodings.push(w.encoding);
                (w.methods, w.skipped, w.details)
            }
            None => {
                encodings.push(None);
                (Vec::new(), Vec::new(), Map::new())
            }
        };
        totals.tensors_compressed += u64::from(!methods.is_empty());
        reports.push(TensorReport {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype.name().into(),
            role: t.role.name().to_string(),
            methods,
            skipped,
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
            archive_bytes,
            coding: coding_stats,
            relative_l2_error: stats.relative_l2_error,
            sqnr_db: stats.sqnr_db,
            max_abs_error: stats.max_abs_error,
            details,
        });
        archive.push(payload);
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
        .all(|s| tensors.iter().all(|t| !s.select.selects(t)))
    {
        notes.push("no tensor matched the pipeline's selection: the model is unchanged".into());
    }
    let mut warnings = Vec::new();
    if totals.tensors_compressed == 0 {
        warnings.push(report::Warning::new(
            "nothing_compressed",
            format!(
                "no tensor was compressed: the pipeline selected none of the model's {} tensors ({} parameters); \
                 the artifacts hold the model unchanged",
                tensors.len(),
                totals.parameters
            ),
        ));
    }
    let report = Report {
        format: String::new(),
        steps: plan.steps_json.clone(),
        tensors: reports,
        totals,
        deep_compression: stages.finish(),
        notes,
        warnings,
    };
    Outcome {
        restored,
        encoded: any_encoded.then(|| EncodedModel {
            tensors: encoded_tensors,
            description: serde_json::json!({"format_version": 1, "tensors": Value::Object(description)}),
        }),
        archive,
        encodings,
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

fn f32_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Appends the stored form of one encoded tensor in `model.<ext>`; returns its bytes and
/// quantization axis.
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
    let push_f32 =
        |out: &mut Vec<Tensor>, suffix: &str, shape: Vec<usize>, v: &[f32]| -> (String, u64) {
            let name = format!("{}.__{suffix}", t.name);
            let data = f32_le(v);
            let n = data.len() as u64;
            out.push(mk(name.clone(), DType::F32, shape, data));
            (name, n)
        };
    match enc {
        Encoding::Quantized(q) => {
            let scale_name = format!("{}.__scale", t.name);
            let zp_name = format!("{}.__zero_point", t.name);
            let nscales = q.scales.len();
            let scales = f32_le(&q.scales);
            let (data, storage, stored_shape) = if q.bits == 8 {
                (
                    q.codes.iter().map(|c| *c as u8).collect::<Vec<u8>>(),
                    "int8",
                    t.shape.clone(),
                )
            } else {
                let symbols: Vec<u32> = if q.bits == 1 {
                    q.codes.iter().map(|&c| u32::from(c > 0)).collect()
                } else {
                    let off = 1i32 << (q.bits - 1);
                    q.codes
                        .iter()
                        .map(|&c| (i32::from(c) + off) as u32)
                        .collect()
                };
                let packed = pack::pack(&symbols, q.bits);
                let len = packed.len();
                (packed, "packed", vec![len])
            };
            let mut bytes = (data.len() + 4 * nscales) as u64;
            let dtype = if q.bits == 8 { DType::I8 } else { DType::U8 };
            out.push(mk(t.name.clone(), dtype, stored_shape, data));
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
            let decode = if q.bits == 8 {
                "w = (q - zero_point) * scale, scale broadcast along axis"
            } else if q.bits == 1 {
                "unpack 1-bit symbols s (LSB first); q = 2s - 1; w = q * scale along axis"
            } else {
                "unpack bits-wide symbols s (LSB first); q = s - 2^(bits-1); w = (q - zero_point) * scale along axis"
            };
            desc.insert(
                t.name.clone(),
                serde_json::json!({
                    "encoding": "linear_quantized",
                    "bits": q.bits,
                    "storage": storage,
                    "shape": t.shape,
                    "scheme": q.scheme,
                    "granularity": if q.group_size.is_some() { "group" } else if q.axis.is_some() { "channel" } else { "tensor" },
                    "axis": q.axis,
                    "group_size": q.group_size,
                    "scale": scale_name,
                    "zero_point": if q.zero_points.is_empty() { Value::Null } else { Value::String(zp_name) },
                    "original_dtype": t.dtype.name(),
                    "decode": decode,
                }),
            );
            (bytes, q.axis)
        }
        Encoding::Cast { dtype, bits } => {
            let dt = match dtype {
                CastType::Float16 => DType::F16,
                CastType::Bfloat16 => DType::BF16,
            };
            let data: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let bytes = data.len() as u64;
            out.push(mk(t.name.clone(), dt, t.shape.clone(), data));
            desc.insert(
                t.name.clone(),
                serde_json::json!({"encoding": "cast", "dtype": dtype.name(), "shape": t.shape, "original_dtype": t.dtype.name()}),
            );
            (bytes, None)
        }
        Encoding::Clustered(c) => {
            let width = pack::width_for(c.symbols());
            let symbols: Vec<u32> = c.indices.iter().map(|&i| u32::from(i)).collect();
            let packed = pack::pack(&symbols, width);
            let len = packed.len() as u64;
            out.push(mk(t.name.clone(), DType::U8, vec![packed.len()], packed));
            let groups = c.centroids.len() / c.k.max(1);
            let (book, book_bytes) = push_f32(out, "codebook", vec![groups, c.k], &c.centroids);
            desc.insert(
                t.name.clone(),
                serde_json::json!({
                    "encoding": "codebook",
                    "bits": c.bits,
                    "index_bits": width,
                    "shape": t.shape,
                    "axis": c.axis,
                    "codebook": book,
                    "zero_index": if c.zeros_fixed { Value::from(c.k) } else { Value::Null },
                    "original_dtype": t.dtype.name(),
                    "decode": "unpack index_bits-wide indices i (LSB first); w = 0 if i == zero_index else codebook[group, i], group = index along axis (0 without axis)",
                }),
            );
            (len + book_bytes, c.axis)
        }
        Encoding::LowRank(f) => {
            let (a, na) = push_f32(out, "a", vec![f.rows, f.rank], &f.a);
            let (b, nb) = push_f32(out, "b", vec![f.rank, f.cols], &f.b);
            desc.insert(
                t.name.clone(),
                serde_json::json!({
                    "encoding": "low_rank", "a": a, "b": b, "shape": t.shape,
                    "original_dtype": t.dtype.name(),
                    "decode": "w = (a @ b).reshape(shape)",
                }),
            );
            (na + nb, None)
        }
        Encoding::Separable(s) => {
            let [o, c, kh, kw] = s.shape;
            let (v, nv) = push_f32(out, "v", vec![o, c, kh, s.rank], &s.v);
            let (h, nh) = push_f32(out, "h", vec![o, c, s.rank, kw], &s.h);
            desc.insert(
                t.name.clone(),
                serde_json::json!({
                    "encoding": "separable", "v": v, "h": h, "shape": t.shape,
                    "original_dtype": t.dtype.name(),
                    "decode": "w[o,c] = v[o,c] @ h[o,c] (a kh×1 then a 1×kw convolution)",
                }),
            );
            (nv + nh, None)
        }
        Encoding::Tucker(k) => {
            let (uo, n1) = push_f32(out, "u_out", vec![k.out_channels, k.rank_out], &k.u_out);
            let mut core_shape = vec![k.rank_out, k.rank_in];
            core_shape.extend_from_slice(&t.shape[2..]);
            let (core, n2) = push_f32(out, "core", core_shape, &k.core);
            let (ui, n3) = push_f32(out, "u_in", vec![k.in_channels, k.rank_in], &k.u_in);
            desc.insert(
                t.name.clone(),
                serde_json::json!({
                    "encoding": "tucker2", "u_out": uo, "core": core, "u_in": ui, "shape": t.shape,
                    "original_dtype": t.dtype.name(),
                    "decode": "w = einsum('oa,ab...,cb->oc...', u_out, core, u_in): a 1×1 conv C→R_in, the core conv, a 1×1 conv R_out→O",
                }),
            );
            (n1 + n2 + n3, None)
        }
    }
}
