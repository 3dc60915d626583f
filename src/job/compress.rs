//! The compression stage: the plan run on the model's tensors, with the statistics
//! calibration measured, or after fine-tuning.

use super::progress::{Span, CALIBRATION_SHARE};
use super::{finetune, FinetuneInput, RunError};
use crate::compress::{self, Control, Plan};
use crate::formats;

/// The plan's outcome, and `training.json` when the job fine-tunes (training comes first,
/// then the trained weights are compressed).
pub(super) fn stage(
    set: &formats::TensorSet,
    plan: &Plan,
    finetune: Option<&FinetuneInput>,
    measured: Option<&crate::calibrate::Measured>,
    ctl: &dyn Control,
) -> Result<(compress::Outcome, Option<serde_json::Value>), RunError> {
    Ok(match (finetune, measured) {
        (Some(f), _) => {
            let (retrained, log) = finetune::retrain(set, plan, f, ctl)?;
            (retrained, Some(log))
        }
        (None, None) => (compress::run(&set.tensors, plan, ctl)?, None),
        (None, Some(m)) => {
            let calibrated_span = Span::new(ctl, CALIBRATION_SHARE, 1.0);
            let o = compress::run_calibrated(&set.tensors, plan, &calibrated_span, &m.core)?;
            (o, None)
        }
    })
}
