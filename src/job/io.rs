//! What a run takes (the model file and the datasets its blocks name) and what it gives
//! (the summary and the artifact files).

use super::RunError;
use crate::compress::report::Warning;
use crate::deploy;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    pub original_bytes: u64,
    /// The deployable file's size (as `deployable_bytes`), kept under its first name.
    pub compressed_bytes: u64,
    /// Size of `model.<ext>`, the file a runtime loads; the restored model when no step
    /// encoded anything.
    #[serde(default)]
    pub deployable_bytes: u64,
    /// original_bytes / deployable_bytes.
    pub ratio: f64,
    pub parameters: u64,
    pub nonzero_parameters: u64,
    pub mean_bits_per_weight: f64,
    /// Size of `model.mpz`, when the job wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_bytes: Option<u64>,
    /// original_bytes / archive_bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
    /// The original and model.onnx timed in-process (ONNX jobs with a compact model.onnx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<deploy::latency::Latency>,
    /// The original and model.onnx scored on the job's dataset (`eval` in the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<crate::eval::Evaluation>,
    /// The gate's verdict when the spec has one: passed_gate, failed_gate or not_evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<crate::eval::Quality>,
    /// The search's verdict, goal, trials and chosen candidate (`constraints` / preset auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<serde_json::Value>,
    /// `"analyze": true`: how many layers and strengths `sensitivity.json` measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<serde_json::Value>,
    /// What calibration measured on the `calibration` dataset: rows, feed, seconds, and the
    /// tensors GPTQ and static int8 served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<serde_json::Value>,
    /// Fine-tuning: the validation metric before and after, epochs, why it stopped
    /// (`training.json` has every epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<serde_json::Value>,
    /// Distillation: the student's layers and parameters against the teacher's, and the
    /// training's figures as under `finetune`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<serde_json::Value>,
}

/// A job's `calibration` block with the dataset file it names.
pub struct CalibrationInput<'a> {
    pub spec: &'a crate::calibrate::CalibrationSpec,
    pub dataset: &'a Path,
}

/// The datasets a job's blocks name (`eval`, `calibration`, `finetune`), with their files.
#[derive(Default)]
pub struct Data<'a> {
    pub eval: Option<EvalInput<'a>>,
    pub calibration: Option<CalibrationInput<'a>>,
    pub finetune: Option<FinetuneInput<'a>>,
    pub distill: Option<DistillInput<'a>>,
}

/// A job's `distill` block with the dataset files it names.
pub struct DistillInput<'a> {
    pub spec: &'a crate::train::DistillSpec,
    pub dataset: &'a Path,
    pub validation: Option<&'a Path>,
}

/// A job's `finetune` block with the dataset files it names.
pub struct FinetuneInput<'a> {
    pub spec: &'a crate::train::FinetuneSpec,
    pub dataset: &'a Path,
    pub validation: Option<&'a Path>,
}

/// A job's `eval` block with the dataset file it names.
pub struct EvalInput<'a> {
    pub spec: &'a crate::eval::EvalSpec,
    pub dataset: &'a Path,
    /// A search's `sensitivity.json` from an earlier job on the same model and dataset.
    pub cached_sensitivity: Option<&'a serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct ArtifactFile {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub sha256: String,
}

pub struct RunOutput {
    pub summary: Summary,
    pub artifacts: Vec<ArtifactFile>,
    /// A sensitivity table this job's search measured in full (`sensitivity.json`), for the
    /// next search on the same model and dataset.
    pub measured_sensitivity: Option<serde_json::Value>,
}

pub(super) fn read_dataset(p: &Path) -> Result<crate::eval::run::Dataset, RunError> {
    std::fs::read(p)
        .map_err(RunError::io("read a dataset"))
        .and_then(|d| crate::eval::run::Dataset::from_npz(&d).map_err(RunError::InvalidSpec))
}
