//! Unstructured magnitude pruning: exactly `round(sparsity · n)` weights become zero, the
//! smallest by |w|, ties broken by position (lower index first), so the count is exact.
//!
//! The `prune` method: per tensor, global, or global with per-layer sparsities from a
//! sensitivity pass. Its `structure` and `pattern` forms are in `structured.rs`.

use super::method::{fraction, params, spec_err, Applied, Kind, Method, Registration, Working};
use super::quantize::ChannelLayout;
use super::structured::{Dim, Norm, PruneNm, PruneStructured};
use super::CompressError;
use crate::model::Tensor;
use serde_json::{json, Map, Value};

pub const METHOD: Registration = Registration {
    name: "prune",
    about: "magnitude pruning: per tensor, global or sensitivity-driven; whole channels \
            (structure); N:M (pattern)",
    file: "src/compress/prune.rs, src/compress/structured.rs",
    parse,
    forms: &[],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneScope {
    Tensor,
    Global,
    /// Global target, per-layer sparsities from a weight-error sensitivity pass.
    Sensitivity,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    sparsity: Option<f64>,
    scope: Option<PruneScope>,
    min_keep: Option<f64>,
    structure: Option<Dim>,
    ratio: Option<f64>,
    norm: Option<Norm>,
    pattern: Option<String>,
}

fn parse(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: Params = params(obj, METHOD.name, at)?;
    let given = |k: &str| obj.contains_key(k);
    if let Some(pattern) = &p.pattern {
        for k in [
            "sparsity",
            "scope",
            "min_keep",
            "structure",
            "ratio",
            "norm",
        ] {
            if given(k) {
                return Err(spec_err(&at(k), "does not go with pattern"));
            }
        }
        let parsed = pattern
            .split_once(':')
            .and_then(|(n, m)| Some((n.parse::<usize>().ok()?, m.parse::<usize>().ok()?)))
            .filter(|&(n, m)| n >= 1 && n < m && m <= 64);
        let Some((n, m)) = parsed else {
            return Err(spec_err(
                &at("pattern"),
                "must be \"N:M\" with 1 ≤ N < M ≤ 64, e.g. \"2:4\"",
            ));
        };
        return Ok(Box::new(PruneNm { n, m }));
    }
    if let Some(dim) = p.structure {
        for k in ["sparsity", "scope", "min_keep"] {
            if given(k) {
                return Err(spec_err(&at(k), "does not go with structure (use ratio)"));
            }
        }
        let ratio = fraction(p.ratio, &at("ratio"), false)?
            .ok_or_else(|| spec_err(&at("ratio"), "is required with structure"))?;
        return Ok(Box::new(PruneStructured {
            ratio: ratio as f32,
            dim,
            norm: p.norm.unwrap_or(Norm::L1),
        }));
    }
    for k in ["ratio", "norm"] {
        if given(k) {
            return Err(spec_err(&at(k), "goes with structure"));
        }
    }
    let sparsity = fraction(p.sparsity, &at("sparsity"), false)?
        .ok_or_else(|| spec_err(&at("sparsity"), "is required"))?;
    let scope = p.scope.unwrap_or(PruneScope::Tensor);
    let min_keep = fraction(p.min_keep, &at("min_keep"), true)?;
    if scope == PruneScope::Tensor && min_keep.is_some() {
        return Err(spec_err(
            &at("min_keep"),
            "applies to global and sensitivity scopes",
        ));
    }
    Ok(Box::new(Prune {
        sparsity: sparsity as f32,
        scope,
        min_keep: min_keep.unwrap_or(0.01) as f32,
    }))
}

/// The unstructured `prune` step.
#[derive(Debug, Clone)]
pub struct Prune {
    pub sparsity: f32,
    pub scope: PruneScope,
    /// Fraction of each tensor always kept (global and sensitivity scopes).
    pub min_keep: f32,
}

impl Method for Prune {
    fn label(&self) -> String {
        let (s, k) = (self.sparsity, self.min_keep);
        match self.scope {
            PruneScope::Tensor => format!("prune({s},tensor)"),
            PruneScope::Global => format!("prune({s},global,min_keep={k})"),
            PruneScope::Sensitivity => format!("prune({s},sensitivity,min_keep={k})"),
        }
    }
    fn kind(&self) -> Kind {
        Kind::Prune
    }
    fn estimate(&self, _t: &Tensor, _pruned_first: bool) -> Option<u64> {
        None
    }
    fn apply_jointly(
        &self,
        tensors: &[&Tensor],
        work: &mut [&mut Working],
    ) -> Result<(), CompressError> {
        if self.scope == PruneScope::Tensor {
            return Ok(());
        }
        if self.scope == PruneScope::Global {
            let total: usize = work.iter().map(|w| w.values.len()).sum();
            let mut views: Vec<&mut [f32]> =
                work.iter_mut().map(|w| w.values.as_mut_slice()).collect();
            prune_global_floor(&mut views, prune_count(total, self.sparsity), self.min_keep);
            return Ok(());
        }
        // The sensitivity pass works per output channel: a channel of small weights
        // (silero's encoder.3 spans 0.09 to 54.9) carries little of its tensor's energy, and
        // a per-tensor error budget would wipe it out.
        let layouts: Vec<ChannelLayout> = tensors
            .iter()
            .map(|t| ChannelLayout::new(&t.shape, Some(t.channel_axis())))
            .collect();
        let counts = {
            let channels: Vec<Vec<Vec<f32>>> = work
                .iter()
                .zip(&layouts)
                .map(|(w, l)| gather_channels(&w.values, l))
                .collect();
            let views: Vec<&[f32]> = channels
                .iter()
                .flat_map(|c| c.iter().map(Vec::as_slice))
                .collect();
            sensitivity_counts(&views, self.sparsity, self.min_keep)
        };
        let mut next = counts.iter();
        for (w, l) in work.iter_mut().zip(&layouts) {
            let per_channel: Vec<usize> = next.by_ref().take(l.channels.max(1)).copied().collect();
            prune_channels(&mut w.values, l, &per_channel);
            let removed: usize = per_channel.iter().sum();
            let fraction = removed as f64 / w.values.len().max(1) as f64;
            w.details
                .insert("sensitivity_sparsity".into(), json!(fraction));
        }
        Ok(())
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        if self.scope == PruneScope::Tensor {
            let k = prune_count(w.values.len(), self.sparsity);
            prune_smallest(&mut [w.values.as_mut_slice()], k);
        }
        // Global scopes pruned every tensor in apply_jointly.
        w.rezero(t, &self.label())?;
        Ok(Applied::Ran)
    }
}

/// Sort key: |w| bits (ordered like |w| for finite floats) then position.
#[inline(always)]
fn key(v: f32, index: usize) -> u64 {
    (u64::from(v.abs().to_bits()) << 32) | index as u64
}

/// How many of `n` weights a sparsity removes.
pub fn prune_count(n: usize, sparsity: f32) -> usize {
    ((f64::from(sparsity) * n as f64).round() as usize).min(n)
}

/// Zeroes the `count` smallest-magnitude entries across `tensors` (one tensor for per-tensor
/// scope, all selected tensors for global scope). Values must be finite.
///
/// Linear-time selection: a full sort of 16 M floats took ~20× longer than
/// `select_nth_unstable` in the benchmark of `benches/`.
pub fn prune_smallest(tensors: &mut [&mut [f32]], count: usize) {
    let total: usize = tensors.iter().map(|t| t.len()).sum();
    if count == 0 || total == 0 {
        return;
    }
    if count >= total {
        tensors.iter_mut().for_each(|t| t.fill(0.0));
        return;
    }
    if total > u32::MAX as usize {
        // Positions no longer fit the packed key: fall back to the obvious version.
        prune_smallest_reference(tensors, count);
        return;
    }
    let mut keys = Vec::with_capacity(total);
    let mut base = 0usize;
    for t in tensors.iter() {
        keys.extend(t.iter().enumerate().map(|(i, &v)| key(v, base + i)));
        base += t.len();
    }
    let (_, pivot, _) = keys.select_nth_unstable(count);
    let pivot = *pivot;
    drop(keys);
    let mut base = 0usize;
    for t in tensors.iter_mut() {
        for (i, v) in t.iter_mut().enumerate() {
            // Branchless select; an `if` here was ~30× slower (../shared/STACK.md).
            let keep = key(*v, base + i) >= pivot;
            *v = if keep { *v } else { 0.0 };
        }
        base += t.len();
    }
}

/// The slow, obvious version: sort every position by (|w|, position), zero the first `count`.
pub fn prune_smallest_reference(tensors: &mut [&mut [f32]], count: usize) {
    let mut all: Vec<(f32, usize, usize)> = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        for (i, &v) in t.iter().enumerate() {
            all.push((v.abs(), ti, i));
        }
    }
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    for &(_, ti, i) in all.iter().take(count) {
        tensors[ti][i] = 0.0;
    }
}

/// How many weights each tensor keeps at least under a floor of `min_keep` (a fraction):
/// one weight at least, so that no layer is emptied.
pub fn floor_count(n: usize, min_keep: f32) -> usize {
    if n == 0 {
        return 0;
    }
    ((f64::from(min_keep) * n as f64).ceil() as usize).clamp(1, n)
}

/// Global magnitude pruning with a per-tensor floor: each tensor's `floor_count` largest
/// weights are protected, then the `count` smallest of all unprotected weights become zero
/// (all of them when fewer remain). Optimal for "remove `count` weights, keep the floor":
/// any other choice removes a larger magnitude. Ties by position, as [`prune_smallest`].
pub fn prune_global_floor(tensors: &mut [&mut [f32]], count: usize, min_keep: f32) {
    let mut keys: Vec<u64> = Vec::new();
    let mut base = 0usize;
    let mut protected_from: Vec<u64> = Vec::with_capacity(tensors.len());
    for t in tensors.iter() {
        let keep = floor_count(t.len(), min_keep);
        let mut own: Vec<u64> = t.iter().enumerate().map(|(i, &v)| key(v, i)).collect();
        let cut = if keep == 0 || own.is_empty() {
            u64::MAX
        } else {
            let at = own.len() - keep;
            *own.select_nth_unstable(at).1
        };
        protected_from.push(cut);
        keys.extend(
            t.iter()
                .enumerate()
                .filter(|(i, &v)| key(v, *i) < cut)
                .map(|(i, &v)| (u64::from(v.abs().to_bits()) << 32) | (base + i) as u64),
        );
        base += t.len();
    }
    let pivot = if count >= keys.len() {
        u64::MAX
    } else {
        *keys.select_nth_unstable(count).1
    };
    drop(keys);
    let mut base = 0usize;
    for (t, &cut) in tensors.iter_mut().zip(&protected_from) {
        for (i, v) in t.iter_mut().enumerate() {
            let own = key(*v, i);
            let global = (u64::from(v.abs().to_bits()) << 32) | (base + i) as u64;
            if own < cut && global < pivot {
                *v = 0.0;
            }
        }
        base += t.len();
    }
}

/// The slow, obvious version: sort each tensor to find its protected weights, then sort every
/// unprotected weight and zero the first `count`.
pub fn prune_global_floor_reference(tensors: &mut [&mut [f32]], count: usize, min_keep: f32) {
    let mut candidates: Vec<(f32, usize, usize)> = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        let keep = floor_count(t.len(), min_keep);
        let mut order: Vec<usize> = (0..t.len()).collect();
        // Descending by (|w|, position): the first `keep` are protected.
        order.sort_by(|&a, &b| t[b].abs().total_cmp(&t[a].abs()).then(b.cmp(&a)));
        for &i in order.iter().skip(keep) {
            candidates.push((t[i].abs(), ti, i));
        }
    }
    let offsets: Vec<usize> = tensors
        .iter()
        .scan(0, |acc, t| {
            let o = *acc;
            *acc += t.len();
            Some(o)
        })
        .collect();
    candidates.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then((offsets[a.1] + a.2).cmp(&(offsets[b.1] + b.2)))
    });
    for &(_, ti, i) in candidates.iter().take(count) {
        tensors[ti][i] = 0.0;
    }
}

/// Per-tensor sparsities from a weight-error sensitivity pass: one relative-L2 error budget
/// `e` for every tensor, each pruned as far as its error stays within `e` (and its floor),
/// with `e` found by bisection so that the total reaches `target` of all weights. Layers whose
/// small weights carry little energy are pruned harder, as Deep Compression's sensitivity
/// analysis does, without retraining.
pub fn sensitivity_counts(tensors: &[&[f32]], target: f32, min_keep: f32) -> Vec<usize> {
    let total: usize = tensors.iter().map(|t| t.len()).sum();
    let want = prune_count(total, target);
    // Prefix energy of the squared magnitudes in ascending order, relative to the tensor's.
    let prefixes: Vec<Vec<f64>> = tensors
        .iter()
        .map(|t| {
            let mut sq: Vec<f64> = t.iter().map(|&v| f64::from(v) * f64::from(v)).collect();
            sq.sort_by(f64::total_cmp);
            let energy: f64 = sq.iter().sum();
            let mut acc = 0.0;
            let mut p = Vec::with_capacity(sq.len() + 1);
            p.push(0.0);
            for s in sq {
                acc += s;
                p.push(if energy > 0.0 { acc / energy } else { 0.0 });
            }
            p
        })
        .collect();
    let counts_at = |e2: f64| -> Vec<usize> {
        prefixes
            .iter()
            .zip(tensors)
            .map(|(p, t)| {
                let cap = t.len() - floor_count(t.len(), min_keep);
                (p.partition_point(|&x| x <= e2).saturating_sub(1)).min(cap)
            })
            .collect()
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..64 {
        let mid = (lo + hi) / 2.0;
        if counts_at(mid).iter().sum::<usize>() >= want {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    counts_at(hi)
}

/// Each channel's values (channel = index along the layout's channel axis), in flat order.
pub fn gather_channels(values: &[f32], layout: &ChannelLayout) -> Vec<Vec<f32>> {
    let ch = layout.channels.max(1);
    let mut out: Vec<Vec<f32>> = (0..ch)
        .map(|_| Vec::with_capacity(values.len() / ch))
        .collect();
    for (b, block) in values.chunks(layout.inner.max(1)).enumerate() {
        out[b % ch].extend_from_slice(block);
    }
    out
}

/// Zeroes the `counts[c]` smallest-magnitude weights of each channel c (ties by position
/// within the channel, as [`prune_smallest`]).
pub fn prune_channels(values: &mut [f32], layout: &ChannelLayout, counts: &[usize]) {
    let ch = layout.channels.max(1);
    let inner = layout.inner.max(1);
    let mut channels = gather_channels(values, layout);
    for (c, k) in channels.iter_mut().zip(counts) {
        prune_smallest(&mut [c.as_mut_slice()], *k);
    }
    let mut cursor = vec![0usize; ch];
    for (b, block) in values.chunks_mut(inner).enumerate() {
        let c = b % ch;
        let at = cursor[c];
        block.copy_from_slice(&channels[c][at..at + block.len()]);
        cursor[c] += block.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Several tensors with many ties (values drawn from a small set) and a sparsity.
    #[derive(Debug, Clone)]
    struct PruneProblem {
        tensors: Vec<Vec<f32>>,
        sparsity: f32,
    }

    fn problem() -> impl Strategy<Value = PruneProblem> {
        (
            prop::collection::vec(prop::collection::vec(-4i8..=4, 0..40), 1..4),
            0f32..=1.0,
        )
            .prop_map(|(t, sparsity)| PruneProblem {
                tensors: t
                    .into_iter()
                    .map(|v| v.into_iter().map(|x| f32::from(x) * 0.25).collect())
                    .collect(),
                sparsity,
            })
    }

    impl PruneProblem {
        fn check(&self) {
            let total: usize = self.tensors.iter().map(Vec::len).sum();
            let count = prune_count(total, self.sparsity);
            let mut fast = self.tensors.clone();
            let mut slow = self.tensors.clone();
            prune_smallest(
                &mut fast
                    .iter_mut()
                    .map(|v| v.as_mut_slice())
                    .collect::<Vec<_>>(),
                count,
            );
            prune_smallest_reference(
                &mut slow
                    .iter_mut()
                    .map(|v| v.as_mut_slice())
                    .collect::<Vec<_>>(),
                count,
            );
            // Exact: the same positions are zeroed, bit for bit.
            let bits =
                |t: &Vec<Vec<f32>>| t.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow));
        }
    }

    proptest! {
        #[test]
        fn prune_matches_reference(p in problem()) {
            p.check();
        }
    }

    /// Global pruning with a floor: tensors of very different scales.
    #[derive(Debug, Clone)]
    struct FloorProblem {
        tensors: Vec<Vec<f32>>,
        sparsity: f32,
        min_keep: f32,
    }

    fn floor_problem() -> impl Strategy<Value = FloorProblem> {
        (
            prop::collection::vec((prop::collection::vec(-4i8..=4, 0..40), 0u8..3), 1..4),
            0f32..=1.0,
            0f32..0.5,
        )
            .prop_map(|(t, sparsity, min_keep)| FloorProblem {
                tensors: t
                    .into_iter()
                    .map(|(v, scale)| {
                        v.into_iter()
                            .map(|x| f32::from(x) * 0.25 * 10f32.powi(i32::from(scale)))
                            .collect()
                    })
                    .collect(),
                sparsity,
                min_keep,
            })
    }

    proptest! {
        #[test]
        fn global_floor_matches_reference(p in floor_problem()) {
            let total: usize = p.tensors.iter().map(Vec::len).sum();
            let count = prune_count(total, p.sparsity);
            let mut fast = p.tensors.clone();
            let mut slow = p.tensors.clone();
            prune_global_floor(&mut fast.iter_mut().map(|v| v.as_mut_slice()).collect::<Vec<_>>(), count, p.min_keep);
            prune_global_floor_reference(&mut slow.iter_mut().map(|v| v.as_mut_slice()).collect::<Vec<_>>(), count, p.min_keep);
            let bits = |t: &Vec<Vec<f32>>| t.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&fast), bits(&slow));
            for (orig, t) in p.tensors.iter().zip(&fast) {
                // The floor: at least floor_count nonzero-or-protected entries survive.
                let kept = t.iter().zip(orig).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                prop_assert!(kept >= floor_count(t.len(), p.min_keep));
            }
        }
    }

    #[test]
    fn sensitivity_spares_the_fragile_layer() {
        // A layer whose weights are all alike (pruning hurts) and a heavy-tailed one.
        let flat: Vec<f32> = (0..1000).map(|i| 1.0 + (i % 7) as f32 * 0.01).collect();
        let tailed: Vec<f32> = (0..1000)
            .map(|i| {
                if i % 10 == 0 {
                    5.0
                } else {
                    0.01 * (i % 13) as f32
                }
            })
            .collect();
        let counts = sensitivity_counts(&[&flat, &tailed], 0.5, 0.01);
        assert!(counts[1] > counts[0], "{counts:?}");
        assert!(counts.iter().sum::<usize>() >= 1000);
        assert!(counts[1] <= 990);
    }

    #[test]
    fn channel_pruning_counts_are_per_channel() {
        // [in=3, out=2] MatMul layout: channels are columns.
        let mut w = vec![1.0f32, -9.0, 2.0, 8.0, 3.0, -7.0];
        let l = ChannelLayout::new(&[3, 2], Some(1));
        prune_channels(&mut w, &l, &[2, 1]);
        assert_eq!(w, vec![0.0, -9.0, 0.0, 8.0, 3.0, 0.0]);
    }

    #[test]
    fn exact_fraction_with_ties() {
        // 1000 weights, all equal magnitude: the count must still be exact.
        let mut w = vec![0.5f32; 1000];
        w.iter_mut().step_by(2).for_each(|v| *v = -0.5);
        prune_smallest(&mut [w.as_mut_slice()], prune_count(1000, 0.3));
        assert_eq!(w.iter().filter(|v| **v == 0.0).count(), 300);
        // Ties go to the lower positions.
        assert!(w[..300].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn exact_fraction_random() {
        let mut w: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 1013) as f32 - 506.5)
            .collect();
        let k = prune_count(w.len(), 0.5);
        prune_smallest(&mut [w.as_mut_slice()], k);
        assert_eq!(w.iter().filter(|v| **v == 0.0).count(), k);
    }
}
