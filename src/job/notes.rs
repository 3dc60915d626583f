//! What a run says beside its numbers: the notes and warnings of `report.json` and the job
//! summary, gathered stage by stage in the order the stages run.

use super::{CalibrationInput, DistillInput, EvalInput, FinetuneInput};
use crate::compress::report::{Report, Warning};

/// The notes and warnings so far.
pub(super) struct Notes {
    pub notes: Vec<String>,
    pub warnings: Vec<Warning>,
}

impl Notes {
    /// The compression's own notes and warnings.
    pub fn from_report(report: &Report) -> Notes {
        Notes {
            notes: report.notes.clone(),
            warnings: report.warnings.clone(),
        }
    }

    pub fn warn(&mut self, code: &str, message: String) {
        self.warnings.push(Warning::new(code, message));
    }

    /// A distilled student: the student is the compression, and a training that never beat
    /// the untrained student is worth a warning.
    pub fn distilled(&mut self, distilled: Option<&serde_json::Value>) {
        let warnings = &mut self.warnings;
        if distilled.is_some() && warnings.iter().any(|w| w.code == "nothing_compressed") {
            // The student is the compression: no step after it is needed.
            warnings.retain(|w| w.code != "nothing_compressed");
            self.notes.push(
                "no step followed the distillation: model.onnx is the distilled student in float"
                    .into(),
            );
        }
        if let Some(t) = distilled.filter(|t| t["best_epoch"] == 0) {
            self.warn(
                "distill_no_gain",
                format!(
                    "no epoch of training lowered the student's validation loss ({} before training; training stopped on {}): model.onnx is the narrowed student as cut from the teacher, untrained",
                    t["validation_loss_before"], t["stopped"]
                ),
            );
        }
    }

    /// Calibration or training that learned from the rows the evaluation scores.
    pub fn data_use(
        &mut self,
        calibrated: bool,
        calibration: Option<&CalibrationInput>,
        eval: Option<&EvalInput>,
        finetune: Option<&FinetuneInput>,
        distill: Option<&DistillInput>,
    ) {
        if let (Some(c), Some(e)) = (calibration, eval) {
            if calibrated && c.spec.dataset_id == e.spec.dataset_id {
                self.warn(
                    "calibrated_on_eval_data",
                    format!(
                        "calibration and evaluation use the same dataset ({}): the evaluation scores rows the calibration learned from, so it flatters the model; upload a separate calibration set",
                        c.spec.dataset_id
                    ),
                );
            }
        }
        // Training that learned from (or stopped early on) the rows the evaluation scores.
        let trained_on = finetune
            .map(|f| ("finetune", f.spec))
            .or(distill.map(|d| ("distill", &d.spec.train)));
        if let (Some((block, t)), Some(e)) = (trained_on, eval) {
            let id = e.spec.dataset_id;
            if t.dataset_id == id || t.validation_dataset_id == Some(id) {
                self.warn(
                    "trained_on_eval_data",
                    format!(
                        "{block} and evaluation use the same dataset ({id}): the evaluation scores rows the training learned from or stopped on, so it flatters the model; upload a separate evaluation set"
                    ),
                );
            }
        }
    }
}
