//! A job's spec, parsed once: the compression plan and what the job does around it (a
//! search for the pipeline, a sensitivity analysis, the blocks that name datasets, the
//! webhook). The API checks it at submit; the worker and the CLI run what it says.

use crate::calibrate::CalibrationSpec;
use crate::compress::{self, method::spec_err, CompressError, AUTO_PRESET};
use crate::eval::EvalSpec;
use crate::search::SearchSpec;
use crate::train::{DistillSpec, FinetuneSpec};
use serde_json::Value;

/// A job's spec, validated.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The steps, outputs and deploy style (empty steps when a search chooses them).
    pub compress: compress::Plan,
    /// `constraints` / preset `auto`: the runner searches for the pipeline.
    pub search: Option<SearchSpec>,
    /// `"analyze": true`: the per-layer sensitivity table, within this many seconds.
    pub analyze: Option<f64>,
    /// `eval`: the dataset and metric the result is scored on, and its gate.
    pub eval: Option<EvalSpec>,
    /// `calibration`: the dataset calibrated steps (and a search's GPTQ) learn from.
    pub calibration: Option<CalibrationSpec>,
    /// `finetune`: training the compressed model on a dataset.
    pub finetune: Option<FinetuneSpec>,
    /// `distill`: a narrower student trained on the model's outputs.
    pub distill: Option<DistillSpec>,
    /// `webhook.url`, checked for form (resolved at submit and at each delivery).
    pub webhook: Option<reqwest::Url>,
}

/// Validates a job spec (`preset` or `pipeline`, optional `options` and `outputs`, and the
/// blocks around them). `model_id` is allowed and ignored here; any other key is refused by
/// name.
pub fn parse_spec(spec: &Value) -> Result<JobPlan, CompressError> {
    let obj = spec
        .as_object()
        .ok_or_else(|| spec_err("spec", "must be a JSON object"))?;
    for key in obj.keys() {
        if ![
            "model_id",
            "preset",
            "pipeline",
            "outputs",
            "options",
            "latency",
            "deploy",
            "eval",
            "gate",
            "constraints",
            "max_seconds",
            "analyze",
            "calibration",
            "finetune",
            "distill",
            "webhook",
        ]
        .contains(&key.as_str())
        {
            return Err(spec_err(
                key,
                "unknown field (expected preset, options, pipeline, outputs, latency, deploy, eval, gate, calibration, finetune, distill, constraints, max_seconds, analyze, webhook)",
            ));
        }
    }
    let webhook = crate::webhook::parse(spec).map_err(CompressError::InvalidSpec)?;
    if obj.get("options").is_some_and(|o| !o.is_object()) {
        return Err(spec_err("options", "must be an object"));
    }
    let auto = obj.get("preset").and_then(Value::as_str) == Some(AUTO_PRESET);
    let search = SearchSpec::parse(obj.get("constraints"), obj.get("max_seconds"), auto)
        .map_err(|(field, m)| spec_err(&field, m))?;
    let analyze = match obj.get("analyze") {
        None | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(
            search
                .as_ref()
                .map_or(crate::search::DEFAULT_MAX_SECONDS, |s| s.max_seconds),
        ),
        Some(_) => return Err(spec_err("analyze", "must be true or false")),
    };
    let analyze = match (analyze, obj.get("max_seconds")) {
        (Some(_), Some(v)) if search.is_none() => Some(
            v.as_f64()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
                .ok_or_else(|| {
                    spec_err("max_seconds", "must be a number of seconds in (0, 86400]")
                })?,
        ),
        (a, _) => a,
    };
    if search.is_none() && analyze.is_none() && obj.contains_key("max_seconds") {
        return Err(spec_err(
            "max_seconds",
            "bounds a search or an analysis: give `constraints`, preset \"auto\" or \"analyze\": true",
        ));
    }
    if search.is_some() {
        if obj.contains_key("pipeline") || (obj.contains_key("preset") && !auto) {
            return Err(spec_err(
                "constraints",
                "a search chooses the pipeline: give constraints (or preset \"auto\") without a pipeline or another preset",
            ));
        }
        if obj.contains_key("options") {
            return Err(spec_err("options", "a search takes no options"));
        }
    }
    let compress = compress::parse_plan(spec, search.is_some())?;
    if obj.contains_key("finetune") && search.is_some() {
        return Err(spec_err(
            "finetune",
            "goes with a preset or pipeline, not with a search",
        ));
    }
    if obj.contains_key("distill") {
        // The student is a different model from the upload: what reads the upload itself
        // (a search, an analysis, calibration) cannot follow it yet.
        for (key, why) in [
            (
                "finetune",
                "the distilled student is trained already: give distill or finetune, not both",
            ),
            (
                "constraints",
                "goes with a preset or pipeline, not with distill",
            ),
            (
                "analyze",
                "measures the uploaded model, not the distilled student: not with distill",
            ),
            (
                "calibration",
                "calibrates on the uploaded model, not the distilled student: not with distill",
            ),
        ] {
            if obj.contains_key(key) || (key == "constraints" && search.is_some()) {
                return Err(spec_err(key, why));
            }
        }
    }
    let invalid = CompressError::InvalidSpec;
    Ok(JobPlan {
        compress,
        search,
        analyze,
        eval: EvalSpec::parse(spec).map_err(invalid)?,
        calibration: CalibrationSpec::parse(spec).map_err(invalid)?,
        finetune: FinetuneSpec::parse(spec).map_err(invalid)?,
        distill: DistillSpec::parse(spec).map_err(invalid)?,
        webhook,
    })
}
