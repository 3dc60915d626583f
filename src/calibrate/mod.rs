//! Calibration: runs the original model on the job's calibration dataset (tract, in-process)
//! and measures what the data-aware steps need:
//! - for GPTQ (`"calibrated": true`), the second moment H = Σ x·xᵀ of each selected weight's
//!   inputs, as its consumer sees them (a MatMul's or Gemm's rows of X, a convolution's
//!   patches);
//! - for static int8 (`"activations"`), the range of every activation that enters or leaves a
//!   selected weight's consumer (min and max, and a histogram for percentile and entropy).
//!
//! The consumers are found in the ONNX graph ([`consumers`]); the model runs with those values
//! as extra outputs, one slice of rows at a time, and each slice is folded into the
//! statistics, so memory stays at one slice's activations.

pub mod consumers;
pub mod patches;

use crate::compress::activations::{Histogram, Observed, HISTOGRAM_BINS};
use crate::compress::gptq::Hessian;
use crate::compress::{self, Control};
use crate::eval::run::{self, Dataset, Feed, RunFailure, Select};
use crate::model::Tensor;
use consumers::{Consumer, Geometry};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use tract_onnx::prelude::*;
use uuid::Uuid;

/// A job's `calibration` block: the dataset calibration learns from.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationSpec {
    pub dataset_id: Uuid,
    /// None: whole when the arrays do not share axis 0, else batched, falling back to one row
    /// at a time when the model fixes its batch (as the evaluation feeds).
    pub feed: Option<Feed>,
    /// Rows used at most (the first ones).
    pub max_rows: usize,
}

pub const DEFAULT_MAX_ROWS: usize = 512;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    dataset_id: String,
    feed: Option<String>,
    max_rows: Option<u64>,
}

impl CalibrationSpec {
    /// The spec's `calibration` block, if any; an error names the field.
    pub fn parse(spec: &Value) -> Result<Option<CalibrationSpec>, String> {
        let Some(v) = spec.get("calibration") else {
            return Ok(None);
        };
        let p: Params = crate::eval::block(v, "calibration")?;
        let dataset_id = Uuid::parse_str(&p.dataset_id).map_err(|_| {
            format!(
                "calibration.dataset_id: {:?} is not a dataset id",
                crate::util::clip(&p.dataset_id)
            )
        })?;
        let feed = Feed::parse_field(p.feed.as_deref(), "calibration.feed")?;
        let max_rows = match p.max_rows {
            None => DEFAULT_MAX_ROWS,
            Some(n) if (1..=1_000_000).contains(&n) => n as usize,
            Some(_) => {
                return Err("calibration.max_rows: must be an integer from 1 to 1000000".into())
            }
        };
        Ok(Some(CalibrationSpec {
            dataset_id,
            feed,
            max_rows,
        }))
    }
}

/// What calibration measured.
#[derive(Debug, Default)]
pub struct Measured {
    /// GPTQ statistics, and why a tensor has none.
    pub core: compress::Calibration,
    /// Static int8: each selected weight's consumers (by tensor index), and what was seen of
    /// every activation they read or write, by value name.
    pub consumers: HashMap<usize, Vec<Consumer>>,
    pub observed: HashMap<String, Observed>,
    /// Why a static weight's consumers are not quantized (by tensor index).
    pub unquantized: HashMap<usize, String>,
    /// Rows the model ran on, and how they were fed.
    pub rows: usize,
    pub feed: Option<Feed>,
    pub seconds: f64,
}

/// Why calibration produced nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationFailure {
    Cancelled,
    /// The model could not run on the dataset.
    Unrunnable(String),
}

/// A weight's inputs' second moment, accumulated slice by slice.
struct HessianSum {
    geometry: Geometry,
    sum: Vec<f64>,
    samples: u64,
}

/// The first `max_rows` rows of every array (all of them when the dataset is one feed).
fn head(data: &Dataset, max_rows: usize, whole: bool) -> Dataset {
    if whole {
        return Dataset {
            arrays: data.arrays.clone(),
            labels: None,
        };
    }
    let arrays = data
        .arrays
        .iter()
        .map(|t| {
            let n = t.shape.first().copied().unwrap_or(0);
            if n <= max_rows {
                return t.clone();
            }
            let row = t.data.len() / n.max(1);
            let mut shape = t.shape.clone();
            shape[0] = max_rows;
            Tensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape,
                data: t.data[..max_rows * row].to_vec(),
                role: t.role,
                output_axis: t.output_axis,
            }
        })
        .collect();
    Dataset {
        arrays,
        labels: None,
    }
}

fn values_f32(v: &TValue) -> Result<(Vec<usize>, Vec<f32>), String> {
    let t = v.cast_to::<f32>().map_err(|e| e.to_string())?;
    let shape = t.shape().to_vec();
    let view = t.to_plain_array_view::<f32>().map_err(|e| e.to_string())?;
    Ok((shape, view.iter().copied().collect()))
}

/// Adds Xᵀ·X of `rows` × `dim` values (row-major) to `sum`, in f32 blocks summed in f64.
fn add_gram(sum: &mut [f64], x: &[f32], rows: usize, dim: usize) {
    const ROWS_PER_BLOCK: usize = 4096;
    for start in (0..rows).step_by(ROWS_PER_BLOCK) {
        let end = (start + ROWS_PER_BLOCK).min(rows);
        let block = faer::Mat::<f32>::from_fn(end - start, dim, |i, j| x[(start + i) * dim + j]);
        let g = block.transpose() * &block;
        for i in 0..dim {
            for j in 0..dim {
                sum[i * dim + j] += f64::from(g[(i, j)]);
            }
        }
    }
}

/// The slow, obvious Xᵀ·X, in f64 (for the property test of [`add_gram`]).
#[cfg(test)]
fn gram_reference(x: &[f32], rows: usize, dim: usize) -> Vec<f64> {
    let mut g = vec![0.0; dim * dim];
    for r in 0..rows {
        for i in 0..dim {
            for j in 0..dim {
                g[i * dim + j] += f64::from(x[r * dim + i]) * f64::from(x[r * dim + j]);
            }
        }
    }
    g
}

impl HessianSum {
    fn add(&mut self, shape: &[usize], x: &[f32]) -> Result<(), String> {
        let (rows, patches) = match &self.geometry {
            Geometry::Rows { dim } => {
                let dim = *dim;
                if shape.last() != Some(&dim) {
                    return Err(format!("its input has shape {shape:?}, not [.., {dim}]"));
                }
                (x.len() / dim.max(1), None)
            }
            Geometry::Conv(c) => {
                let p = patches::im2col(x, shape, c)?;
                (p.len() / c.patch_len().max(1), Some(p))
            }
        };
        let dim = self.geometry.dim();
        add_gram(&mut self.sum, patches.as_deref().unwrap_or(x), rows, dim);
        self.samples += rows as u64;
        Ok(())
    }
}

/// Runs the original on the calibration data and measures what `targets` (tensor index and
/// needs, from [`compress::calibration_targets`]) ask for. Progress moves over `span`;
/// cancellation stops between slices.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    original: &[u8],
    proto: &tract_onnx::pb::ModelProto,
    tensors: &[Tensor],
    targets: &[(usize, compress::method::Needs)],
    data: &Dataset,
    spec: &CalibrationSpec,
    ctl: &dyn Control,
    span: (f64, f64),
) -> Result<Measured, CalibrationFailure> {
    let started = std::time::Instant::now();
    let graph = proto.graph.clone().unwrap_or_default();
    let mut out = Measured::default();
    // What each target reads: GPTQ sums per (activation, geometry), static ranges per value.
    let mut sums: Vec<(String, HessianSum)> = Vec::new();
    let mut hessian_of: Vec<(String, usize)> = Vec::new();
    let mut ranged: Vec<String> = Vec::new();
    let mut histogram_needed = false;
    for &(i, needs) in targets {
        let t = &tensors[i];
        let found = consumers::of(&graph, t);
        if needs.hessian {
            match &found {
                Err(why) => {
                    out.core.missing.insert(t.name.clone(), why.clone());
                }
                Ok(list) => {
                    // Several consumers read the weight: their inputs add up, when they share
                    // one geometry.
                    let g = list[0].geometry.clone();
                    if list.iter().any(|c| c.geometry != g) {
                        out.core.missing.insert(
                            t.name.clone(),
                            "its consumers read it with different input layouts".into(),
                        );
                    } else if g.dim() > consumers::MAX_HESSIAN_DIM {
                        out.core.missing.insert(
                            t.name.clone(),
                            format!(
                                "{} inputs per channel, beyond the {} calibration measures",
                                g.dim(),
                                consumers::MAX_HESSIAN_DIM
                            ),
                        );
                    } else {
                        for c in list {
                            let at = match sums
                                .iter()
                                .position(|(a, s)| *a == c.input && s.geometry == g)
                            {
                                Some(k) => k,
                                None => {
                                    sums.push((
                                        c.input.clone(),
                                        HessianSum {
                                            geometry: g.clone(),
                                            sum: vec![0.0; g.dim() * g.dim()],
                                            samples: 0,
                                        },
                                    ));
                                    sums.len() - 1
                                }
                            };
                            hessian_of.push((t.name.clone(), at));
                        }
                    }
                }
            }
        }
        if let Some(a) = needs.activations {
            match &found {
                Err(why) => {
                    out.unquantized.insert(i, format!("{:?}: {why}", t.name));
                }
                Ok(list) => {
                    histogram_needed |= a.method.needs_histogram();
                    for c in list {
                        for v in c.quantized_values() {
                            if !ranged.contains(v) {
                                ranged.push(v.clone());
                            }
                        }
                    }
                    out.consumers.insert(i, list.clone());
                }
            }
        }
    }
    let mut wanted: Vec<String> = sums.iter().map(|(a, _)| a.clone()).collect();
    for v in &ranged {
        if !wanted.contains(v) {
            wanted.push(v.clone());
        }
    }
    if wanted.is_empty() {
        out.seconds = started.elapsed().as_secs_f64();
        return Ok(out);
    }
    let feeds = run::feeds_to_try(data, spec.feed, 32);
    let passes = if histogram_needed { 2 } else { 1 };
    let mut last_err = String::new();
    for feed in feeds {
        let data = head(data, spec.max_rows, feed == Feed::Whole);
        let mut minmax: HashMap<String, (f32, f32)> = HashMap::new();
        let mut hist: HashMap<String, Histogram> = HashMap::new();
        let rows = match feed {
            Feed::Whole => 1,
            _ => data
                .arrays
                .first()
                .and_then(|t| t.shape.first())
                .copied()
                .unwrap_or(0),
        };
        let mut failed = None;
        for pass in 0..passes {
            let (lo, hi) = (
                span.0 + (span.1 - span.0) * pass as f64 / passes as f64,
                span.0 + (span.1 - span.0) * (pass + 1) as f64 / passes as f64,
            );
            let mut tick = |done: usize, total: usize| {
                if ctl.cancelled() {
                    return false;
                }
                let f = if total > 0 {
                    done as f64 / total as f64
                } else {
                    0.0
                };
                ctl.progress(lo + (hi - lo) * f, "calibrating on the dataset");
                true
            };
            let first = pass == 0;
            if !first {
                for v in &ranged {
                    let (l, h) = minmax.get(v).copied().unwrap_or((0.0, 0.0));
                    hist.insert(v.clone(), Histogram::new(l, h, HISTOGRAM_BINS));
                }
            }
            let names: &[String] = if first { &wanted } else { &ranged };
            let mut sink = |labels: &[String], values: &[TValue]| -> Result<(), String> {
                for (name, v) in labels.iter().zip(values) {
                    let (shape, x) = values_f32(v)?;
                    if first {
                        if x.iter().any(|v| !v.is_finite()) {
                            return Err(format!("the value {name:?} holds NaN or infinity"));
                        }
                        for (a, s) in sums.iter_mut().filter(|(a, _)| a == name) {
                            s.add(&shape, &x).map_err(|e| format!("{a:?}: {e}"))?;
                        }
                        if ranged.contains(name) {
                            let e = minmax
                                .entry(name.clone())
                                .or_insert((f32::INFINITY, f32::NEG_INFINITY));
                            for &v in &x {
                                e.0 = e.0.min(v);
                                e.1 = e.1.max(v);
                            }
                        }
                    } else if let Some(h) = hist.get_mut(name) {
                        h.add(&x);
                    }
                }
                Ok(())
            };
            match run::run_slices(
                original,
                &data,
                feed,
                Select::Values(names),
                &mut tick,
                &mut sink,
            ) {
                Ok(_) => {}
                Err(RunFailure::Stopped) => return Err(CalibrationFailure::Cancelled),
                Err(RunFailure::Failed(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            last_err = format!("{} feed: {e}", feed_name(feed));
            // Start the statistics again for the next feed.
            for (_, s) in &mut sums {
                s.sum.iter_mut().for_each(|v| *v = 0.0);
                s.samples = 0;
            }
            continue;
        }
        for (name, at) in &hessian_of {
            let s = &sums[*at].1;
            let h = out
                .core
                .hessians
                .entry(name.clone())
                .or_insert_with(|| Arc::new(Hessian::zeros(s.geometry.dim())));
            let h = Arc::make_mut(h);
            for (a, b) in h.values.iter_mut().zip(&s.sum) {
                *a += b;
            }
            h.samples += s.samples;
        }
        for v in &ranged {
            let (min, max) = minmax.get(v).copied().unwrap_or((0.0, 0.0));
            out.observed.insert(
                v.clone(),
                Observed {
                    min,
                    max,
                    histogram: hist.remove(v),
                },
            );
        }
        out.rows = rows;
        out.feed = Some(feed);
        out.seconds = started.elapsed().as_secs_f64();
        return Ok(out);
    }
    Err(CalibrationFailure::Unrunnable(last_err))
}

pub fn feed_name(f: Feed) -> &'static str {
    match f {
        Feed::Batched(_) => "batched",
        Feed::PerSample => "per_sample",
        Feed::Whole => "whole",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The blocked f32 Gram matrix equals the f64 one within f32 accumulation error.
        #[test]
        fn gram_matches_reference(
            rows in 1usize..40,
            dim in 1usize..12,
            seed in any::<u64>(),
        ) {
            let x: Vec<f32> = (0..rows * dim)
                .map(|i| (((i as u64).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let mut fast = vec![0.0; dim * dim];
            add_gram(&mut fast, &x, rows, dim);
            let slow = gram_reference(&x, rows, dim);
            for (a, b) in fast.iter().zip(&slow) {
                // f32 products summed over `rows` terms of magnitude ≤ 1.
                prop_assert!((a - b).abs() <= 1e-5 * rows as f64, "{} vs {}", a, b);
            }
        }
    }
}
