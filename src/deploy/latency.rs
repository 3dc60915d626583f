//! Latency of an ONNX model in tract, in-process: one thread, zeros of the declared input
//! shapes (symbolic dimensions as 1), the median of a few runs after one warm-up. A model
//! tract cannot run (an onnxruntime contrib op, an `ai.onnx.ml` operator) gets the reason
//! instead of a number.

use serde::Serialize;
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// Timed runs after the warm-up.
pub const RUNS: usize = 5;

/// Runs a model on zeros of its declared input shapes: the outputs of a first run, then the
/// milliseconds of `timed` more runs.
pub fn run_on_zeros(bytes: &[u8], timed: usize) -> Result<(TVec<TValue>, Vec<f64>), String> {
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(bytes))
        .map_err(|e| format!("tract cannot load it: {e}"))?;
    let mut inputs: TVec<TValue> = TVec::new();
    for i in 0..model.inputs.len() {
        let fact = model.input_fact(i).map_err(|e| e.to_string())?.clone();
        let dt = fact.datum_type.concretize().unwrap_or(f32::datum_type());
        let shape: Vec<usize> = fact
            .shape
            .dims()
            .map(|d| {
                d.concretize()
                    .and_then(|d| d.to_i64().ok())
                    .map_or(1, |v| v.max(1) as usize)
            })
            .collect();
        let zero = Tensor::zero_dt(dt, &shape).map_err(|e| e.to_string())?;
        model
            .set_input_fact(i, InferenceFact::dt_shape(dt, shape))
            .map_err(|e| e.to_string())?;
        inputs.push(zero.into_tvalue());
    }
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| format!("tract cannot plan it: {e}"))?;
    let outputs = plan
        .run(inputs.clone())
        .map_err(|e| format!("tract cannot run it: {e}"))?;
    let mut times = Vec::with_capacity(timed);
    for _ in 0..timed {
        let t0 = Instant::now();
        plan.run(inputs.clone())
            .map_err(|e| format!("tract cannot run it: {e}"))?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok((outputs, times))
}

/// One model's median run time in milliseconds, or why it could not be measured.
pub fn median_ms(bytes: &[u8]) -> Result<f64, String> {
    let (_, mut times) = run_on_zeros(bytes, RUNS)?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The original against the deployable file, as the summary reports it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Latency {
    /// How it was measured.
    pub engine: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployable_ms: Option<f64>,
    /// deployable_ms / original_ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    pub slower_than_original: bool,
    /// Why a figure is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

pub fn compare(original: &[u8], deployable: &[u8]) -> Latency {
    let engine = format!(
        "tract in-process, 1 thread, zeros of the declared input shapes, median of {RUNS} runs"
    );
    let (o, d) = (median_ms(original), median_ms(deployable));
    let ratio = match (&o, &d) {
        (Ok(o), Ok(d)) if *o > 0.0 => Some(d / o),
        _ => None,
    };
    let skipped = match (&o, &d) {
        (Err(e), _) => Some(format!("original: {e}")),
        (_, Err(e)) => Some(format!("model.onnx: {e}")),
        _ => None,
    };
    Latency {
        engine,
        original_ms: o.ok(),
        deployable_ms: d.ok(),
        ratio,
        slower_than_original: ratio.is_some_and(|r| r > 1.0),
        skipped,
    }
}
