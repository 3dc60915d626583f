//! Evaluation: running a model on a dataset ([`run`]) and scoring a candidate's outputs
//! against the original's ([`metrics`]), with the same figures as the shared cases'
//! `evaluate.py`.

pub mod metrics;
pub mod run;

use metrics::Metric;
use run::{Dataset, Feed};
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

impl EvalSpec {
    /// The spec's `eval` block, if any; an error names the field (`eval.metric: …`).
    pub fn parse(spec: &Value) -> Result<Option<EvalSpec>, String> {
        let Some(v) = spec.get("eval") else {
            return Ok(None);
        };
        let p: EvalParams = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                format!("eval: {inner}")
            } else {
                format!("eval.{path}: {inner}")
            }
        })?;
        let dataset_id = Uuid::parse_str(&p.dataset_id)
            .map_err(|_| format!("eval.dataset_id: {:?} is not a dataset id", p.dataset_id))?;
        let metric = Metric::parse(&p.metric).ok_or_else(|| {
            "eval.metric: must be top1, agreement, relative_error, decision_agreement or cosine"
                .to_string()
        })?;
        let feed = match p.feed.as_deref() {
            None => None,
            Some(f) => Some(
                Feed::parse(f)
                    .ok_or_else(|| "eval.feed: must be batched, per_sample or whole".to_string())?,
            ),
        };
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
            skipped: Some(why.into()),
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

/// Runs the original and the candidate (ONNX bytes) on `data` and scores the candidate.
pub fn evaluate(original: &[u8], candidate: &[u8], data: &Dataset, spec: &EvalSpec) -> Evaluation {
    let rows_shared = data
        .describe()
        .map(|(_, rows)| rows.is_some())
        .unwrap_or(false);
    let feeds: Vec<Feed> = match spec.feed {
        Some(f) => vec![f],
        None if !rows_shared => vec![Feed::Whole],
        None => vec![Feed::Batched(64), Feed::PerSample],
    };
    let mut last_err = String::new();
    for feed in feeds {
        let o = match run::run(original, data, feed, spec.output.as_deref()) {
            Ok(o) => o,
            Err(e) => {
                last_err = format!("the original ({} feed): {e}", feed_name(feed));
                continue;
            }
        };
        let c = match run::run(candidate, data, feed, Some(&o.name)) {
            Ok(c) => c,
            Err(e) => return Evaluation::skipped(spec, format!("model.onnx: {e}")),
        };
        let labels = data.labels.as_deref().filter(|l| l.len() == o.rows);
        if spec.metric == Metric::Top1 && labels.is_none() {
            return Evaluation::skipped(spec, "top1 needs labels, one per output row");
        }
        let scores = match metrics::score(
            spec.metric,
            &o.values,
            &c.values,
            o.rows,
            labels,
            spec.threshold,
        ) {
            Ok(s) => s,
            Err(e) => return Evaluation::skipped(spec, e.to_string()),
        };
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
        return Evaluation {
            dataset_id: spec.dataset_id,
            metric: spec.metric,
            engine: ENGINE.into(),
            output: Some(o.name),
            feed: Some(feed_name(feed).into()),
            original,
            compressed,
            drop,
            scores: serde_json::to_value(&scores).ok(),
            skipped: None,
        };
    }
    Evaluation::skipped(spec, last_err)
}
