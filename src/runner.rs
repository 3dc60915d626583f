//! Runs one compression from a model file to artifact files in a directory. The worker and
//! the CLI both call [`execute`], so a job and `modelpress compress` write the same bytes.

use crate::compress::{self, CompressError, Control, Plan};
use crate::formats::{self, FormatError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    pub original_bytes: u64,
    pub compressed_bytes: u64,
    pub ratio: f64,
    pub parameters: u64,
    pub nonzero_parameters: u64,
    pub mean_bits_per_weight: f64,
    /// Size of `model.mpz`, when the job wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_bytes: Option<u64>,
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
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    InvalidModel(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Internal(String),
}

impl From<FormatError> for RunError {
    fn from(e: FormatError) -> Self {
        if e.is_user_error() {
            RunError::InvalidModel(e.to_string())
        } else {
            RunError::Internal(e.to_string())
        }
    }
}

impl From<CompressError> for RunError {
    fn from(e: CompressError) -> Self {
        match e {
            CompressError::InvalidSpec(m) => RunError::InvalidSpec(m),
            CompressError::InvalidModel(m) => RunError::InvalidModel(m),
            CompressError::Cancelled => RunError::Cancelled,
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn write_artifact(dir: &Path, name: String, bytes: &[u8]) -> Result<ArtifactFile, RunError> {
    let path = dir.join(&name);
    std::fs::write(&path, bytes).map_err(|e| RunError::Internal(format!("write {name}: {e}")))?;
    Ok(ArtifactFile {
        name,
        path,
        size_bytes: bytes.len() as u64,
        sha256: sha256_hex(bytes),
    })
}

/// Compresses `input` by `plan` and writes the requested artifacts into `out_dir`.
pub fn execute(
    input: &Path,
    plan: &Plan,
    out_dir: &Path,
    ctl: &dyn Control,
) -> Result<RunOutput, RunError> {
    ctl.progress(0.0, "reading model");
    let original_bytes = std::fs::metadata(input)
        .map_err(|e| RunError::Internal(e.to_string()))?
        .len();
    let set = formats::read_path(input)?;
    let outcome = compress::run(&set, plan, ctl)?;
    ctl.progress(0.92, "writing artifacts");
    let ext = set.format.extension();
    let restored_bytes = formats::write_bytes(&outcome.restored)?;
    let mut notes = outcome.report.notes.clone();
    let model = match (&outcome.encoded, set.format) {
        (None, _) => None,
        (Some(_), formats::Format::Onnx) => {
            notes.push(
                "ONNX: model.onnx holds the dense restored weights until deployable ONNX \
                 (DequantizeLinear initializers) is built; bytes_after and bits_per_weight \
                 give the size of the encoded form"
                    .into(),
            );
            // The same bytes as restored.onnx: borrowed, not copied.
            Some((None, "onnx"))
        }
        (Some(enc), _) => {
            let (bytes, mext) = formats::write_encoded(&set, &enc.tensors, &enc.description)?;
            Some((Some(bytes), mext))
        }
    };
    let wants = |o: &str| plan.outputs.iter().any(|x| x == o);
    let archive = if wants("archive") {
        Some(formats::mpz::write(
            &set,
            &outcome.restored.tensors,
            &outcome.archive,
        )?)
    } else {
        None
    };
    let input_format = set.format;
    // The original tensors are no longer needed: free them before writing artifacts.
    drop(set);
    let model_bytes =
        |m: &Option<Vec<u8>>| -> usize { m.as_ref().map_or(restored_bytes.len(), Vec::len) };
    if input_format == formats::Format::Npy && model.is_some() {
        notes.push("an .npy holds one array, so model.npz carries the codes and scales".into());
    }
    let compressed_bytes = model
        .as_ref()
        .map(|(b, _)| model_bytes(b) as u64)
        .unwrap_or(u64::MAX)
        .min(restored_bytes.len() as u64)
        .min(archive.as_ref().map_or(u64::MAX, |a| a.len() as u64));
    let totals = &outcome.report.totals;
    let summary = Summary {
        original_bytes,
        compressed_bytes,
        ratio: if compressed_bytes > 0 {
            original_bytes as f64 / compressed_bytes as f64
        } else {
            0.0
        },
        parameters: totals.parameters,
        nonzero_parameters: totals.nonzero_parameters,
        mean_bits_per_weight: totals.mean_bits_per_weight,
        archive_bytes: archive.as_ref().map(|a| a.len() as u64),
    };
    let mut artifacts = Vec::new();
    if wants("model") {
        if let Some((bytes, mext)) = &model {
            let bytes = bytes.as_deref().unwrap_or(&restored_bytes);
            artifacts.push(write_artifact(out_dir, format!("model.{mext}"), bytes)?);
        }
    }
    if let Some(bytes) = &archive {
        artifacts.push(write_artifact(out_dir, "model.mpz".into(), bytes)?);
    }
    if wants("restored") {
        artifacts.push(write_artifact(
            out_dir,
            format!("restored.{ext}"),
            &restored_bytes,
        )?);
    }
    if wants("report") {
        let mut report = outcome.report;
        report.notes = notes;
        let doc = serde_json::json!({
            "summary": summary,
            "artifacts": artifacts.iter().map(|a| serde_json::json!({"name": a.name, "size_bytes": a.size_bytes, "sha256": a.sha256})).collect::<Vec<_>>(),
            "report": report,
        });
        let bytes =
            serde_json::to_vec_pretty(&doc).map_err(|e| RunError::Internal(e.to_string()))?;
        artifacts.push(write_artifact(out_dir, "report.json".into(), &bytes)?);
    }
    ctl.progress(1.0, "done");
    Ok(RunOutput { summary, artifacts })
}
