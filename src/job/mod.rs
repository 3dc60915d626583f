//! A job: its spec, parsed once ([`spec`]), and the stages that run it from a model file to
//! artifact files in a directory. The worker and the CLI both call [`execute`], so a job and
//! `modelpress compress` write the same bytes.
//!
//! Each stage is a function of what the stages before it made: distill → search →
//! calibrate → compress (or fine-tune) → deploy → evaluate → artifacts.

mod artifacts;
mod calibrate;
mod compress;
mod deploy;
mod distill;
mod error;
mod evaluate;
mod finetune;
mod io;
mod notes;
mod progress;
mod search;
pub mod spec;

pub use error::RunError;
pub use io::{
    ArtifactFile, CalibrationInput, Data, DistillInput, EvalInput, FinetuneInput, RunOutput,
    Summary,
};
pub use spec::{parse_spec, JobPlan};

use crate::compress::{Control, Plan};
use crate::formats;
use io::read_dataset;
use progress::{Span, SEARCH_SHARE, TRAINING_END};
use std::path::Path;

/// Compresses `input` as `job` says and writes the requested artifacts into `out_dir`.
pub fn execute(
    input: &Path,
    job: &JobPlan,
    out_dir: &Path,
    ctl: &dyn Control,
    data: Data,
) -> Result<RunOutput, RunError> {
    let Data {
        eval,
        calibration,
        finetune,
        distill,
    } = data;
    let (eval, calibration) = (eval.as_ref(), calibration.as_ref());
    let (finetune, distill) = (finetune.as_ref(), distill.as_ref());
    ctl.progress(0.0, "reading model");
    let original_bytes = std::fs::metadata(input)
        .map_err(RunError::io("read the model"))?
        .len();
    let set = formats::read_path(input)?;
    // Distillation replaces the model by a trained student; the job's steps compress that,
    // and the original stays the reference the evaluation and the ratios compare with.
    let (set, distilled) = distill::stage(set, distill, ctl)?;
    let distill_span = Span::new(ctl, TRAINING_END, 1.0);
    let ctl: &dyn Control = if distilled.is_some() {
        &distill_span
    } else {
        ctl
    };
    // A search chooses the pipeline first; the job then runs it as if it had been sent.
    let mut searched = search::stage(input, &set, job, eval, calibration, ctl)?;
    let chosen = searched.chosen.take();
    let span = Span::new(ctl, SEARCH_SHARE, 1.0);
    let (plan, ctl): (&Plan, &dyn Control) = match (&chosen, &searched.analysis) {
        (None, None) => (&job.compress, ctl),
        (None, Some(_)) => (&job.compress, &span),
        (Some(chosen), _) => (chosen, &span),
    };
    let search_measured = searched.measured.take();
    let calibrated = calibrate::stage(input, &set, plan, calibration, search_measured, ctl)?;
    let (mut outcome, training) = compress::stage(&set, plan, finetune, calibrated.as_ref(), ctl)?;
    outcome.report.format = set.format.as_str().into();
    let restored = set.with_tensors(std::mem::take(&mut outcome.restored));
    ctl.progress(0.92, "writing artifacts");
    let restored_bytes = formats::write_bytes(&restored)?;
    let mut notes = notes::Notes::from_report(&outcome.report);
    notes.distilled(distilled.as_ref());
    notes.data_use(calibrated.is_some(), calibration, eval, finetune, distill);
    let deployed = deploy::stage(
        &set,
        &restored,
        &restored_bytes,
        &outcome,
        plan,
        calibrated.as_ref(),
        distilled.is_some(),
        &mut notes,
    )?;
    let archive = (plan.outputs.iter().any(|o| o == "archive"))
        .then(|| crate::compress::archive::write(&set, &restored.tensors, &outcome.archive))
        .transpose()?;
    let (input_format, ext) = (set.format, set.format.extension());
    // The original tensors are no longer needed: free them before writing artifacts.
    drop(set);
    drop(restored);
    if input_format == formats::Format::Npy && deployed.model.is_some() {
        notes
            .notes
            .push("an .npy holds one array, so model.npz carries the codes and scales".into());
    }
    let checked = evaluate::stage(
        input,
        input_format,
        plan,
        eval,
        &deployed,
        &restored_bytes,
        ctl,
        &mut notes,
    )?;
    let made = artifacts::Made {
        original_bytes,
        outcome,
        restored_bytes,
        ext,
        deployed,
        archive,
        searched,
        calibrated,
        checked,
        training,
        distilled,
        notes,
    };
    let out = artifacts::finish(made, plan, calibration, out_dir)?;
    ctl.progress(1.0, "done");
    Ok(out)
}
