//! The calibration stage: the original run on the calibration dataset for the steps that
//! learn from it (GPTQ, static int8), and the static int8 plan drawn from what it saw.

use super::progress::CALIBRATION_SHARE;
use super::{read_dataset, CalibrationInput, RunError};
use crate::compress::{self, Control, Plan};
use crate::{deploy, formats};
use std::path::Path;

/// The statistics the plan's steps need: none when no step learns from data; a search with
/// calibration measured every layer it varies, and its chosen plan reuses that.
pub(super) fn stage(
    input: &Path,
    set: &formats::TensorSet,
    plan: &Plan,
    calibration: Option<&CalibrationInput>,
    searched: Option<crate::calibrate::Measured>,
    ctl: &dyn Control,
) -> Result<Option<crate::calibrate::Measured>, RunError> {
    Ok(
        match (plan.needs() == compress::method::Needs::default(), searched) {
            (true, _) => None,
            (false, Some(m)) => Some(m),
            (false, None) => Some(calibrate(input, set, plan, calibration, ctl)?),
        },
    )
}

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
pub(super) fn calibrate_targets(
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
    let original = std::fs::read(input).map_err(RunError::io("read the model"))?;
    let data = read_dataset(c.dataset)?;
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
pub(super) fn static_plan(
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
