//! Unstructured magnitude pruning: exactly `round(sparsity · n)` weights become zero, the
//! smallest by |w|, ties broken by position (lower index first), so the count is exact.

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
