//! The compression core: the pipeline. Each method is one file implementing
//! [`method::Method`] (registered in [`method::METHODS`]) and the [`form::Form`] it leaves a
//! tensor in; `spec` parses a job's spec into a validated [`Plan`], [`plan`] estimates it,
//! [`check`] refuses impossible orderings, and [`run`] applies it to a model's tensors.
//! No HTTP, SQL or file paths here.

pub mod activations;
pub mod archive;
pub mod cast;
pub mod coding;
pub mod form;
pub mod gptq;
pub mod huffman;
pub mod kmeans;
pub mod lower;
pub mod lowrank;
pub mod method;
pub mod nf4;
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

use crate::model::{Role, Tensor, TensorFacts};
use coding::{CodingStats, Payload, StageBytes};
pub use form::Encoding;
use form::{Parts, Stored};
pub use method::{Applied, Kind, Method, Working};
use report::{Report, StageTotals, TensorReport, Totals};
use serde_json::{Map, Value};
pub use spec::{
    parse_plan, preset, preset_needs_calibration, AUTO_PRESET, OUTPUT_NAMES, PRESET_NAMES,
};
use std::collections::HashMap;
use std::sync::Arc;

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
        self.selects_facts(&t.facts())
    }

    /// The same choice from what an inventory knows of a tensor (no values needed).
    pub fn selects_facts(&self, t: &TensorFacts) -> bool {
        let len = crate::model::element_count(t.shape).unwrap_or(0);
        if !t.dtype.is_float() || len < self.min_params || len == 0 {
            return false;
        }
        if self.exclude.iter().any(|p| p.matches(t.name)) {
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
            self.include.iter().any(|p| p.matches(t.name))
        }
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub method: Arc<dyn Method>,
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
    /// The spec has a `finetune` block: the steps' forms must be trainable.
    pub finetune: bool,
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
/// Progress reporting and cancellation, checked at every tensor boundary.
pub trait Control: Sync {
    fn progress(&self, fraction: f64, stage: &str);
    /// The structured detail of the current phase, for the event streams: a search's
    /// `{trial, trials, best_ratio, best_drop}`, training's `{epoch, epochs, loss,
    /// validation}`. The stage text says the same for pollers.
    fn detail(&self, _detail: serde_json::Value) {}
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
    /// Static int8: for each tensor, in order, the activation ranges its consumers want.
    pub activations: Vec<Option<activations::ActivationSpec>>,
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
            let pruned_first = steps.iter().any(|s| s.method.kind() == Kind::Prune);
            let estimated = steps
                .iter()
                .rev()
                .find(|s| matches!(s.method.kind(), Kind::Encode | Kind::Factorize))
                .and_then(|s| s.method.estimate(t, pruned_first))
                .unwrap_or(before);
            PlannedTensor {
                name: t.name.clone(),
                steps: steps.iter().map(|s| s.method.label()).collect(),
                parameters: n,
                bytes_before: before,
                estimated_bytes_after: estimated,
            }
        })
        .collect()
}

/// Refuses a pipeline in which a step cannot follow the step that last set some tensor's
/// form (e.g. quantizing float32 factors, pruning binary weights). Runs at submit time on the
/// model's inventory, so an impossible pipeline is a 422 and not a failed job.
pub fn check<'a>(
    tensors: impl IntoIterator<Item = TensorFacts<'a>>,
    plan: &Plan,
) -> Result<(), CompressError> {
    for t in tensors {
        let mut current: Option<(usize, &Step)> = None;
        for (i, step) in plan.steps.iter().enumerate() {
            if !step.select.selects_facts(&t) {
                continue;
            }
            if let Some((j, earlier)) = current {
                if let Some(why) = step.method.refuses_after(earlier.method.as_ref()) {
                    return Err(CompressError::InvalidSpec(format!(
                        "pipeline[{i}]: {} cannot follow pipeline[{j}] {why} on tensor {:?}",
                        step.method.label(),
                        t.name
                    )));
                }
            }
            if matches!(step.method.kind(), Kind::Encode | Kind::Factorize) {
                current = Some((i, step));
            }
        }
    }
    Ok(())
}

/// What the runner measured on calibration data for the core, by tensor name.
#[derive(Debug, Default, Clone)]
pub struct Calibration {
    pub hessians: HashMap<String, Arc<gptq::Hessian>>,
    /// Why a selected tensor has no statistics (e.g. its consumer is not a MatMul, Gemm or
    /// Conv).
    pub missing: HashMap<String, String>,
}

impl Plan {
    /// What the plan's steps need measured, over all of them.
    pub fn needs(&self) -> method::Needs {
        self.steps.iter().fold(method::Needs::default(), |acc, s| {
            union(acc, s.method.needs())
        })
    }
}

fn union(a: method::Needs, b: method::Needs) -> method::Needs {
    method::Needs {
        hessian: a.hessian || b.hessian,
        activations: a.activations.or(b.activations),
    }
}

/// For each tensor some step with needs selects: its index and what it needs measured.
pub fn calibration_targets(tensors: &[Tensor], plan: &Plan) -> Vec<(usize, method::Needs)> {
    let selections = select(tensors, plan);
    let mut out: Vec<(usize, method::Needs)> = Vec::new();
    for (step, sel) in plan.steps.iter().zip(&selections) {
        let needs = step.method.needs();
        if needs == method::Needs::default() {
            continue;
        }
        for &i in sel {
            match out.iter_mut().find(|(j, _)| *j == i) {
                Some((_, n)) => *n = union(*n, needs),
                None => out.push((i, needs)),
            }
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out
}

/// Why a tensor's form cannot be trained through [`project`] (the first selected step that
/// says so).
pub fn untrainable(t: &TensorFacts, plan: &Plan) -> Option<String> {
    plan.steps
        .iter()
        .filter(|s| s.select.selects_facts(t))
        .find_map(|s| {
            s.method
                .untrainable()
                .map(|why| format!("{} on {:?}: {why}", s.method.label(), t.name))
        })
}

/// The values `t` takes when the plan's encoding steps run on `values` (whose pruned
/// weights the caller has already zeroed): the forward pass of quantization-aware training.
/// Run on the trained weights, the pipeline gives these values again.
pub fn project(t: &Tensor, plan: &Plan, values: Vec<f32>) -> Result<Vec<f32>, CompressError> {
    let mut w = Working::new(values);
    for step in plan.steps.iter().filter(|s| s.select.selects(t)) {
        let label = step.method.label();
        match step.method.kind() {
            Kind::Encode => {
                if let Applied::Ran = step.method.apply(t, &mut w)? {
                    w.methods.push(label);
                }
            }
            // The mask is the caller's; keep the form holding its zeros.
            Kind::Prune => {
                w.pruned = true;
                w.rezero(t, &label)?;
            }
            Kind::Factorize => {
                return Err(CompressError::InvalidSpec(
                    untrainable(&t.facts(), plan).unwrap_or_default(),
                ))
            }
            Kind::Entropy => {}
        }
    }
    Ok(w.values)
}

/// The plan without its value-sharing steps (k-means): what fine-tuning trains under before
/// the codebooks exist (Deep Compression's retraining after pruning).
pub fn without_sharing(plan: &Plan) -> Plan {
    Plan {
        steps: plan
            .steps
            .iter()
            .filter(|s| !s.method.shares_values())
            .cloned()
            .collect(),
        ..plan.clone()
    }
}

/// The plan's steps up to and including the last whose method `is` picks (None: no such
/// step).
pub fn through_last(plan: &Plan, is: impl Fn(&dyn Method) -> bool) -> Option<Plan> {
    let last = plan.steps.iter().rposition(|s| is(s.method.as_ref()))?;
    Some(Plan {
        steps: plan.steps[..=last].to_vec(),
        ..plan.clone()
    })
}

/// For each tensor a factor-training step (low rank) factorizes, its factors when the plan
/// runs on `tensors` up to its last such step (None for the others).
pub fn trained_factors(
    tensors: &[Tensor],
    plan: &Plan,
) -> Result<Vec<Option<lowrank::Factors>>, CompressError> {
    Ok(trained_views(tensors, plan, |m| m.trains_factors())?
        .into_iter()
        .map(|v| match v? {
            form::Trained::Factors(f) => Some(f),
            form::Trained::Dense | form::Trained::Shared(_) => None,
        })
        .collect())
}

/// What training updates in each tensor's form when the plan runs on `tensors` up to its
/// last step that `is` picks (None for tensors left as they are, and for every tensor when
/// no step is picked).
fn trained_views(
    tensors: &[Tensor],
    plan: &Plan,
    is: impl Fn(&dyn Method) -> bool,
) -> Result<Vec<Option<form::Trained>>, CompressError> {
    let Some(prefix) = through_last(plan, is) else {
        return Ok(vec![None; tensors.len()]);
    };
    let outcome = run(tensors, &prefix, &NoControl)?;
    Ok(outcome
        .encodings
        .iter()
        .zip(tensors)
        .map(|(e, t)| Some(e.as_ref()?.form().trained(&t.shape)))
        .collect())
}

/// The plan with the factor-training steps' ranks fixed to those of `factors` (parallel to
/// `tensors`): run on the trained factors' product (of that rank exactly), it stores factors
/// of the same rank, where a rule such as `energy` would choose a smaller one.
pub fn pin_ranks(plan: &Plan, tensors: &[Tensor], factors: &[Option<lowrank::Factors>]) -> Plan {
    let ranks: HashMap<String, usize> = tensors
        .iter()
        .zip(factors)
        .filter_map(|(t, f)| Some((t.name.clone(), f.as_ref()?.rank)))
        .collect();
    let mut pinned = plan.clone();
    for s in &mut pinned.steps {
        if let Some(m) = s.method.with_ranks(&ranks) {
            s.method = m;
        }
    }
    pinned
}

/// A tensor's shared values: `slots[j]` indexes `values` for weight j (`u32::MAX`: an exact
/// zero kept out of the codebook).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedValues {
    pub slots: Vec<u32>,
    pub values: Vec<f32>,
}

/// For each tensor a value-sharing step selects, its codebook and indices when the plan
/// runs on `tensors` up to its last value-sharing step (None for the others, and for every
/// tensor of a plan without such a step).
pub fn shared_values(
    tensors: &[Tensor],
    plan: &Plan,
) -> Result<Vec<Option<SharedValues>>, CompressError> {
    Ok(trained_views(tensors, plan, |m| m.shares_values())?
        .into_iter()
        .map(|v| match v? {
            form::Trained::Shared(s) => Some(s),
            form::Trained::Dense | form::Trained::Factors(_) => None,
        })
        .collect())
}

/// Applies the plan. Tensors no step selects pass through bit for bit.
pub fn run(tensors: &[Tensor], plan: &Plan, ctl: &dyn Control) -> Result<Outcome, CompressError> {
    run_calibrated(tensors, plan, ctl, &Calibration::default())
}

/// [`run`] with what calibration measured (GPTQ statistics) for the steps that use it.
pub fn run_calibrated(
    tensors: &[Tensor],
    plan: &Plan,
    ctl: &dyn Control,
    calibration: &Calibration,
) -> Result<Outcome, CompressError> {
    check(tensors.iter().map(Tensor::facts), plan)?;
    let n = tensors.len();
    let mut work: Vec<Option<Working>> = (0..n).map(|_| None).collect();
    let selections = select(tensors, plan);
    let total_units: usize = selections.iter().map(Vec::len).sum::<usize>().max(1);
    let mut done_units = 0usize;
    for (si, step) in plan.steps.iter().enumerate() {
        let label = step.method.label();
        let stage = format!("step {}/{}: {label}", si + 1, plan.steps.len());
        for &i in &selections[si] {
            if work[i].is_none() {
                let t = &tensors[i];
                let values = t.to_f32().unwrap_or_default();
                check_finite(t, &values)?;
                let mut w = Working::new(values);
                if let Some(h) = calibration.hessians.get(&t.name) {
                    w.calibration = Ok(h.clone());
                } else if let Some(why) = calibration.missing.get(&t.name) {
                    w.calibration = Err(why.clone());
                }
                work[i] = Some(w);
            }
        }
        if ctl.cancelled() {
            return Err(CompressError::Cancelled);
        }
        {
            let chosen: Vec<&Tensor> = selections[si].iter().map(|&i| &tensors[i]).collect();
            let mut chosen_mask = vec![false; n];
            for &i in &selections[si] {
                chosen_mask[i] = true;
            }
            let mut slots: Vec<&mut Working> = work
                .iter_mut()
                .zip(&chosen_mask)
                .filter(|(_, c)| **c)
                .filter_map(|(w, _)| w.as_mut())
                .collect();
            step.method.apply_jointly(&chosen, &mut slots)?;
        }
        for &i in &selections[si] {
            if ctl.cancelled() {
                return Err(CompressError::Cancelled);
            }
            let t = &tensors[i];
            let Some(w) = work[i].as_mut() else { continue };
            // A step that sets the form decides whether activations are quantized with it.
            let sets_form = matches!(step.method.kind(), Kind::Encode | Kind::Factorize);
            let activations = w.activations;
            if sets_form {
                w.activations = None;
            }
            // `check` refused every step that cannot follow this tensor's form.
            match step.method.apply(t, w)? {
                Applied::Ran => {
                    w.pruned |= step.method.kind() == Kind::Prune;
                    w.methods.push(label.clone());
                }
                Applied::Skipped(why) => {
                    w.activations = activations;
                    w.skipped.push(format!("{label}: {why}"));
                }
            }
            debug_assert!(w
                .encoding
                .as_ref()
                .is_none_or(|e| e.decode(&t.shape) == w.values));
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
    let mut statics = Vec::with_capacity(tensors.len());
    let mut missed: Vec<String> = Vec::new();
    let mut totals = Totals::default();
    let mut stages = StageTotals::default();
    let (mut float_bits, mut float_params) = (0f64, 0u64);
    // Tensors whose weights say the model is likely broken.
    let mut broken: Vec<String> = Vec::new();
    for (i, (t, w)) in tensors.iter().zip(work).enumerate() {
        let params = t.len() as u64;
        let bytes_before = t.data.len() as u64;
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
                let same = StageBytes::unchanged(bytes_before);
                (
                    bytes_before,
                    count_nonzero(t),
                    report::error_stats(&[], &[]),
                    None,
                    Payload {
                        repr: coding::Repr::raw(),
                        sections: Vec::new(),
                    },
                    None,
                    same,
                )
            }
            Some(w) => {
                let original = t.to_f32().unwrap_or_default();
                let stats = report::error_stats(&original, &w.values);
                // Pruning removes weights on purpose: its error is the user's choice, and
                // whole zero channels are what structured pruning makes.
                broken.extend(likely_broken(t, &original, w, &stats));
                restored[i].set_f32(&w.values);
                let nonzero = w.values.iter().filter(|v| **v != 0.0).count() as u64;
                let (bytes_after, axis) = match &w.encoding {
                    None => {
                        encoded_tensors.push(restored[i].clone());
                        (bytes_before, None)
                    }
                    Some(enc) => {
                        let mut parts = Parts {
                            tensors: &mut encoded_tensors,
                            base: &t.name,
                        };
                        let Stored {
                            bytes,
                            axis,
                            description: d,
                        } = enc.form().store(t, &mut parts);
                        description.insert(t.name.clone(), d);
                        (bytes, axis)
                    }
                };
                let (mut payload, cstats, stage) = match &w.encoding {
                    None => coding::floats(&w.values, &restored[i].data, w.huffman),
                    Some(enc) => enc.form().payload(&w.values, w.huffman, w.pruned),
                };
                if payload.repr.is_raw() {
                    // The archive writer takes the restored bytes: no second copy here.
                    payload.sections.clear();
                }
                (bytes_after, nonzero, stats, axis, payload, cstats, stage)
            }
        };
        let archive_bytes = if payload.repr.is_raw() {
            bytes_before
        } else {
            payload.bytes()
        };
        if t.dtype.is_float() {
            float_bits += bytes_after as f64 * 8.0;
            float_params += params;
        }
        totals.add(params, nonzero, (bytes_before, bytes_after, archive_bytes));
        stages.add(bytes_before, &stage);
        let (methods, skipped, details) = match w {
            Some(w) => {
                encodings.push(w.encoding);
                statics.push(w.activations);
                missed.extend(w.calibration_missed);
                (w.methods, w.skipped, w.details)
            }
            None => {
                encodings.push(None);
                statics.push(None);
                (Vec::new(), Vec::new(), Map::new())
            }
        };
        totals.tensors_compressed += u64::from(!methods.is_empty());
        let sizes = (bytes_before, bytes_after, archive_bytes, nonzero);
        let done = (methods, skipped, details);
        reports.push(tensor_report(t, done, axis, sizes, coding_stats, &stats));
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
    let warnings = run_warnings(tensors.len(), &totals, &broken, &missed);
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
        activations: statics,
        report,
    }
}

/// Why a compressed tensor makes the model likely broken: output channels that became all
/// zeros, or a signal-to-noise ratio below the floor (pruning's errors are the user's choice).
fn likely_broken(
    t: &Tensor,
    original: &[f32],
    w: &Working,
    stats: &report::ErrorStats,
) -> Option<String> {
    // Pruning removes weights on purpose: its error is the user's choice, and whole zero
    // channels are what structured pruning makes.
    let collapsed = if w.pruned || t.shape.len() < 2 {
        0
    } else {
        report::collapsed_channels(original, &w.values, &t.shape, t.channel_axis())
    };
    if collapsed > 0 {
        Some(format!(
            "{:?}: {collapsed} of {} output channels became all zeros",
            t.name,
            t.shape[t.channel_axis()]
        ))
    } else {
        stats
            .sqnr_db
            .filter(|db| !w.pruned && *db < report::WEIGHT_SQNR_FLOOR_DB)
            .map(|db| format!("{:?}: SQNR {db:.1} dB", t.name))
    }
}

/// One tensor's line of the report: what was done to it (methods, skipped, details), its
/// axis, its sizes (bytes before, after, in the archive, and non-zero parameters) and errors.
fn tensor_report(
    t: &Tensor,
    (methods, skipped, details): (Vec<String>, Vec<String>, Map<String, Value>),
    axis: Option<usize>,
    (bytes_before, bytes_after, archive_bytes, nonzero): (u64, u64, u64, u64),
    coding: Option<CodingStats>,
    stats: &report::ErrorStats,
) -> TensorReport {
    let params = t.len() as u64;
    TensorReport {
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
        coding,
        relative_l2_error: stats.relative_l2_error,
        sqnr_db: stats.sqnr_db,
        max_abs_error: stats.max_abs_error,
        details,
    }
}

/// The run's warnings: nothing compressed, weights likely broken, calibration missed.
fn run_warnings(
    tensor_count: usize,
    totals: &Totals,
    broken: &[String],
    missed: &[String],
) -> Vec<report::Warning> {
    let mut warnings = Vec::new();
    if totals.tensors_compressed == 0 {
        warnings.push(report::Warning::new(
            "nothing_compressed",
            format!(
                "no tensor was compressed: the pipeline selected none of the model's {} tensors ({} parameters); \
                 the artifacts hold the model unchanged",
                tensor_count,
                totals.parameters
            ),
        ));
    }
    if !broken.is_empty() {
        let shown = broken.len().min(8);
        warnings.push(report::Warning::new(
            "weight_error_high",
            format!(
                "the compressed weights are far from the original in {} tensor(s), so the model is likely broken: {}{}; \
                 evaluate it before deploying, or use a milder setting for these tensors (exclude them, more bits, \
                 granularity \"channel\", a smaller group_size)",
                broken.len(),
                broken[..shown].join("; "),
                if broken.len() > shown { "; …" } else { "" }
            ),
        ));
    }
    if !missed.is_empty() {
        let shown = missed.len().min(8);
        warnings.push(report::Warning::new(
            "calibration_missing",
            format!(
                "{} tensor(s) asked for calibrated quantization were rounded to nearest instead: {}{}",
                missed.len(),
                missed[..shown].join("; "),
                if missed.len() > shown { "; …" } else { "" }
            ),
        ));
    }
    warnings
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
