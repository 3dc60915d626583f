//! Casts to 16-bit floats (round to nearest even, as IEEE and PyTorch do): the `cast` method
//! and its [`Halves`] form.

use super::coding::{self, CodingStats, Payload, Repr, StageBytes};
use super::form::{Encoding, Form, Parts, Stored, Trained};
use super::lower::{Elem, Graph};
use super::method::{params, spec_err, Applied, Decoder, Kind, Method, Registration, Working};
use super::CompressError;
use crate::model::{DType, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::Serialize;
use serde_json::{json, Map, Value};

pub const METHOD: Registration = Registration {
    name: "cast",
    about: "float16 or bfloat16 weights",
    file: "src/compress/cast.rs",
    parse,
    forms: &[Decoder {
        encoding: "cast",
        decode: decode_archive,
    }],
};

/// The archive entry: float16/bfloat16 bit patterns. Section `data` (u16 LE).
#[derive(Serialize, serde::Deserialize)]
struct CastRepr {
    dtype: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    dtype: Option<CastType>,
}

fn parse(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: Params = params(obj, METHOD.name, at)?;
    let dtype = p
        .dtype
        .ok_or_else(|| spec_err(&at("dtype"), "must be \"float16\" or \"bfloat16\""))?;
    Ok(Box::new(Cast { dtype }))
}

/// The `cast` step.
#[derive(Debug, Clone)]
pub struct Cast {
    pub dtype: CastType,
}

impl Method for Cast {
    fn label(&self) -> String {
        format!("cast({})", self.dtype.name())
    }
    fn kind(&self) -> Kind {
        Kind::Encode
    }
    fn estimate(&self, t: &Tensor, _pruned_first: bool) -> Option<u64> {
        Some(t.len() as u64 * 2)
    }
    fn apply(&self, _t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        let bits = cast_bits(&w.values, self.dtype);
        w.values = widen(&bits, self.dtype);
        w.encoding = Some(Encoding::new(Halves {
            dtype: self.dtype,
            bits,
        }));
        Ok(Applied::Ran)
    }
}

/// 16-bit float patterns.
#[derive(Debug, Clone, PartialEq)]
pub struct Halves {
    pub dtype: CastType,
    pub bits: Vec<u16>,
}

impl Form for Halves {
    fn decode(&self, _shape: &[usize]) -> Vec<f32> {
        widen(&self.bits, self.dtype)
    }
    fn trained(&self, _shape: &[usize]) -> Trained {
        Trained::Dense
    }
    fn rezero(&mut self, values: &[f32], _shape: &[usize]) -> Result<(), String> {
        self.bits = cast_bits(values, self.dtype);
        Ok(())
    }
    fn store(&self, t: &Tensor, parts: &mut Parts) -> Stored {
        let dt = match self.dtype {
            CastType::Float16 => DType::F16,
            CastType::Bfloat16 => DType::BF16,
        };
        let data: Vec<u8> = self.bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let bytes = parts.push(t.name.clone(), dt, t.shape.clone(), data);
        Stored {
            bytes,
            axis: None,
            description: json!({"encoding": "cast", "dtype": self.dtype.name(), "shape": t.shape, "original_dtype": t.dtype.name()}),
        }
    }
    fn payload(
        &self,
        _values: &[f32],
        _huffman: bool,
        _pruned: bool,
    ) -> (Payload, Option<CodingStats>, StageBytes) {
        let data: Vec<u8> = self.bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        coding::plain(
            Repr::new(
                "cast",
                &CastRepr {
                    dtype: self.dtype.name().into(),
                },
            ),
            vec![("data".into(), data)],
        )
    }
    fn deploy_refusal(&self, _shape: &[usize], opset: i64) -> Option<String> {
        (self.dtype == CastType::Bfloat16 && opset < 13)
            .then(|| format!("Cast from bfloat16 needs opset 13; the model has {opset}"))
    }
    fn lower(&self, g: &mut dyn Graph, shape: &[usize]) -> String {
        let raw = self.bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let elem = match self.dtype {
            CastType::Float16 => Elem::F16,
            CastType::Bfloat16 => Elem::Bf16,
        };
        let x = g.part(elem, shape, raw);
        g.cast(x, Elem::F32, true);
        "Cast".into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CastType {
    Float16,
    Bfloat16,
}

impl CastType {
    pub fn name(self) -> &'static str {
        match self {
            CastType::Float16 => "float16",
            CastType::Bfloat16 => "bfloat16",
        }
    }
}

/// The 16-bit patterns of `values` in the target type.
pub fn cast_bits(values: &[f32], to: CastType) -> Vec<u16> {
    match to {
        CastType::Float16 => {
            let mut out = vec![f16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            out.iter().map(|v| v.to_bits()).collect()
        }
        CastType::Bfloat16 => {
            let mut out = vec![bf16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            out.iter().map(|v| v.to_bits()).collect()
        }
    }
}

/// The f32 values the 16-bit patterns stand for.
pub fn widen(bits: &[u16], from: CastType) -> Vec<f32> {
    match from {
        CastType::Float16 => bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
        CastType::Bfloat16 => bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect(),
    }
}

/// The slow, obvious version: one element at a time.
pub fn cast_bits_reference(values: &[f32], to: CastType) -> Vec<u16> {
    values
        .iter()
        .map(|&v| match to {
            CastType::Float16 => f16::from_f32(v).to_bits(),
            CastType::Bfloat16 => bf16::from_f32(v).to_bits(),
        })
        .collect()
}

/// A float16 or bfloat16 tensor from its archive entry (`model.mpz`).
fn decode_archive(
    repr: &Repr,
    shape: &[usize],
    section: &coding::Section<'_, '_>,
) -> Result<Vec<f32>, coding::DecodeError> {
    let n = crate::model::element_count(shape).ok_or_else(|| coding::err("shape overflows"))?;
    let p: CastRepr = repr.params()?;
    let t = match p.dtype.as_str() {
        "float16" => CastType::Float16,
        "bfloat16" => CastType::Bfloat16,
        _ => return Err(coding::err("unknown cast dtype")),
    };
    let data = section("data")?;
    if Some(data.len()) != n.checked_mul(2) {
        return Err(coding::err("cast data length differs from the shape"));
    }
    let bits: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Ok(widen(&bits, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct CastProblem {
        values: Vec<f32>,
        to: CastType,
    }

    impl CastProblem {
        fn check(&self) {
            // Exact: the bulk conversion and the scalar one agree bit for bit.
            assert_eq!(
                cast_bits(&self.values, self.to),
                cast_bits_reference(&self.values, self.to)
            );
            // Approximate: relative error within half an ulp of the target type.
            let eps = match self.to {
                CastType::Float16 => 2f32.powi(-11),
                CastType::Bfloat16 => 2f32.powi(-8),
            };
            let back = widen(&cast_bits(&self.values, self.to), self.to);
            for (&v, &b) in self.values.iter().zip(&back) {
                if v.abs() > 1e-4 && v.abs() < 6.0e4 {
                    assert!((v - b).abs() <= v.abs() * eps * 1.0001, "{v} -> {b}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn cast_matches_reference(values in prop::collection::vec(-7.0e4f32..7.0e4, 0..300), bf in any::<bool>()) {
            CastProblem { values, to: if bf { CastType::Bfloat16 } else { CastType::Float16 } }.check();
        }
    }
}
