//! Activation ranges for static int8 quantization: what a calibration run saw of one value of
//! the graph (its min, max and a histogram) turned into the range its uint8 codes cover, by
//! min-max, percentile or entropy (the KL-divergence threshold of TensorRT's calibrator,
//! Migacz 2017). The runner collects the histograms (`crate::calibrate`); the deployable
//! writer puts the resulting scale and zero point into `QuantizeLinear`/`DequantizeLinear`.

use serde::{Deserialize, Serialize};

/// How a value's range is chosen from what calibration saw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeMethod {
    /// The smallest and largest value seen.
    Minmax,
    /// The two-sided percentile (e.g. 99.999 %: the top and bottom 0.001 % are clipped).
    Percentile,
    /// The clipping threshold whose quantized histogram is closest (KL divergence) to the
    /// one seen.
    Entropy,
}

impl RangeMethod {
    pub fn name(self) -> &'static str {
        match self {
            RangeMethod::Minmax => "minmax",
            RangeMethod::Percentile => "percentile",
            RangeMethod::Entropy => "entropy",
        }
    }
    /// Whether the range needs a histogram (a second pass over the data).
    pub fn needs_histogram(self) -> bool {
        self != RangeMethod::Minmax
    }
}

/// Static activation quantization as a step asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ActivationSpec {
    pub method: RangeMethod,
    /// For [`RangeMethod::Percentile`]: the percentile kept, in (50, 100).
    pub percentile: f64,
}

pub const DEFAULT_PERCENTILE: f64 = 99.999;

/// Bins of a calibration histogram (TensorRT and onnxruntime use 2048).
pub const HISTOGRAM_BINS: usize = 2048;

/// Counts of values in equal bins over `[lo, hi]` (values outside fall in the end bins).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub lo: f32,
    pub hi: f32,
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn new(lo: f32, hi: f32, bins: usize) -> Histogram {
        Histogram {
            lo,
            hi: if hi > lo { hi } else { lo + 1.0 },
            counts: vec![0; bins.max(1)],
        }
    }
    fn width(&self) -> f64 {
        (f64::from(self.hi) - f64::from(self.lo)) / self.counts.len() as f64
    }
    /// Adds values (bin from a multiplication: 1.6 GB/s against 0.2 GB/s for the edge search
    /// of [`Histogram::add_reference`] on 1 M floats).
    pub fn add(&mut self, values: &[f32]) {
        let n = self.counts.len();
        let lo = f64::from(self.lo);
        let inv = 1.0 / self.width();
        for &v in values {
            let b = ((f64::from(v) - lo) * inv).floor();
            let b = if b < 0.0 { 0 } else { (b as usize).min(n - 1) };
            self.counts[b] += 1;
        }
    }
    /// The slow, obvious version: each value's bin by searching the bin edges.
    pub fn add_reference(&mut self, values: &[f32]) {
        let n = self.counts.len();
        let w = self.width();
        let edge = |i: usize| f64::from(self.lo) + i as f64 * w;
        for &v in values {
            let v = f64::from(v);
            let b = (0..n).rfind(|&i| edge(i) <= v).unwrap_or(0);
            self.counts[b] += 1;
        }
    }
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    fn edge(&self, i: usize) -> f32 {
        (f64::from(self.lo) + i as f64 * self.width()) as f32
    }
}

/// What calibration saw of one value.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub min: f32,
    pub max: f32,
    /// Over `[min, max]`; None when the method needs none.
    pub histogram: Option<Histogram>,
}

/// The range the codes cover, always holding 0 (so that zero padding and ReLU zeros are
/// exact).
pub fn range(seen: &Observed, spec: &ActivationSpec) -> (f32, f32) {
    let (lo, hi) = match (spec.method, &seen.histogram) {
        (RangeMethod::Minmax, _) | (_, None) => (seen.min, seen.max),
        (RangeMethod::Percentile, Some(h)) => percentile_range(h, spec.percentile),
        (RangeMethod::Entropy, Some(h)) => entropy_range(h, seen.min, seen.max),
    };
    (lo.min(0.0), hi.max(0.0))
}

/// uint8 scale and zero point for a range holding 0 (onnxruntime's convention).
pub fn uint8_params(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = (hi - lo) / 255.0;
    if !(scale > 0.0 && scale.is_finite()) {
        return (1.0, 0);
    }
    let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0);
    (scale, zero as u8)
}

/// The values at the `(100 − p)` and `p` percentiles, as bin edges: the lower edge of the bin
/// where the bottom tail ends, the upper edge of the bin where the top tail starts.
pub fn percentile_range(h: &Histogram, p: f64) -> (f32, f32) {
    let total = h.total();
    if total == 0 {
        return (h.lo, h.hi);
    }
    let tail = ((1.0 - p / 100.0) * total as f64).floor() as u64;
    let n = h.counts.len();
    let mut seen = 0;
    let mut lo_bin = 0;
    for (i, &c) in h.counts.iter().enumerate() {
        if seen + c > tail {
            lo_bin = i;
            break;
        }
        seen += c;
    }
    seen = 0;
    let mut hi_bin = n - 1;
    for (i, &c) in h.counts.iter().enumerate().rev() {
        if seen + c > tail {
            hi_bin = i;
            break;
        }
        seen += c;
    }
    (h.edge(lo_bin), h.edge(hi_bin + 1))
}

/// The exact percentiles by sorting every value: nearest rank, as [`percentile_range`]
/// counts its tails.
pub fn percentile_reference(values: &[f32], p: f64) -> (f32, f32) {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let tail = ((1.0 - p / 100.0) * v.len() as f64).floor() as usize;
    (
        v[tail.min(v.len() - 1)],
        v[v.len() - 1 - tail.min(v.len() - 1)],
    )
}

/// The KL threshold: the histogram of |x| (or of x when nothing is negative) is clipped at
/// each candidate bin i (the clipped mass added to the last kept bin), merged into as many
/// bins as there are codes on that side (256 for non-negative values, 128 per sign), spread
/// back over the non-empty bins, and compared; the i with the smallest divergence wins.
pub fn entropy_range(h: &Histogram, min: f32, max: f32) -> (f32, f32) {
    let non_negative = min >= 0.0;
    let levels = if non_negative { 256 } else { 128 };
    // The magnitudes' histogram: fold the bins of [min, max] around zero.
    let top = max.abs().max(min.abs());
    if top == 0.0 || h.total() == 0 {
        return (min, max);
    }
    let bins = h.counts.len();
    let mut mag = vec![0u64; bins];
    for (i, &c) in h.counts.iter().enumerate() {
        let centre = (f64::from(h.edge(i)) + f64::from(h.edge(i + 1))) / 2.0;
        let b = ((centre.abs() / f64::from(top)) * bins as f64).floor() as usize;
        mag[b.min(bins - 1)] += c;
    }
    let width = f64::from(top) / bins as f64;
    let best = kl_threshold(&mag, levels);
    let t = (best as f64 * width) as f32;
    if non_negative {
        (0.0, t.min(max))
    } else {
        ((-t).max(min), t.min(max))
    }
}

/// The bin count (from `levels` to all of them) whose clipping loses least, by KL divergence.
fn kl_threshold(counts: &[u64], levels: usize) -> usize {
    let bins = counts.len();
    if bins <= levels {
        return bins;
    }
    let mut best = (f64::INFINITY, bins);
    for i in levels..=bins {
        let mut p: Vec<f64> = counts[..i].iter().map(|&c| c as f64).collect();
        let outliers: f64 = counts[i..].iter().map(|&c| c as f64).sum();
        p[i - 1] += outliers;
        // Merge into `levels` chunks, then spread each chunk over its non-empty bins.
        let mut q = vec![0f64; i];
        for l in 0..levels {
            let (a, b) = (l * i / levels, (l + 1) * i / levels);
            let chunk = &counts[a..b];
            let sum: f64 = chunk.iter().map(|&c| c as f64).sum();
            let nonzero = chunk.iter().filter(|&&c| c > 0).count();
            if nonzero > 0 {
                for (j, &c) in chunk.iter().enumerate() {
                    if c > 0 {
                        q[a + j] = sum / nonzero as f64;
                    }
                }
            }
        }
        // Where the clipped mass sits, q must not be empty (the divergence would be infinite).
        if p[i - 1] > 0.0 && q[i - 1] == 0.0 {
            q[i - 1] = 1.0;
        }
        let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
        if ps == 0.0 || qs == 0.0 {
            continue;
        }
        let kl: f64 = p
            .iter()
            .zip(&q)
            .filter(|(a, _)| **a > 0.0)
            .map(|(a, b)| {
                let (a, b) = (a / ps, b / qs);
                if b > 0.0 {
                    a * (a / b).ln()
                } else {
                    f64::INFINITY
                }
            })
            .sum();
        if kl < best.0 {
            best = (kl, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fast histogram equals the edge search, bin for bin, and the percentile read
        /// from it is within one bin of the exact one.
        #[test]
        fn histogram_and_percentile_match_reference(
            values in prop::collection::vec(-1000f32..1000f32, 1..400),
            p in 90f64..100f64,
            bins in 1usize..300,
        ) {
            let (lo, hi) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            let mut fast = Histogram::new(lo, hi, bins);
            fast.add(&values);
            let mut slow = Histogram::new(lo, hi, bins);
            slow.add_reference(&values);
            // Equal except where f64 rounding puts a value exactly on an edge.
            let moved: u64 = fast.counts.iter().zip(&slow.counts).map(|(a, b)| a.abs_diff(*b)).sum();
            prop_assert!(moved <= 2, "{moved} values moved bins");
            prop_assert_eq!(fast.total(), values.len() as u64);
            let (a, b) = percentile_range(&fast, p);
            let (x, y) = percentile_reference(&values, p);
            let w = fast.width() as f32 * 1.001 + 1e-3;
            prop_assert!(a <= x + w && a >= x - w, "low {} vs exact {}", a, x);
            prop_assert!(b <= y + w && b >= y - w, "high {} vs exact {}", b, y);
        }
    }

    /// A bell with rare, far outliers: min-max spends the codes on the outliers, entropy and
    /// percentile clip them.
    #[test]
    fn entropy_and_percentile_clip_rare_outliers() {
        let mut values: Vec<f32> = (0..20_000)
            .map(|i| {
                // A deterministic bell: the sum of three uniforms.
                let u = |k: u64| ((i as u64 * 2_654_435_761 + k * 97) % 10_007) as f32 / 10_007.0;
                u(1) + u(2) + u(3) - 1.5
            })
            .collect();
        values.extend([40.0, -35.0, 38.0]);
        let (lo, hi) = (-35.0, 40.0);
        let mut h = Histogram::new(lo, hi, HISTOGRAM_BINS);
        h.add(&values);
        let seen = Observed {
            min: lo,
            max: hi,
            histogram: Some(h),
        };
        let minmax = range(
            &seen,
            &ActivationSpec {
                method: RangeMethod::Minmax,
                percentile: 0.0,
            },
        );
        assert_eq!(minmax, (-35.0, 40.0));
        let pct = range(
            &seen,
            &ActivationSpec {
                method: RangeMethod::Percentile,
                percentile: 99.9,
            },
        );
        assert!(pct.1 < 2.0 && pct.0 > -2.0, "{pct:?}");
        let ent = range(
            &seen,
            &ActivationSpec {
                method: RangeMethod::Entropy,
                percentile: 0.0,
            },
        );
        assert!(ent.1 > 0.8 && ent.1 < 10.0, "{ent:?}");
        assert!(ent.0 < -0.8 && ent.0 > -10.0, "{ent:?}");
    }

    #[test]
    fn uint8_params_hold_zero_exactly() {
        let (s, z) = uint8_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, 64);
        assert_eq!(uint8_params(0.0, 255.0), (1.0, 0));
        assert_eq!(uint8_params(0.0, 0.0), (1.0, 0));
        // Only negative values: the range is widened to 0.
        assert_eq!(uint8_params(-2.55, -1.0).1, 255);
    }
}
