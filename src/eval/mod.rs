//! Evaluation: running a model on a dataset ([`run`]) and scoring a candidate's outputs
//! against the original's ([`metrics`]), with the same figures as the shared cases'
//! `evaluate.py`.

pub mod check;
pub mod metrics;
pub mod run;

use crate::compress::Control;
use metrics::Metric;
use run::{Dataset, Feed, RunFailure};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// A job's `eval` block: score `model.onnx` against the original on a stored dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    pub dataset_id: Uuid,
    pub metric: Metric,
    /// The output to score (default: the first float output).
    pub output: Option<String>,
    /// decision_agreement's threshold.
    pub threshold: f64,
    /// None: whole when the arrays do not share axis 0, else batched, falling back to one
    /// row at a time when the model fixes its batch.
    pub feed: Option<Feed>,
    /// The spec's `gate.max_metric_drop`: the job is marked `failed_gate` beyond it.
    pub gate: Option<f64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GateParams {
    max_metric_drop: f64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalParams {
    dataset_id: String,
    metric: String,
    output: Option<String>,
    threshold: Option<f64>,
    feed: Option<String>,
}

/// A spec block's parameters; a refusal names the field (`eval.metric: …`).
pub fn block<T: serde::de::DeserializeOwned>(v: &Value, name: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            format!("{name}: {inner}")
        } else {
            format!("{name}.{path}: {inner}")
        }
    })
}

impl Feed {
    /// A block's optional `feed` field.
    pub fn parse_field(v: Option<&str>, field: &str) -> Result<Option<Feed>, String> {
        v.map(|f| {
            Feed::parse(f).ok_or_else(|| format!("{field}: must be batched, per_sample or whole"))
        })
        .transpose()
    }
}

impl EvalSpec {
    /// The spec's `eval` block (and `gate`, which needs one), if any; an error names the
    /// field (`eval.metric: …`).
    pub fn parse(spec: &Value) -> Result<Option<EvalSpec>, String> {
        let gate = match spec.get("gate") {
            None => None,
            Some(g) => {
                let p: GateParams = serde_path_to_error::deserialize(g.clone()).map_err(|e| {
                    let path = e.path().to_string();
                    format!("gate.{path}: {}", e.into_inner())
                })?;
                if !p.max_metric_drop.is_finite() || p.max_metric_drop < 0.0 {
                    return Err("gate.max_metric_drop: must be a number ≥ 0".into());
                }
                Some(p.max_metric_drop)
            }
        };
        let Some(v) = spec.get("eval") else {
            if gate.is_some() {
                return Err(
                    "gate: needs an `eval` block (the dataset and metric the gate judges)".into(),
                );
            }
            return Ok(None);
        };
        let p: EvalParams = block(v, "eval")?;
        let dataset_id = Uuid::parse_str(&p.dataset_id)
            .map_err(|_| format!("eval.dataset_id: {:?} is not a dataset id", p.dataset_id))?;
        let metric = Metric::parse(&p.metric).ok_or_else(|| {
            "eval.metric: must be top1, agreement, relative_error, decision_agreement or cosine"
                .to_string()
        })?;
        let feed = Feed::parse_field(p.feed.as_deref(), "eval.feed")?;
        let threshold = p.threshold.unwrap_or(0.5);
        if !threshold.is_finite() {
            return Err("eval.threshold: must be a finite number".into());
        }
        Ok(Some(EvalSpec {
            dataset_id,
            metric,
            output: p.output,
            threshold,
            feed,
            gate,
        }))
    }
}

/// The evaluation in a job's summary: the metric for the original and for `model.onnx`, the
/// drop, and every figure of the metric's family; or why it could not run.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Evaluation {
    pub dataset_id: Uuid,
    pub metric: Metric,
    pub engine: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feed: Option<String>,
    /// The metric of the original (top1 with labels: its accuracy; fidelity metrics: their
    /// value for a model against itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<f64>,
    /// How much worse the compressed model is (positive: worse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<Value>,
    /// Time per row of each model in tract, on this dataset and feed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<EvalLatency>,
    /// The spec's gate and its verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Gate>,
    /// Why no figure was produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl Evaluation {
    pub fn skipped(spec: &EvalSpec, why: impl Into<String>) -> Evaluation {
        Evaluation {
            dataset_id: spec.dataset_id,
            metric: spec.metric,
            engine: ENGINE.into(),
            output: None,
            feed: None,
            original: None,
            compressed: None,
            drop: None,
            scores: None,
            latency: None,
            gate: spec.gate.map(|max| Gate::judge(max, None)),
            skipped: Some(why.into()),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct EvalLatency {
    pub rows: usize,
    pub original_ms_per_row: f64,
    pub compressed_ms_per_row: f64,
}

/// A job's quality verdict against its gate.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    PassedGate,
    FailedGate,
    /// The evaluation could not run, so the gate could not judge: not a pass.
    NotEvaluated,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Gate {
    pub max_metric_drop: f64,
    pub quality: Quality,
}

impl Gate {
    pub fn judge(max_metric_drop: f64, drop: Option<f64>) -> Gate {
        let quality = match drop {
            None => Quality::NotEvaluated,
            Some(d) if d <= max_metric_drop => Quality::PassedGate,
            Some(_) => Quality::FailedGate,
        };
        Gate {
            max_metric_drop,
            quality,
        }
    }
}

const ENGINE: &str = "tract, in-process";

fn feed_name(f: Feed) -> &'static str {
    match f {
        Feed::Batched(_) => "batched",
        Feed::PerSample => "per_sample",
        Feed::Whole => "whole",
    }
}

/// The original's outputs on a dataset, computed once and scored against as many candidates
/// as a job makes (a sensitivity analysis or a search runs dozens).
pub struct Reference {
    pub outputs: run::Outputs,
    pub feed: Feed,
}

/// Why an evaluation produced no figure.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalFailure {
    Cancelled,
    /// The reason, for `Evaluation::skipped`.
    Skipped(String),
}

/// Progress of one run, mapped onto `[lo, hi]` of the job, and its cancellation.
fn ticker<'a>(
    ctl: &'a dyn Control,
    lo: f64,
    hi: f64,
    stage: &'a str,
) -> impl FnMut(usize, usize) -> bool + 'a {
    move |done, total| {
        if ctl.cancelled() {
            return false;
        }
        let f = if total > 0 {
            done as f64 / total as f64
        } else {
            0.0
        };
        ctl.progress(lo + (hi - lo) * f, stage);
        true
    }
}

impl Reference {
    /// Runs the original with the spec's feed, or (none given) whole when the arrays do not
    /// share axis 0, else batched and then one row at a time when the model fixes its batch.
    pub fn compute(
        original: &[u8],
        data: &Dataset,
        spec: &EvalSpec,
        ctl: &dyn Control,
        span: (f64, f64),
    ) -> Result<Reference, EvalFailure> {
        let feeds = run::feeds_to_try(data, spec.feed, 64);
        let mut last_err = String::new();
        for feed in feeds {
            let mut tick = ticker(ctl, span.0, span.1, "running the original on the dataset");
            match run::run(original, data, feed, spec.output.as_deref(), &mut tick) {
                Ok(outputs) => return Ok(Reference { outputs, feed }),
                Err(RunFailure::Stopped) => return Err(EvalFailure::Cancelled),
                Err(RunFailure::Failed(e)) => {
                    last_err = format!("the original ({} feed): {e}", feed_name(feed));
                }
            }
        }
        Err(EvalFailure::Skipped(last_err))
    }

    /// Runs `candidate` (ONNX bytes) with the reference's feed and scores it.
    pub fn score(
        &self,
        candidate: &[u8],
        data: &Dataset,
        spec: &EvalSpec,
        ctl: &dyn Control,
        span: (f64, f64),
    ) -> Result<Evaluation, EvalFailure> {
        let o = &self.outputs;
        let mut tick = ticker(ctl, span.0, span.1, "running model.onnx on the dataset");
        let c = match run::run(candidate, data, self.feed, Some(&o.name), &mut tick) {
            Ok(c) => c,
            Err(RunFailure::Stopped) => return Err(EvalFailure::Cancelled),
            Err(RunFailure::Failed(e)) => {
                return Err(EvalFailure::Skipped(format!("model.onnx: {e}")))
            }
        };
        let labels = data.labels.as_deref().filter(|l| l.len() == o.rows);
        if spec.metric == Metric::Top1 && labels.is_none() {
            return Err(EvalFailure::Skipped(
                "top1 needs labels, one per output row".into(),
            ));
        }
        let scores = metrics::score(
            spec.metric,
            &o.values,
            &c.values,
            o.rows,
            labels,
            spec.threshold,
        )
        .map_err(|e| EvalFailure::Skipped(e.to_string()))?;
        let compressed = scores.value(spec.metric);
        let original = match spec.metric {
            Metric::Top1 => scores.top1_accuracy_original,
            Metric::RelativeError => Some(0.0),
            _ => Some(1.0),
        };
        let drop = match (original, compressed) {
            (Some(a), Some(b)) if spec.metric.higher_is_better() => Some(a - b),
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let per_row = |s: f64| 1e3 * s / o.rows.max(1) as f64;
        Ok(Evaluation {
            dataset_id: spec.dataset_id,
            metric: spec.metric,
            engine: ENGINE.into(),
            output: Some(o.name.clone()),
            feed: Some(feed_name(self.feed).into()),
            original,
            compressed,
            drop,
            scores: serde_json::to_value(&scores).ok(),
            latency: Some(EvalLatency {
                rows: o.rows,
                original_ms_per_row: per_row(o.run_seconds),
                compressed_ms_per_row: per_row(c.run_seconds),
            }),
            gate: None,
            skipped: None,
        })
    }
}

/// Runs the original and the candidate (ONNX bytes) on `data` and scores the candidate;
/// progress moves over `span` of the job and cancellation stops between slices of rows.
pub fn evaluate(
    original: &[u8],
    candidate: &[u8],
    data: &Dataset,
    spec: &EvalSpec,
    ctl: &dyn Control,
    span: (f64, f64),
) -> Result<Evaluation, EvalFailure> {
    let mid = (span.0 + span.1) / 2.0;
    let reference = Reference::compute(original, data, spec, ctl, (span.0, mid))?;
    let mut e = reference.score(candidate, data, spec, ctl, (mid, span.1))?;
    e.gate = spec.gate.map(|max| Gate::judge(max, e.drop));
    Ok(e)
}
