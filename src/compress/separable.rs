//! Compact filters for convolution kernels [O, C, kh, kw]:
//! - spatially separable filters (Jaderberg, Vedaldi, Zisserman 2014, scheme 1): each kh×kw
//!   filter W[o,c] ≈ Σ_t v_t·h_tᵀ by its own SVD, i.e. a kh×1 convolution followed by a
//!   1×kw one, with the same rank r for every filter of the tensor;
//! - Tucker-2 (Kim et al. 2016): W ≈ core ×₀ U_out ×₁ U_in, a 1×1 convolution C→R_in, a kh×kw
//!   convolution R_in→R_out, and a 1×1 convolution R_out→O, by HOSVD.
//!
//! Reconstruction loops have a fixed summation order, so an archive rebuilds `restored` bit
//! for bit on any machine.
//!
//! The `separable` and `tucker2` methods, and their forms.

use super::coding::{self, f32_bytes, CodingStats, Payload, Repr, StageBytes};
use super::form::{Encoding, Form, Parts, Stored, Trained};
use super::lower::{Consumers, Graph, Rewrite};
use super::lowrank::{choose_rank, rank_rule, singular_values, thin_svd, RankRule};
use super::method::{params, Applied, Decoder, Kind, Method, Registration, Working};
use super::{is_conv, CompressError};
use crate::model::Tensor;
use faer::Mat;
use serde::Serialize;
use serde_json::{json, Map, Value};

pub const SEPARABLE: Registration = Registration {
    name: "separable",
    about: "conv kernels as a kh×1 then a 1×kw convolution per filter (Jaderberg et al.)",
    file: "src/compress/separable.rs",
    parse: parse_separable,
    forms: &[Decoder {
        encoding: "separable",
        decode: decode_separable,
    }],
};

pub const TUCKER2: Registration = Registration {
    name: "tucker2",
    about: "conv kernels as 1×1, core and 1×1 convolutions by HOSVD (Kim et al.)",
    file: "src/compress/separable.rs",
    parse: parse_tucker2,
    forms: &[Decoder {
        encoding: "tucker2",
        decode: decode_tucker2,
    }],
};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    rank: Option<u64>,
    energy: Option<f64>,
    ratio: Option<f64>,
}

fn parse_separable(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: Params = params(obj, SEPARABLE.name, at)?;
    Ok(Box::new(SeparableStep {
        rule: rank_rule(p.rank, p.energy, p.ratio, at)?,
    }))
}

fn parse_tucker2(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: Params = params(obj, TUCKER2.name, at)?;
    Ok(Box::new(Tucker2Step {
        rule: rank_rule(p.rank, p.energy, p.ratio, at)?,
    }))
}

/// The `separable` step.
#[derive(Debug, Clone)]
pub struct SeparableStep {
    pub rule: RankRule,
}

/// The `tucker2` step.
#[derive(Debug, Clone)]
pub struct Tucker2Step {
    pub rule: RankRule,
}

/// What a kernel factorization gives: the rebuilt values, its report entry, its form.
type Factored = (Vec<f32>, (&'static str, Value), Encoding);

/// Runs a factorization of a convolution kernel; anything else, or a factorization that does
/// not pay, leaves the tensor alone with the reason.
fn factor_kernel(
    t: &Tensor,
    w: &mut Working,
    factor: impl FnOnce(&[f32]) -> Result<Factored, String>,
) -> Result<Applied, CompressError> {
    if !is_conv(t) {
        return Ok(Applied::Skipped("not a convolution kernel".into()));
    }
    match factor(&w.values) {
        Ok((values, (key, details), encoding)) => {
            w.values = values;
            w.details.insert(key.into(), details);
            w.encoding = Some(encoding);
            Ok(Applied::Ran)
        }
        Err(why) => Ok(Applied::Skipped(why)),
    }
}

impl Method for SeparableStep {
    fn label(&self) -> String {
        format!("separable({})", self.rule.label())
    }
    fn kind(&self) -> Kind {
        Kind::Factorize
    }
    fn estimate(&self, _t: &Tensor, _pruned_first: bool) -> Option<u64> {
        None
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        factor_kernel(t, w, |v| {
            let s = separate(v, &t.shape, self.rule)?;
            let details = json!({"rank": s.rank, "cost": s.cost()});
            Ok((s.reconstruct(), ("separable", details), Encoding::new(s)))
        })
    }
}

impl Method for Tucker2Step {
    fn label(&self) -> String {
        format!("tucker2({})", self.rule.label())
    }
    fn kind(&self) -> Kind {
        Kind::Factorize
    }
    fn estimate(&self, _t: &Tensor, _pruned_first: bool) -> Option<u64> {
        None
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        factor_kernel(t, w, |v| {
            let k = tucker2(v, &t.shape, self.rule)?;
            let details = json!({"rank_out": k.rank_out, "rank_in": k.rank_in, "cost": k.cost()});
            Ok((k.reconstruct(), ("tucker2", details), Encoding::new(k)))
        })
    }
}

impl Form for Separable {
    fn decode(&self, _shape: &[usize]) -> Vec<f32> {
        self.reconstruct()
    }
    fn trained(&self, _shape: &[usize]) -> Trained {
        Trained::Dense
    }
    fn rezero(&mut self, _values: &[f32], _shape: &[usize]) -> Result<(), String> {
        Err("a factorization; prune first".into())
    }
    fn store(&self, t: &Tensor, parts: &mut Parts) -> Stored {
        let [o, c, kh, kw] = self.shape;
        let (v, nv) = parts.push_f32("v", vec![o, c, kh, self.rank], &self.v);
        let (h, nh) = parts.push_f32("h", vec![o, c, self.rank, kw], &self.h);
        Stored {
            bytes: nv + nh,
            axis: None,
            description: json!({
                "encoding": "separable", "v": v, "h": h, "shape": t.shape,
                "original_dtype": t.dtype.name(),
                "decode": "w[o,c] = v[o,c] @ h[o,c] (a kh×1 then a 1×kw convolution)",
            }),
        }
    }
    fn payload(
        &self,
        _values: &[f32],
        _huffman: bool,
        _pruned: bool,
    ) -> (Payload, Option<CodingStats>, StageBytes) {
        coding::plain(
            Repr::new("separable", &SeparableRepr { rank: self.rank }),
            vec![
                ("v".into(), f32_bytes(&self.v)),
                ("h".into(), f32_bytes(&self.h)),
            ],
        )
    }
    fn deploy_refusal(&self, shape: &[usize], _opset: i64) -> Option<String> {
        (self.shape.iter().product::<usize>() != shape.iter().product::<usize>())
            .then(|| "separable factors do not cover the kernel".into())
    }
    fn lower(&self, g: &mut dyn Graph, shape: &[usize]) -> String {
        let [o, c, kh, kw] = self.shape;
        let v = g.floats(&[o, c, kh, self.rank], &self.v);
        let h = g.floats(&[o, c, self.rank, kw], &self.h);
        let same = shape == self.shape;
        let w = g.binary("MatMul", v, h, same);
        if !same {
            g.reshape(w, shape, true);
        }
        "MatMul(separable)".into()
    }
}

impl Form for Tucker2 {
    fn decode(&self, _shape: &[usize]) -> Vec<f32> {
        self.reconstruct()
    }
    fn trained(&self, _shape: &[usize]) -> Trained {
        Trained::Dense
    }
    fn rezero(&mut self, _values: &[f32], _shape: &[usize]) -> Result<(), String> {
        Err("a factorization; prune first".into())
    }
    fn store(&self, t: &Tensor, parts: &mut Parts) -> Stored {
        let (uo, n1) = parts.push_f32("u_out", vec![self.out_channels, self.rank_out], &self.u_out);
        let mut core_shape = vec![self.rank_out, self.rank_in];
        core_shape.extend_from_slice(&t.shape[2..]);
        let (core, n2) = parts.push_f32("core", core_shape, &self.core);
        let (ui, n3) = parts.push_f32("u_in", vec![self.in_channels, self.rank_in], &self.u_in);
        Stored {
            bytes: n1 + n2 + n3,
            axis: None,
            description: json!({
                "encoding": "tucker2", "u_out": uo, "core": core, "u_in": ui, "shape": t.shape,
                "original_dtype": t.dtype.name(),
                "decode": "w = einsum('oa,ab...,cb->oc...', u_out, core, u_in): a 1×1 conv C→R_in, the core conv, a 1×1 conv R_out→O",
            }),
        }
    }
    fn payload(
        &self,
        _values: &[f32],
        _huffman: bool,
        _pruned: bool,
    ) -> (Payload, Option<CodingStats>, StageBytes) {
        coding::plain(
            Repr::new(
                "tucker2",
                &Tucker2Repr {
                    rank_out: self.rank_out,
                    rank_in: self.rank_in,
                },
            ),
            vec![
                ("u_out".into(), f32_bytes(&self.u_out)),
                ("core".into(), f32_bytes(&self.core)),
                ("u_in".into(), f32_bytes(&self.u_in)),
            ],
        )
    }
    /// In the compute path where every consumer is an ungrouped Conv: a 1×1 convolution
    /// C→R_in, the core R_in→R_out with the consumer's window, a 1×1 one R_out→O. Else the
    /// kernel rebuilt by `MatMul`s.
    fn lower(&self, g: &mut dyn Graph, shape: &[usize]) -> String {
        if shape.len() >= 3
            && shape[..2] == [self.out_channels, self.in_channels]
            && g.consumers() == Some(Consumers::Conv)
        {
            let ones = shape.len() - 2;
            let mut first_dims = vec![self.rank_in, self.in_channels];
            first_dims.extend(std::iter::repeat_n(1, ones));
            // u_in is [C, R_in]; the first convolution's filters are its columns.
            let mut first = Vec::with_capacity(self.u_in.len());
            for b in 0..self.rank_in {
                for ci in 0..self.in_channels {
                    first.push(self.u_in[ci * self.rank_in + b]);
                }
            }
            let first = g.floats(&first_dims, &first);
            let mut core_dims = vec![self.rank_out, self.rank_in];
            core_dims.extend_from_slice(&shape[2..]);
            let spatial = g.floats(&core_dims, &self.core);
            let mut last_dims = vec![self.out_channels, self.rank_out];
            last_dims.extend(std::iter::repeat_n(1, ones));
            let pointwise = g.floats(&last_dims, &self.u_out);
            g.rewrite(Rewrite::ConvFactors {
                first: Some(first),
                spatial,
                pointwise,
            });
            return "Conv1x1·Conv·Conv1x1 (Tucker-2 in the compute path)".into();
        }
        let u_in = g.floats(&[self.in_channels, self.rank_in], &self.u_in);
        let core = g.floats(&[self.rank_out, self.rank_in, self.window], &self.core);
        let u_out = g.floats(&[self.out_channels, self.rank_out], &self.u_out);
        // [C, R_in] · [R_out, R_in, window] broadcasts to [R_out, C, window].
        let t = g.binary("MatMul", u_in, core, false);
        let t = g.reshape(t, &[self.rank_out, self.in_channels * self.window], false);
        let w = g.binary("MatMul", u_out, t, false);
        g.reshape(w, shape, true);
        "MatMul(tucker2)".into()
    }
}

/// The archive entry of separable factors. Sections `v` [O,C,kh,r], `h` [O,C,r,kw] (f32).
#[derive(Serialize, serde::Deserialize)]
struct SeparableRepr {
    rank: usize,
}

/// The archive entry of Tucker-2 factors. Sections `u_out` [O,R_out], `core`
/// [R_out,R_in,window], `u_in` [C,R_in] (f32).
#[derive(Serialize, serde::Deserialize)]
struct Tucker2Repr {
    rank_out: usize,
    rank_in: usize,
}

fn decode_separable(
    repr: &Repr,
    shape: &[usize],
    section: &coding::Section<'_, '_>,
) -> Result<Vec<f32>, coding::DecodeError> {
    let p: SeparableRepr = repr.params()?;
    Ok(Separable::from_archive(p.rank, shape, section)?.reconstruct())
}

fn decode_tucker2(
    repr: &Repr,
    shape: &[usize],
    section: &coding::Section<'_, '_>,
) -> Result<Vec<f32>, coding::DecodeError> {
    let p: Tucker2Repr = repr.params()?;
    Ok(Tucker2::from_archive(p.rank_out, p.rank_in, shape, section)?.reconstruct())
}

/// Parameters and multiply-adds per output position, before and after.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cost {
    pub parameters_before: usize,
    pub parameters_after: usize,
    pub macs_per_position_before: usize,
    pub macs_per_position_after: usize,
}

/// Spatially separable factors: v [O, C, kh, r] and h [O, C, r, kw].
#[derive(Debug, Clone, PartialEq)]
pub struct Separable {
    pub shape: [usize; 4],
    pub rank: usize,
    pub v: Vec<f32>,
    pub h: Vec<f32>,
}

impl Separable {
    pub fn reconstruct(&self) -> Vec<f32> {
        let [o, c, kh, kw] = self.shape;
        let r = self.rank;
        let mut out = vec![0f32; o * c * kh * kw];
        for f in 0..o * c {
            let v = &self.v[f * kh * r..(f + 1) * kh * r];
            let h = &self.h[f * r * kw..(f + 1) * r * kw];
            let filt = &mut out[f * kh * kw..(f + 1) * kh * kw];
            for y in 0..kh {
                for x in 0..kw {
                    let mut s = 0f32;
                    for t in 0..r {
                        s += v[y * r + t] * h[t * kw + x];
                    }
                    filt[y * kw + x] = s;
                }
            }
        }
        out
    }
    pub fn cost(&self) -> Cost {
        let [o, c, kh, kw] = self.shape;
        Cost {
            parameters_before: o * c * kh * kw,
            parameters_after: o * c * self.rank * (kh + kw),
            macs_per_position_before: o * c * kh * kw,
            macs_per_position_after: o * c * self.rank * (kh + kw),
        }
    }
}

/// Why a kernel is not a 2-D convolution kernel, if it is not.
pub fn not_2d_kernel(shape: &[usize]) -> Option<String> {
    match shape {
        [_, _, kh, kw] if *kh > 1 && *kw > 1 => None,
        _ => Some(format!(
            "spatial separation needs a [O, C, kh, kw] kernel with kh, kw > 1, not {shape:?}"
        )),
    }
}

/// Separates every filter with one rank for the tensor (`Rank`, or the smallest rank whose
/// kept energy over all filters reaches `Energy`; `Ratio` is a parameter budget).
pub fn separate(values: &[f32], shape: &[usize], rule: RankRule) -> Result<Separable, String> {
    if let Some(why) = not_2d_kernel(shape) {
        return Err(why);
    }
    let (o, c, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
    let full = kh.min(kw);
    let mut decs = Vec::with_capacity(o * c);
    let mut energy_by_rank = vec![0f64; full];
    let mut total = 0f64;
    for f in 0..o * c {
        let d = thin_svd(&values[f * kh * kw..(f + 1) * kh * kw], kh, kw)
            .ok_or("the SVD of a filter did not converge")?;
        for (t, s) in d.1.iter().enumerate() {
            energy_by_rank[t] += s * s;
            total += s * s;
        }
        decs.push(d);
    }
    let rank = match rule {
        RankRule::Ratio(f) => {
            ((f * (kh * kw) as f64 / (kh + kw) as f64).floor() as usize).clamp(1, full)
        }
        RankRule::Rank(r) => r.clamp(1, full),
        RankRule::Energy(_) => {
            let sigma: Vec<f64> = energy_by_rank.iter().map(|e| e.sqrt()).collect();
            choose_rank(&sigma, total, rule, kh, kw).unwrap_or(full)
        }
    };
    if rank * (kh + kw) >= kh * kw {
        return Err(format!(
            "rank {rank} separable {kh}×1 and 1×{kw} filters take {} parameters, not fewer than {}",
            rank * (kh + kw),
            kh * kw
        ));
    }
    let mut v = vec![0f32; o * c * kh * rank];
    let mut h = vec![0f32; o * c * rank * kw];
    for (f, (u, s, vv)) in decs.iter().enumerate() {
        for t in 0..rank {
            let root = s.get(t).copied().unwrap_or(0.0).sqrt() as f32;
            for y in 0..kh {
                v[f * kh * rank + y * rank + t] = u[(y, t)] * root;
            }
            for x in 0..kw {
                h[f * rank * kw + t * kw + x] = vv[(x, t)] * root;
            }
        }
    }
    Ok(Separable {
        shape: [o, c, kh, kw],
        rank,
        v,
        h,
    })
}

/// Tucker-2 factors: u_out [O, R_out], core [R_out, R_in, window], u_in [C, R_in].
#[derive(Debug, Clone, PartialEq)]
pub struct Tucker2 {
    /// O, C and the kernel window (kh·kw·…).
    pub out_channels: usize,
    pub in_channels: usize,
    pub window: usize,
    pub rank_out: usize,
    pub rank_in: usize,
    pub u_out: Vec<f32>,
    pub core: Vec<f32>,
    pub u_in: Vec<f32>,
}

impl Tucker2 {
    /// W[o,c,s] = Σ_a u_out[o,a] · Σ_b core[a,b,s] · u_in[c,b], in that order.
    pub fn reconstruct(&self) -> Vec<f32> {
        let (o, c, s, ro, ri) = (
            self.out_channels,
            self.in_channels,
            self.window,
            self.rank_out,
            self.rank_in,
        );
        // t[a, c, s] = Σ_b core[a,b,s]·u_in[c,b]
        let mut t = vec![0f32; ro * c * s];
        for a in 0..ro {
            for ci in 0..c {
                let out = &mut t[(a * c + ci) * s..(a * c + ci + 1) * s];
                for b in 0..ri {
                    let u = self.u_in[ci * ri + b];
                    let core = &self.core[(a * ri + b) * s..(a * ri + b + 1) * s];
                    for (x, &g) in out.iter_mut().zip(core) {
                        *x += g * u;
                    }
                }
            }
        }
        let mut w = vec![0f32; o * c * s];
        for oi in 0..o {
            let out = &mut w[oi * c * s..(oi + 1) * c * s];
            for a in 0..ro {
                let u = self.u_out[oi * ro + a];
                for (x, &y) in out.iter_mut().zip(&t[a * c * s..(a + 1) * c * s]) {
                    *x += u * y;
                }
            }
        }
        w
    }
    pub fn cost(&self) -> Cost {
        let (o, c, s, ro, ri) = (
            self.out_channels,
            self.in_channels,
            self.window,
            self.rank_out,
            self.rank_in,
        );
        let after = c * ri + ri * ro * s + ro * o;
        Cost {
            parameters_before: o * c * s,
            parameters_after: after,
            macs_per_position_before: o * c * s,
            macs_per_position_after: after,
        }
    }
}

/// Mode unfoldings of W [O, C, S]: mode 0 is [O, C·S], mode 1 is [C, O·S].
fn unfold_in(values: &[f32], o: usize, c: usize, s: usize) -> Vec<f32> {
    let mut m = vec![0f32; c * o * s];
    for oi in 0..o {
        for ci in 0..c {
            for x in 0..s {
                m[ci * o * s + oi * s + x] = values[(oi * c + ci) * s + x];
            }
        }
    }
    m
}

fn left_vectors(values: &[f32], rows: usize, cols: usize) -> Option<(Mat<f32>, Vec<f64>)> {
    thin_svd(values, rows, cols).map(|(u, s, _)| (u, s))
}

/// Tucker-2 by HOSVD. `rule` applies to each channel mode (`Rank` gives both ranks, `Energy`
/// each mode's kept energy, `Ratio` the largest common fraction of O and C within that
/// parameter budget).
pub fn tucker2(values: &[f32], shape: &[usize], rule: RankRule) -> Result<Tucker2, String> {
    if shape.len() < 3 {
        return Err(format!(
            "Tucker-2 needs a convolution kernel [O, C, k…], not {shape:?}"
        ));
    }
    let (o, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    if o < 2 || c < 2 {
        return Err(format!(
            "Tucker-2 needs at least 2 input and output channels, not {shape:?}"
        ));
    }
    let (uo, so) = left_vectors(values, o, c * s).ok_or("the SVD did not converge")?;
    let (ui, si) =
        left_vectors(&unfold_in(values, o, c, s), c, o * s).ok_or("the SVD did not converge")?;
    let total: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let params = |ro: usize, ri: usize| c * ri + ri * ro * s + ro * o;
    let (ro, ri) = match rule {
        RankRule::Rank(r) => (r.clamp(1, o.min(c * s)), r.clamp(1, c.min(o * s))),
        RankRule::Energy(_) => (
            choose_rank(&so, total, rule, o, c * s).unwrap_or(o),
            choose_rank(&si, total, rule, c, o * s).unwrap_or(c),
        ),
        RankRule::Ratio(f) => {
            let budget = f * (o * c * s) as f64;
            let mut best = (1, 1);
            for step in 1..=100 {
                let frac = step as f64 / 100.0;
                let cand = (
                    ((frac * o as f64).round() as usize).clamp(1, o),
                    ((frac * c as f64).round() as usize).clamp(1, c),
                );
                if (params(cand.0, cand.1) as f64) <= budget {
                    best = cand;
                }
            }
            best
        }
    };
    let (ro, ri) = (ro.min(uo.ncols()), ri.min(ui.ncols()));
    if params(ro, ri) >= o * c * s {
        return Err(format!(
            "Tucker-2 ranks ({ro}, {ri}) take {} parameters, not fewer than {}",
            params(ro, ri),
            o * c * s
        ));
    }
    // core[a,b,x] = Σ_o Σ_c U_out[o,a] · U_in[c,b] · W[o,c,x], accumulated in f64.
    let mut half = vec![0f64; ro * c * s]; // Σ_o U_out[o,a] W[o,c,x]
    for a in 0..ro {
        for oi in 0..o {
            let u = f64::from(uo[(oi, a)]);
            let src = &values[oi * c * s..(oi + 1) * c * s];
            for (h, &w) in half[a * c * s..(a + 1) * c * s].iter_mut().zip(src) {
                *h += u * f64::from(w);
            }
        }
    }
    let mut core = vec![0f32; ro * ri * s];
    for a in 0..ro {
        for b in 0..ri {
            for x in 0..s {
                let mut acc = 0f64;
                for ci in 0..c {
                    acc += f64::from(ui[(ci, b)]) * half[(a * c + ci) * s + x];
                }
                core[(a * ri + b) * s + x] = acc as f32;
            }
        }
    }
    let u_out = (0..o * ro).map(|i| uo[(i / ro, i % ro)]).collect();
    let u_in = (0..c * ri).map(|i| ui[(i / ri, i % ri)]).collect();
    Ok(Tucker2 {
        out_channels: o,
        in_channels: c,
        window: s,
        rank_out: ro,
        rank_in: ri,
        u_out,
        core,
        u_in,
    })
}

/// The slow, obvious reconstruction of a Tucker-2 kernel, element by element.
pub fn tucker2_reconstruct_reference(t: &Tucker2) -> Vec<f64> {
    let mut w = vec![0f64; t.out_channels * t.in_channels * t.window];
    for o in 0..t.out_channels {
        for c in 0..t.in_channels {
            for x in 0..t.window {
                let mut s = 0f64;
                for a in 0..t.rank_out {
                    for b in 0..t.rank_in {
                        s += f64::from(t.u_out[o * t.rank_out + a])
                            * f64::from(t.core[(a * t.rank_in + b) * t.window + x])
                            * f64::from(t.u_in[c * t.rank_in + b]);
                    }
                }
                w[(o * t.in_channels + c) * t.window + x] = s;
            }
        }
    }
    w
}

/// The slow, obvious separable reconstruction, in f64.
pub fn separable_reconstruct_reference(s: &Separable) -> Vec<f64> {
    let [o, c, kh, kw] = s.shape;
    let r = s.rank;
    let mut w = vec![0f64; o * c * kh * kw];
    for f in 0..o * c {
        for y in 0..kh {
            for x in 0..kw {
                w[(f * kh + y) * kw + x] = (0..r)
                    .map(|t| {
                        f64::from(s.v[(f * kh + y) * r + t]) * f64::from(s.h[(f * r + t) * kw + x])
                    })
                    .sum();
            }
        }
    }
    w
}

/// Optimal error of a rank-r approximation of each filter (Eckart–Young), summed.
pub fn separable_optimal_error(values: &[f32], shape: &[usize], rank: usize) -> f64 {
    let (kh, kw) = (shape[2], shape[3]);
    values
        .chunks(kh * kw)
        .map(|f| {
            singular_values(f, kh, kw)
                .iter()
                .skip(rank)
                .map(|s| s * s)
                .sum::<f64>()
        })
        .sum()
}

impl Separable {
    /// The form from its archive entry (`model.mpz`): a 4-D kernel's vertical and
    /// horizontal filters.
    fn from_archive<'a>(
        rank: usize,
        shape: &[usize],
        section: &coding::Section<'_, 'a>,
    ) -> Result<Separable, coding::DecodeError> {
        let err = coding::err;
        let [o, c, kh, kw] =
            <[usize; 4]>::try_from(shape).map_err(|_| err("separable filters need a 4-D shape"))?;
        let n = crate::model::element_count(shape).ok_or_else(|| err("shape overflows"))?;
        let filters = o * c;
        let count = |x: usize| {
            filters
                .checked_mul(x)
                .and_then(|v| v.checked_mul(rank))
                .ok_or_else(|| err("rank too large"))
        };
        let v = coding::f32_section(section("v")?, count(kh)?, "v")?;
        let h = coding::f32_section(section("h")?, count(kw)?, "h")?;
        coding::check_expansion(n, &[v.len(), h.len()])?;
        Ok(Separable {
            shape: [o, c, kh, kw],
            rank,
            v,
            h,
        })
    }
}

impl Tucker2 {
    /// The form from its archive entry (`model.mpz`): the two projections and the core.
    fn from_archive<'a>(
        rank_out: usize,
        rank_in: usize,
        shape: &[usize],
        section: &coding::Section<'_, 'a>,
    ) -> Result<Tucker2, coding::DecodeError> {
        let err = coding::err;
        if shape.len() < 3 {
            return Err(err("Tucker-2 needs a kernel of rank ≥ 3"));
        }
        let n = crate::model::element_count(shape).ok_or_else(|| err("shape overflows"))?;
        let (o, c) = (shape[0], shape[1]);
        let window: usize = shape[2..].iter().product();
        let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| err("rank too large"));
        let u_out = coding::f32_section(section("u_out")?, mul(o, rank_out)?, "u_out")?;
        let core = coding::f32_section(
            section("core")?,
            mul(mul(rank_out, rank_in)?, window)?,
            "core",
        )?;
        let u_in = coding::f32_section(section("u_in")?, mul(c, rank_in)?, "u_in")?;
        coding::check_expansion(n, &[u_out.len(), core.len(), u_in.len()])?;
        Ok(Tucker2 {
            out_channels: o,
            in_channels: c,
            window,
            rank_out,
            rank_in,
            u_out,
            core,
            u_in,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small conv kernel and a rank.
    #[derive(Debug, Clone)]
    struct ConvProblem {
        shape: Vec<usize>,
        values: Vec<f32>,
        rank: usize,
    }

    fn problem() -> impl Strategy<Value = ConvProblem> {
        (2usize..6, 2usize..6, 3usize..6, 1usize..3).prop_flat_map(|(o, c, k, rank)| {
            prop::collection::vec(-1f32..1f32, o * c * k * k).prop_map(move |values| ConvProblem {
                shape: vec![o, c, k, k],
                values,
                rank,
            })
        })
    }

    fn sq_err(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn separable_is_optimal_per_filter_and_matches_reference(p in problem()) {
            let Ok(sep) = separate(&p.values, &p.shape, RankRule::Rank(p.rank)) else { return Ok(()); };
            let fast = sep.reconstruct();
            let slow = separable_reconstruct_reference(&sep);
            for (a, b) in fast.iter().zip(&slow) {
                // Close: f32 sums of at most r terms against f64.
                prop_assert!((f64::from(*a) - b).abs() <= 1e-5 * (1.0 + b.abs()));
            }
            let optimal = separable_optimal_error(&p.values, &p.shape, p.rank);
            let energy: f64 = p.values.iter().map(|v| f64::from(*v).powi(2)).sum();
            prop_assert!(sq_err(&p.values, &fast) <= optimal * (1.0 + 1e-3) + 1e-6 * energy);
        }

        #[test]
        fn tucker2_matches_reference_and_full_rank_is_exact(p in problem()) {
            let o = p.shape[0];
            let c = p.shape[1];
            let s = p.shape[2] * p.shape[3];
            if let Ok(t) = tucker2(&p.values, &p.shape, RankRule::Rank(p.rank)) {
                let fast = t.reconstruct();
                let slow = tucker2_reconstruct_reference(&t);
                for (a, b) in fast.iter().zip(&slow) {
                    prop_assert!((f64::from(*a) - b).abs() <= 1e-4 * (1.0 + b.abs()));
                }
                prop_assert!(t.cost().parameters_after < o * c * s);
            }
            // Full ranks reproduce the kernel (HOSVD with complete bases), up to f32 rounding.
            let full = Tucker2 { ..tucker_full(&p.values, o, c, s) };
            let back = full.reconstruct();
            let energy: f64 = p.values.iter().map(|v| f64::from(*v).powi(2)).sum();
            prop_assert!(sq_err(&p.values, &back) <= 1e-8 * energy.max(1.0));
        }
    }

    /// HOSVD at full ranks, bypassing the "not smaller" check.
    fn tucker_full(values: &[f32], o: usize, c: usize, s: usize) -> Tucker2 {
        let (uo, _) = left_vectors(values, o, c * s).unwrap();
        let (ui, _) = left_vectors(&unfold_in(values, o, c, s), c, o * s).unwrap();
        let (ro, ri) = (uo.ncols(), ui.ncols());
        let mut core = vec![0f32; ro * ri * s];
        for a in 0..ro {
            for b in 0..ri {
                for x in 0..s {
                    let mut acc = 0f64;
                    for oi in 0..o {
                        for ci in 0..c {
                            acc += f64::from(uo[(oi, a)])
                                * f64::from(ui[(ci, b)])
                                * f64::from(values[(oi * c + ci) * s + x]);
                        }
                    }
                    core[(a * ri + b) * s + x] = acc as f32;
                }
            }
        }
        Tucker2 {
            out_channels: o,
            in_channels: c,
            window: s,
            rank_out: ro,
            rank_in: ri,
            u_out: (0..o * ro).map(|i| uo[(i / ro, i % ro)]).collect(),
            core,
            u_in: (0..c * ri).map(|i| ui[(i / ri, i % ri)]).collect(),
        }
    }

    #[test]
    fn one_d_kernels_are_skipped_with_a_reason() {
        let err = separate(&[0.0; 24], &[2, 4, 3], RankRule::Rank(1)).unwrap_err();
        assert!(err.contains("kh, kw > 1"));
    }
}
