//! The search stage: a search for the pipeline (`constraints`, preset `auto`) or the
//! sensitivity analysis (`"analyze": true`).

use super::progress::SEARCH_SHARE;
use super::{read_dataset, CalibrationInput, EvalInput, JobPlan, RunError};
use crate::compress::{self, Control, Plan};
use crate::formats;
use std::path::Path;

/// What the search stage found: the pipeline it chose with the search's outcome, the
/// calibration it measured on the way, or the analysis's table.
#[derive(Default)]
pub(super) struct Searched {
    pub chosen: Option<Plan>,
    pub found: Option<crate::search::SearchOutcome>,
    pub measured: Option<crate::calibrate::Measured>,
    pub analysis: Option<serde_json::Value>,
}

/// Runs the job's search or analysis, if it has one. With a search, the analysis is the
/// search's own table (in `chosen`).
pub(super) fn stage(
    input: &Path,
    set: &formats::TensorSet,
    job: &JobPlan,
    eval: Option<&EvalInput>,
    calibration: Option<&CalibrationInput>,
    ctl: &dyn Control,
) -> Result<Searched, RunError> {
    if let Some(s) = &job.search {
        let (chosen, found, measured) =
            search(input, set, &job.compress, s, eval, calibration, ctl)?;
        return Ok(Searched {
            chosen: Some(chosen),
            found: Some(found),
            measured,
            analysis: None,
        });
    }
    let analysis = match job.analyze {
        Some(max_seconds) => Some(analyze(input, set, max_seconds, eval, ctl)?),
        None => None,
    };
    Ok(Searched {
        analysis,
        ..Searched::default()
    })
}

/// What running the model needs: an eval block with its dataset, and an ONNX model.
fn model_and_data<'a, 'e>(
    input: &Path,
    set: &'a formats::TensorSet,
    eval: Option<&'e EvalInput<'e>>,
    what: &str,
) -> Result<
    (
        &'a formats::onnx::OnnxContainer,
        Vec<u8>,
        crate::eval::run::Dataset,
        &'e crate::eval::EvalSpec,
    ),
    RunError,
> {
    let eval = eval.ok_or_else(|| {
        RunError::InvalidSpec(format!("{what} needs an `eval` block (dataset and metric)"))
    })?;
    let formats::Container::Onnx(container) = &set.container else {
        return Err(RunError::InvalidSpec(format!(
            "{what} runs the model, so it needs an ONNX model"
        )));
    };
    let original = std::fs::read(input).map_err(RunError::io("read the model"))?;
    let data = read_dataset(eval.dataset)?;
    Ok((container, original, data, eval.spec))
}

fn search_error(e: crate::search::SearchError) -> RunError {
    match e {
        crate::search::SearchError::Cancelled => RunError::Cancelled,
        crate::search::SearchError::Unrunnable(m) => {
            RunError::InvalidModel(format!("cannot run the original on the dataset: {m}"))
        }
    }
}

/// `"analyze": true`: the sensitivity table (`sensitivity.json`).
fn analyze(
    input: &Path,
    set: &formats::TensorSet,
    max_seconds: f64,
    eval: Option<&EvalInput>,
    ctl: &dyn Control,
) -> Result<serde_json::Value, RunError> {
    let (container, original, data, spec) =
        model_and_data(input, set, eval, "analyze: the sensitivity analysis")?;
    crate::search::analyze(
        &set.tensors,
        container,
        &original,
        &data,
        spec,
        crate::search::DEFAULT_MIN_PARAMS,
        max_seconds,
        ctl,
        (0.0, SEARCH_SHARE),
    )
    .map_err(search_error)
}

/// Runs the job's search and returns the plan it chose (the job's outputs and options kept),
/// with the calibration it measured when the job has a `calibration` block (every quantize
/// setting is then GPTQ, and the chosen plan reuses the statistics).
fn search(
    input: &Path,
    set: &formats::TensorSet,
    plan: &Plan,
    spec: &crate::search::SearchSpec,
    eval: Option<&EvalInput>,
    calibration: Option<&CalibrationInput>,
    ctl: &dyn Control,
) -> Result<
    (
        Plan,
        crate::search::SearchOutcome,
        Option<crate::calibrate::Measured>,
    ),
    RunError,
> {
    let (container, original, data, eval_spec) =
        model_and_data(input, set, eval, "constraints: a search")?;
    let measured = match calibration {
        None => None,
        Some(_) => {
            let needs = compress::method::Needs {
                hessian: true,
                activations: None,
            };
            let targets: Vec<(usize, compress::method::Needs)> =
                crate::search::layer_indices(&set.tensors, spec.min_params)
                    .into_iter()
                    .map(|i| (i, needs))
                    .collect();
            Some(super::calibrate::calibrate_targets(
                input,
                set,
                &targets,
                calibration,
                ctl,
            )?)
        }
    };
    let block = calibration.map(|c| serde_json::json!({"dataset_id": c.spec.dataset_id}));
    let calibrated =
        measured
            .as_ref()
            .zip(block.clone())
            .map(|(m, block)| crate::search::Calibrated {
                core: &m.core,
                block,
            });
    let found = crate::search::search(
        &set.tensors,
        container,
        &original,
        &data,
        eval_spec,
        spec,
        eval.and_then(|e| e.cached_sensitivity),
        calibrated.as_ref(),
        ctl,
        (0.0, SEARCH_SHARE),
    )
    .map_err(search_error)?;
    if found.pipeline.is_empty() {
        return Err(RunError::InvalidModel(format!(
            "the search found no candidate to return: no layer of at least {} parameters could be compressed and scored",
            spec.min_params
        )));
    }
    let mut chosen_spec = serde_json::json!({"pipeline": found.pipeline});
    if let Some(b) = block {
        chosen_spec["calibration"] = b;
    }
    let mut chosen = compress::parse_plan(&chosen_spec, false)?;
    chosen.outputs = plan.outputs.clone();
    chosen.outputs_explicit = plan.outputs_explicit;
    chosen.latency = plan.latency;
    chosen.deploy = plan.deploy;
    Ok((chosen, found, measured))
}
