//! Scores a candidate's outputs against the original's on the same rows, with the figures
//! `../shared/cases/evaluate.py` prints, per family of metric:
//! - classifier (`top1`, `agreement`, `relative_error`): top-1 accuracy (with labels), top-1
//!   agreement with the original, relative L2 error, max abs difference;
//! - detector (`decision_agreement`): agreement of `score > threshold`, positive fractions,
//!   mean and max abs difference;
//! - embedding (`cosine`): cosine of each output row with the original's, mean, min, 5th
//!   percentile (numpy's linear interpolation).
//!
//! Everything is accumulated in f64 in one pass; [`reference`] recomputes each figure the
//! obvious way for the property test.

use serde::{Deserialize, Serialize};

/// The metric a job or the CLI asks for; it decides which family of figures is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Top1,
    Agreement,
    RelativeError,
    DecisionAgreement,
    Cosine,
}

impl Metric {
    pub fn parse(s: &str) -> Option<Metric> {
        Some(match s {
            "top1" => Metric::Top1,
            "agreement" => Metric::Agreement,
            "relative_error" => Metric::RelativeError,
            "decision_agreement" => Metric::DecisionAgreement,
            "cosine" => Metric::Cosine,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Metric::Top1 => "top1",
            Metric::Agreement => "agreement",
            Metric::RelativeError => "relative_error",
            Metric::DecisionAgreement => "decision_agreement",
            Metric::Cosine => "cosine",
        }
    }
    /// True when a larger value is better.
    pub fn higher_is_better(self) -> bool {
        self != Metric::RelativeError
    }
}

/// Every figure of the metric's family; absent ones do not apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub samples: usize,
    pub max_abs_diff: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_accuracy_original: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_l2_error: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positive_fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positive_fraction_original: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_abs_diff: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_p05: Option<f64>,
}

impl Scores {
    /// The value of `metric` (None when its family was not computed or labels are missing).
    pub fn value(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Top1 => self.top1_accuracy,
            Metric::Agreement => self.top1_agreement,
            Metric::RelativeError => self.rel_l2_error,
            Metric::DecisionAgreement => self.decision_agreement,
            Metric::Cosine => self.cosine_mean,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricError {
    #[error("the candidate's output has {candidate} values, the original's {original}")]
    ShapeMismatch { original: usize, candidate: usize },
    #[error("{labels} labels for {rows} rows")]
    LabelCount { labels: usize, rows: usize },
    #[error("no rows to score")]
    Empty,
}

/// Scores `candidate` against `original`, both `rows` rows of equal length, row-major.
/// `labels` (one class per row) give top-1 accuracy; `threshold` is the detector's.
pub fn score(
    metric: Metric,
    original: &[f32],
    candidate: &[f32],
    rows: usize,
    labels: Option<&[i64]>,
    threshold: f64,
) -> Result<Scores, MetricError> {
    if original.len() != candidate.len() {
        return Err(MetricError::ShapeMismatch {
            original: original.len(),
            candidate: candidate.len(),
        });
    }
    if rows == 0 || original.is_empty() || !original.len().is_multiple_of(rows) {
        return Err(MetricError::Empty);
    }
    if let Some(l) = labels {
        if l.len() != rows {
            return Err(MetricError::LabelCount {
                labels: l.len(),
                rows,
            });
        }
    }
    let width = original.len() / rows;
    let mut s = Scores {
        samples: rows,
        ..Scores::default()
    };
    let mut max_abs = 0f64;
    match metric {
        Metric::Top1 | Metric::Agreement | Metric::RelativeError => {
            let (mut agree, mut right, mut right0) = (0usize, 0usize, 0usize);
            let (mut noise, mut signal) = (0f64, 0f64);
            for (i, (r, c)) in original
                .chunks_exact(width)
                .zip(candidate.chunks_exact(width))
                .enumerate()
            {
                for (&a, &b) in r.iter().zip(c) {
                    let (a, b) = (f64::from(a), f64::from(b));
                    let d = b - a;
                    noise += d * d;
                    signal += a * a;
                    max_abs = max_abs.max(d.abs());
                }
                let (p0, p1) = (argmax(r), argmax(c));
                agree += usize::from(p0 == p1);
                if let Some(l) = labels {
                    right += usize::from(p1 as i64 == l[i]);
                    right0 += usize::from(p0 as i64 == l[i]);
                }
            }
            let n = rows as f64;
            if labels.is_some() {
                s.top1_accuracy = Some(right as f64 / n);
                s.top1_accuracy_original = Some(right0 as f64 / n);
            }
            s.top1_agreement = Some(agree as f64 / n);
            s.rel_l2_error = Some(noise.sqrt() / signal.sqrt());
        }
        Metric::DecisionAgreement => {
            let (mut agree, mut pos, mut pos0, mut sum_abs) = (0usize, 0usize, 0usize, 0f64);
            for (&a, &b) in original.iter().zip(candidate) {
                let (a, b) = (f64::from(a), f64::from(b));
                let (p0, p1) = (a > threshold, b > threshold);
                agree += usize::from(p0 == p1);
                pos += usize::from(p1);
                pos0 += usize::from(p0);
                let d = (b - a).abs();
                sum_abs += d;
                max_abs = max_abs.max(d);
            }
            let n = original.len() as f64;
            s.decision_agreement = Some(agree as f64 / n);
            s.positive_fraction = Some(pos as f64 / n);
            s.positive_fraction_original = Some(pos0 as f64 / n);
            s.mean_abs_diff = Some(sum_abs / n);
        }
        Metric::Cosine => {
            let mut cos = Vec::with_capacity(rows);
            for (r, c) in original
                .chunks_exact(width)
                .zip(candidate.chunks_exact(width))
            {
                let (mut dot, mut nr, mut nc) = (0f64, 0f64, 0f64);
                for (&a, &b) in r.iter().zip(c) {
                    let (a, b) = (f64::from(a), f64::from(b));
                    dot += a * b;
                    nr += a * a;
                    nc += b * b;
                    max_abs = max_abs.max((b - a).abs());
                }
                cos.push(dot / (nr.sqrt() * nc.sqrt()));
            }
            s.cosine_mean = Some(cos.iter().sum::<f64>() / rows as f64);
            s.cosine_min = Some(cos.iter().copied().fold(f64::INFINITY, f64::min));
            s.cosine_p05 = Some(percentile(&mut cos, 5.0));
        }
    }
    s.max_abs_diff = max_abs;
    Ok(s)
}

/// First index of the largest value (numpy's argmax; NaN counts as largest, as there).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// numpy's default (linear) percentile.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let pos = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The obvious computation of each figure, one at a time, for the property test.
pub mod reference {
    use super::*;

    pub fn score(
        metric: Metric,
        original: &[f32],
        candidate: &[f32],
        rows: usize,
        labels: Option<&[i64]>,
        threshold: f64,
    ) -> Scores {
        let width = original.len() / rows;
        let r: Vec<Vec<f64>> = original
            .chunks(width)
            .map(|c| c.iter().map(|&x| f64::from(x)).collect())
            .collect();
        let c: Vec<Vec<f64>> = candidate
            .chunks(width)
            .map(|c| c.iter().map(|&x| f64::from(x)).collect())
            .collect();
        let flat = |m: &Vec<Vec<f64>>| m.concat();
        let (fr, fc) = (flat(&r), flat(&c));
        let n = rows as f64;
        let mut s = Scores {
            samples: rows,
            max_abs_diff: fr
                .iter()
                .zip(&fc)
                .map(|(a, b)| (b - a).abs())
                .fold(0.0, f64::max),
            ..Scores::default()
        };
        let arg = |row: &Vec<f64>| {
            let mut best = 0;
            for i in 1..row.len() {
                if row[i] > row[best] {
                    best = i;
                }
            }
            best
        };
        match metric {
            Metric::Top1 | Metric::Agreement | Metric::RelativeError => {
                let p0: Vec<usize> = r.iter().map(arg).collect();
                let p1: Vec<usize> = c.iter().map(arg).collect();
                if let Some(l) = labels {
                    s.top1_accuracy = Some(
                        p1.iter().zip(l).filter(|(p, l)| **p as i64 == **l).count() as f64 / n,
                    );
                    s.top1_accuracy_original = Some(
                        p0.iter().zip(l).filter(|(p, l)| **p as i64 == **l).count() as f64 / n,
                    );
                }
                s.top1_agreement =
                    Some(p0.iter().zip(&p1).filter(|(a, b)| a == b).count() as f64 / n);
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let diff: Vec<f64> = fc.iter().zip(&fr).map(|(b, a)| b - a).collect();
                s.rel_l2_error = Some(norm(&diff) / norm(&fr));
            }
            Metric::DecisionAgreement => {
                let m = fr.len() as f64;
                let above = |v: &[f64]| v.iter().map(|x| *x > threshold).collect::<Vec<bool>>();
                let (a0, a1) = (above(&fr), above(&fc));
                s.decision_agreement =
                    Some(a0.iter().zip(&a1).filter(|(a, b)| a == b).count() as f64 / m);
                s.positive_fraction = Some(a1.iter().filter(|x| **x).count() as f64 / m);
                s.positive_fraction_original = Some(a0.iter().filter(|x| **x).count() as f64 / m);
                s.mean_abs_diff =
                    Some(fr.iter().zip(&fc).map(|(a, b)| (b - a).abs()).sum::<f64>() / m);
            }
            Metric::Cosine => {
                let mut cos: Vec<f64> = r
                    .iter()
                    .zip(&c)
                    .map(|(a, b)| {
                        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
                        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
                        dot / (na * nb)
                    })
                    .collect();
                s.cosine_mean = Some(cos.iter().sum::<f64>() / n);
                s.cosine_min = Some(cos.iter().copied().fold(f64::INFINITY, f64::min));
                cos.sort_by(f64::total_cmp);
                let pos = 0.05 * (cos.len() - 1) as f64;
                let lo = pos.floor() as usize;
                let hi = (lo + 1).min(cos.len() - 1);
                s.cosine_p05 = Some(cos[lo] + (cos[hi] - cos[lo]) * (pos - lo as f64));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Outputs of an original and a perturbed candidate, with labels and a metric.
    #[derive(Debug, Clone)]
    struct MetricProblem {
        rows: usize,
        original: Vec<f32>,
        candidate: Vec<f32>,
        labels: Vec<i64>,
        metric: Metric,
    }

    fn problem() -> impl Strategy<Value = MetricProblem> {
        (1usize..20, 1usize..12, 0usize..5).prop_flat_map(|(rows, width, m)| {
            let metric = [
                Metric::Top1,
                Metric::Agreement,
                Metric::RelativeError,
                Metric::DecisionAgreement,
                Metric::Cosine,
            ][m];
            (
                prop::collection::vec(-5f32..5.0, rows * width),
                prop::collection::vec(-0.5f32..0.5, rows * width),
                prop::collection::vec(0i64..width as i64, rows),
            )
                .prop_map(move |(original, noise, labels)| MetricProblem {
                    rows,
                    candidate: original.iter().zip(&noise).map(|(a, b)| a + b).collect(),
                    original,
                    labels,
                    metric,
                })
        })
    }

    /// Relative and absolute 1e-9: both sides sum the same f64 values in different orders.
    const TOL: f64 = 1e-9;

    fn close(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() <= TOL * (1.0 + a.abs().max(b.abs())),
            (None, None) => true,
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn score_matches_reference(p in problem()) {
            let fast = score(p.metric, &p.original, &p.candidate, p.rows, Some(&p.labels), 0.5).unwrap();
            let slow = reference::score(p.metric, &p.original, &p.candidate, p.rows, Some(&p.labels), 0.5);
            prop_assert_eq!(fast.samples, slow.samples);
            prop_assert!(close(Some(fast.max_abs_diff), Some(slow.max_abs_diff)));
            for (a, b) in [
                (fast.top1_accuracy, slow.top1_accuracy),
                (fast.top1_accuracy_original, slow.top1_accuracy_original),
                (fast.top1_agreement, slow.top1_agreement),
                (fast.rel_l2_error, slow.rel_l2_error),
                (fast.decision_agreement, slow.decision_agreement),
                (fast.positive_fraction, slow.positive_fraction),
                (fast.positive_fraction_original, slow.positive_fraction_original),
                (fast.mean_abs_diff, slow.mean_abs_diff),
                (fast.cosine_mean, slow.cosine_mean),
                (fast.cosine_min, slow.cosine_min),
                (fast.cosine_p05, slow.cosine_p05),
            ] {
                prop_assert!(close(a, b), "{:?} vs {:?}", a, b);
            }
        }
    }

    #[test]
    fn mismatched_outputs_are_errors() {
        assert!(matches!(
            score(Metric::Cosine, &[1.0, 2.0], &[1.0], 1, None, 0.5),
            Err(MetricError::ShapeMismatch { .. })
        ));
        assert_eq!(
            score(Metric::Top1, &[1.0, 2.0], &[1.0, 2.0], 2, Some(&[0]), 0.5),
            Err(MetricError::LabelCount { labels: 1, rows: 2 })
        );
    }
}

#[cfg(test)]
mod name_tests {
    use super::Metric;

    #[test]
    fn names_parse_back() {
        for m in [
            Metric::Top1,
            Metric::Agreement,
            Metric::RelativeError,
            Metric::DecisionAgreement,
            Metric::Cosine,
        ] {
            assert_eq!(Metric::parse(m.name()), Some(m));
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
    }
}
