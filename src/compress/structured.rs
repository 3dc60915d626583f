//! Structured pruning (whole output filters or input channels, ranked by L1 or L2 norm) and
//! N:M semi-structured pruning (N kept in every M consecutive weights along the input
//! dimension, as NVIDIA's 2:4 sparse tensor cores want).

use super::method::{Applied, Kind, Method, Working};
use super::quantize::ChannelLayout;
use super::CompressError;
use crate::model::Tensor;
use serde::Serialize;
use serde_json::json;

/// The `prune` step with `structure`: whole output filters or input channels.
#[derive(Debug, Clone)]
pub struct PruneStructured {
    pub ratio: f32,
    pub dim: Dim,
    pub norm: Norm,
}

/// The `prune` step with `pattern`: N kept in every M consecutive inputs.
#[derive(Debug, Clone)]
pub struct PruneNm {
    pub n: usize,
    pub m: usize,
}

impl Method for PruneStructured {
    fn label(&self) -> String {
        format!(
            "prune({},{},{})",
            if self.dim == Dim::Output {
                "output"
            } else {
                "input"
            },
            self.ratio,
            if self.norm == Norm::L1 { "l1" } else { "l2" }
        )
    }
    fn kind(&self) -> Kind {
        Kind::Prune
    }
    fn estimate(&self, _t: &Tensor, _pruned_first: bool) -> Option<u64> {
        None
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        let kept = prune_units(
            &mut w.values,
            &t.shape,
            t.channel_axis(),
            self.dim,
            self.norm,
            self.ratio,
        );
        w.details.insert(
            "structure".into(),
            json!({
                "kind": if self.dim == Dim::Output { "output_channels" } else { "input_channels" },
                "units": kept.units,
                "kept": kept.kept,
            }),
        );
        w.rezero(t, &self.label())?;
        Ok(Applied::Ran)
    }
}

impl Method for PruneNm {
    fn label(&self) -> String {
        format!("prune({}:{})", self.n, self.m)
    }
    fn kind(&self) -> Kind {
        Kind::Prune
    }
    fn estimate(&self, _t: &Tensor, _pruned_first: bool) -> Option<u64> {
        None
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        prune_n_m(&mut w.values, &t.shape, t.channel_axis(), self.n, self.m);
        let view = InputView::new(&t.shape, t.channel_axis());
        w.details.insert(
            "structure".into(),
            json!({
                "kind": format!("{}:{}", self.n, self.m),
                "along": "input",
                "groups_per_line": view.len.div_ceil(self.m),
            }),
        );
        w.rezero(t, &self.label())?;
        Ok(Applied::Ran)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    L1,
    L2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dim {
    /// Output filters/channels (the tensor's output axis).
    Output,
    /// Input channels.
    Input,
}

/// The input dimension of a weight as `outer × len × inner`: input unit `j` of line `o`
/// covers elements `(o·len + j)·inner + i` for every `i < inner`.
/// - output axis 0 (Conv [O,C,kh,kw], Linear [out,in]): axis 1, the kernel window inner;
/// - output axis last (MatMul [in,out], mnist-8's [16,4,4,10] reshaped to [256,10]): every
///   preceding axis, flattened;
/// - otherwise (LSTM [dirs,4H,in]): the axes after the output axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputView {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl InputView {
    pub fn new(shape: &[usize], output_axis: usize) -> InputView {
        let prod = |s: &[usize]| s.iter().product::<usize>();
        let rank = shape.len();
        if rank < 2 {
            return InputView {
                outer: 1,
                len: prod(shape),
                inner: 1,
            };
        }
        if output_axis == 0 {
            InputView {
                outer: shape[0],
                len: shape[1],
                inner: prod(&shape[2..]),
            }
        } else if output_axis == rank - 1 {
            InputView {
                outer: 1,
                len: prod(&shape[..rank - 1]),
                inner: shape[rank - 1],
            }
        } else {
            InputView {
                outer: prod(&shape[..=output_axis]),
                len: prod(&shape[output_axis + 1..]),
                inner: 1,
            }
        }
    }
    #[inline]
    fn index(&self, o: usize, j: usize, i: usize) -> usize {
        (o * self.len + j) * self.inner + i
    }
}

/// What structured pruning kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub units: usize,
    pub kept: usize,
}

/// Norm of each unit (output channel or input unit).
fn unit_norms(values: &[f32], shape: &[usize], axis: usize, dim: Dim, norm: Norm) -> Vec<f64> {
    let f = |v: f32| match norm {
        Norm::L1 => f64::from(v.abs()),
        Norm::L2 => f64::from(v) * f64::from(v),
    };
    match dim {
        Dim::Output => {
            let l = ChannelLayout::new(shape, Some(axis));
            let mut acc = vec![0f64; l.channels.max(1)];
            for (b, block) in values.chunks(l.inner.max(1)).enumerate() {
                acc[b % l.channels.max(1)] += block.iter().map(|&v| f(v)).sum::<f64>();
            }
            acc
        }
        Dim::Input => {
            let v = InputView::new(shape, axis);
            let mut acc = vec![0f64; v.len.max(1)];
            for (b, block) in values.chunks(v.inner.max(1)).enumerate() {
                acc[b % v.len.max(1)] += block.iter().map(|&x| f(x)).sum::<f64>();
            }
            acc
        }
    }
}

/// The `count` units of smallest norm (ties to the lower index).
fn weakest(norms: &[f64], count: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..norms.len()).collect();
    order.sort_by(|&a, &b| norms[a].total_cmp(&norms[b]).then(a.cmp(&b)));
    let mut drop = vec![false; norms.len()];
    order.iter().take(count).for_each(|&u| drop[u] = true);
    drop
}

/// Zeroes `round(ratio · units)` whole units (at most all but one), the weakest by `norm`.
pub fn prune_units(
    values: &mut [f32],
    shape: &[usize],
    axis: usize,
    dim: Dim,
    norm: Norm,
    ratio: f32,
) -> Kept {
    let norms = unit_norms(values, shape, axis, dim, norm);
    let units = norms.len();
    let count = super::prune::prune_count(units, ratio).min(units.saturating_sub(1));
    let drop = weakest(&norms, count);
    match dim {
        Dim::Output => {
            let l = ChannelLayout::new(shape, Some(axis));
            for (b, block) in values.chunks_mut(l.inner.max(1)).enumerate() {
                if drop[b % l.channels.max(1)] {
                    block.fill(0.0);
                }
            }
        }
        Dim::Input => {
            let v = InputView::new(shape, axis);
            for (b, block) in values.chunks_mut(v.inner.max(1)).enumerate() {
                if drop[b % v.len.max(1)] {
                    block.fill(0.0);
                }
            }
        }
    }
    Kept {
        units,
        kept: units - count,
    }
}

/// The slow, obvious version: each element's unit from its multi-index.
pub fn prune_units_reference(
    values: &mut [f32],
    shape: &[usize],
    axis: usize,
    dim: Dim,
    norm: Norm,
    ratio: f32,
) -> Kept {
    let unit_of = |flat: usize| -> usize {
        // Multi-index of `flat` in C order.
        let mut idx = vec![0usize; shape.len()];
        let mut r = flat;
        for d in (0..shape.len()).rev() {
            idx[d] = r % shape[d].max(1);
            r /= shape[d].max(1);
        }
        match dim {
            Dim::Output => idx.get(axis).copied().unwrap_or(0),
            Dim::Input => {
                let rank = shape.len();
                let (from, to) = if rank < 2 {
                    (0, rank)
                } else if axis == 0 {
                    (1, 2)
                } else if axis == rank - 1 {
                    (0, rank - 1)
                } else {
                    (axis + 1, rank)
                };
                (from..to).fold(0, |acc, d| acc * shape[d] + idx[d])
            }
        }
    };
    let units = match dim {
        Dim::Output => shape.get(axis).copied().unwrap_or(1),
        Dim::Input => InputView::new(shape, axis).len,
    };
    let mut norms = vec![0f64; units.max(1)];
    for (i, &v) in values.iter().enumerate() {
        norms[unit_of(i)] += match norm {
            Norm::L1 => f64::from(v.abs()),
            Norm::L2 => f64::from(v) * f64::from(v),
        };
    }
    let count = super::prune::prune_count(units, ratio).min(units.saturating_sub(1));
    let drop = weakest(&norms, count);
    for (i, v) in values.iter_mut().enumerate() {
        if drop[unit_of(i)] {
            *v = 0.0;
        }
    }
    Kept {
        units,
        kept: units - count,
    }
}

/// N:M: in every group of `m` consecutive weights along the input dimension, keep the `n`
/// largest by |w| (ties to the lower position); a short last group keeps min(n, its size).
pub fn prune_n_m(values: &mut [f32], shape: &[usize], axis: usize, n: usize, m: usize) {
    let v = InputView::new(shape, axis);
    let mut group: Vec<(u32, usize)> = Vec::with_capacity(m);
    for o in 0..v.outer {
        for i in 0..v.inner {
            let mut start = 0;
            while start < v.len {
                let end = (start + m).min(v.len);
                group.clear();
                group.extend((start..end).map(|j| {
                    let at = v.index(o, j, i);
                    (values[at].abs().to_bits(), at)
                }));
                // Largest first; among equal magnitudes the lower position wins.
                group.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, at) in group.iter().skip(n) {
                    values[at] = 0.0;
                }
                start = end;
            }
        }
    }
}

/// The slow, obvious version: walk the tensor by multi-index, gather each group by its
/// input coordinate, keep the n largest.
pub fn prune_n_m_reference(values: &mut [f32], shape: &[usize], axis: usize, n: usize, m: usize) {
    let v = InputView::new(shape, axis);
    let mut groups: std::collections::BTreeMap<(usize, usize, usize), Vec<usize>> =
        Default::default();
    for flat in 0..values.len() {
        let i = flat % v.inner.max(1);
        let j = (flat / v.inner.max(1)) % v.len.max(1);
        let o = flat / (v.inner.max(1) * v.len.max(1));
        groups.entry((o, i, j / m)).or_default().push(flat);
    }
    for (_, members) in groups {
        let mut ranked = members.clone();
        ranked.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
        for &at in ranked.iter().skip(n) {
            values[at] = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A random weight with a random shape and output axis.
    #[derive(Debug, Clone)]
    struct StructuredProblem {
        shape: Vec<usize>,
        values: Vec<f32>,
        axis: usize,
        ratio: f32,
        n: usize,
        m: usize,
    }

    fn problem() -> impl Strategy<Value = StructuredProblem> {
        (
            prop::collection::vec(1usize..6, 1..5),
            0usize..4,
            0f32..1.0,
            1usize..8,
        )
            .prop_flat_map(|(shape, axis, ratio, m)| {
                let len: usize = shape.iter().product();
                let axis = axis % shape.len();
                (
                    Just(shape),
                    prop::collection::vec((-8i8..8).prop_map(|x| f32::from(x) * 0.5), len),
                    Just(axis),
                    Just(ratio),
                    1usize..=m,
                    Just(m + 1),
                )
            })
            .prop_map(|(shape, values, axis, ratio, n, m)| StructuredProblem {
                shape,
                values,
                axis,
                ratio,
                n,
                m,
            })
    }

    proptest! {
        #[test]
        fn structured_and_n_m_match_reference(p in problem()) {
            for dim in [Dim::Output, Dim::Input] {
                for norm in [Norm::L1, Norm::L2] {
                    let mut fast = p.values.clone();
                    let mut slow = p.values.clone();
                    let a = prune_units(&mut fast, &p.shape, p.axis, dim, norm, p.ratio);
                    let b = prune_units_reference(&mut slow, &p.shape, p.axis, dim, norm, p.ratio);
                    prop_assert_eq!(a, b);
                    prop_assert_eq!(&fast, &slow);
                }
            }
            let mut fast = p.values.clone();
            let mut slow = p.values.clone();
            prune_n_m(&mut fast, &p.shape, p.axis, p.n, p.m);
            prune_n_m_reference(&mut slow, &p.shape, p.axis, p.n, p.m);
            prop_assert_eq!(&fast, &slow);
        }
    }

    #[test]
    fn two_four_along_conv_input_channels() {
        // Conv [O=1, C=8, 1, 1]: groups are C-contiguous; each keeps its 2 largest.
        let mut w = vec![1.0f32, -4.0, 3.0, 2.0, 0.5, 0.25, -0.75, 0.1];
        prune_n_m(&mut w, &[1, 8, 1, 1], 0, 2, 4);
        assert_eq!(w, vec![0.0, -4.0, 3.0, 0.0, 0.5, 0.0, -0.75, 0.0]);
        // MatMul [in=4, out=2] (output axis 1): groups run down each column.
        let mut w = vec![1.0f32, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0];
        prune_n_m(&mut w, &[4, 2], 1, 2, 4);
        assert_eq!(w, vec![0.0, 8.0, 0.0, 7.0, 3.0, 0.0, 4.0, 0.0]);
    }

    #[test]
    fn filters_keep_the_strongest() {
        let mut w = vec![1.0f32, 1.0, 5.0, 5.0, 0.1, 0.1, 3.0, 3.0];
        let kept = prune_units(&mut w, &[4, 2], 0, Dim::Output, Norm::L2, 0.5);
        assert_eq!(kept, Kept { units: 4, kept: 2 });
        assert_eq!(w, vec![0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 3.0, 3.0]);
    }
}
