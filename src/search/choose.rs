//! Choosing per-layer settings from a sensitivity profile: a greedy knapsack that assumes the
//! layers' metric drops add up. The search verifies every choice end to end, so the
//! assumption only has to be good enough to rank; [`reference`] is the exhaustive choice for
//! the property test.

/// One setting measured on one layer alone: bytes saved in `model.onnx` and the metric drop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub saved: i64,
    pub drop: f64,
}

/// `profile[layer][option]`: None where the option did not run on the layer.
pub type Profile = Vec<Vec<Option<Measured>>>;

/// What the choice aims at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aim {
    /// Save the most bytes with a predicted drop ≤ the budget.
    MostSaved { budget: f64 },
    /// Save at least `bytes` with the least predicted drop.
    LeastDrop { bytes: i64 },
}

/// A layer's drop as counted in a sum: a gain (negative drop) is noise, not credit.
fn cost(m: &Measured) -> f64 {
    m.drop.max(0.0)
}

/// The predicted drop and the bytes saved of an assignment.
pub fn predict(profile: &Profile, choice: &[Option<usize>]) -> (f64, i64) {
    let mut drop = 0.0;
    let mut saved = 0;
    for (layer, c) in choice.iter().enumerate() {
        if let Some(m) = c.and_then(|o| profile[layer][o]) {
            drop += cost(&m);
            saved += m.saved;
        }
    }
    (drop, saved)
}

/// Greedy: start with every layer as it is; repeatedly take the move (one layer to another
/// of its options) that saves the most bytes per unit of added drop, while the aim allows.
/// Moves that save nothing are never taken. For a budget, the best single saving alone
/// (grown the same way) is kept when it beats the result: the classic repair of greedy
/// knapsack, where one big saving can beat many efficient small ones.
pub fn choose(profile: &Profile, aim: Aim) -> Vec<Option<usize>> {
    let choice = grow(profile, aim, vec![None; profile.len()]);
    let Aim::MostSaved { budget } = aim else {
        return choice;
    };
    let single = profile
        .iter()
        .enumerate()
        .flat_map(|(l, opts)| opts.iter().enumerate().map(move |(o, m)| (l, o, m)))
        .filter_map(|(l, o, m)| m.filter(|m| cost(m) <= budget).map(|m| (l, o, m.saved)))
        .max_by_key(|(_, _, s)| *s);
    match single {
        Some((l, o, s)) if s > predict(profile, &choice).1 => {
            let mut alone = vec![None; profile.len()];
            alone[l] = Some(o);
            let alone = grow(profile, aim, alone);
            if predict(profile, &alone).1 > predict(profile, &choice).1 {
                alone
            } else {
                choice
            }
        }
        _ => choice,
    }
}

fn grow(profile: &Profile, aim: Aim, mut choice: Vec<Option<usize>>) -> Vec<Option<usize>> {
    const EPS: f64 = 1e-6;
    loop {
        let (drop, saved) = predict(profile, &choice);
        if let Aim::LeastDrop { bytes } = aim {
            if saved >= bytes {
                return choice;
            }
        }
        let mut best: Option<(f64, usize, usize)> = None;
        for (layer, options) in profile.iter().enumerate() {
            let current = choice[layer].and_then(|o| options[o]);
            let (cur_saved, cur_cost) = current.map_or((0, 0.0), |m| (m.saved, cost(&m)));
            for (o, m) in options.iter().enumerate() {
                let Some(m) = m else { continue };
                let gain = m.saved - cur_saved;
                if gain <= 0 {
                    continue;
                }
                let added = cost(m) - cur_cost;
                if let Aim::MostSaved { budget } = aim {
                    if drop + added > budget + 1e-12 {
                        continue;
                    }
                }
                let score = gain as f64 / (added.max(0.0) + EPS);
                if best.is_none_or(|(s, _, _)| score > s) {
                    best = Some((score, layer, o));
                }
            }
        }
        match best {
            Some((_, layer, o)) => choice[layer] = Some(o),
            None => return choice,
        }
    }
}

/// Moves each layer whose setting shares its packed width with no other layer (or that is
/// left as it is, or stored as bytes) to the narrowest setting (then the one that saves the
/// most) among those of a width another layer already uses and no wider than its own, while
/// the predicted drop stays within `budget`. In `model.onnx` the weights of one width share one unpacking
/// subgraph, so a lone width pays for a subgraph of its own: a saving the profile, which
/// measures each layer alone, cannot see. `widths[o]` is option `o`'s packed width, None
/// where it is not packed (int8 is stored as bytes, so counts as 8 bits).
pub fn share(
    profile: &Profile,
    choice: &[Option<usize>],
    widths: &[Option<u8>],
    budget: f64,
) -> Vec<Option<usize>> {
    let width = |c: Option<usize>| c.and_then(|o| widths.get(o).copied().flatten());
    let mut out = choice.to_vec();
    for layer in 0..out.len() {
        let others: Vec<u8> = out
            .iter()
            .enumerate()
            .filter(|&(l, _)| l != layer)
            .filter_map(|(_, &c)| width(c))
            .collect();
        let own = width(out[layer]);
        if own.is_some_and(|w| others.contains(&w)) {
            continue;
        }
        let widest = match (out[layer], own) {
            (None, _) => u8::MAX,
            (Some(_), None) => 8,
            (Some(_), Some(w)) => w,
        };
        let best = profile[layer]
            .iter()
            .enumerate()
            .filter_map(|(o, m)| m.map(|m| (o, m)))
            .filter(|&(o, _)| width(Some(o)).is_some_and(|w| w <= widest && others.contains(&w)))
            .filter(|&(o, _)| {
                let mut moved = out.clone();
                moved[layer] = Some(o);
                predict(profile, &moved).0 <= budget + 1e-12
            })
            // The narrowest width first: once its subgraph is shared, fewer bits are fewer
            // bytes, whatever each setting saved alone (where it paid for its own).
            .min_by_key(|&(o, m)| (width(Some(o)), -m.saved));
        if let Some((o, _)) = best {
            out[layer] = Some(o);
        }
    }
    out
}

/// Every assignment, for small profiles: the most bytes saved within the budget.
pub fn reference(profile: &Profile, budget: f64) -> (f64, i64) {
    fn walk(
        profile: &Profile,
        layer: usize,
        choice: &mut Vec<Option<usize>>,
        budget: f64,
        best: &mut (f64, i64),
    ) {
        if layer == profile.len() {
            let (d, s) = predict(profile, choice);
            if d <= budget + 1e-12 && s > best.1 {
                *best = (d, s);
            }
            return;
        }
        choice.push(None);
        walk(profile, layer + 1, choice, budget, best);
        choice.pop();
        for o in 0..profile[layer].len() {
            if profile[layer][o].is_some() {
                choice.push(Some(o));
                walk(profile, layer + 1, choice, budget, best);
                choice.pop();
            }
        }
    }
    let mut best = (0.0, 0);
    walk(profile, 0, &mut Vec::new(), budget, &mut best);
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn profiles() -> impl Strategy<Value = (Profile, f64)> {
        let m = (0i64..10_000, -0.01f64..0.2).prop_map(|(saved, drop)| Measured { saved, drop });
        let layer = prop::collection::vec(prop::option::weighted(0.8, m), 1..4);
        (prop::collection::vec(layer, 1..5), 0.0f64..0.3)
    }

    #[test]
    fn a_lone_width_joins_a_shared_one_within_the_budget() {
        let m = |saved, drop| Some(Measured { saved, drop });
        // Options: 0 = unpacked (int8), 1 = width 4, 2 = width 3.
        let widths = [None, Some(4), Some(3)];
        let profile: Profile = vec![
            vec![m(100, 0.0), m(150, 0.001), m(160, 0.002)],
            vec![m(100, 0.0), m(150, 0.001), m(160, 0.002)],
            vec![m(10, 0.0), m(-5, 0.0005), m(-8, 0.001)],
        ];
        // Layers 0 and 1 at width 3; layer 2 alone at int8 moves to width 3.
        let choice = [Some(2), Some(2), Some(0)];
        assert_eq!(
            share(&profile, &choice, &widths, 0.01),
            [Some(2), Some(2), Some(2)]
        );
        // Not when the budget has no room for it.
        assert_eq!(share(&profile, &choice, &widths, 0.0045), choice);
        // A layer left as it is joins too; layers that already share stay.
        let choice = [Some(1), Some(1), None];
        assert_eq!(
            share(&profile, &choice, &widths, 0.01),
            [Some(1), Some(1), Some(1)]
        );
        // A lone width never moves to a wider one: layer 1 stays at width 3 beside layer 0
        // at width 4 (whose width 3 costs too much), and layer 2 joins the narrowest.
        let mut costly = profile.clone();
        costly[0][2] = m(160, 0.02);
        let choice = [Some(1), Some(2), None];
        assert_eq!(
            share(&costly, &choice, &widths, 0.01),
            [Some(1), Some(2), Some(2)]
        );
        // With no other packed layer there is nothing to join.
        assert_eq!(
            share(&profile, &[Some(0), Some(0), None], &widths, 1.0),
            [Some(0), Some(0), None]
        );
    }

    proptest! {
        /// The greedy choice stays within the budget, cannot take one more move that fits
        /// and saves bytes, and saves at least half what the exhaustive optimum saves
        /// (named tolerance: GREEDY_FLOOR) on these profiles.
        #[test]
        fn greedy_fits_and_is_close_to_the_optimum((profile, budget) in profiles()) {
            const GREEDY_FLOOR: f64 = 0.5;
            let choice = choose(&profile, Aim::MostSaved { budget });
            let (drop, saved) = predict(&profile, &choice);
            prop_assert!(drop <= budget + 1e-9);
            for (layer, options) in profile.iter().enumerate() {
                let cur = choice[layer].and_then(|x| profile[layer][x]);
                for m in options.iter().flatten() {
                    let gain = m.saved - cur.map_or(0, |c| c.saved);
                    let added = cost(m) - cur.map_or(0.0, |c| cost(&c));
                    prop_assert!(gain <= 0 || drop + added > budget + 1e-12,
                        "a move that fits and saves {gain} B was left on layer {layer}");
                }
            }
            let (_, best) = reference(&profile, budget);
            prop_assert!(saved as f64 >= GREEDY_FLOOR * best as f64 - 1.0,
                "greedy saved {saved}, optimum {best}");
        }

        #[test]
        fn least_drop_reaches_the_bytes_when_it_can((profile, _) in profiles(), frac in 0.0f64..1.0) {
            let all: i64 = profile.iter().map(|l| l.iter().flatten().map(|m| m.saved).max().unwrap_or(0).max(0)).sum();
            let bytes = (all as f64 * frac) as i64;
            let choice = choose(&profile, Aim::LeastDrop { bytes });
            let (_, saved) = predict(&profile, &choice);
            prop_assert!(saved >= bytes, "saved {saved} of {bytes} (at most {all})");
        }
    }
}
