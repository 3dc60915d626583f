//! The last stage: the job summary and the artifact files (`model.<ext>`, `model.mpz`, the
//! JSON documents of a search, an analysis or a training, `restored.<ext>`, `report.json`).

use super::deploy::Deployed;
use super::notes::Notes;
use super::search::Searched;
use super::{evaluate, ArtifactFile, CalibrationInput, RunError, RunOutput, Summary};
use crate::compress::{self, Plan};
use std::path::Path;

/// Everything the stages made, for the summary and the files.
pub(super) struct Made {
    pub original_bytes: u64,
    pub outcome: compress::Outcome,
    pub restored_bytes: Vec<u8>,
    /// The input's extension (`restored.<ext>`).
    pub ext: &'static str,
    pub deployed: Deployed,
    pub archive: Option<Vec<u8>>,
    pub searched: Searched,
    pub calibrated: Option<crate::calibrate::Measured>,
    pub checked: evaluate::Measured,
    pub training: Option<serde_json::Value>,
    pub distilled: Option<serde_json::Value>,
    pub notes: Notes,
}

/// Writes the artifacts `plan.outputs` asks for into `out_dir`, with the summary.
pub(super) fn finish(
    made: Made,
    plan: &Plan,
    calibration: Option<&CalibrationInput>,
    out_dir: &Path,
) -> Result<RunOutput, RunError> {
    let summary = summary(&made, calibration);
    let Made {
        outcome,
        restored_bytes,
        ext,
        deployed,
        archive,
        searched,
        training,
        distilled,
        notes,
        ..
    } = made;
    let wants = |o: &str| plan.outputs.iter().any(|x| x == o);
    let mut artifacts = Vec::new();
    if wants("model") {
        if let Some((bytes, mext)) = &deployed.model {
            let bytes = bytes.as_deref().unwrap_or(&restored_bytes);
            artifacts.push(write_artifact(out_dir, format!("model.{mext}"), bytes)?);
        }
    }
    if let Some(bytes) = &archive {
        artifacts.push(write_artifact(out_dir, "model.mpz".into(), bytes)?);
    }
    let docs: Vec<(&str, &serde_json::Value)> = match (&searched.found, &searched.analysis) {
        (Some(found), _) => vec![
            ("search.json", &found.doc),
            ("sensitivity.json", &found.sensitivity),
        ],
        (None, Some(a)) => vec![("sensitivity.json", a)],
        (None, None) => Vec::new(),
    };
    let training_doc = training.as_ref().or(distilled.as_ref());
    for (name, doc) in docs
        .into_iter()
        .chain(training_doc.map(|t| ("training.json", t)))
    {
        let bytes = serde_json::to_vec_pretty(doc).map_err(RunError::json("a JSON artifact"))?;
        artifacts.push(write_artifact(out_dir, name.into(), &bytes)?);
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
        report.notes = notes.notes;
        report.warnings = notes.warnings;
        let doc = serde_json::json!({
            "summary": summary,
            "deployable": deployed.doc,
            "artifacts": artifacts.iter().map(|a| serde_json::json!({"name": a.name, "size_bytes": a.size_bytes, "sha256": a.sha256})).collect::<Vec<_>>(),
            "report": report,
        });
        let bytes = serde_json::to_vec_pretty(&doc).map_err(RunError::json("report.json"))?;
        artifacts.push(write_artifact(out_dir, "report.json".into(), &bytes)?);
    }
    let measured_sensitivity = searched
        .found
        .filter(|f| f.cacheable)
        .map(|f| f.sensitivity);
    Ok(RunOutput {
        summary,
        artifacts,
        measured_sensitivity,
    })
}

/// The job summary: sizes and ratios, the warnings, and what each stage measured.
fn summary(made: &Made, calibration: Option<&CalibrationInput>) -> Summary {
    let original_bytes = made.original_bytes;
    let ratio_of = |bytes: u64| {
        if bytes > 0 {
            original_bytes as f64 / bytes as f64
        } else {
            0.0
        }
    };
    let deployable_bytes = made.deployed.bytes(&made.restored_bytes).len() as u64;
    let totals = &made.outcome.report.totals;
    let archive = made.archive.as_ref();
    Summary {
        original_bytes,
        compressed_bytes: deployable_bytes,
        deployable_bytes,
        ratio: ratio_of(deployable_bytes),
        parameters: totals.parameters,
        nonzero_parameters: totals.nonzero_parameters,
        mean_bits_per_weight: totals.mean_bits_per_weight,
        archive_bytes: archive.map(|a| a.len() as u64),
        archive_ratio: archive.map(|a| ratio_of(a.len() as u64)),
        warnings: made.notes.warnings.clone(),
        latency: made.checked.latency.clone(),
        evaluation: made.checked.evaluation.clone(),
        quality: made.checked.quality,
        search: made.searched.found.as_ref().map(|f| f.summary.clone()),
        calibration: made
            .calibrated
            .as_ref()
            .map(|m| calibration_summary(made, m, calibration)),
        distill: made.distilled.as_ref().map(|t| {
            let mut s = super::finetune::training_summary(t);
            s["student"] = t["student"].clone();
            s
        }),
        finetune: made
            .training
            .as_ref()
            .map(super::finetune::training_summary),
        sensitivity: made.searched.analysis.as_ref().map(|a| {
            serde_json::json!({
                "layers": a["layers"].as_array().map_or(0, Vec::len),
                "settings": a["settings"].as_array().map_or(0, Vec::len),
                "complete": a["complete"],
                "seconds": a["seconds"],
            })
        }),
    }
}

/// What calibration measured, and the tensors GPTQ and static int8 served.
fn calibration_summary(
    made: &Made,
    m: &crate::calibrate::Measured,
    calibration: Option<&CalibrationInput>,
) -> serde_json::Value {
    let gptq = made
        .outcome
        .report
        .tensors
        .iter()
        .filter(|t| {
            t.details
                .get("calibration")
                .is_some_and(|c| c.get("method").is_some())
        })
        .count();
    serde_json::json!({
        "dataset_id": calibration.map(|c| c.spec.dataset_id),
        "rows": m.rows,
        "feed": m.feed.map(crate::calibrate::feed_name),
        "seconds": m.seconds,
        "gptq_tensors": gptq,
        "static_tensors": made.deployed.statics.weights.len(),
        "static_activations": made.deployed.statics_written.as_ref().map_or(0, |w| w.activations),
    })
}

fn write_artifact(dir: &Path, name: String, bytes: &[u8]) -> Result<ArtifactFile, RunError> {
    let path = dir.join(&name);
    std::fs::write(&path, bytes).map_err(RunError::io(format!("write {name}")))?;
    Ok(ArtifactFile {
        name,
        path,
        size_bytes: bytes.len() as u64,
        sha256: crate::util::sha256_hex(bytes),
    })
}
