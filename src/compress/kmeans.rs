//! k-means weight sharing (Deep Compression, stage 2), in one dimension.
//!
//! Weights are scalars, so clusters are intervals of the sorted values. Two algorithms work on
//! the sorted, de-duplicated values with prefix sums, where a cluster's mean and its sum of
//! squared errors cost O(1):
//! - [`Algorithm::Optimal`]: the exact optimum by dynamic programming over sorted values
//!   (Wang & Song's Ckmeans.1d.dp), each layer by divide and conquer, O(k·n·log n) time and
//!   k·n back-pointers. `Auto` uses it while k·n stays under [`OPTIMAL_BUDGET`].
//! - [`Algorithm::Lloyd`]: Lloyd's algorithm started, like scikit-learn's
//!   `KMeans(init=linspace)`, from k evenly spaced centroids. On sorted data an iteration costs
//!   O(k·log n) instead of O(n·k): the clusters are the intervals between centroid midpoints.
//!
//! Why the Lloyd variant never ends above plain Lloyd from the same start (the property test
//! `lloyd_never_regresses_against_plain_lloyd` checks it on tie-free data): it first takes
//! exactly plain Lloyd's steps (nearest-centroid assignment with ties to the lower index,
//! centroids to their cluster means, empty clusters' centroids left in place) to plain
//! Lloyd's fixed point or scikit-learn's 300 iterations, whichever comes first (scikit-learn
//! may stop earlier still, at a tolerance). Only then, if clusters
//! are empty, it splits the costliest cluster at its best cut for each (lowering the inertia
//! by that cut's gain, ≥ 0) and continues; assignment and update steps never raise the
//! inertia, so it ends at or below plain Lloyd's fixed point. (Refilling empty clusters
//! earlier, inside the iterations, gave a different trajectory that could end higher: the
//! property test found such a case.)
//!
//! The `kmeans` method, and its [`Clustered`] form (packed indices plus codebooks).

use super::coding::{self, f32_bytes, CodingStats, Payload, Repr, StageBytes};
use super::form::{Encoding, Form, Parts, Stored, Trained};
use super::lower::{gather, Graph};
use super::method::{int_in, params, Applied, Decoder, Kind, Method, Registration, Working};
use super::quantize::Granularity;
use super::{is_conv, pack, CompressError};
use crate::model::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Map, Value};

pub const METHOD: Registration = Registration {
    name: "kmeans",
    about: "k-means weight sharing: 2^bits shared values per tensor or channel (Deep Compression)",
    file: "src/compress/kmeans.rs",
    parse,
    forms: &[Decoder {
        encoding: "codebook",
        decode: decode_archive,
    }],
};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    bits: Option<u64>,
    conv_bits: Option<u64>,
    granularity: Option<Granularity>,
    zero_cluster: Option<bool>,
    algorithm: Option<Algorithm>,
}

fn parse(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: Params = params(obj, METHOD.name, at)?;
    Ok(Box::new(Kmeans {
        bits: int_in(p.bits, &at("bits"), 1, 8)?.unwrap_or(4) as u8,
        conv_bits: int_in(p.conv_bits, &at("conv_bits"), 1, 8)?.map(|b| b as u8),
        granularity: p.granularity.unwrap_or(Granularity::Tensor),
        zero_cluster: p.zero_cluster.unwrap_or(false),
        algorithm: p.algorithm.unwrap_or(Algorithm::Auto),
    }))
}

/// The `kmeans` step.
#[derive(Debug, Clone)]
pub struct Kmeans {
    pub bits: u8,
    /// Bits for convolution kernels, when they differ (Deep Compression: 8 conv / 5 fc).
    pub conv_bits: Option<u8>,
    pub granularity: Granularity,
    /// Let exact zeros join a cluster instead of keeping them exact.
    pub zero_cluster: bool,
    pub algorithm: Algorithm,
}

impl Kmeans {
    fn bits_for(&self, t: &Tensor) -> u8 {
        if is_conv(t) {
            self.conv_bits.unwrap_or(self.bits)
        } else {
            self.bits
        }
    }
}

impl Method for Kmeans {
    fn label(&self) -> String {
        match self.conv_bits {
            Some(c) => format!(
                "kmeans({} bits,conv {c} bits,{})",
                self.bits,
                self.granularity.name()
            ),
            None => format!("kmeans({} bits,{})", self.bits, self.granularity.name()),
        }
    }
    fn kind(&self) -> Kind {
        Kind::Encode
    }
    fn shares_values(&self) -> bool {
        true
    }
    fn estimate(&self, t: &Tensor, pruned_first: bool) -> Option<u64> {
        let k = 1u64 << self.bits_for(t);
        // A kept zero needs one more symbol, known only once pruning has run; assume it when
        // the pipeline prunes this tensor first.
        let zero = !self.zero_cluster && pruned_first;
        let width = u64::from(pack::width_for((k + u64::from(zero)) as usize));
        Some((t.len() as u64 * width).div_ceil(8) + 4 * k * self.granularity.channels(t))
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        let b = self.bits_for(t);
        let c = cluster(
            &w.values,
            &t.shape,
            b,
            self.granularity.axis(t),
            !self.zero_cluster,
            self.algorithm,
        );
        let decoded = c.decode(&t.shape);
        // Against the values this step clustered (after any pruning), as k-means defines it.
        let inertia: f64 = w
            .values
            .iter()
            .zip(&decoded)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum();
        w.values = decoded;
        w.details.insert(
            "kmeans".into(),
            json!({
                "bits": b,
                "k": c.k,
                "algorithm": c.algorithm,
                "zeros_fixed": c.zeros_fixed,
                "inertia": inertia,
            }),
        );
        w.encoding = Some(Encoding::new(c));
        Ok(Applied::Ran)
    }
}

impl Form for Clustered {
    fn decode(&self, shape: &[usize]) -> Vec<f32> {
        Clustered::decode(self, shape)
    }
    fn trained(&self, shape: &[usize]) -> Trained {
        Trained::Shared(self.shared(shape))
    }
    fn rezero(&mut self, values: &[f32], _shape: &[usize]) -> Result<(), String> {
        for (j, v) in values.iter().enumerate() {
            if *v == 0.0 {
                self.indices[j] = self.k as u16;
                self.zeros_fixed = true;
            }
        }
        Ok(())
    }
    fn store(&self, t: &Tensor, parts: &mut Parts) -> Stored {
        let width = pack::width_for(self.symbols());
        let symbols: Vec<u32> = self.indices.iter().map(|&i| u32::from(i)).collect();
        let packed = pack::pack(&symbols, width);
        let len = parts.push(t.name.clone(), DType::U8, vec![packed.len()], packed);
        let groups = self.centroids.len() / self.k.max(1);
        let (book, book_bytes) = parts.push_f32("codebook", vec![groups, self.k], &self.centroids);
        Stored {
            bytes: len + book_bytes,
            axis: self.axis,
            description: json!({
                "encoding": "codebook",
                "bits": self.bits,
                "index_bits": width,
                "shape": t.shape,
                "axis": self.axis,
                "codebook": book,
                "zero_index": if self.zeros_fixed { Value::from(self.k) } else { Value::Null },
                "original_dtype": t.dtype.name(),
                "decode": "unpack index_bits-wide indices i (LSB first); w = 0 if i == zero_index else codebook[group, i], group = index along axis (0 without axis)",
            }),
        }
    }
    fn payload(
        &self,
        values: &[f32],
        huffman: bool,
        pruned: bool,
    ) -> (Payload, Option<CodingStats>, StageBytes) {
        let syms: Vec<u32> = self.indices.iter().map(|&i| u32::from(i)).collect();
        let zero = self.zeros_fixed.then_some(self.k as u32);
        let tables = vec![("centroids".to_string(), f32_bytes(&self.centroids))];
        coding::index_stream(
            &syms,
            self.symbols() as u32,
            zero,
            tables,
            values,
            huffman,
            pruned,
            |stream| {
                Repr::new(
                    "codebook",
                    &CodebookRepr {
                        bits: self.bits,
                        axis: self.axis,
                        k: self.k,
                        zeros_fixed: self.zeros_fixed,
                        algorithm: self.algorithm,
                        stream,
                    },
                )
            },
        )
    }
    fn lower(&self, g: &mut dyn Graph, shape: &[usize]) -> String {
        let width = pack::width_for(self.symbols());
        let symbols: Vec<u32> = self.indices.iter().map(|&i| u32::from(i)).collect();
        // Each group's book gains a zero at index k, the code of weights kept out of
        // clustering.
        let k = self.k.max(1);
        let mut books = Vec::with_capacity(self.centroids.len() / k * (k + 1));
        for book in self.centroids.chunks_exact(k) {
            books.extend_from_slice(book);
            books.push(0.0);
        }
        gather(g, &symbols, width, &books, k + 1, self.axis, shape);
        format!("unpack(uint{width})+Gather(codebook)")
    }
}

/// The archive entry: codebook indices; symbol k is an exact zero. Sections: the stream's,
/// `centroids` (f32, groups × k).
#[derive(Serialize, serde::Deserialize)]
struct CodebookRepr {
    bits: u8,
    axis: Option<usize>,
    k: usize,
    zeros_fixed: bool,
    algorithm: Algorithm,
    stream: coding::Stream,
}

fn decode_archive(
    repr: &Repr,
    shape: &[usize],
    section: &coding::Section<'_, '_>,
) -> Result<Vec<f32>, coding::DecodeError> {
    let p: CodebookRepr = repr.params()?;
    let c = Clustered::from_archive(
        (p.bits, p.axis, p.k, p.zeros_fixed, p.algorithm),
        &p.stream,
        shape,
        section,
    )?;
    Ok(c.decode(shape))
}

/// Largest k·(distinct values) for which `Auto` runs the exact dynamic programme: 8 M
/// back-pointers (32 MiB).
pub const OPTIMAL_BUDGET: usize = 8 << 20;
const MAX_LLOYD_ITERATIONS: usize = 10_000;
/// Plain Lloyd's iterations before empty clusters are refilled: scikit-learn's `max_iter`.
const PLAIN_LLOYD_ITERATIONS: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Auto,
    Optimal,
    Lloyd,
}

/// Distinct sorted values with their multiplicities, and prefix sums of the values centred on
/// their mean (centring keeps `s2 - s1²/w` from cancelling).
struct Prefix {
    x: Vec<f64>,
    w: Vec<f64>,
    s1: Vec<f64>,
    s2: Vec<f64>,
    mean: f64,
}

impl Prefix {
    fn new(values: &[f32]) -> Prefix {
        let mut sorted: Vec<f32> = values.to_vec();
        sorted.sort_unstable_by(f32::total_cmp);
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len().max(1) as f64;
        let (mut x, mut counts): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        for v in sorted {
            let v = f64::from(v);
            match x.last() {
                Some(&last) if last == v => *counts.last_mut().unwrap_or(&mut 0.0) += 1.0,
                _ => {
                    x.push(v);
                    counts.push(1.0);
                }
            }
        }
        let n = x.len();
        let (mut w, mut s1, mut s2) = (vec![0.0; n + 1], vec![0.0; n + 1], vec![0.0; n + 1]);
        for i in 0..n {
            let d = x[i] - mean;
            w[i + 1] = w[i] + counts[i];
            s1[i + 1] = s1[i] + counts[i] * d;
            s2[i + 1] = s2[i] + counts[i] * d * d;
        }
        Prefix { x, w, s1, s2, mean }
    }
    fn len(&self) -> usize {
        self.x.len()
    }
    /// Sum of squared errors of distinct values `a..b` around their mean.
    #[inline(always)]
    fn cost(&self, a: usize, b: usize) -> f64 {
        let w = self.w[b] - self.w[a];
        if w <= 0.0 {
            return 0.0;
        }
        let s = self.s1[b] - self.s1[a];
        (self.s2[b] - self.s2[a] - s * s / w).max(0.0)
    }
    fn mean_of(&self, a: usize, b: usize) -> f64 {
        let w = self.w[b] - self.w[a];
        (self.s1[b] - self.s1[a]) / w + self.mean
    }
    /// The cut `a < c < b` that minimises cost(a,c) + cost(c,b).
    fn best_split(&self, a: usize, b: usize) -> Option<(usize, f64)> {
        (a + 1..b)
            .map(|c| (c, self.cost(a, c) + self.cost(c, b)))
            .min_by(|p, q| p.1.total_cmp(&q.1))
    }
}

/// A fitted codebook: centroids in ascending order (at most k; fewer when the values have
/// fewer distinct values), and how they were found.
#[derive(Debug, Clone)]
pub struct Fit {
    pub centroids: Vec<f32>,
    pub algorithm: Algorithm,
    pub iterations: usize,
}

/// Fits k centroids to `values` (finite). Deterministic.
pub fn fit(values: &[f32], k: usize, algorithm: Algorithm) -> Fit {
    let p = Prefix::new(values);
    let n = p.len();
    if n == 0 || k == 0 {
        return Fit {
            centroids: Vec::new(),
            algorithm,
            iterations: 0,
        };
    }
    if n <= k {
        // Every distinct value is its own centroid: lossless.
        return Fit {
            centroids: p.x.iter().map(|&v| v as f32).collect(),
            algorithm: Algorithm::Optimal,
            iterations: 0,
        };
    }
    let use_optimal = match algorithm {
        Algorithm::Optimal => true,
        Algorithm::Lloyd => false,
        Algorithm::Auto => n.saturating_mul(k) <= OPTIMAL_BUDGET,
    };
    let (bounds, algorithm, iterations) = if use_optimal {
        (optimal_bounds(&p, k), Algorithm::Optimal, 0)
    } else {
        let lo = p.x[0];
        let hi = p.x[n - 1];
        let init: Vec<f64> = linspace(lo, hi, k);
        let (b, it) = lloyd_bounds(&p, init);
        (b, Algorithm::Lloyd, it)
    };
    let mut centroids: Vec<f32> = bounds
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| p.mean_of(w[0], w[1]) as f32)
        .collect();
    centroids.sort_by(f32::total_cmp);
    centroids.dedup();
    Fit {
        centroids,
        algorithm,
        iterations,
    }
}

/// `k` evenly spaced points from `lo` to `hi`, as numpy's `linspace`.
pub fn linspace(lo: f64, hi: f64, k: usize) -> Vec<f64> {
    if k == 1 {
        return vec![lo];
    }
    let step = (hi - lo) / (k - 1) as f64;
    (0..k)
        .map(|i| if i == k - 1 { hi } else { lo + step * i as f64 })
        .collect()
}

/// Segment boundaries (indices into the distinct values, `0 = b0 < … < bk = n`) of the
/// optimal k-partition. Each layer of the DP is filled by divide and conquer, which the
/// monotone optimal split points of a Monge cost allow.
fn optimal_bounds(p: &Prefix, k: usize) -> Vec<usize> {
    let n = p.len();
    let mut prev: Vec<f64> = (0..=n).map(|i| p.cost(0, i)).collect();
    let mut back = vec![0u32; (k - 1) * (n + 1)];
    let mut cur = vec![f64::INFINITY; n + 1];
    for m in 1..k {
        let row = &mut back[(m - 1) * (n + 1)..m * (n + 1)];
        cur.iter_mut().for_each(|c| *c = f64::INFINITY);
        // cur[i] = min over j in [m, i) of prev[j] + cost(j, i), for i in [m+1, n].
        fill_layer(p, &prev, &mut cur, row, m + 1, n, m, n - 1);
        std::mem::swap(&mut prev, &mut cur);
    }
    let mut bounds = vec![n; k + 1];
    bounds[0] = 0;
    let mut i = n;
    for m in (1..k).rev() {
        let j = back[(m - 1) * (n + 1) + i] as usize;
        bounds[m] = j;
        i = j;
    }
    bounds
}

#[allow(clippy::too_many_arguments)]
fn fill_layer(
    p: &Prefix,
    prev: &[f64],
    cur: &mut [f64],
    back: &mut [u32],
    lo: usize,
    hi: usize,
    opt_lo: usize,
    opt_hi: usize,
) {
    if lo > hi {
        return;
    }
    let mid = (lo + hi) / 2;
    let (mut best, mut best_j) = (f64::INFINITY, opt_lo);
    #[allow(clippy::needless_range_loop)] // j is both an index and a split point
    for j in opt_lo..=opt_hi.min(mid - 1) {
        let c = prev[j] + p.cost(j, mid);
        if c < best {
            best = c;
            best_j = j;
        }
    }
    cur[mid] = best;
    back[mid] = best_j as u32;
    if mid > lo {
        fill_layer(p, prev, cur, back, lo, mid - 1, opt_lo, best_j);
    }
    fill_layer(p, prev, cur, back, mid + 1, hi, best_j, opt_hi);
}

/// Lloyd's algorithm on sorted values; returns segment boundaries and the iteration count.
///
/// Phase 1 takes exactly plain Lloyd's steps (an empty cluster's centroid stays where it is)
/// until no assignment changes. Phase 2 starts from that fixed point only if clusters are
/// empty: each is refilled by splitting the costliest cluster at its best cut, and Lloyd's
/// steps continue to a new fixed point. Every phase-2 step lowers the inertia or keeps it.
fn lloyd_bounds(p: &Prefix, mut centroids: Vec<f64>) -> (Vec<usize>, usize) {
    let n = p.len();
    let k = centroids.len();
    let mut bounds: Vec<usize> = Vec::new();
    let mut iterations = 0;
    let mut refill = false;
    loop {
        // Lloyd keeps centroids in order; the sort is stable, so ties keep their indices.
        centroids.sort_by(f64::total_cmp);
        // Assignment: value x goes to the nearest centroid, the lower one on a tie (as
        // scikit-learn's argmin), so cluster j ends after the last x ≤ midpoint(j, j+1).
        let mut next = Vec::with_capacity(k + 1);
        next.push(0usize);
        for j in 0..k - 1 {
            let mid = (centroids[j] + centroids[j + 1]) / 2.0;
            next.push(p.x.partition_point(|&x| x <= mid));
        }
        next.push(n);
        if iterations >= MAX_LLOYD_ITERATIONS {
            break;
        }
        let converged = next == bounds;
        if converged || (!refill && iterations >= PLAIN_LLOYD_ITERATIONS) {
            let empty = next.windows(2).any(|w| w[1] == w[0]);
            if refill || (converged && !empty) {
                break;
            }
            // Phase 2: plain Lloyd has converged (or used scikit-learn's 300 iterations)
            // with idle centroids; without idle ones it simply carries on.
            refill = empty;
        }
        bounds = next;
        iterations += 1;
        if !refill {
            // Update: each non-empty cluster's centroid moves to its mean; an empty one stays.
            for (j, c) in centroids.iter_mut().enumerate() {
                if bounds[j + 1] > bounds[j] {
                    *c = p.mean_of(bounds[j], bounds[j + 1]);
                }
            }
            continue;
        }
        let mut segments: Vec<(usize, usize)> = bounds
            .windows(2)
            .filter(|w| w[1] > w[0])
            .map(|w| (w[0], w[1]))
            .collect();
        // Empty clusters: split the costliest splittable segment at its best cut.
        while segments.len() < k {
            let Some((si, _)) = segments
                .iter()
                .enumerate()
                .filter(|(_, s)| s.1 - s.0 >= 2)
                .map(|(i, s)| (i, p.cost(s.0, s.1)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
            else {
                break;
            };
            let (a, b) = segments[si];
            let Some((c, _)) = p.best_split(a, b) else {
                break;
            };
            segments[si] = (a, c);
            segments.insert(si + 1, (c, b));
        }
        let mut refilled: Vec<f64> = segments.iter().map(|&(a, b)| p.mean_of(a, b)).collect();
        // Fewer distinct values than clusters cannot happen here (n > k); stay total anyway
        // by keeping the remaining centroids where they were.
        refilled.extend(centroids.iter().skip(refilled.len()).copied());
        centroids = refilled;
    }
    (bounds, iterations)
}

/// Nearest centroid of each value (the lower one on a tie). `centroids` ascending.
pub fn assign(values: &[f32], centroids: &[f32]) -> Vec<u16> {
    let mids: Vec<f64> = centroids
        .windows(2)
        .map(|w| (f64::from(w[0]) + f64::from(w[1])) / 2.0)
        .collect();
    values
        .iter()
        .map(|&v| mids.partition_point(|&m| m < f64::from(v)) as u16)
        .collect()
}

/// Sum of squared distances of values to their centroids.
pub fn inertia(values: &[f32], centroids: &[f32], codes: &[u16]) -> f64 {
    values
        .iter()
        .zip(codes)
        .map(|(&v, &c)| {
            let d = f64::from(v) - f64::from(centroids[c as usize]);
            d * d
        })
        .sum()
}

/// A tensor's codebooks and indices. `indices[i] == k` marks an exact zero kept out of the
/// clustering (a pruned weight); other indices select `centroids[group·k + index]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustered {
    pub bits: u8,
    /// Channel axis of per-channel codebooks, None for one codebook.
    pub axis: Option<usize>,
    /// Codebook slots per group: 2^bits.
    pub k: usize,
    /// groups × k centroids; unused slots repeat the group's last centroid.
    pub centroids: Vec<f32>,
    pub indices: Vec<u16>,
    /// True when zeros were kept out of the clustering (index `k` is used for them).
    pub zeros_fixed: bool,
    pub algorithm: Algorithm,
}

impl Clustered {
    pub fn decode(&self, shape: &[usize]) -> Vec<f32> {
        let layout = super::quantize::ChannelLayout::new(shape, self.axis);
        let k = self.k;
        let mut out = vec![0f32; self.indices.len()];
        let inner = layout.inner.max(1);
        for (b, (idx, o)) in self
            .indices
            .chunks(inner)
            .zip(out.chunks_mut(inner))
            .enumerate()
        {
            let g = b % layout.channels.max(1);
            let book = &self.centroids[g * k..(g + 1) * k];
            for (v, &i) in o.iter_mut().zip(idx) {
                *v = book.get(i as usize).copied().unwrap_or(0.0);
            }
        }
        out
    }
    /// The codebooks as one table of shared values, with each weight's slot in it (group
    /// × k + index; `u32::MAX` for a fixed zero).
    pub fn shared(&self, shape: &[usize]) -> super::SharedValues {
        let layout = super::quantize::ChannelLayout::new(shape, self.axis);
        let inner = layout.inner.max(1);
        let slots = self
            .indices
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let g = (j / inner) % layout.channels.max(1);
                if self.zeros_fixed && i as usize == self.k {
                    u32::MAX
                } else {
                    (g * self.k + i as usize) as u32
                }
            })
            .collect();
        super::SharedValues {
            slots,
            values: self.centroids.clone(),
        }
    }
    /// Number of distinct symbols an index can take (k, plus one for the zero code).
    pub fn symbols(&self) -> usize {
        self.k + usize::from(self.zeros_fixed)
    }
}

/// Clusters a tensor's values into 2^bits shared values, per tensor or per channel. With
/// `zeros_fixed`, exact zeros stay exact (index k) and take no cluster.
pub fn cluster(
    values: &[f32],
    shape: &[usize],
    bits: u8,
    axis: Option<usize>,
    zeros_fixed: bool,
    algorithm: Algorithm,
) -> Clustered {
    let layout = super::quantize::ChannelLayout::new(shape, axis);
    let k = 1usize << bits;
    let groups = layout.channels.max(1);
    let inner = layout.inner.max(1);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); groups];
    for (b, block) in values.chunks(inner).enumerate() {
        let g = b % groups;
        let base = b * inner;
        members[g].extend(
            block
                .iter()
                .enumerate()
                .filter(|(_, &v)| !(zeros_fixed && v == 0.0))
                .map(|(i, _)| base + i),
        );
    }
    let zeros_fixed = zeros_fixed && values.contains(&0.0);
    let mut centroids = vec![0f32; groups * k];
    let mut indices = vec![k as u16; values.len()];
    let mut used = algorithm;
    for (g, idx) in members.iter().enumerate() {
        let vals: Vec<f32> = idx.iter().map(|&i| values[i]).collect();
        let f = fit(&vals, k, algorithm);
        if f.algorithm == Algorithm::Lloyd {
            used = Algorithm::Lloyd;
        } else if used == Algorithm::Auto {
            used = Algorithm::Optimal;
        }
        let book = &mut centroids[g * k..(g + 1) * k];
        let last = f.centroids.last().copied().unwrap_or(0.0);
        for (s, slot) in book.iter_mut().enumerate() {
            *slot = f.centroids.get(s).copied().unwrap_or(last);
        }
        let codes = assign(&vals, &f.centroids);
        for (&i, c) in idx.iter().zip(codes) {
            indices[i] = c;
        }
    }
    Clustered {
        bits,
        axis,
        k,
        centroids,
        indices,
        zeros_fixed,
        algorithm: used,
    }
}

/// The slow, obvious exact optimum: the O(k·n²) dynamic programme over all split points.
pub fn optimal_reference(values: &[f32], k: usize) -> f64 {
    let p = Prefix::new(values);
    let n = p.len();
    if n <= k {
        return 0.0;
    }
    let mut d: Vec<f64> = (0..=n).map(|i| p.cost(0, i)).collect();
    for _ in 1..k {
        let mut next = vec![f64::INFINITY; n + 1];
        for (i, slot) in next.iter_mut().enumerate() {
            #[allow(clippy::needless_range_loop)]
            for j in 0..i {
                *slot = slot.min(d[j] + p.cost(j, i));
            }
        }
        d = next;
    }
    d[n]
}

/// The slow, obvious Lloyd: O(n·k) assignment by scanning every centroid, centroids of empty
/// clusters left where they are, stopped when no assignment changes or after scikit-learn's
/// 300 iterations.
pub fn lloyd_reference(values: &[f32], init: &[f64]) -> Vec<f64> {
    let mut c = init.to_vec();
    let mut assignment: Vec<usize> = Vec::new();
    for _ in 0..=PLAIN_LLOYD_ITERATIONS {
        let next: Vec<usize> = values
            .iter()
            .map(|&v| {
                let v = f64::from(v);
                let mut best = 0;
                for j in 1..c.len() {
                    if (v - c[j]).abs() < (v - c[best]).abs() {
                        best = j;
                    }
                }
                best
            })
            .collect();
        if next == assignment {
            break;
        }
        assignment = next;
        let mut sum = vec![0f64; c.len()];
        let mut count = vec![0usize; c.len()];
        for (&v, &a) in values.iter().zip(&assignment) {
            sum[a] += f64::from(v);
            count[a] += 1;
        }
        for j in 0..c.len() {
            if count[j] > 0 {
                c[j] = sum[j] / count[j] as f64;
            }
        }
    }
    c
}

/// Inertia of values against f64 centroids by nearest assignment.
pub fn inertia_f64(values: &[f32], centroids: &[f64]) -> f64 {
    values
        .iter()
        .map(|&v| {
            let v = f64::from(v);
            centroids
                .iter()
                .map(|c| (v - c) * (v - c))
                .fold(f64::INFINITY, f64::min)
        })
        .sum()
}

impl Clustered {
    /// The form from its archive entry (`model.mpz`): `(bits, axis, k, zeros_fixed,
    /// algorithm)` from the header, every length checked against the shape.
    fn from_archive<'a>(
        (bits, axis, k, zeros_fixed, algorithm): (u8, Option<usize>, usize, bool, Algorithm),
        stream: &coding::Stream,
        shape: &[usize],
        section: &coding::Section<'_, 'a>,
    ) -> Result<Clustered, coding::DecodeError> {
        let err = coding::err;
        let n = crate::model::element_count(shape).ok_or_else(|| err("shape overflows"))?;
        if !(1..=8).contains(&bits)
            || k != 1 << bits
            || axis.is_some_and(|a| a >= shape.len())
            || stream.alphabet as usize != k + usize::from(zeros_fixed)
        {
            return Err(err("codebook parameters out of range"));
        }
        let syms = coding::read_stream(stream, n, section)?;
        let groups = axis.map_or(1, |a| shape[a]);
        let centroids = coding::f32_section(
            section("centroids")?,
            groups
                .checked_mul(k)
                .ok_or_else(|| err("codebook too large"))?,
            "centroids",
        )?;
        Ok(Clustered {
            bits,
            axis,
            k,
            centroids,
            indices: syms.iter().map(|&s| s as u16).collect(),
            zeros_fixed,
            algorithm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values with many duplicates and outliers (the cases that leave clusters empty), and k.
    #[derive(Debug, Clone)]
    struct KmeansProblem {
        values: Vec<f32>,
        k: usize,
    }

    fn problem() -> impl Strategy<Value = KmeansProblem> {
        (
            prop::collection::vec(
                prop_oneof![
                    4 => -1f32..1f32,
                    1 => (-20i32..20).prop_map(|i| i as f32 / 4.0),
                    1 => -100f32..100f32,
                ],
                1..120,
            ),
            1usize..12,
        )
            .prop_map(|(values, k)| KmeansProblem { values, k })
    }

    /// Relative tolerance for two sums of squares computed in different orders.
    const CLOSE: f64 = 1e-9;

    /// Continuous values (ties have probability ~0), for comparing trajectories with plain
    /// Lloyd; outliers make empty clusters common.
    fn tie_free_problem() -> impl Strategy<Value = KmeansProblem> {
        (
            prop::collection::vec(prop_oneof![4 => -1f32..1f32, 1 => -100f32..100f32], 2..120),
            1usize..12,
        )
            .prop_map(|(values, k)| KmeansProblem { values, k })
    }

    impl KmeansProblem {
        fn fitted_inertia(&self, algorithm: Algorithm) -> f64 {
            let f = fit(&self.values, self.k, algorithm);
            let codes = assign(&self.values, &f.centroids);
            inertia(&self.values, &f.centroids, &codes)
        }
        fn scale(&self) -> f64 {
            self.values
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .max(1e-30)
        }
        fn check_optimal(&self) {
            let scale = self.scale();
            let exact = optimal_reference(&self.values, self.k);
            let optimal = self.fitted_inertia(Algorithm::Optimal);
            // f32 centroids add rounding: allow f32 epsilon relative to the data's energy.
            let f32_slack = scale * 1e-6;
            assert!(
                (optimal - exact).abs() <= CLOSE * scale + f32_slack,
                "optimal {optimal} vs reference {exact}"
            );
            let lloyd = self.fitted_inertia(Algorithm::Lloyd);
            assert!(
                lloyd + CLOSE * scale + f32_slack >= exact,
                "below the optimum"
            );
        }
        fn check_lloyd(&self) {
            let scale = self.scale();
            let mut distinct = self.values.clone();
            distinct.sort_by(f32::total_cmp);
            distinct.dedup();
            if distinct.len() <= self.k {
                return;
            }
            let lo = f64::from(distinct[0]);
            let hi = f64::from(distinct[distinct.len() - 1]);
            let plain = inertia_f64(
                &self.values,
                &lloyd_reference(&self.values, &linspace(lo, hi, self.k)),
            );
            let lloyd = self.fitted_inertia(Algorithm::Lloyd);
            assert!(
                lloyd <= plain + CLOSE * scale + scale * 1e-6,
                "lloyd {lloyd} regressed against plain lloyd {plain}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn optimal_matches_reference(p in problem()) {
            p.check_optimal();
        }

        #[test]
        fn lloyd_never_regresses_against_plain_lloyd(p in tie_free_problem()) {
            p.check_lloyd();
        }
    }

    proptest! {
        /// The shared-values view fine-tuning trains reads every weight as decode does, and
        /// clustering the decoded values again finds the same values (what retraining
        /// centroids relies on: the pipeline runs again on the trained weights).
        #[test]
        fn shared_view_matches_decode_and_reclusters_exactly(
            rows in 1usize..5,
            cols in 1usize..30,
            seed in prop::collection::vec(-1f32..1f32, 150),
            bits in 1u8..4,
            per_channel in any::<bool>(),
            zeros in any::<bool>(),
        ) {
            let shape = [rows, cols];
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| if zeros && i % 3 == 0 { 0.0 } else { seed[i % seed.len()] })
                .collect();
            let axis = per_channel.then_some(0);
            let c = cluster(&values, &shape, bits, axis, true, Algorithm::Auto);
            let decoded = c.decode(&shape);
            let sv = c.shared(&shape);
            let gathered: Vec<f32> = sv
                .slots
                .iter()
                .map(|&s| if s == u32::MAX { 0.0 } else { sv.values[s as usize] })
                .collect();
            prop_assert_eq!(&gathered, &decoded);
            let again = cluster(&decoded, &shape, bits, axis, true, Algorithm::Auto).decode(&shape);
            prop_assert_eq!(again, decoded);
        }
    }

    /// Found by proptest in CI when empty clusters were refilled inside the iterations.
    #[test]
    fn regression_refill_during_iterations_ended_above_plain_lloyd() {
        let values = vec![
            21.680832f32,
            -2.0,
            94.15443,
            -97.89333,
            0.0,
            0.0,
            -29.277885,
            0.0,
            0.0,
            0.0,
            -77.469475,
            -0.41324484,
            -0.36625275,
            -0.20337145,
            -5.17858,
            0.0,
            0.0,
            0.0,
            -2.25,
            0.0,
            0.0,
            0.0,
            0.0,
            69.33332,
            -4.75,
        ];
        KmeansProblem { values, k: 8 }.check_lloyd();
    }

    #[test]
    fn lossless_when_few_distinct_values() {
        let values = [0.5f32, -0.25, 0.5, 3.0, -0.25];
        let c = cluster(&values, &[5], 2, None, false, Algorithm::Auto);
        assert_eq!(c.decode(&[5]), values.to_vec());
    }

    #[test]
    fn zeros_stay_zero_and_take_no_cluster() {
        let values = [0.0f32, 1.0, 0.0, 2.0, 3.0, 4.0, 0.0, 5.0];
        let c = cluster(&values, &[8], 1, None, true, Algorithm::Auto);
        let d = c.decode(&[8]);
        for (v, r) in values.iter().zip(&d) {
            assert_eq!(*v == 0.0, *r == 0.0);
        }
        assert!(c.zeros_fixed);
        assert_eq!(c.symbols(), 3);
    }

    #[test]
    fn per_channel_codebooks() {
        let values = [1.0f32, 100.0, 2.0, 200.0, 3.0, 300.0];
        let c = cluster(&values, &[3, 2], 1, Some(1), false, Algorithm::Auto);
        assert_eq!(c.centroids.len(), 4);
        let d = c.decode(&[3, 2]);
        assert!((d[1] - 150.0).abs() <= 50.0 && d[0] < 4.0);
    }
}
