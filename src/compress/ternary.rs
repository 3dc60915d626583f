//! Extreme quantization: binary weights (sign × mean |w| per output channel, as XNOR-Net's
//! weight binarization and BinaryConnect) and ternary weights (TWN: threshold
//! Δ = 0.7 · mean |w|, scale α = mean |w| over the weights above Δ, per channel).
//! Both produce [`Quantized`] codes (binary: ±1 with 1 bit; ternary: -1/0/+1 with 2 bits).

use super::form::Encoding;
use super::method::{params, spec_err, Applied, Kind, Method, Registration, Working};
use super::quantize::{dequantize, ChannelLayout, Granularity, Quantized, Scheme};
use super::CompressError;
use crate::model::Tensor;
use serde_json::{Map, Value};

pub const BINARY: Registration = Registration {
    name: "binary",
    about: "1-bit weights: sign × mean |w| per channel (XNOR-Net, BinaryConnect)",
    file: "src/compress/ternary.rs",
    parse: parse_binary,
    forms: &[],
};

pub const TERNARY: Registration = Registration {
    name: "ternary",
    about: "-1/0/+1 × a scale per channel (TWN)",
    file: "src/compress/ternary.rs",
    parse: parse_ternary,
    forms: &[],
};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BinaryParams {
    granularity: Option<Granularity>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TernaryParams {
    granularity: Option<Granularity>,
    threshold: Option<f64>,
}

fn parse_binary(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: BinaryParams = params(obj, BINARY.name, at)?;
    Ok(Box::new(Binary {
        granularity: p.granularity.unwrap_or(Granularity::Channel),
    }))
}

fn parse_ternary(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: TernaryParams = params(obj, TERNARY.name, at)?;
    let threshold = match p.threshold {
        None => TWN_THRESHOLD,
        Some(t) if t > 0.0 && t < 10.0 => t as f32,
        Some(_) => return Err(spec_err(&at("threshold"), "must be a number in (0, 10)")),
    };
    Ok(Box::new(Ternary {
        granularity: p.granularity.unwrap_or(Granularity::Channel),
        threshold,
    }))
}

/// The `binary` step.
#[derive(Debug, Clone)]
pub struct Binary {
    pub granularity: Granularity,
}

/// The `ternary` step.
#[derive(Debug, Clone)]
pub struct Ternary {
    pub granularity: Granularity,
    /// Δ = threshold · mean |w|.
    pub threshold: f32,
}

fn packed_with_scales(t: &Tensor, bits: u64, g: Granularity) -> u64 {
    (t.len() as u64 * bits).div_ceil(8) + 4 * g.channels(t)
}

impl Method for Binary {
    fn label(&self) -> String {
        format!("binary({})", self.granularity.name())
    }
    fn kind(&self) -> Kind {
        Kind::Encode
    }
    fn estimate(&self, t: &Tensor, _pruned_first: bool) -> Option<u64> {
        Some(packed_with_scales(t, 1, self.granularity))
    }
    fn has_zero(&self) -> bool {
        false
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        let q = binarize(&w.values, &t.shape, self.granularity.axis(t));
        w.values = dequantize(&q, &t.shape);
        w.encoding = Some(Encoding::new(q));
        Ok(Applied::Ran)
    }
}

impl Method for Ternary {
    fn label(&self) -> String {
        format!("ternary({},{})", self.threshold, self.granularity.name())
    }
    fn kind(&self) -> Kind {
        Kind::Encode
    }
    fn estimate(&self, t: &Tensor, _pruned_first: bool) -> Option<u64> {
        Some(packed_with_scales(t, 2, self.granularity))
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        let q = ternarize(
            &w.values,
            &t.shape,
            self.granularity.axis(t),
            self.threshold,
        );
        w.values = dequantize(&q, &t.shape);
        w.encoding = Some(Encoding::new(q));
        Ok(Applied::Ran)
    }
}

/// TWN's threshold factor: Δ = 0.7 · E|w| approximates the optimum for Gaussian weights.
pub const TWN_THRESHOLD: f32 = 0.7;

fn channel_sums(
    values: &[f32],
    layout: &ChannelLayout,
    f: impl Fn(f32) -> Option<f32>,
) -> (Vec<f64>, Vec<u64>) {
    let ch = layout.channels.max(1);
    let (mut sum, mut count) = (vec![0f64; ch], vec![0u64; ch]);
    for (b, block) in values.chunks(layout.inner.max(1)).enumerate() {
        let c = b % ch;
        for &v in block {
            if let Some(x) = f(v) {
                sum[c] += f64::from(x);
                count[c] += 1;
            }
        }
    }
    (sum, count)
}

fn mean(sum: f64, count: u64) -> f32 {
    if count == 0 {
        0.0
    } else {
        (sum / count as f64) as f32
    }
}

/// Binary: code sign(w) (+1 for w ≥ 0), scale mean |w| of the channel.
pub fn binarize(values: &[f32], shape: &[usize], axis: Option<usize>) -> Quantized {
    let layout = ChannelLayout::new(shape, axis);
    let (sum, count) = channel_sums(values, &layout, |v| Some(v.abs()));
    let scales: Vec<f32> = sum.iter().zip(&count).map(|(&s, &c)| mean(s, c)).collect();
    let codes = values
        .iter()
        .map(|&v| if v >= 0.0 { 1i8 } else { -1 })
        .collect();
    Quantized {
        bits: 1,
        scheme: Scheme::Symmetric,
        axis,
        scales,
        zero_points: Vec::new(),
        codes,
        group_size: None,
    }
}

/// Ternary (TWN): Δ_c = factor · mean |w| of channel c; codes ±1 beyond ±Δ_c, else 0; scale
/// α_c = mean |w| of the weights beyond Δ_c.
pub fn ternarize(values: &[f32], shape: &[usize], axis: Option<usize>, factor: f32) -> Quantized {
    let layout = ChannelLayout::new(shape, axis);
    let ch = layout.channels.max(1);
    let (sum, count) = channel_sums(values, &layout, |v| Some(v.abs()));
    let delta: Vec<f32> = sum
        .iter()
        .zip(&count)
        .map(|(&s, &c)| factor * mean(s, c))
        .collect();
    let mut big_sum = vec![0f64; ch];
    let mut big_count = vec![0u64; ch];
    let mut codes = vec![0i8; values.len()];
    for (b, (block, out)) in values
        .chunks(layout.inner.max(1))
        .zip(codes.chunks_mut(layout.inner.max(1)))
        .enumerate()
    {
        let c = b % ch;
        let d = delta[c];
        for (o, &v) in out.iter_mut().zip(block) {
            if v.abs() > d {
                *o = if v > 0.0 { 1 } else { -1 };
                big_sum[c] += f64::from(v.abs());
                big_count[c] += 1;
            }
        }
    }
    let scales = big_sum
        .iter()
        .zip(&big_count)
        .map(|(&s, &c)| mean(s, c))
        .collect();
    Quantized {
        bits: 2,
        scheme: Scheme::Symmetric,
        axis,
        scales,
        zero_points: Vec::new(),
        codes,
        group_size: None,
    }
}

/// The slow, obvious binary: each channel's mean |w| over its members gathered by flat index.
pub fn binarize_reference(values: &[f32], shape: &[usize], axis: Option<usize>) -> Quantized {
    let layout = ChannelLayout::new(shape, axis);
    let ch = layout.channels.max(1);
    let scales = (0..ch)
        .map(|c| {
            let members: Vec<f32> = (0..values.len())
                .filter(|&i| layout.channel_of(i) == c)
                .map(|i| values[i].abs())
                .collect();
            mean(
                members.iter().map(|&v| f64::from(v)).sum(),
                members.len() as u64,
            )
        })
        .collect();
    Quantized {
        bits: 1,
        scheme: Scheme::Symmetric,
        axis,
        scales,
        zero_points: Vec::new(),
        codes: values
            .iter()
            .map(|&v| if v < 0.0 { -1 } else { 1 })
            .collect(),
        group_size: None,
    }
}

/// The slow, obvious ternary: every channel's members gathered by flat index, then the
/// formulas applied literally.
pub fn ternarize_reference(
    values: &[f32],
    shape: &[usize],
    axis: Option<usize>,
    factor: f32,
) -> Quantized {
    let layout = ChannelLayout::new(shape, axis);
    let ch = layout.channels.max(1);
    let mut scales = vec![0f32; ch];
    let mut codes = vec![0i8; values.len()];
    for (c, scale) in scales.iter_mut().enumerate() {
        let members: Vec<usize> = (0..values.len())
            .filter(|&i| layout.channel_of(i) == c)
            .collect();
        let abs_sum: f64 = members.iter().map(|&i| f64::from(values[i].abs())).sum();
        let delta = factor * mean(abs_sum, members.len() as u64);
        let big: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| values[i].abs() > delta)
            .collect();
        let big_sum: f64 = big.iter().map(|&i| f64::from(values[i].abs())).sum();
        *scale = mean(big_sum, big.len() as u64);
        for &i in &big {
            codes[i] = values[i].signum() as i8;
        }
    }
    Quantized {
        bits: 2,
        scheme: Scheme::Symmetric,
        axis,
        scales,
        zero_points: Vec::new(),
        codes,
        group_size: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::quantize::dequantize;
    use proptest::prelude::*;

    /// A random weight with a random shape and channel axis.
    #[derive(Debug, Clone)]
    struct TernaryProblem {
        shape: Vec<usize>,
        values: Vec<f32>,
        axis: Option<usize>,
    }

    fn problem() -> impl Strategy<Value = TernaryProblem> {
        (
            prop::collection::vec(1usize..6, 1..4),
            any::<bool>(),
            0usize..4,
        )
            .prop_flat_map(|(shape, per_channel, axis)| {
                let n: usize = shape.iter().product();
                let rank = shape.len();
                (
                    Just(shape),
                    prop::collection::vec(-10f32..10f32, n),
                    Just(per_channel.then_some(axis % rank)),
                )
                    .prop_map(|(shape, values, axis)| TernaryProblem {
                        shape,
                        values,
                        axis,
                    })
            })
    }

    proptest! {
        #[test]
        fn ternary_matches_reference(p in problem()) {
            let fast = ternarize(&p.values, &p.shape, p.axis, TWN_THRESHOLD);
            let slow = ternarize_reference(&p.values, &p.shape, p.axis, TWN_THRESHOLD);
            prop_assert_eq!(&fast.codes, &slow.codes);
            for (a, b) in fast.scales.iter().zip(&slow.scales) {
                // Sums in a different order: Close, 1e-5 relative.
                prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-30));
            }
        }

        #[test]
        fn binary_matches_reference_and_signs_match(p in problem()) {
            let q = binarize(&p.values, &p.shape, p.axis);
            let r = binarize_reference(&p.values, &p.shape, p.axis);
            prop_assert_eq!(&q.codes, &r.codes);
            for (a, b) in q.scales.iter().zip(&r.scales) {
                // Close: the same sum in another order, 1e-5 relative.
                prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-30));
            }
            let d = dequantize(&q, &p.shape);
            for (v, r) in p.values.iter().zip(&d) {
                prop_assert!(*r == 0.0 || (v >= &0.0) == (r > &0.0));
            }
        }
    }
}
