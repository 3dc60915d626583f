//! NormalFloat-4 (Dettmers et al., QLoRA 2023): each block of `group_size` consecutive
//! weights (in the tensor's memory order, as QLoRA's blockwise quantization) is scaled by its
//! absolute maximum into [-1, 1] and rounded to the nearest of 16 levels placed at quantiles
//! of a standard normal, so that normally distributed weights use every level about equally
//! often. Level 7 is an exact zero, so a later pruning step stays exact. The scales are kept
//! as float32 (QLoRA's second quantization of the scales is not done).
//!
//! The `nf4` method and its [`Nf4`] form: 4-bit indices plus one scale per block; in
//! `model.onnx` a `Gather` from the 16-level codebook and a `Mul` by the block scales; in
//! `model.mpz` the indices as an index stream (dense or sparse, Huffman when asked). Fine-tuning
//! trains the dense weight through the NF4 rounding (fake quantization); the pipeline encodes
//! the trained weight again.

use super::coding::{self, f32_bytes, CodingStats, Payload, Repr, StageBytes};
use super::form::{Encoding, Form, Parts, Stored, Trained};
use super::lower::{Attr, Elem, Graph};
use super::method::{int_in, params, Applied, Decoder, Kind, Method, Registration, Working};
use super::{pack, CompressError};
use crate::model::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub const METHOD: Registration = Registration {
    name: "nf4",
    about: "NormalFloat-4 codebook with an absmax scale per block of weights (QLoRA)",
    file: "src/compress/nf4.rs",
    parse,
    forms: &[Decoder {
        encoding: "nf4",
        decode: decode_archive,
    }],
};

/// The 16 NF4 levels (QLoRA's table, as bitsandbytes ships it), ascending; index 7 is zero.
pub const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The index of the exact zero.
const ZERO: u8 = 7;

/// QLoRA's block size.
pub const DEFAULT_GROUP_SIZE: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    group_size: Option<u64>,
}

fn parse(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: Params = params(obj, METHOD.name, at)?;
    let group_size = int_in(p.group_size, &at("group_size"), 16, 256)?;
    Ok(Box::new(Nf4Step {
        group_size: group_size.map_or(DEFAULT_GROUP_SIZE, |g| g as usize),
    }))
}

/// The `nf4` step.
#[derive(Debug, Clone)]
pub struct Nf4Step {
    pub group_size: usize,
}

impl Method for Nf4Step {
    fn label(&self) -> String {
        format!("nf4(group {})", self.group_size)
    }
    fn kind(&self) -> Kind {
        Kind::Encode
    }
    fn estimate(&self, t: &Tensor, _pruned_first: bool) -> Option<u64> {
        let n = t.len();
        Some(pack::packed_len(n, 4) as u64 + n.div_ceil(self.group_size) as u64 * 4)
    }
    /// The pipeline has refused non-finite values before any step (`check_finite`).
    fn apply(&self, _t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        let f = encode(&w.values, self.group_size);
        w.values = f.values();
        w.details.insert(
            "nf4".into(),
            json!({"group_size": f.group_size, "blocks": f.scales.len()}),
        );
        w.encoding = Some(Encoding::new(f));
        Ok(Applied::Ran)
    }
}

/// NF4 indices (one per weight, < 16) and one absmax scale per block of `group_size`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    pub group_size: usize,
    pub scales: Vec<f32>,
    pub indices: Vec<u8>,
}

impl Nf4 {
    /// The dense values: `LEVELS[index] · scale of its block`.
    pub fn values(&self) -> Vec<f32> {
        self.indices
            .iter()
            .enumerate()
            .map(|(j, &i)| LEVELS[usize::from(i)] * self.scales[j / self.group_size])
            .collect()
    }
}

/// Midpoints between neighbouring levels, in f64 (exact: each is half the sum of two
/// float32 values of close magnitude).
fn midpoints() -> [f64; 15] {
    let mut m = [0.0; 15];
    for (i, x) in m.iter_mut().enumerate() {
        *x = (f64::from(LEVELS[i]) + f64::from(LEVELS[i + 1])) / 2.0;
    }
    m
}

/// Encodes finite `values`: per block, the absolute maximum as scale and each weight's
/// nearest level (ties to the lower one) by a search among the midpoints.
pub fn encode(values: &[f32], group_size: usize) -> Nf4 {
    let mids = midpoints();
    let mut scales = Vec::with_capacity(values.len().div_ceil(group_size));
    let mut indices = Vec::with_capacity(values.len());
    for block in values.chunks(group_size) {
        let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(absmax);
        for &v in block {
            indices.push(if absmax == 0.0 || v == 0.0 {
                ZERO
            } else {
                let x = f64::from(v / absmax);
                mids.partition_point(|&m| m < x) as u8
            });
        }
    }
    Nf4 {
        group_size,
        scales,
        indices,
    }
}

impl Form for Nf4 {
    fn decode(&self, _shape: &[usize]) -> Vec<f32> {
        self.values()
    }
    fn trained(&self, _shape: &[usize]) -> Trained {
        Trained::Dense
    }
    fn rezero(&mut self, values: &[f32], _shape: &[usize]) -> Result<(), String> {
        for (i, v) in self.indices.iter_mut().zip(values) {
            if *v == 0.0 {
                *i = ZERO;
            }
        }
        Ok(())
    }
    fn store(&self, t: &Tensor, parts: &mut Parts) -> Stored {
        let symbols: Vec<u32> = self.indices.iter().map(|&i| u32::from(i)).collect();
        let packed = pack::pack(&symbols, 4);
        let len = packed.len();
        let mut bytes = parts.push(t.name.clone(), DType::U8, vec![len], packed);
        let (scale, n) = parts.push_f32("scale", vec![self.scales.len()], &self.scales);
        bytes += n;
        Stored {
            bytes,
            axis: None,
            description: json!({
                "encoding": "nf4",
                "shape": t.shape,
                "group_size": self.group_size,
                "levels": LEVELS,
                "scale": scale,
                "original_dtype": t.dtype.name(),
                "decode": "unpack 4-bit indices i (LSB first); w[j] = levels[i[j]] * scale[j // group_size], in the tensor's memory order",
            }),
        }
    }
    fn payload(
        &self,
        values: &[f32],
        huffman: bool,
        pruned: bool,
    ) -> (Payload, Option<CodingStats>, StageBytes) {
        let symbols: Vec<u32> = self.indices.iter().map(|&i| u32::from(i)).collect();
        let tables = vec![("scales".to_string(), f32_bytes(&self.scales))];
        coding::index_stream(
            &symbols,
            16,
            Some(u32::from(ZERO)),
            tables,
            values,
            huffman,
            pruned,
            |stream| {
                Repr::new(
                    "nf4",
                    &Nf4Repr {
                        group_size: self.group_size,
                        stream,
                    },
                )
            },
        )
    }
    /// `Gather` from the 16 levels by the unpacked indices viewed as [blocks, group_size]
    /// (the last block padded with the zero level), `Mul` by the block scales [blocks, 1],
    /// then cut back to the weight's elements and shape.
    fn lower(&self, g: &mut dyn Graph, shape: &[usize]) -> String {
        let n = self.indices.len();
        let (blocks, size) = (self.scales.len(), self.group_size);
        let mut symbols: Vec<u32> = self.indices.iter().map(|&i| u32::from(i)).collect();
        symbols.resize(blocks * size, u32::from(ZERO));
        let x = g.unpack(&symbols, 4, 0.0);
        let x = g.reshape(x, &[blocks, size], false);
        let idx = g.cast(x, Elem::I64, false);
        let book = g.floats(&[LEVELS.len()], &LEVELS);
        let v = g.op("Gather", vec![book, idx], vec![Attr::Int("axis", 0)], false);
        let scales = g.floats(&[blocks, 1], &self.scales);
        let mut v = g.binary("Mul", v, scales, false);
        if blocks * size > n {
            v = g.reshape(v, &[blocks * size], false);
            v = g.slice(v, 0, 0, n);
        }
        g.reshape(v, shape, true);
        format!("unpack(uint4)+Gather(nf4)+Mul(group {size})")
    }
}

/// The archive entry: indices as an index stream over 16 symbols (7 is zero). Sections: the
/// stream's, `scales` (f32, one per block).
#[derive(Serialize, Deserialize)]
struct Nf4Repr {
    group_size: usize,
    stream: coding::Stream,
}

fn decode_archive(
    repr: &Repr,
    shape: &[usize],
    section: &coding::Section<'_, '_>,
) -> Result<Vec<f32>, coding::DecodeError> {
    let err = coding::err;
    let p: Nf4Repr = repr.params()?;
    let n = crate::model::element_count(shape).ok_or_else(|| err("shape overflows"))?;
    if p.group_size == 0 || p.stream.alphabet != 16 {
        return Err(err("nf4 parameters out of range"));
    }
    let symbols = coding::read_stream(&p.stream, n, section)?;
    let scales = coding::f32_section(section("scales")?, n.div_ceil(p.group_size), "scales")?;
    let f = Nf4 {
        group_size: p.group_size,
        scales,
        indices: symbols.iter().map(|&s| s as u8).collect(),
    };
    Ok(f.values())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The obvious encoder: every level tried, the nearest kept (ties to the lower index).
    fn encode_reference(values: &[f32], group_size: usize) -> Nf4 {
        let mut scales = Vec::new();
        let mut indices = Vec::new();
        for block in values.chunks(group_size) {
            let absmax = block.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            scales.push(absmax);
            for &v in block {
                let x = if absmax == 0.0 {
                    0.0
                } else {
                    f64::from(v / absmax)
                };
                let mut best = 0;
                for (i, &l) in LEVELS.iter().enumerate() {
                    if (x - f64::from(l)).abs() < (x - f64::from(LEVELS[best])).abs() {
                        best = i;
                    }
                }
                indices.push(best as u8);
            }
        }
        Nf4 {
            group_size,
            scales,
            indices,
        }
    }

    /// Weights (normal-ish, with exact zeros and outliers) and a block size.
    #[derive(Debug, Clone)]
    struct Nf4Problem {
        values: Vec<f32>,
        group_size: usize,
    }

    fn problem() -> impl Strategy<Value = Nf4Problem> {
        (
            prop::collection::vec(
                prop_oneof![6 => -1.0f32..1.0, 1 => Just(0.0f32), 1 => -40.0f32..40.0],
                0..300,
            ),
            2usize..80,
        )
            .prop_map(|(values, group_size)| Nf4Problem { values, group_size })
    }

    /// Named tolerance: the fast encoder picks the reference's level, or one exactly as near
    /// (a tie the two break differently can only come from a value on a midpoint).
    const TIE: f64 = 1e-12;

    proptest! {
        #[test]
        fn fast_encoder_matches_the_reference(p in problem()) {
            let fast = encode(&p.values, p.group_size);
            let slow = encode_reference(&p.values, p.group_size);
            prop_assert_eq!(&fast.scales, &slow.scales);
            for (j, (&a, &b)) in fast.indices.iter().zip(&slow.indices).enumerate() {
                if a != b {
                    let s = fast.scales[j / p.group_size];
                    let x = f64::from(p.values[j] / s);
                    let (da, db) = ((x - f64::from(LEVELS[usize::from(a)])).abs(), (x - f64::from(LEVELS[usize::from(b)])).abs());
                    prop_assert!((da - db).abs() <= TIE, "value {} index {} vs {}", p.values[j], a, b);
                }
            }
            // Every block's extreme is represented exactly, and a zero stays zero.
            let decoded = fast.values();
            for (v, d) in p.values.iter().zip(&decoded) {
                if *v == 0.0 {
                    prop_assert_eq!(*d, 0.0);
                }
            }
            for (b, block) in p.values.chunks(p.group_size).enumerate() {
                let m = block.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
                let j = block.iter().position(|v| v.abs() == m).unwrap() + b * p.group_size;
                prop_assert_eq!(decoded[j].abs(), m);
            }
        }

        #[test]
        fn archive_payload_decodes_to_the_values(p in problem()) {
            let f = encode(&p.values, p.group_size);
            let values = f.values();
            for huffman in [false, true] {
                let (payload, _, _) = f.payload(&values, huffman, false);
                let section = |name: &str| -> Result<&[u8], coding::DecodeError> {
                    payload.sections.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice()).ok_or_else(|| coding::err("missing"))
                };
                let back = decode_archive(&payload.repr, &[values.len()], &section).unwrap();
                prop_assert_eq!(back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn the_levels_are_ascending_with_zero_at_seven() {
        assert!(LEVELS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LEVELS[usize::from(ZERO)], 0.0);
        assert_eq!((LEVELS[0], LEVELS[15]), (-1.0, 1.0));
    }

    #[test]
    fn pruning_after_nf4_decodes_exact_zeros() {
        let values = [0.3f32, -0.7, 0.05, 0.9, -0.2];
        let mut f = encode(&values, 4);
        let mut pruned = f.values();
        pruned[1] = 0.0;
        pruned[3] = 0.0;
        f.rezero(&pruned, &[5]).unwrap();
        assert_eq!(f.values(), pruned);
    }
}
