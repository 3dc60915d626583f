//! The deploy stage: `model.<ext>`, the file a runtime loads, with the forms its tensors
//! took and what could not take the form asked for.

use super::notes::Notes;
use super::RunError;
use crate::compress::{self, Plan};
use crate::deploy::{self, TensorForm};
use crate::formats;

/// The deployable model and what went into it.
pub(super) struct Deployed {
    /// The bytes of `model.<ext>` (None: the same bytes as `restored.<ext>`) and its
    /// extension; None when no step encoded anything (`restored` is the model).
    pub model: Option<(Option<Vec<u8>>, &'static str)>,
    /// `report.json`'s `deployable`: the file, its opset and each tensor's form.
    pub doc: serde_json::Value,
    /// Static int8: the weights and activations asked for, and what the writer did.
    pub statics: deploy::onnx::Statics,
    pub statics_written: Option<deploy::onnx::StaticsWritten>,
}

impl Deployed {
    /// The deployable file's bytes: `model.<ext>`, or `restored` when it is the model.
    pub fn bytes<'a>(&'a self, restored: &'a [u8]) -> &'a [u8] {
        self.model
            .as_ref()
            .and_then(|(b, _)| b.as_deref())
            .unwrap_or(restored)
    }
}

/// Writes the deployable model of `outcome` (a distilled student with no step after it is
/// the model as it is), and says where a form was not written as asked.
#[allow(clippy::too_many_arguments)]
pub(super) fn stage(
    set: &formats::TensorSet,
    restored: &formats::TensorSet,
    restored_bytes: &[u8],
    outcome: &compress::Outcome,
    plan: &Plan,
    measured: Option<&crate::calibrate::Measured>,
    distilled: bool,
    notes: &mut Notes,
) -> Result<Deployed, RunError> {
    let ext = set.format.extension();
    // Static int8: the ranges of the activations around each static weight's consumers.
    let (statics, unserved) = match measured {
        Some(m) => super::calibrate::static_plan(&outcome.activations, m),
        None => Default::default(),
    };
    let mut statics_written = None;
    let mut forms: Vec<TensorForm> = Vec::new();
    let mut doc = serde_json::Value::Null;
    let model = match (&outcome.encoded, &set.container) {
        // A distilled student with no step after it: the student is the deployable model.
        (None, _) if distilled => Some((Some(restored_bytes.to_vec()), ext)),
        (None, _) => None,
        (Some(_), formats::Container::Onnx(c)) => {
            let deployed = deploy::onnx::write(
                c,
                &restored.tensors,
                &outcome.encodings,
                plan.deploy,
                &statics,
            )?;
            forms = deployed.tensors;
            doc = serde_json::json!({
                "file": "model.onnx",
                "opset": deployed.opset,
                "tensors": forms,
            });
            statics_written = Some(deployed.statics);
            Some((Some(deployed.bytes), "onnx"))
        }
        (Some(enc), _) => {
            let (bytes, mext) = formats::write_encoded(set, &enc.tensors, &enc.description)?;
            Some((Some(bytes), mext))
        }
    };
    let mut not_static: Vec<String> = unserved;
    if let Some(why) = statics_written.as_ref().and_then(|w| w.refused.clone()) {
        not_static.insert(0, why);
    }
    if !not_static.is_empty() {
        let shown = not_static.len().min(6);
        notes.warn(
            "static_not_applied",
            format!(
                "activations were not quantized where a step asked for static int8 (those weights stay weight-only int8): {}{}",
                not_static[..shown].join("; "),
                if not_static.len() > shown { "; …" } else { "" }
            ),
        );
    }
    let dense: Vec<&TensorForm> = forms.iter().filter(|f| f.form == "dense").collect();
    if !dense.is_empty() {
        notes.warn(
            "dense_fallback",
            format!(
                "{} encoded tensor(s) stay dense in the deployable file ({}); model.mpz holds them compactly",
                dense.len(),
                dense
                    .iter()
                    .take(5)
                    .map(|f| format!("{}: {}", f.name, f.note.as_deref().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        );
    }
    // Tensors a step changed but that no encoding holds (pruning alone): their zeros are
    // stored densely in every format but the archive.
    let dense_changed = outcome
        .report
        .tensors
        .iter()
        .zip(&outcome.encodings)
        .filter(|(t, e)| e.is_none() && !t.methods.is_empty())
        .count();
    if dense_changed > 0 {
        notes.notes.push(format!(
            "{dense_changed} tensor(s) were changed without an encoding (e.g. unstructured pruning): \
             their zeros are stored densely in model.{ext} and restored.{ext}, which are no smaller \
             for it; model.mpz codes them sparsely"
        ));
    }
    Ok(Deployed {
        model,
        doc,
        statics,
        statics_written,
    })
}
