//! The distillation stage: a narrower student cut from the model and trained on its
//! outputs replaces the model; the job's steps compress the student.

use super::finetune::{train_error, training_pool};
use super::progress::TRAINING_END;
use super::{read_dataset, DistillInput, RunError};
use crate::compress::Control;
use crate::formats;

/// The model the job's steps compress: the student when the job distills (with
/// `training.json`), the model itself otherwise.
pub(super) fn stage(
    set: formats::TensorSet,
    d: Option<&DistillInput>,
    ctl: &dyn Control,
) -> Result<(formats::TensorSet, Option<serde_json::Value>), RunError> {
    match d {
        None => Ok((set, None)),
        Some(d) => {
            let (student, log) = distill(&set, d, ctl)?;
            Ok((student, Some(log)))
        }
    }
}

/// Distillation: cuts a narrower student from the model (each narrowable layer keeps the
/// `width` share of its most important channels, measured on the training rows), trains it
/// on the teacher's outputs, and returns it as the model the job's steps then compress, with
/// `training.json`.
fn distill(
    set: &formats::TensorSet,
    d: &DistillInput,
    ctl: &dyn Control,
) -> Result<(formats::TensorSet, serde_json::Value), RunError> {
    use crate::train::narrow;
    let formats::Container::Onnx(container) = &set.container else {
        return Err(RunError::InvalidSpec(
            "distill runs the model, so it needs an ONNX model".into(),
        ));
    };
    let spec = &d.spec.train;
    let data = read_dataset(d.dataset)?;
    let validation = d.validation.map(read_dataset).transpose()?;
    let mut narrowing = narrow::find(&container.model, &set.tensors);
    if narrowing.cuts.is_empty() {
        return Err(RunError::InvalidModel(format!(
            "distill: no layer of this model can be narrowed yet ({})",
            narrowing.skipped.join("; ")
        )));
    }
    ctl.progress(0.0, "distill: measuring each channel's importance");
    let pool = training_pool()?;
    let features: Vec<(String, usize)> = narrowing
        .cuts
        .iter()
        .map(|c| (c.feature.clone(), c.feature_axis))
        .collect();
    let rms = pool
        .install(|| {
            // Importance is measured on the rows training learns from, never the held-out ones.
            crate::train::channel_rms(
                &container.model,
                &set.tensors,
                &data,
                spec,
                validation.is_some(),
                &features,
                ctl,
            )
        })
        .map_err(train_error("distill"))?;
    narrow::choose(&mut narrowing, &set.tensors, &rms, d.spec.width);
    let mut tensors = narrow::apply(&narrowing, &set.tensors);
    let student = crate::train::Student {
        model: &container.model,
        weights: &tensors,
        params: tensors
            .iter()
            .map(|_| crate::train::Param::default())
            .collect(),
        teacher: (&container.model, &set.tensors),
    };
    let trained = pool
        .install(|| {
            crate::train::finetune(
                student,
                &data,
                validation.as_ref(),
                spec,
                ctl,
                (0.02, TRAINING_END),
            )
        })
        .map_err(train_error("distill"))?;
    for (i, values) in &trained.values {
        tensors[*i].set_f32(values);
    }
    let count = |ts: &[formats::Tensor]| {
        ts.iter()
            .filter(|t| t.dtype.is_float())
            .map(|t| t.len() as u64)
            .sum::<u64>()
    };
    let mut log = trained.log;
    log["student"] = serde_json::json!({
        "width": d.spec.width,
        "layers": narrowing.cuts.iter().map(|c| serde_json::json!({
            "layer": c.layer,
            "into": c.into,
            "channels": c.channels,
            "kept": c.keep.len(),
        })).collect::<Vec<_>>(),
        "not_narrowed": narrowing.skipped,
        "float_parameters": count(&tensors),
        "teacher_float_parameters": count(&set.tensors),
    });
    let container = formats::onnx::resized(container, &tensors)?;
    Ok((
        formats::TensorSet {
            format: set.format,
            tensors,
            container: formats::Container::Onnx(std::sync::Arc::new(container)),
        },
        log,
    ))
}
