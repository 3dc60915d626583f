//! Calibrated weight quantization: GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022). Each
//! output channel's weights are quantized one input at a time, in input order; the rounding
//! error of each is spread over the inputs not yet quantized, weighted by the inverse of the
//! inputs' second moment H = Σ x·xᵀ collected on calibration data. The layer's output error
//! on that data (‖(W − Q)·X‖²), not the weights' own error, is what gets small.
//!
//! The result is an ordinary [`Quantized`] form (same bits, scheme, scales and group layout
//! as round-to-nearest), so every deployable form and the archive take it unchanged. Used by
//! `quantize` with `"calibrated": true`; the statistics come from the runner, which runs the
//! model on the calibration dataset (`crate::calibrate`).

use super::quantize::{self, ChannelLayout, GroupLayout, Quantized, Scheme};
use faer::{Mat, Side};

/// The second moment of a weight's inputs over calibration data: H = Σ x·xᵀ, with x in the
/// weight's input order (input k of a channel is `outer_index·inner + inner_index` around the
/// channel axis, as [`GroupLayout`] numbers them: a MatMul weight's rows, a convolution's
/// C·kh·kw patch).
#[derive(Debug, Clone, PartialEq)]
pub struct Hessian {
    pub dim: usize,
    /// dim × dim, row-major, symmetric.
    pub values: Vec<f64>,
    /// Input vectors summed.
    pub samples: u64,
}

impl Hessian {
    pub fn zeros(dim: usize) -> Hessian {
        Hessian {
            dim,
            values: vec![0.0; dim * dim],
            samples: 0,
        }
    }
}

/// Dampening added to H's diagonal, as a fraction of its mean (the paper's 1 %): keeps the
/// inverse well conditioned when inputs are correlated or rarely active.
pub const DEFAULT_DAMP: f64 = 0.01;

/// Columns quantized between two lazy updates of the rest of the matrix (the paper's 128).
const BLOCK: usize = 128;

/// How a tensor is quantized: bits, scheme, and one scale per tensor, per channel or per
/// group of inputs within each channel.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub bits: u8,
    pub scheme: Scheme,
    /// The output-channel axis: rows of the matrix GPTQ works on.
    pub axis: usize,
    /// One scale for the whole tensor (the channel axis then only orders the work).
    pub per_tensor: bool,
    pub group_size: Option<usize>,
}

/// The weight as a [channels × inputs] matrix in f64, and the flat index of each entry.
struct View {
    channels: usize,
    inputs: usize,
    layout: ChannelLayout,
}

impl View {
    fn new(shape: &[usize], axis: usize) -> View {
        let layout = ChannelLayout::new(shape, Some(axis));
        View {
            channels: layout.channels.max(1),
            inputs: layout.outer * layout.inner,
            layout,
        }
    }
    /// The flat index of channel `c`, input `k`.
    fn flat(&self, c: usize, k: usize) -> usize {
        let inner = self.layout.inner.max(1);
        let (o, i) = (k / inner, k % inner);
        (o * self.channels + c) * inner + i
    }
}

/// Why GPTQ could not run on a tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GptqError {
    #[error("the calibration statistics have {got} inputs; the weight has {want}")]
    Dimension { got: usize, want: usize },
    #[error("the calibration statistics are not finite")]
    NotFinite,
    #[error("the inputs' second moment is not positive definite even with dampening")]
    NotPositiveDefinite,
}

/// H with dead inputs (never active in the calibration data, so nothing to weigh their
/// error by) given a unit diagonal, and `damp` · mean(diag) added to the diagonal.
fn damped(h: &Hessian, damp: f64) -> Vec<f64> {
    let n = h.dim;
    let mut m = h.values.clone();
    for k in 0..n {
        if m[k * n + k] <= 0.0 {
            m[k * n + k] = 1.0;
        }
    }
    let mean = (0..n).map(|k| m[k * n + k]).sum::<f64>() / n.max(1) as f64;
    for k in 0..n {
        m[k * n + k] += damp * mean;
    }
    m
}

fn checked(h: &Hessian, inputs: usize) -> Result<(), GptqError> {
    if h.dim != inputs || h.values.len() != inputs * inputs {
        return Err(GptqError::Dimension {
            got: h.dim,
            want: inputs,
        });
    }
    if h.values.iter().any(|v| !v.is_finite()) {
        return Err(GptqError::NotFinite);
    }
    Ok(())
}

/// U, upper triangular with H⁻¹ = Uᵀ·U (row-major): row i holds how the error of input i
/// spreads over the inputs after it. A failed factorization retries with ten times the
/// dampening, three times.
fn inverse_factor(h: &Hessian, damp: f64) -> Result<Mat<f64>, GptqError> {
    let n = h.dim;
    let mut d = damp;
    for _ in 0..4 {
        let m = damped(h, d);
        let hm = Mat::from_fn(n, n, |i, j| m[i * n + j]);
        if let Ok(llt) = hm.llt(Side::Lower) {
            let inv = faer::linalg::solvers::DenseSolveCore::inverse(&llt);
            // H⁻¹ = L₂·L₂ᵀ with L₂ lower, so U = L₂ᵀ.
            if let Ok(l2) = inv.llt(Side::Lower) {
                let l = l2.L();
                let u = Mat::from_fn(n, n, |i, j| if j >= i { l[(j, i)] } else { 0.0 });
                if (0..n).all(|i| u[(i, i)] > 0.0 && u[(i, i)].is_finite()) {
                    return Ok(u);
                }
            }
        }
        d *= 10.0;
    }
    Err(GptqError::NotPositiveDefinite)
}

/// The quantizer of one row (or the whole tensor): scale and zero point from a range.
#[derive(Debug, Clone, Copy)]
struct Step {
    scale: f32,
    zero: i8,
}

impl Step {
    fn from_range(lo: f64, hi: f64, grid: &Grid) -> Step {
        let (lo, hi) = if lo > hi { (0.0, 0.0) } else { (lo, hi) };
        let (scale, zero) = quantize::params(lo as f32, hi as f32, grid.bits, grid.scheme);
        Step { scale, zero }
    }
    /// The code that decodes to exactly 0.
    fn zero_code(self) -> i8 {
        self.zero
    }
    /// The code of `w` and the value it decodes to (as `dequantize` computes it, in f32).
    fn round(self, w: f64, qmin: f64, qmax: f64) -> (i8, f64) {
        let s = f64::from(self.scale);
        let z = f64::from(self.zero);
        let code = ((w / s).round_ties_even() + z).clamp(qmin, qmax);
        let back = (code as f32 - f32::from(self.zero)) * self.scale;
        (code as i8, f64::from(back))
    }
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    })
}

/// What both implementations share: the matrix, the quantizers fixed before the work starts
/// (per tensor, per channel), and the output they fill.
struct Work<'a> {
    view: View,
    grid: Grid,
    layout: Option<GroupLayout>,
    /// W [channels × inputs], column-major (faer), updated as errors spread.
    w: Mat<f64>,
    steps: Vec<Step>,
    codes: Vec<i8>,
    qmin: f64,
    qmax: f64,
    /// Flat indices that must stay exactly zero (pruned before): their code is the zero's,
    /// and their whole value is error to spread.
    fixed_zeros: &'a [bool],
}

impl<'a> Work<'a> {
    fn new(values: &[f32], shape: &[usize], grid: Grid, fixed_zeros: &'a [bool]) -> Work<'a> {
        let view = View::new(shape, grid.axis);
        let w = Mat::from_fn(view.channels, view.inputs, |c, k| {
            f64::from(values[view.flat(c, k)])
        });
        let layout = grid
            .group_size
            .map(|g| GroupLayout::new(shape, Some(grid.axis), g));
        let steps = match (&layout, grid.per_tensor) {
            (Some(l), _) => vec![
                Step {
                    scale: 1.0,
                    zero: 0
                };
                l.groups()
            ],
            (None, true) => {
                let (lo, hi) = range(values.iter().map(|&v| f64::from(v)));
                vec![Step::from_range(lo, hi, &grid)]
            }
            (None, false) => (0..view.channels)
                .map(|c| {
                    let (lo, hi) = range((0..view.inputs).map(|k| w[(c, k)]));
                    Step::from_range(lo, hi, &grid)
                })
                .collect(),
        };
        let (qmin, qmax) = quantize::code_range(grid.bits, grid.scheme);
        Work {
            codes: vec![0; values.len()],
            view,
            grid,
            layout,
            w,
            steps,
            qmin: f64::from(qmin),
            qmax: f64::from(qmax),
            fixed_zeros,
        }
    }

    /// [`Work::new`], once the statistics are known to fit the weight.
    fn checked(
        values: &[f32],
        shape: &[usize],
        grid: Grid,
        fixed_zeros: &'a [bool],
        h: &Hessian,
    ) -> Result<Work<'a>, GptqError> {
        checked(h, View::new(shape, grid.axis).inputs)?;
        Ok(Work::new(values, shape, grid, fixed_zeros))
    }

    /// At the first input of a group: its channels' quantizers from the current (already
    /// corrected) weights of the group.
    fn start_group(&mut self, k: usize) {
        let Some(l) = self.layout else { return };
        if !k.is_multiple_of(l.group_size) {
            return;
        }
        let end = (k + l.group_size).min(self.view.inputs);
        for c in 0..self.view.channels {
            let (lo, hi) = range((k..end).map(|j| self.w[(c, j)]));
            self.steps[c * l.blocks + k / l.group_size] = Step::from_range(lo, hi, &self.grid);
        }
    }

    fn step_of(&self, c: usize, k: usize) -> Step {
        match (&self.layout, self.grid.per_tensor) {
            (Some(l), _) => self.steps[c * l.blocks + k / l.group_size],
            (None, true) => self.steps[0],
            (None, false) => self.steps[c],
        }
    }

    /// Quantizes input `k` of every channel; returns each channel's error divided by U[k,k].
    fn quantize_column(&mut self, k: usize, pivot: f64) -> Vec<f64> {
        self.start_group(k);
        (0..self.view.channels)
            .map(|c| {
                let w = self.w[(c, k)];
                let flat = self.view.flat(c, k);
                let step = self.step_of(c, k);
                let (code, back) = if self.fixed_zeros.get(flat) == Some(&true) {
                    (step.zero_code(), 0.0)
                } else {
                    step.round(w, self.qmin, self.qmax)
                };
                self.codes[flat] = code;
                (w - back) / pivot
            })
            .collect()
    }

    fn finish(self) -> Quantized {
        let (scales, zps): (Vec<f32>, Vec<i8>) =
            self.steps.iter().map(|s| (s.scale, s.zero)).unzip();
        let axis = (!self.grid.per_tensor).then_some(self.grid.axis);
        let mut q = quantize::quantized(
            self.grid.bits,
            self.grid.scheme,
            axis,
            scales,
            zps,
            self.codes,
        );
        q.group_size = self.layout.map(|l| l.group_size);
        q
    }
}

/// GPTQ with lazy batch updates: within a block of columns errors spread at once; to the
/// columns after the block in one matrix product per block (the paper's algorithm 1).
/// `fixed_zeros` (empty, or one flag per value) marks pruned weights that must stay zero.
/// Values must be finite.
pub fn gptq(
    values: &[f32],
    shape: &[usize],
    grid: Grid,
    h: &Hessian,
    damp: f64,
    fixed_zeros: &[bool],
) -> Result<Quantized, GptqError> {
    let mut work = Work::checked(values, shape, grid, fixed_zeros, h)?;
    let n = work.view.inputs;
    let u = inverse_factor(h, damp)?;
    // A block holds whole groups, so a group's quantizer always sees its corrected weights.
    let block = match work.layout {
        Some(l) => l.group_size * BLOCK.div_ceil(l.group_size),
        None => BLOCK,
    };
    let channels = work.view.channels;
    let mut b0 = 0;
    while b0 < n {
        let b1 = (b0 + block).min(n);
        let mut errors = Mat::<f64>::zeros(channels, b1 - b0);
        for k in b0..b1 {
            let err = work.quantize_column(k, u[(k, k)]);
            for j in k + 1..b1 {
                let f = u[(k, j)];
                if f != 0.0 {
                    for (c, e) in err.iter().enumerate() {
                        work.w[(c, j)] -= e * f;
                    }
                }
            }
            for (c, e) in err.into_iter().enumerate() {
                errors[(c, k - b0)] = e;
            }
        }
        if b1 < n {
            let spread = errors.as_ref() * u.as_ref().submatrix(b0, b1, b1 - b0, n - b1);
            let mut rest = work.w.as_mut().submatrix_mut(0, b1, channels, n - b1);
            rest -= spread;
        }
        b0 = b1;
    }
    Ok(work.finish())
}

/// The slow, obvious version: Cholesky factorizations and the inverse written out, and every
/// column's error spread over all later columns at once.
pub fn gptq_reference(
    values: &[f32],
    shape: &[usize],
    grid: Grid,
    h: &Hessian,
    damp: f64,
    fixed_zeros: &[bool],
) -> Result<Quantized, GptqError> {
    let mut work = Work::checked(values, shape, grid, fixed_zeros, h)?;
    let n = work.view.inputs;
    let m = damped(h, damp);
    let l = cholesky(&m, n).ok_or(GptqError::NotPositiveDefinite)?;
    let inv = inverse_from_cholesky(&l, n);
    let l2 = cholesky(&inv, n).ok_or(GptqError::NotPositiveDefinite)?;
    let u = |i: usize, j: usize| l2[j * n + i];
    for k in 0..n {
        let err = work.quantize_column(k, u(k, k));
        for j in k + 1..n {
            for (c, e) in err.iter().enumerate() {
                work.w[(c, j)] -= e * u(k, j);
            }
        }
    }
    Ok(work.finish())
}

/// Lower-triangular L with m = L·Lᵀ (row-major), or None when m is not positive definite.
fn cholesky(m: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                let d = m[i * n + i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i * n + i] = d.sqrt();
            } else {
                l[i * n + j] = (m[i * n + j] - s) / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// (L·Lᵀ)⁻¹ by solving L·Lᵀ·x = e_j for each unit vector.
fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0.0; n * n];
    for j in 0..n {
        let mut y = vec![0.0; n];
        for i in 0..n {
            let s: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
            y[i] = (f64::from(u8::from(i == j)) - s) / l[i * n + i];
        }
        let mut x = vec![0.0; n];
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
            x[i] = (y[i] - s) / l[i * n + i];
        }
        for i in 0..n {
            inv[i * n + j] = x[i];
        }
    }
    inv
}

/// The layer's output error on the calibration data, tr((W − Q)·H·(W − Q)ᵀ), for comparing
/// quantizations of one weight (GPTQ minimizes it greedily).
pub fn output_error(
    original: &[f32],
    quantized: &[f32],
    shape: &[usize],
    axis: usize,
    h: &Hessian,
) -> f64 {
    let view = View::new(shape, axis);
    let n = view.inputs;
    let mut total = 0.0;
    for c in 0..view.channels {
        let d: Vec<f64> = (0..n)
            .map(|k| {
                let i = view.flat(c, k);
                f64::from(original[i]) - f64::from(quantized[i])
            })
            .collect();
        for i in 0..n {
            if d[i] == 0.0 {
                continue;
            }
            let row = &h.values[i * n..(i + 1) * n];
            total += d[i] * row.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::quantize::{dequantize, quantize, quantize_grouped};
    use crate::compress::testing::Tolerance;
    use proptest::prelude::*;

    /// Inputs x = A·z with correlated features: H = Σ x·xᵀ over `samples` draws.
    fn correlated_hessian(dim: usize, samples: usize, seed: u64) -> Hessian {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let mix: Vec<f64> = (0..dim * dim).map(|_| next()).collect();
        let mut h = Hessian::zeros(dim);
        for _ in 0..samples {
            let z: Vec<f64> = (0..dim).map(|_| next()).collect();
            let x: Vec<f64> = (0..dim)
                .map(|i| (0..dim).map(|j| mix[i * dim + j] * z[j]).sum::<f64>() + z[i])
                .collect();
            for i in 0..dim {
                for j in 0..dim {
                    h.values[i * dim + j] += x[i] * x[j];
                }
            }
            h.samples += 1;
        }
        h
    }

    #[derive(Debug, Clone)]
    struct GptqProblem {
        shape: Vec<usize>,
        axis: usize,
        values: Vec<f32>,
        grid: Grid,
        seed: u64,
    }

    fn problem() -> impl Strategy<Value = GptqProblem> {
        (
            prop::collection::vec(1usize..7, 2..4),
            2u8..=8,
            any::<bool>(),
            0usize..3,
            prop::option::of(1usize..9),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_flat_map(|(shape, bits, affine, axis, group, per_tensor, seed)| {
                let n: usize = shape.iter().product();
                let axis = axis % shape.len();
                (
                    Just(shape),
                    Just(axis),
                    prop::collection::vec(-10f32..10f32, n),
                    Just(Grid {
                        bits,
                        scheme: if affine {
                            Scheme::Affine
                        } else {
                            Scheme::Symmetric
                        },
                        axis,
                        per_tensor: per_tensor && group.is_none(),
                        group_size: group,
                    }),
                    Just(seed),
                )
            })
            .prop_map(|(shape, axis, values, grid, seed)| GptqProblem {
                shape,
                axis,
                values,
                grid,
                seed,
            })
    }

    impl GptqProblem {
        fn check(&self) {
            let view = View::new(&self.shape, self.axis);
            let h = correlated_hessian(view.inputs, 3 * view.inputs + 1, self.seed);
            let fast = gptq(&self.values, &self.shape, self.grid, &h, DEFAULT_DAMP, &[]).unwrap();
            let slow = gptq_reference(&self.values, &self.shape, self.grid, &h, DEFAULT_DAMP, &[])
                .unwrap();
            // Both spread the same errors in another order (f64, far from rounding ties).
            Tolerance::Exact.assert_i8(&fast.codes, &slow.codes);
            assert_eq!(fast.scales, slow.scales);
            assert_eq!(fast.zero_points, slow.zero_points);
            // The form is the one round-to-nearest writes: same layout of scales.
            let rtn = match self.grid.group_size {
                Some(g) => quantize_grouped(
                    &self.values,
                    &self.shape,
                    self.grid.bits,
                    self.grid.scheme,
                    Some(self.axis),
                    g,
                ),
                None => quantize(
                    &self.values,
                    &self.shape,
                    self.grid.bits,
                    self.grid.scheme,
                    (!self.grid.per_tensor).then_some(self.axis),
                ),
            };
            assert_eq!(fast.scales.len(), rtn.scales.len());
            assert_eq!(fast.group_size, rtn.group_size);
            assert_eq!(fast.axis, rtn.axis);
            // Fixed (per tensor, per channel) quantizers are those of round-to-nearest.
            if self.grid.group_size.is_none() {
                assert_eq!(fast.scales, rtn.scales);
            }
        }
    }

    proptest! {
        #[test]
        fn gptq_matches_reference(p in problem()) {
            p.check();
        }
    }

    /// On inputs with correlated features GPTQ's output error is well below round-to-nearest
    /// on the same grid (per channel and group-wise), though its weight error is larger.
    #[test]
    fn gptq_lowers_the_output_error_of_correlated_inputs() {
        let (out, inp) = (24usize, 64usize);
        let shape = [inp, out]; // a MatMul weight [K, N]: channels on the last axis
        let values: Vec<f32> = (0..inp * out)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 5) as f32))
            .collect();
        let h = correlated_hessian(inp, 400, 7);
        for (bits, group) in [(4u8, None), (4, Some(16)), (3, Some(32))] {
            let grid = Grid {
                bits,
                scheme: Scheme::Affine,
                axis: 1,
                per_tensor: false,
                group_size: group,
            };
            let q = gptq(&values, &shape, grid, &h, DEFAULT_DAMP, &[]).unwrap();
            let rtn = match group {
                Some(g) => quantize_grouped(&values, &shape, bits, Scheme::Affine, Some(1), g),
                None => quantize(&values, &shape, bits, Scheme::Affine, Some(1)),
            };
            let e_gptq = output_error(&values, &dequantize(&q, &shape), &shape, 1, &h);
            let e_rtn = output_error(&values, &dequantize(&rtn, &shape), &shape, 1, &h);
            assert!(
                e_gptq < 0.8 * e_rtn,
                "int{bits} group {group:?}: gptq {e_gptq} vs rtn {e_rtn}"
            );
        }
    }

    /// Weights pruned before stay exactly zero; the others absorb their error.
    #[test]
    fn pruned_weights_stay_zero() {
        let shape = [32usize, 8];
        let mut values: Vec<f32> = (0..256)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0)
            .collect();
        for v in values.iter_mut().step_by(3) {
            *v = 0.0;
        }
        let zeros: Vec<bool> = values.iter().map(|v| *v == 0.0).collect();
        let h = correlated_hessian(32, 100, 3);
        for scheme in [Scheme::Symmetric, Scheme::Affine] {
            let grid = Grid {
                bits: 4,
                scheme,
                axis: 1,
                per_tensor: false,
                group_size: Some(16),
            };
            let q = gptq(&values, &shape, grid, &h, DEFAULT_DAMP, &zeros).unwrap();
            let slow = gptq_reference(&values, &shape, grid, &h, DEFAULT_DAMP, &zeros).unwrap();
            assert_eq!(q.codes, slow.codes);
            let back = dequantize(&q, &shape);
            for (z, b) in zeros.iter().zip(&back) {
                if *z {
                    assert_eq!(*b, 0.0, "{scheme:?}");
                }
            }
        }
    }

    #[test]
    fn a_mismatched_or_broken_hessian_is_refused() {
        let values = [1.0f32; 12];
        let grid = Grid {
            bits: 4,
            scheme: Scheme::Symmetric,
            axis: 0,
            per_tensor: false,
            group_size: None,
        };
        let h = Hessian::zeros(5);
        assert_eq!(
            gptq(&values, &[3, 4], grid, &h, DEFAULT_DAMP, &[]).unwrap_err(),
            GptqError::Dimension { got: 5, want: 4 }
        );
        let mut h = Hessian::zeros(4);
        h.values[0] = f64::NAN;
        assert_eq!(
            gptq(&values, &[3, 4], grid, &h, DEFAULT_DAMP, &[]).unwrap_err(),
            GptqError::NotFinite
        );
        // Inputs never active: nothing to weigh by; the weights round to nearest.
        let q = gptq(
            &values,
            &[3, 4],
            grid,
            &Hessian::zeros(4),
            DEFAULT_DAMP,
            &[],
        )
        .unwrap();
        let rtn = quantize(&values, &[3, 4], 4, Scheme::Symmetric, Some(0));
        assert_eq!(q.codes, rtn.codes);
    }
}
