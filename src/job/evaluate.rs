//! The evaluation stage: the original and the deployable model timed in-process, and scored
//! on the job's dataset against its gate.

use super::deploy::Deployed;
use super::notes::Notes;
use super::{EvalInput, RunError};
use crate::compress::{Control, Plan};
use crate::{deploy, formats};
use std::path::Path;

/// What the evaluation stage measured.
pub(super) struct Measured {
    pub latency: Option<deploy::latency::Latency>,
    pub evaluation: Option<crate::eval::Evaluation>,
    pub quality: Option<crate::eval::Quality>,
}

/// Times the original and `model.onnx` when the plan asks (`latency`), and scores both on
/// the `eval` block's dataset.
#[allow(clippy::too_many_arguments)]
pub(super) fn stage(
    input: &Path,
    input_format: formats::Format,
    plan: &Plan,
    eval: Option<&EvalInput>,
    deployed: &Deployed,
    restored_bytes: &[u8],
    ctl: &dyn Control,
    notes: &mut Notes,
) -> Result<Measured, RunError> {
    let model = &deployed.model;
    let timed = plan.latency && matches!(model, Some((Some(_), "onnx")));
    let evaluated = eval.is_some() && input_format == formats::Format::Onnx;
    // The original ONNX bytes, for timing and evaluation: read again rather than kept from
    // parsing, since holding the file through the whole compression would add its size to
    // the peak for every job; read once for both.
    let original = if timed || evaluated {
        Some(std::fs::read(input).map_err(RunError::io("read the model"))?)
    } else {
        None
    };
    let latency = match (model, &original) {
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
        notes.warn(
            "slower_than_original",
            format!(
                "model.onnx ran {:.1}x slower than the original in tract ({:.3} ms vs {:.3} ms): \
                 its weights are rebuilt at run time by a runtime that does not fold them",
                l.ratio.unwrap_or(0.0),
                l.deployable_ms.unwrap_or(0.0),
                l.original_ms.unwrap_or(0.0)
            ),
        );
    }
    let evaluation = match eval {
        None => None,
        Some(e) => Some(match original.as_deref().filter(|_| evaluated) {
            None => crate::eval::Evaluation::skipped(
                e.spec,
                "a weight-only file cannot be run; the report gives weight-space figures only",
            ),
            Some(original) => score(original, deployed.bytes(restored_bytes), e, ctl)?,
        }),
    };
    if let Some(why) = evaluation.as_ref().and_then(|e| e.skipped.as_ref()) {
        notes.warn(
            "evaluation_skipped",
            format!("the job asked for an evaluation that could not run: {why}"),
        );
    }
    let quality = evaluation
        .as_ref()
        .and_then(|e| e.gate.as_ref())
        .map(|g| g.quality);
    if let (Some(crate::eval::Quality::FailedGate), Some(e)) = (quality, &evaluation) {
        notes.warn(
            "failed_gate",
            format!(
                "{} dropped by {:.6} ({:.6} -> {:.6}), beyond the gate's max_metric_drop {}",
                e.metric.name(),
                e.drop.unwrap_or(f64::NAN),
                e.original.unwrap_or(f64::NAN),
                e.compressed.unwrap_or(f64::NAN),
                e.gate.as_ref().map_or(0.0, |g| g.max_metric_drop)
            ),
        );
    }
    Ok(Measured {
        latency,
        evaluation,
        quality,
    })
}

/// The original and the candidate scored on the eval dataset (skipped, with the reason,
/// when the data cannot be read or the models cannot run on it).
fn score(
    original: &[u8],
    candidate: &[u8],
    e: &EvalInput,
    ctl: &dyn Control,
) -> Result<crate::eval::Evaluation, RunError> {
    ctl.progress(
        0.96,
        "evaluating the original and model.onnx on the dataset",
    );
    let data = std::fs::read(e.dataset)
        .map_err(|e| e.to_string())
        .and_then(|d| crate::eval::run::Dataset::from_npz(&d));
    Ok(
        match data.map(|data| {
            crate::eval::evaluate(original, candidate, &data, e.spec, ctl, (0.96, 0.99))
        }) {
            Err(why) => crate::eval::Evaluation::skipped(e.spec, why),
            Ok(Ok(ev)) => ev,
            Ok(Err(crate::eval::EvalFailure::Cancelled)) => return Err(RunError::Cancelled),
            Ok(Err(crate::eval::EvalFailure::Skipped(why))) => {
                crate::eval::Evaluation::skipped(e.spec, why)
            }
        },
    )
}
