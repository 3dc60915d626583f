//! Canonical Huffman coding (Deep Compression, stage 3) of codebook indices, quantized codes
//! and the relative indices of sparse tensors.
//!
//! A code is described by one length per symbol (0 = unused); codes are assigned canonically
//! (by length, then symbol), so the lengths alone rebuild it. Codes are written most
//! significant bit first. Lengths are capped at [`MAX_CODE_LEN`] by halving the counts and
//! rebuilding, as zlib-style coders do.

use super::method::{params, Applied, Kind, Method, Registration, Working};
use super::CompressError;
use crate::model::Tensor;
use serde_json::{Map, Value};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub const METHOD: Registration = Registration {
    name: "huffman",
    about: "lets model.mpz Huffman-code index streams and sparse gaps (Deep Compression, stage 3)",
    file: "src/compress/huffman.rs",
    parse,
    forms: &[],
};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {}

fn parse(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let _: Params = params(obj, METHOD.name, at)?;
    Ok(Box::new(Huffman))
}

/// The `huffman` step: the archive may entropy-code this tensor's streams.
#[derive(Debug, Clone)]
pub struct Huffman;

impl Method for Huffman {
    fn label(&self) -> String {
        "huffman".into()
    }
    fn kind(&self) -> Kind {
        Kind::Entropy
    }
    fn estimate(&self, _t: &Tensor, _pruned_first: bool) -> Option<u64> {
        None
    }
    fn apply(&self, _t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        w.huffman = true;
        Ok(Applied::Ran)
    }
}

pub const MAX_CODE_LEN: u8 = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HuffmanError {
    #[error("invalid Huffman code lengths")]
    BadLengths,
    #[error("Huffman stream ends early or holds an unused code")]
    BadStream,
}

/// Code lengths of an optimal prefix code for `counts`, capped at [`MAX_CODE_LEN`]. A lone
/// used symbol gets length 1.
pub fn code_lengths(counts: &[u64]) -> Vec<u8> {
    let mut counts = counts.to_vec();
    loop {
        let lengths = unbounded_lengths(&counts);
        if lengths.iter().all(|&l| l <= MAX_CODE_LEN) {
            return lengths;
        }
        counts
            .iter_mut()
            .filter(|c| **c > 0)
            .for_each(|c| *c = (*c).div_ceil(2));
    }
}

fn unbounded_lengths(counts: &[u64]) -> Vec<u8> {
    let mut lengths = vec![0u8; counts.len()];
    let used: Vec<usize> = (0..counts.len()).filter(|&s| counts[s] > 0).collect();
    match used.len() {
        0 => return lengths,
        1 => {
            lengths[used[0]] = 1;
            return lengths;
        }
        _ => {}
    }
    // Nodes: leaves 0..n, then internal nodes; ties broken by node id, so it is deterministic.
    let mut parent: Vec<usize> = vec![usize::MAX; used.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = used
        .iter()
        .enumerate()
        .map(|(i, &s)| Reverse((counts[s], i)))
        .collect();
    while heap.len() > 1 {
        let (Some(Reverse((ca, a))), Some(Reverse((cb, b)))) = (heap.pop(), heap.pop()) else {
            break;
        };
        let id = parent.len();
        parent.push(usize::MAX);
        parent[a] = id;
        parent[b] = id;
        heap.push(Reverse((ca + cb, id)));
    }
    for (i, &s) in used.iter().enumerate() {
        let mut depth = 0u32;
        let mut node = i;
        while parent[node] != usize::MAX {
            node = parent[node];
            depth += 1;
        }
        lengths[s] = depth.min(255) as u8;
    }
    lengths
}

/// Canonical codes for the lengths; checks the Kraft inequality.
fn canonical_codes(lengths: &[u8]) -> Result<Vec<u32>, HuffmanError> {
    if lengths.iter().any(|&l| l > MAX_CODE_LEN) {
        return Err(HuffmanError::BadLengths);
    }
    let mut kraft: u64 = 0;
    for &l in lengths.iter().filter(|&&l| l > 0) {
        kraft += 1u64 << (MAX_CODE_LEN - l);
    }
    if kraft > 1u64 << MAX_CODE_LEN {
        return Err(HuffmanError::BadLengths);
    }
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&s| lengths[s] > 0).collect();
    order.sort_by_key(|&s| (lengths[s], s));
    let mut codes = vec![0u32; lengths.len()];
    let mut code: u32 = 0;
    let mut prev_len = 0u8;
    for (i, &s) in order.iter().enumerate() {
        let l = lengths[s];
        if i > 0 {
            code += 1;
        }
        code <<= l - prev_len;
        prev_len = l;
        codes[s] = code;
    }
    Ok(codes)
}

/// Bits the symbols take under the lengths (every symbol must have a length).
pub fn encoded_bits(counts: &[u64], lengths: &[u8]) -> u64 {
    counts
        .iter()
        .zip(lengths)
        .map(|(&c, &l)| c * u64::from(l))
        .sum()
}

/// Symbol counts over an alphabet of `alphabet` symbols.
pub fn histogram(symbols: &[u32], alphabet: usize) -> Vec<u64> {
    let mut counts = vec![0u64; alphabet];
    for &s in symbols {
        if let Some(c) = counts.get_mut(s as usize) {
            *c += 1;
        }
    }
    counts
}

/// Encodes symbols (each with a nonzero length) into a byte stream, MSB first.
pub fn encode(symbols: &[u32], lengths: &[u8]) -> Result<Vec<u8>, HuffmanError> {
    let codes = canonical_codes(lengths)?;
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut filled = 0u32;
    for &s in symbols {
        let l = u32::from(*lengths.get(s as usize).ok_or(HuffmanError::BadStream)?);
        if l == 0 {
            return Err(HuffmanError::BadStream);
        }
        acc = (acc << l) | u64::from(codes[s as usize]);
        filled += l;
        while filled >= 8 {
            out.push((acc >> (filled - 8)) as u8);
            filled -= 8;
        }
        acc &= (1u64 << filled) - 1;
    }
    if filled > 0 {
        out.push((acc << (8 - filled)) as u8);
    }
    Ok(out)
}

/// Decodes `count` symbols. Fails on bad lengths, a short stream or an unused code, never
/// panics: lengths and counts come from files.
pub fn decode(bytes: &[u8], lengths: &[u8], count: usize) -> Result<Vec<u32>, HuffmanError> {
    canonical_codes(lengths)?;
    let max = usize::from(MAX_CODE_LEN);
    // Per length: how many codes, the first code, and where its symbols start in `sorted`.
    let mut per_len = vec![0u32; max + 1];
    for &l in lengths {
        per_len[usize::from(l)] += 1;
    }
    per_len[0] = 0;
    let mut sorted: Vec<u32> = (0..lengths.len() as u32)
        .filter(|&s| lengths[s as usize] > 0)
        .collect();
    sorted.sort_by_key(|&s| (lengths[s as usize], s));
    let mut first = vec![0u32; max + 2];
    let mut offset = vec![0u32; max + 2];
    let (mut code, mut index) = (0u32, 0u32);
    for l in 1..=max {
        code = (code + per_len[l - 1]) << 1;
        first[l] = code;
        offset[l] = index;
        index += per_len[l];
    }
    // No reservation from `count` beyond what the stream could hold (one bit per symbol).
    let mut out = Vec::with_capacity(count.min(bytes.len().saturating_mul(8)));
    let total_bits = bytes.len() * 8;
    let mut pos = 0usize;
    while out.len() < count {
        let mut c = 0u32;
        let mut found = false;
        for l in 1..=max {
            if pos >= total_bits {
                return Err(HuffmanError::BadStream);
            }
            let bit = (bytes[pos / 8] >> (7 - pos % 8)) & 1;
            pos += 1;
            c = (c << 1) | u32::from(bit);
            let n = per_len[l];
            if n > 0 && c >= first[l] && c - first[l] < n {
                out.push(sorted[(offset[l] + c - first[l]) as usize]);
                found = true;
                break;
            }
        }
        if !found {
            return Err(HuffmanError::BadStream);
        }
    }
    Ok(out)
}

/// The slow, obvious decoder: a map from (length, code) to symbol, one bit at a time.
pub fn decode_reference(
    bytes: &[u8],
    lengths: &[u8],
    count: usize,
) -> Result<Vec<u32>, HuffmanError> {
    let codes = canonical_codes(lengths)?;
    let table: std::collections::HashMap<(u8, u32), u32> = (0..lengths.len())
        .filter(|&s| lengths[s] > 0)
        .map(|s| ((lengths[s], codes[s]), s as u32))
        .collect();
    let mut out = Vec::new();
    let (mut len, mut code, mut pos) = (0u8, 0u32, 0usize);
    while out.len() < count {
        let bit = bytes.get(pos / 8).ok_or(HuffmanError::BadStream)? >> (7 - pos % 8) & 1;
        pos += 1;
        code = (code << 1) | u32::from(bit);
        len += 1;
        if let Some(&s) = table.get(&(len, code)) {
            out.push(s);
            len = 0;
            code = 0;
        } else if len >= MAX_CODE_LEN {
            return Err(HuffmanError::BadStream);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Skewed symbol streams over a small or large alphabet.
    #[derive(Debug, Clone)]
    struct HuffmanProblem {
        alphabet: usize,
        symbols: Vec<u32>,
    }

    fn problem() -> impl Strategy<Value = HuffmanProblem> {
        (1usize..300).prop_flat_map(|alphabet| {
            prop::collection::vec(
                prop_oneof![
                    3 => Just(0u32),
                    1 => 0u32..(alphabet as u32),
                ],
                0..400,
            )
            .prop_map(move |symbols| HuffmanProblem { alphabet, symbols })
        })
    }

    proptest! {
        #[test]
        fn round_trip_matches_reference_and_is_optimal_enough(p in problem()) {
            let counts = histogram(&p.symbols, p.alphabet);
            let lengths = code_lengths(&counts);
            let bytes = encode(&p.symbols, &lengths).unwrap();
            let fast = decode(&bytes, &lengths, p.symbols.len()).unwrap();
            prop_assert_eq!(&fast, &p.symbols);
            prop_assert_eq!(decode_reference(&bytes, &lengths, p.symbols.len()).unwrap(), fast);
            prop_assert_eq!(bytes.len() as u64, encoded_bits(&counts, &lengths).div_ceil(8));
            // A Huffman code is within one bit per symbol of the entropy.
            let n = p.symbols.len() as f64;
            if n > 0.0 {
                let entropy: f64 = counts.iter().filter(|&&c| c > 0)
                    .map(|&c| { let q = c as f64 / n; -q * q.log2() * n }).sum();
                prop_assert!((encoded_bits(&counts, &lengths) as f64) < entropy + n + 1e-9);
            }
        }
    }

    #[test]
    fn hostile_lengths_and_streams_are_errors() {
        assert_eq!(
            decode(&[0xff], &[1, 1, 1], 1),
            Err(HuffmanError::BadLengths)
        );
        assert_eq!(decode(&[0xff], &[30], 1), Err(HuffmanError::BadLengths));
        assert_eq!(decode(&[], &[1, 1], 1), Err(HuffmanError::BadStream));
        // Length 2 for one symbol leaves codes unused.
        assert_eq!(decode(&[0xff], &[2], 1), Err(HuffmanError::BadStream));
        assert!(decode(&[0; 4], &[1, 1], usize::MAX).is_err());
    }

    #[test]
    fn long_codes_are_capped() {
        // Fibonacci counts force a degenerate tree deeper than the cap.
        let mut counts = vec![1u64, 1];
        while counts.len() < 40 {
            let n = counts.len();
            counts.push(counts[n - 1] + counts[n - 2]);
        }
        let lengths = code_lengths(&counts);
        assert!(lengths.iter().all(|&l| (1..=MAX_CODE_LEN).contains(&l)));
        assert!(canonical_codes(&lengths).is_ok());
    }
}
